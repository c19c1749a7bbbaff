"""The CPU path's rectangle strategies (``cpu/products.py``), each forced
on, against dense float64 products: neighbouring experts of one size batched into one bmm,
staging runs of many small experts, single rectangles, rectangles that overlap in their
output rows/columns (the ``addmm_`` and zero-fill bookkeeping), and grouped operands whose
groups do not match the rectangles. CPU only: these are the torch path's internals."""

import pytest
import torch

from blocksparse_moe import ops
from blocksparse_moe.ops import products
from blocksparse_moe.cpu import products as cpu_products
from blocksparse_moe.cpu import rectangles as cpu_rectangles
from blocksparse_moe.topology import Topology
from product_cases import moe_topology, randn
from tolerances import assert_close, poisoned

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
    return products._meta(topo)


def _scatter_blocks(topo, data):
    b = topo.block_size
    out = torch.zeros(topo.shape, dtype=torch.float64)
    for n, (r, c) in enumerate(zip(topo.row_indices.tolist(), topo.column_indices.tolist())):
        out[r * b:(r + 1) * b, c * b:(c + 1) * b] = data[n].double()
    return out


def _check_all(topo, dtype, seed=0):
    """sdd, dsd, dsd^T, dds, dds^T on ``topo`` (2-D operands) against dense float64 products."""
    m, n = topo.shape
    bs = topo.block_size
    meta = _meta(topo)
    a = randn((m, K), dtype, "cpu", scale=K ** -0.5, seed=seed)
    b = randn((K, n), dtype, "cpu", seed=seed + 1)
    mask = topo.to_dense_mask().double()
    out = poisoned((topo.nnz, bs, bs), dtype, "cpu")
    got = cpu_products.sdd(a, b, *meta, bs, out=out)
    assert_close(_scatter_blocks(topo, got), (a.double() @ b.double()) * mask, dtype, msg="sdd")

    data = randn((topo.nnz, bs, bs), dtype, "cpu", scale=max(1, n) ** -0.5, seed=seed + 2)
    s = _scatter_blocks(topo, data)
    for transposed in (False, True):
        dense = s.t() if transposed else s
        bb = randn((dense.shape[1], K), dtype, "cpu", seed=seed + 3)
        y = cpu_products.dsd(data, bb, *meta, transposed, out=poisoned((dense.shape[0], K), dtype, "cpu"))
        assert_close(y, dense @ bb.double(), dtype, msg=f"dsd transposed={transposed}")
        aa = randn((K, dense.shape[0]), dtype, "cpu", seed=seed + 4)
        z = cpu_products.dds(aa, data, *meta, transposed, out=poisoned((K, dense.shape[1]), dtype, "cpu"))
        assert_close(z, aa.double() @ dense, dtype, msg=f"dds transposed={transposed}")


