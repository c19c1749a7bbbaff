"""Topology of the P x (E*F) hidden activation (blocksparse_moe.make_topology).

The metadata is checked against a block mask built from padded_bins with Python loops, in
both orientations: the row-major CSR/COO fields must describe the mask, the transposed fields
(column_indices_t, offsets_t, block_offsets_t) must describe mask.T and point back at the
right stored block. The native build must equal the torch build field by field.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blocksparse_moe as bm
from routing_cases import CASES, Case
from blocksparse_moe.native.fallback import TOPOLOGY_FIELDS as _FIELDS
from blocksparse_moe.native.fallback import topology_torch


def make_topology_torch(padded_bins, num_experts, ffn, b):
    fields, p = topology_torch(padded_bins, num_experts, ffn, b)
    return bm.Topology(**fields, shape=(p, num_experts * ffn), block_size=b)


def plain_block_mask(padded_bins: list, ffn_hidden_size: int, block_size: int) -> list:
    """``[P/b][E*F/b]`` block mask from padded_bins, with loops: expert e's block rows hold
    exactly its own F/b block columns."""
    fb = ffn_hidden_size // block_size
    num_experts = len(padded_bins)
    rows = padded_bins[-1] // block_size if padded_bins else 0
    mask = [[False] * (num_experts * fb) for _ in range(rows)]
    start = 0
    for e, end in enumerate(padded_bins):
        for r in range(start // block_size, end // block_size):
            for j in range(fb):
                mask[r][e * fb + j] = True
        start = end
    return mask


def check_topology(topo: bm.Topology, padded_bins: list, num_experts: int, ffn_hidden_size: int, block_size: int):
    b = block_size
    mask = plain_block_mask(padded_bins, ffn_hidden_size, b)
    nbr, nbc = len(mask), num_experts * ffn_hidden_size // b
    assert topo.shape == (nbr * b, nbc * b)
    assert topo.block_size == b
    for name in _FIELDS:
        assert getattr(topo, name).dtype == torch.int32, name
    row_indices = topo.row_indices.tolist()
    column_indices = topo.column_indices.tolist()
    offsets = topo.offsets.tolist()
    assert topo.nnz == sum(map(sum, mask))

    # Row-major orientation: CSR rows, COO rows agree, columns ascending within a row.
    got = [[False] * nbc for _ in range(nbr)]
    assert len(offsets) == nbr + 1 and offsets[0] == 0 and offsets[-1] == topo.nnz
    for r in range(nbr):
        cols = column_indices[offsets[r]:offsets[r + 1]]
        assert cols == sorted(cols) and len(set(cols)) == len(cols)
        for i in range(offsets[r], offsets[r + 1]):
            assert row_indices[i] == r
            got[r][column_indices[i]] = True
    assert got == mask

    # Transposed orientation: describes mask.T, rows ascending in each column, and each
    # block_offsets_t entry is the row-major index of that very block.
    column_indices_t = topo.column_indices_t.tolist()
    offsets_t = topo.offsets_t.tolist()
    block_offsets_t = topo.block_offsets_t.tolist()
    assert len(offsets_t) == nbc + 1 and offsets_t[0] == 0 and offsets_t[-1] == topo.nnz
    got_t = [[False] * nbr for _ in range(nbc)]
    for c in range(nbc):
        rows = column_indices_t[offsets_t[c]:offsets_t[c + 1]]
        assert rows == sorted(rows) and len(set(rows)) == len(rows)
        for q in range(offsets_t[c], offsets_t[c + 1]):
            r, blk = column_indices_t[q], block_offsets_t[q]
            got_t[c][r] = True
            assert (row_indices[blk], column_indices[blk]) == (r, c)
    assert got_t == [[mask[r][c] for r in range(nbr)] for c in range(nbc)]  # mask.T
    assert sorted(block_offsets_t) == list(range(topo.nnz))

    # The element mask the products see.
    dense = topo.to_dense_mask()
    assert dense.shape == topo.shape
    if nbr:
        want = torch.tensor(mask).repeat_interleave(b, 0).repeat_interleave(b, 1)
        assert torch.equal(dense, want)


def check_native_equals_torch(topo: bm.Topology, padded_bins: torch.Tensor, num_experts: int, ffn: int, b: int):
    ref = make_topology_torch(padded_bins, num_experts, ffn, b)
    assert topo.shape == ref.shape
    for name in _FIELDS:
        assert torch.equal(getattr(topo, name), getattr(ref, name)), f"{name}: native != torch build"


@pytest.mark.parametrize("ffn_mult", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_topology_from_routing(case: Case, ffn_mult: int):
    ffn = case.block_size * ffn_mult
    r = bm.route(case.ids(), case.num_experts, case.block_size, ffn_hidden_size=ffn)
    check_topology(r.topology, r.padded_bins.tolist(), case.num_experts, ffn, case.block_size)
    check_native_equals_torch(r.topology, r.padded_bins, case.num_experts, ffn, case.block_size)
    # route(..., ffn_hidden_size) is make_topology of its padded_bins
    again = bm.make_topology(r.padded_bins, case.num_experts, ffn, case.block_size)
    for name in _FIELDS:
        assert torch.equal(getattr(again, name), getattr(r.topology, name))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("b", [16, 32, 64, 128])
def test_topology_each_block_size(b, dtype):
    padded_bins = [2 * b, 2 * b, 5 * b, 6 * b]  # expert 1 empty, others 2, 3, 1 block rows
    pb = torch.tensor(padded_bins, dtype=dtype)
    topo = bm.make_topology(pb, 4, 2 * b, b)
    check_topology(topo, padded_bins, 4, 2 * b, b)
    check_native_equals_torch(topo, pb, 4, 2 * b, b)


@pytest.mark.parametrize("num_experts", [1, 5])
def test_topology_empty_p0(num_experts):
    pb = torch.zeros(num_experts, dtype=torch.int32)
    topo = bm.make_topology(pb, num_experts, 64, 16)
    assert topo.shape == (0, num_experts * 64) and topo.nnz == 0
    assert topo.offsets.tolist() == [0]
    assert topo.offsets_t.tolist() == [0] * (num_experts * 4 + 1)
    check_topology(topo, pb.tolist(), num_experts, 64, 16)
    check_native_equals_torch(topo, pb, num_experts, 64, 16)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=10), st.sampled_from([16, 32, 64, 128]),
       st.integers(1, 4))
def test_topology_property(rows_per_expert, b, fb):
    padded_bins = [x * b for x in torch.tensor(rows_per_expert).cumsum(0).tolist()]
    e = len(padded_bins)
    topo = bm.make_topology(torch.tensor(padded_bins, dtype=torch.int32), e, fb * b, b)
    check_topology(topo, padded_bins, e, fb * b, b)
    check_native_equals_torch(topo, torch.tensor(padded_bins), e, fb * b, b)


BAD = [
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 32]), 2, 40, 16), ValueError, "ffn_hidden_size",
                 id="ffn-not-multiple-of-block"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 32]), 2, 0, 16), ValueError, "ffn_hidden_size",
                 id="ffn-zero"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 32]), 2, 32, 24), ValueError, "block_size",
                 id="block-24"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 32]), 3, 32, 16), ValueError, "padded_bins",
                 id="wrong-length"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16.0, 32.0]), 2, 32, 16), TypeError, "padded_bins",
                 id="float-padded-bins"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 0, 32, 0])[::2], 2, 32, 16), ValueError,
                 "padded_bins", id="non-contiguous"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 32], device="meta"), 2, 32, 16), ValueError,
                 "padded_bins", id="meta-device"),
    pytest.param(lambda: bm.make_topology(torch.tensor([32, 16]), 2, 32, 16), ValueError, "padded_bins",
                 id="decreasing"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 40]), 2, 32, 16), ValueError, "padded_bins",
                 id="not-block-multiple"),
    pytest.param(lambda: bm.make_topology(torch.tensor([-16, 16]), 2, 32, 16), ValueError, "padded_bins",
                 id="negative"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 32]), 2.0, 32, 16), TypeError, "num_experts",
                 id="float-num-experts"),
    pytest.param(lambda: bm.route(torch.zeros(2, 1, dtype=torch.int64), 2, 16, ffn_hidden_size=24), ValueError,
                 "ffn_hidden_size", id="route-ffn-not-multiple"),
]


@pytest.mark.parametrize("call, exc, needle", BAD)
def test_topology_bad_inputs(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()


@pytest.mark.parametrize("padded_bins", [[32, 16], [16, 40], [-16, 16]], ids=["decreasing", "odd", "negative"])
def test_torch_build_rejects_bad_padded_bins(padded_bins):
    with pytest.raises(ValueError, match="padded_bins"):
        make_topology_torch(torch.tensor(padded_bins), 2, 32, 16)
