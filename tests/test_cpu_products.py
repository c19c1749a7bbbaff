"""The CPU path's rectangle strategies (``cpu/products.py``), each forced
on, against dense float64 products: neighbouring experts of one size batched into one bmm,
staging runs of many small experts, single rectangles, rectangles that overlap in their
output rows/columns (the ``addmm_`` and zero-fill bookkeeping), and grouped operands whose
groups do not match the rectangles. CPU only: these are the torch path's internals.

Expectations come from ``reference.py`` on the pattern as the reference builds it; fp16/bf16
results must be the float64 reference rounded once (both GEMM paths promise fp32
accumulation and one rounding: a second rounding of a partial product fails).
"""

from types import SimpleNamespace

import pytest
import torch

import blocksparse_moe as bm
from blocksparse_moe import reference
from blocksparse_moe.cpu.precision import compute_dtype
from product_cases import moe_reference_topology, moe_topology, randn
from tolerances import assert_op, poisoned, reference_with_magnitude


def _private():
    """PRIVATE HOOKS, the only ones in this file (repoint when ops.py becomes ops/, issue 10):
    the CPU products module itself (what this file tests) and the six metadata tensors."""
    from blocksparse_moe.cpu import products as cpu_products
    from blocksparse_moe.ops import products

    return SimpleNamespace(cpu=cpu_products, meta=products._meta)


cpu_products = _private().cpu

K = 24  # dense width (SDD's K, DSD/DDS's N)

# (tokens per expert, F, block size): what each exercises.
MOE = [
    pytest.param([16, 16, 16, 16], 32, 16, id="equal-neighbours-one-bmm"),
    pytest.param([16, 17, 30, 5, 0, 16, 16, 40], 32, 16, id="mixed-sizes-batches-and-singles"),
    pytest.param([3, 9, 1, 4, 15, 2, 8, 7, 12, 6], 16, 16, id="many-small-experts-one-run"),
    pytest.param([70, 65], 64, 64, id="two-block-rows-b64"),
    pytest.param([0, 0, 33, 0], 16, 16, id="one-expert-takes-all"),
]


def _meta(topo):
    return _private().meta(topo)


def _moe(tokens, ffn, block):
    """(the package's topology, the reference's pattern) of an MoE with these group sizes."""
    return moe_topology(tokens, ffn, block), moe_reference_topology(tokens, ffn, block)


def _coo(rows, cols, block_rows, block_cols, block_size=16):
    """(Topology.from_block_coo, the reference's pattern) of an arbitrary block pattern."""
    topo = bm.Topology.from_block_coo(torch.tensor(rows), torch.tensor(cols),
                                      (block_rows * block_size, block_cols * block_size), block_size)
    ref = reference.block_topology_reference(list(zip(rows, cols)), block_rows, block_cols)
    ref.update(shape=(block_rows * block_size, block_cols * block_size), block_size=block_size)
    return topo, ref


def _check_all(topo, ref_topo, dtype, seed=0):
    """sdd, dsd, dsd^T, dds, dds^T on ``topo`` (2-D operands) against the float64 references."""
    m, n = topo.shape
    bs = topo.block_size
    meta = _meta(topo)
    a = randn((m, K), dtype, "cpu", scale=K ** -0.5, seed=seed)
    b = randn((K, n), dtype, "cpu", seed=seed + 1)
    out = poisoned((topo.nnz, bs, bs), dtype, "cpu")
    got = cpu_products.sdd(a, b, *meta, bs, out=out)
    want, mag = reference_with_magnitude(lambda a, b: reference.sdd_reference(a, b, ref_topo), (a, b))
    assert_op(got, want, dtype, terms=K, magnitude=mag, msg="sdd")

    data = randn((topo.nnz, bs, bs), dtype, "cpu", scale=max(1, n) ** -0.5, seed=seed + 2)
    for transposed in (False, True):
        rows, cols = (n, m) if transposed else (m, n)
        bb = randn((cols, K), dtype, "cpu", seed=seed + 3)
        y = cpu_products.dsd(data, bb, *meta, transposed, out=poisoned((rows, K), dtype, "cpu"))
        want, mag = reference_with_magnitude(lambda d, b: reference.dsd_reference(d, b, ref_topo, transposed),
                                             (data, bb))
        assert_op(y, want, dtype, terms=cols, magnitude=mag, msg=f"dsd transposed={transposed}")
        aa = randn((K, rows), dtype, "cpu", seed=seed + 4)
        z = cpu_products.dds(aa, data, *meta, transposed, out=poisoned((K, cols), dtype, "cpu"))
        want, mag = reference_with_magnitude(lambda a, d: reference.dds_reference(a, d, ref_topo, transposed),
                                             (aa, data))
        assert_op(z, want, dtype, terms=rows, magnitude=mag, msg=f"dds transposed={transposed}")