@pytest.fixture(params=["upcast", "half-gemm"])
def gemm(request, monkeypatch):
    """fp16/bf16 GEMMs upcast to fp32, or run in fp16/bf16 (oneDNN's fp32-accumulating
    kernels where the CPU has them; forced here so both paths run on every machine)."""
    if request.param == "upcast":
        monkeypatch.setattr(cpu_rectangles, "_gemm_dtype", cpu_rectangles._acc_dtype)
    else:
        monkeypatch.setattr(cpu_rectangles, "_gemm_dtype",
                            lambda dt: dt if dt in (torch.float16, torch.bfloat16) else cpu_rectangles._acc_dtype(dt))
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("tokens,ffn,block", MOE)
def test_moe_rectangles(tokens, ffn, block, dtype):
    _check_all(moe_topology(tokens, ffn, block), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_gemms(gemm, dtype):
    # Both ways of multiplying fp16/bf16 blocks: fp32 copies, or the half dtype itself with
    # fp32 accumulation (never where a second product would add to a rounded result).
    _check_all(moe_topology([16, 17, 30, 5, 0, 16, 16, 40], 32, 16), dtype)
    rows = torch.tensor([0, 0, 1, 1, 3, 3, 4, 5, 5, 5])
    cols = torch.tensor([1, 2, 1, 2, 1, 2, 2, 2, 3, 4])
    _check_all(Topology.from_block_coo(rows, cols, (6 * 16, 7 * 16), 16), dtype)


@pytest.mark.parametrize("stage", [1, 1 << 30], ids=["one-rectangle-per-run", "one-run"])
def test_staging_run_sizes(monkeypatch, stage):
    # The staging bound only changes how many rectangles one copy serves, never the result.
    monkeypatch.setattr(cpu_rectangles, "_STAGE_ELEMENTS", stage)
    _check_all(moe_topology([16, 16, 40, 3, 16, 16], 32, 16), torch.float32)


@pytest.mark.parametrize("threads,batches", [(1, [3, 2]), (2, [2, 1, 2])], ids=["1-thread", "2-threads"])
def test_batched_matches_one_matmul_per_expert(monkeypatch, threads, batches):
    # Neighbouring experts of one size run as one bmm, in multiples of the thread count (the
    # odd one out as its own matmul); the sums are those of one mm per expert (fp64: exact).
    topo = moe_topology([16, 16, 16, 32, 32], 32, 16)
    segs = cpu_rectangles.rectangles(topo.row_indices, topo.column_indices, topo.offsets)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert [n for _, n, _ in cpu_rectangles._batches(segs)] == batches
    _check_all(topo, torch.float64)
    monkeypatch.setattr(cpu_rectangles, "_batches", lambda group, *args, **kw: ((i, 1, sum(s[1] for s in group[:i]))
                                                                         for i in range(len(group))))
    _check_all(topo, torch.float64)


def test_overlapping_output_ranges():
    # Not an MoE: rectangles sharing block columns (DSD^T / DDS accumulate with addmm_ into
    # rows/columns an earlier rectangle wrote) or partly sharing them (zero the rest first),
    # one empty block row and never-covered block columns (zeroed, not left as poison).
    rows = torch.tensor([0, 0, 1, 1, 3, 3, 4, 5, 5, 5])
    cols = torch.tensor([1, 2, 1, 2, 1, 2, 2, 2, 3, 4])
    topo = Topology.from_block_coo(rows, cols, (6 * 16, 7 * 16), 16)
    segs = cpu_rectangles.rectangles(topo.row_indices, topo.column_indices, topo.offsets)
    assert segs is not None and len(segs) == 4
    fresh, zero = cpu_rectangles._cover([(c0, c0 + c) for _, _, c0, c, _ in segs], 7)
    assert fresh == [True, False, False, False] and zero == [(0, 1), (3, 7)]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        _check_all(topo, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "transposed-storage"])
@pytest.mark.parametrize("group", [32, 64, 16], ids=["group-is-expert", "group-spans-two-experts",
                                                     "group-is-half-expert"])
def test_grouped_operand_pieces(layout, group):
    # A grouped b whose groups are, or are not, the rectangles' column (row) ranges: one
    # piece, one piece per group crossed, or a rectangle inside one group.
    topo = moe_topology([16, 16, 20, 16], 32, 16)
    m, n = topo.shape
    bs = topo.block_size
    meta = _meta(topo)
    a = randn((m, K), torch.float64, "cpu", scale=K ** -0.5, seed=1)
    b2 = randn((K, n), torch.float64, "cpu", seed=2)
    b3 = b2.view(K, n // group, group).transpose(0, 1)  # [G, K, C]: B = cat(list(b3), dim=1)
    if layout == "contiguous":
        b3 = b3.contiguous()
    got = cpu_products.sdd(a, b3, *meta, bs)
    assert_close(_scatter_blocks(topo, got), (a @ b2) * topo.to_dense_mask().double(), torch.float64,
                 msg="grouped sdd")
    data = randn((topo.nnz, bs, bs), torch.float64, "cpu", seed=3)
    w = randn((n, K), torch.float64, "cpu", seed=4)
    w3 = w.view(n // group, group, K)
    if layout != "contiguous":
        w3 = w3.transpose(1, 2).contiguous().transpose(1, 2)
    s = _scatter_blocks(topo, data)
    assert_close(cpu_products.dsd(data, w3, *meta, False), s @ w, torch.float64, msg="grouped dsd")
    dy = randn((m, K), torch.float64, "cpu", seed=5)
    dy3 = dy.view(m // group, group, K) if m % group == 0 else None
    if dy3 is not None:  # S^T @ B with B's rows grouped
        assert_close(cpu_products.dsd(data, dy3, *meta, True), s.t() @ dy, torch.float64, msg="grouped dsd^T")


def test_operand_views_share_storage():
    # Operand slices and batches are views: nothing is copied per call.
    t = torch.randn(8, 6 * 16)
    op = cpu_rectangles.Operand(t, "cols")
    assert op.batch(16, 3, 16).shape == (3, 8, 16) and op.batch(16, 3, 16).data_ptr() == t[:, 16:].data_ptr()
    g = torch.randn(6, 16, 8)
    rows = cpu_rectangles.Operand(g, "rows")
    assert rows.batch(32, 2, 16).data_ptr() == g[2].data_ptr() and rows.batch(8, 2, 16) is None
    assert [(lo, hi) for lo, hi, _ in rows.pieces(8, 40)] == [(0, 8), (8, 24), (24, 32)]
