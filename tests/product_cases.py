"""Topologies and operands shared by test_sdd.py, test_dsd.py and test_dds.py.

Each case names what it is for. Shapes stay small: the "triton" path runs in Triton's
interpreter on CPU machines. Dense widths (K of SDD, N of DSD/DDS) are deliberately not
multiples of the interpreter's 32-wide tiles so the kernels' masks are exercised; blocks of
64 and 128 are split into tiles, blocks of 16 and 32 are one tile.
"""

from __future__ import annotations

import math

import pytest
import torch

import blocksparse_moe as bm
from blocksparse_moe import reference

Topology, make_topology = bm.Topology, bm.make_topology


def moe_topology(tokens_per_expert, ffn_hidden_size: int, block_size: int) -> Topology:
    """The ``P x (E*F)`` topology routing would build for these expert group sizes."""
    t = torch.tensor(tokens_per_expert, dtype=torch.int64)
    padded = (t + block_size - 1) // block_size * block_size
    return make_topology(torch.cumsum(padded, 0), len(tokens_per_expert), ffn_hidden_size, block_size)


def arbitrary_topology() -> Topology:
    """A pattern routing never makes: rows with gaps, an empty block row, an empty block column."""
    rows = torch.tensor([0, 0, 0, 1, 3, 3, 3])
    cols = torch.tensor([4, 0, 2, 1, 0, 1, 4])  # block column 3 and block row 2 stay empty
    return Topology.from_block_coo(rows, cols, (64, 80), 16)


ARBITRARY_BLOCKS = [(0, 0), (0, 2), (0, 4), (1, 1), (3, 0), (3, 1), (3, 4)]  # arbitrary_topology's, row-major


def _padded_bins(tokens_per_expert, block_size: int) -> list:
    bins, total = [], 0
    for t in tokens_per_expert:
        total += -(-t // block_size) * block_size
        bins.append(total)
    return bins


def moe_reference_topology(tokens_per_expert, ffn_hidden_size: int, block_size: int) -> dict:
    """:func:`moe_topology`'s pattern from ``reference.topology_reference`` (never from the
    package's make_topology): what the products' expectations are built on."""
    return reference.topology_reference(_padded_bins(tokens_per_expert, block_size), len(tokens_per_expert),
                                        ffn_hidden_size, block_size)


def arbitrary_reference_topology() -> dict:
    out = reference.block_topology_reference(ARBITRARY_BLOCKS, 4, 5)
    out.update(shape=(64, 80), block_size=16)
    return out


def _topology(spec) -> Topology:
    if spec == "coo":
        return arbitrary_topology()
    return moe_topology(*spec)


def reference_topology(case_id: str) -> dict:
    """The case's pattern from the reference (``row_indices``, ``column_indices``, ``shape``,
    ``block_size`` and the transposed fields), for the products' references."""
    spec = _SPECS[case_id]
    return arbitrary_reference_topology() if spec == "coo" else moe_reference_topology(*spec)


# (tokens per expert, F, block size) or "coo".
_SPECS = {
    "moe-ragged-empty-expert-b16": ([5, 0, 20], 32, 16),
    "one-block-row-b32": ([3], 64, 32),
    "all-tokens-one-expert-b16": ([0, 0, 37, 0], 16, 16),
    "moe-b64": ([40, 70], 64, 64),
    "moe-b128-tiny": ([100, 1], 128, 128),
    "no-tokens-b16": ([0, 0], 32, 16),
    "coo-arbitrary-b16": "coo",
}
CASE_IDS = list(_SPECS)
# The cases the dtype sweep runs (the others run in fp32 and bf16 only, to keep time down).
DTYPE_SWEEP_IDS = ["moe-ragged-empty-expert-b16", "coo-arbitrary-b16"]

_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def case_params():
    """``(case id, dtype)`` params: every case in fp32 and bf16, the sweep cases in fp16 too."""
    out = []
    for cid in CASE_IDS:
        dts = (torch.float32, torch.float16, torch.bfloat16) if cid in DTYPE_SWEEP_IDS else (
            torch.float32, torch.bfloat16)
        for dt in dts:
            out.append(pytest.param(cid, dt, id=f"{cid}-{_SHORT[dt]}"))
    return out


def topology(case_id: str, device) -> Topology:
    return _topology(_SPECS[case_id]).to(device)


def randn(shape, dtype, device, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Unit-variance (times ``scale``) values, generated in fp64 on CPU so every path sees the same."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def sparse_scale(topo: Topology, transposed: bool) -> float:
    """1/sqrt(longest reduction) for random block data, so products are O(1)."""
    counts = torch.diff((topo.offsets_t if transposed else topo.offsets).long())
    longest = int(counts.max()) if counts.numel() else 0
    return 1.0 / math.sqrt(max(1, longest * topo.block_size))


def dense_blocks(dense: torch.Tensor, topo: Topology) -> torch.Tensor:
    """The ``[nnz, b, b]`` blocks of a dense ``topo.shape`` matrix, in the topology's order."""
    b = topo.block_size
    m, n = topo.shape
    tiles = dense.reshape(m // b, b, n // b, b).permute(0, 2, 1, 3)
    return tiles[topo.row_indices.long(), topo.column_indices.long()]


# Grouped dense operands (blocksparse_moe/_grouped.py): a 3-D stack w standing for the 2-D
# operand B = torch.cat(list(w), dim) -- dim 1 (columns) for SDD's b, dim 0 (rows) for DSD's.
# Two storage layouts per kind: one where B is also a strided 2-D view of the storage, and
# the one where it is not (the layouts that used to be copied per call).
GROUPED_LAYOUTS = ["contiguous", "transposed-storage"]


def grouped(B: torch.Tensor, along: str, group: int, layout: str) -> torch.Tensor:
    """The 3-D grouped operand (``group`` columns/rows per group) holding ``B``'s values.

    ``along="cols"``: ``w [G, K, group]`` with ``w[g, k, c] = B[k, g*group + c]``;
    ``along="rows"``: ``w [G, group, N]`` with ``w[g, r, n] = B[g*group + r, n]``.
    ``layout="contiguous"``: w is contiguous; ``"transposed-storage"``: w is the
    ``transpose(1, 2)`` view of a contiguous ``[G, last, middle]`` tensor (transformers'
    ``[E, H, F]`` down_proj read as ``[E, F, H]``).
    """
    if along == "cols":
        k, n = B.shape
        w = B.reshape(k, n // group, group).permute(1, 0, 2)
    else:
        n_rows, n = B.shape
        w = B.reshape(n_rows // group, group, n)
    if layout == "contiguous":
        w = w.contiguous()
    else:
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    if w.shape[0]:  # no groups at all (an empty B): nothing to concatenate
        assert torch.equal(torch.cat(list(w), dim=1 if along == "cols" else 0), B)
    return w