@pytest.fixture(params=["upcast", "half-gemm"])
def gemm(request, monkeypatch):
    """fp16/bf16 GEMMs upcast to fp32, or run in fp16/bf16 (oneDNN's fp32-accumulating
    kernels where the CPU has them; forced here so both paths run on every machine)."""
    if request.param == "upcast":
        monkeypatch.setattr(cpu_products, "_gemm_dtype", compute_dtype)
    else:
        monkeypatch.setattr(cpu_products, "_gemm_dtype",
                            lambda dt: dt if dt in (torch.float16, torch.bfloat16) else compute_dtype(dt))
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("tokens,ffn,block", MOE)
def test_moe_rectangles(tokens, ffn, block, dtype):
    _check_all(*_moe(tokens, ffn, block), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_gemms(gemm, dtype):
    # Both ways of multiplying fp16/bf16 blocks: fp32 copies, or the half dtype itself with
    # fp32 accumulation (never where a second product would add to a rounded result). The
    # rounded-once checks of _check_all catch a second rounding on either path: a rounded
    # partial product (e.g. DSD^T / DDS adding with addmm_ into an fp16/bf16 result where
    # rectangles overlap, the second pattern here, or a chunk's bmm rounded before its
    # index_add_).
    _check_all(*_moe([16, 17, 30, 5, 0, 16, 16, 40], 32, 16), dtype)
    _check_all(*_coo(*OVERLAPPING), dtype)


@pytest.mark.parametrize("stage", [1, 1 << 30], ids=["one-rectangle-per-run", "one-run"])
def test_staging_run_sizes(monkeypatch, stage):
    # The staging bound only changes how many rectangles one copy serves, never the result.
    monkeypatch.setattr(cpu_products, "_STAGE_ELEMENTS", stage)
    _check_all(*_moe([16, 16, 40, 3, 16, 16], 32, 16), torch.float32)


@pytest.mark.parametrize("threads,batches", [(1, [3, 2]), (2, [2, 1, 2])], ids=["1-thread", "2-threads"])
def test_batched_matches_one_matmul_per_expert(monkeypatch, threads, batches):
    # Neighbouring experts of one size run as one bmm, in multiples of the thread count (the
    # odd one out as its own matmul); the sums are those of one mm per expert (fp64: exact).
    topo, ref_topo = _moe([16, 16, 16, 32, 32], 32, 16)
    segs = cpu_products.rectangles(topo.row_indices, topo.column_indices, topo.offsets)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert [n for _, n, _ in cpu_products._batches(segs)] == batches
    _check_all(topo, ref_topo, torch.float64)
    monkeypatch.setattr(cpu_products, "_batches", lambda group, *args, **kw: ((i, 1, sum(s[1] for s in group[:i]))
                                                                         for i in range(len(group))))
    _check_all(topo, ref_topo, torch.float64)


# Not an MoE: rectangles sharing block columns (DSD^T / DDS accumulate with addmm_ into
# rows/columns an earlier rectangle wrote) or partly sharing them (zero the rest first),
# one empty block row and never-covered block columns (zeroed, not left as poison).
OVERLAPPING = ([0, 0, 1, 1, 3, 3, 4, 5, 5, 5], [1, 2, 1, 2, 1, 2, 2, 2, 3, 4], 6, 7)


def test_overlapping_output_ranges():
    topo, ref_topo = _coo(*OVERLAPPING)
    segs = cpu_products.rectangles(topo.row_indices, topo.column_indices, topo.offsets)
    assert segs is not None and len(segs) == 4
    fresh, zero = cpu_products._cover([(c0, c0 + c) for _, _, c0, c, _ in segs], 7)
    assert fresh == [True, False, False, False] and zero == [(0, 1), (3, 7)]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        _check_all(topo, ref_topo, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "transposed-storage"])
@pytest.mark.parametrize("group", [32, 64, 16], ids=["group-is-expert", "group-spans-two-experts",
                                                     "group-is-half-expert"])
def test_grouped_operand_pieces(layout, group):
    # A grouped b whose groups are, or are not, the rectangles' column (row) ranges: one
    # piece, one piece per group crossed, or a rectangle inside one group.
    topo, ref_topo = _moe([16, 16, 20, 16], 32, 16)
    m, n = topo.shape
    bs = topo.block_size
    meta = _meta(topo)
    a = randn((m, K), torch.float64, "cpu", scale=K ** -0.5, seed=1)
    b2 = randn((K, n), torch.float64, "cpu", seed=2)
    b3 = b2.view(K, n // group, group).transpose(0, 1)  # [G, K, C]: B = cat(list(b3), dim=1)
    if layout == "contiguous":
        b3 = b3.contiguous()
    got = cpu_products.sdd(a, b3, *meta, bs)
    assert_op(got, reference.sdd_reference(a, b2, ref_topo), torch.float64, terms=K, magnitude=None,
              msg="grouped sdd")
    data = randn((topo.nnz, bs, bs), torch.float64, "cpu", seed=3)
    w = randn((n, K), torch.float64, "cpu", seed=4)
    w3 = w.view(n // group, group, K)
    if layout != "contiguous":
        w3 = w3.transpose(1, 2).contiguous().transpose(1, 2)
    assert_op(cpu_products.dsd(data, w3, *meta, False), reference.dsd_reference(data, w, ref_topo), torch.float64,
              terms=n, magnitude=None, msg="grouped dsd")
    dy = randn((m, K), torch.float64, "cpu", seed=5)
    dy3 = dy.view(m // group, group, K) if m % group == 0 else None
    if dy3 is not None:  # S^T @ B with B's rows grouped
        assert_op(cpu_products.dsd(data, dy3, *meta, True), reference.dsd_reference(data, dy, ref_topo, True),
                  torch.float64, terms=m, magnitude=None, msg="grouped dsd^T")


def test_operand_views_share_storage():
    # Operand slices and batches are views: nothing is copied per call.
    t = torch.randn(8, 6 * 16)
    op = cpu_products.Operand(t, "cols")
    assert op.batch(16, 3, 16).shape == (3, 8, 16) and op.batch(16, 3, 16).data_ptr() == t[:, 16:].data_ptr()
    g = torch.randn(6, 16, 8)
    rows = cpu_products.Operand(g, "rows")
    assert rows.batch(32, 2, 16).data_ptr() == g[2].data_ptr() and rows.batch(8, 2, 16) is None
    assert [(lo, hi) for lo, hi, _ in rows.pieces(8, 40)] == [(0, 8), (8, 24), (24, 32)]
