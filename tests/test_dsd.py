"""DSD (kernels/dsd.py, cpu/products.py dsd, bm.dsd) against ``reference.dsd_reference`` in
float64, for S and for its transpose S^T (read through the transposed metadata).

The reference builds S block by block from the case's pattern as ``reference.py`` makes it
(``product_cases.reference_topology``), never with the package's ``to_dense``, and reads
no transposed metadata: a wrong ``offsets_t`` / ``column_indices_t`` / ``block_offsets_t``
read shows. fp16/bf16 results must also be the float64 reference rounded once: that kills,
e.g., the CPU path's generic (chunked) product rounding each chunk's block products to
fp16/bf16 before summing them (the coo case; tried).
"""

from types import SimpleNamespace

import pytest
import torch

import blocksparse_moe as bm
from blocksparse_moe import backend, reference
from product_cases import (GROUPED_LAYOUTS, case_params, grouped, moe_reference_topology, moe_topology, randn,
                           reference_topology, sparse_scale, topology)
from tolerances import assert_op, poisoned, reference_with_magnitude

N = 40  # not a multiple of the 32-wide N tile: the N mask is exercised

TRANSPOSED = [pytest.param(False, id="S"), pytest.param(True, id="St")]


def _private():
    """PRIVATE HOOKS, the only ones in this file (repoint when ops.py becomes ops/, issue 10):
    the launch with an ``out=`` buffer (to poison it), the six metadata tensors and the CPU
    module (its chunked path)."""
    from blocksparse_moe.cpu import products as cpu_products
    from blocksparse_moe.ops import products

    return SimpleNamespace(dsd_out=products._dsd, meta=products._meta, cpu=cpu_products)


def _operands(topo, transposed, dtype, device, n=N, seed=0):
    s = bm.SparseMatrix(topo, randn((topo.nnz, topo.block_size, topo.block_size), dtype, device,
                                 scale=sparse_scale(topo, transposed), seed=seed))
    if transposed:
        s = s.t()
    b = randn((s.shape[1], n), dtype, device, seed=seed + 1)
    return s, b


def _check(got, s, b, ref_topo, dtype, msg):
    """``got`` against ``S @ b`` (``S^T @ b``); ``b`` is the 2-D ``B``. A row sums at most K terms."""
    want, magnitude = reference_with_magnitude(
        lambda d, b: reference.dsd_reference(d, b, ref_topo, s.transposed), (s.data, b))
    assert_op(got, want, dtype, terms=b.shape[0], magnitude=magnitude, msg=msg)


def _check_grads(ddata, db, s, b, ref_topo, dy, dtype, msg):
    """Gradients of ``<dsd(s, b), dy>``: ``ddata`` (dy @ b^T at the stored blocks, sums over N)
    and ``db = S^T @ dy`` (sums over the M rows of dy); ``db`` 2-D or grouped."""
    _, _, (dd_ref, db_ref), (dd_mag, db_mag) = reference_with_magnitude(
        lambda d, b: reference.dsd_reference(d, b, ref_topo, s.transposed), (s.data, b), dy)
    assert_op(ddata, dd_ref, dtype, terms=dy.shape[1], magnitude=dd_mag, msg=f"{msg} ddata")
    db = db if db.dim() == 2 else torch.cat(list(db), dim=0)
    assert_op(db, db_ref, dtype, terms=dy.shape[0], magnitude=db_mag, msg=f"{msg} db")


@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("case,dtype", case_params())
def test_dsd_matches_dense(path, case, dtype, transposed):
    topo = topology(case, path)
    s, b = _operands(topo, transposed, dtype, path)
    y = bm.dsd(s, b)
    assert y.dtype == dtype and y.is_contiguous()
    _check(y, s, b, reference_topology(case), dtype, msg=f"dsd {case} transposed={transposed}")


@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dsd_transposed_dense_operand(path, dtype, transposed):
    # Backward hands b.t() views (e.g. dY @ W^T): read through strides, no copy.
    topo = topology("moe-b64", path)
    s, b0 = _operands(topo, transposed, dtype, path)
    b = b0.t().contiguous().t()
    assert b.stride(0) == 1
    _check(bm.dsd(s, b), s, b0, reference_topology("moe-b64"), dtype, msg="dsd column-major b")


@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "moe-b128-tiny", "no-tokens-b16",
                                  "coo-arbitrary-b16"])
def test_dsd_writes_every_element(path, case, transposed):
    # Empty block rows (the empty expert's columns under S^T, the coo case's empty row and
    # column, all of S^T with no tokens) must come out as zeros, not as the poison.
    topo = topology(case, path)
    s, b = _operands(topo, transposed, torch.float32, path)
    out = poisoned((s.shape[0], N), torch.float32, path)
    got = _private().dsd_out(s.data, b, topo, transposed, out=out)
    assert got is out
    _check(out, s, b, reference_topology(case), torch.float32, msg=f"dsd poisoned {case}")


def test_dsd_strided_output(path):
    topo = topology("moe-ragged-empty-expert-b16", path)
    s, b = _operands(topo, False, torch.float32, path)
    out = poisoned((N, s.shape[0]), torch.float32, path).t()  # column-major [M, N]
    _private().dsd_out(s.data, b, topo, False, out=out)
    _check(out, s, b, reference_topology("moe-ragged-empty-expert-b16"), torch.float32, msg="dsd column-major out")


def test_dsd_strided_blocks(path):
    # data itself may be strided (e.g. a transposed view of another block tensor).
    topo = topology("moe-b64", path)
    s, b = _operands(topo, False, torch.float32, path)
    s = s.with_data(s.data.transpose(1, 2).contiguous().transpose(1, 2))
    assert not s.data.is_contiguous()
    _check(bm.dsd(s, b), s, b, reference_topology("moe-b64"), torch.float32, msg="dsd strided data")


@pytest.mark.parametrize("transposed", TRANSPOSED)
def test_dsd_deterministic(path, transposed):
    # No float atomics anywhere: allowed under deterministic mode, bitwise repeatable.
    topo = topology("coo-arbitrary-b16", path)
    s, b = _operands(topo, transposed, torch.float32, path)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = bm.dsd(s, b), bm.dsd(s, b)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first, second)
    _check(first, s, b, reference_topology("coo-arbitrary-b16"), torch.float32, msg="dsd deterministic")


@pytest.mark.parametrize("transposed", TRANSPOSED)
def test_dsd_cpu_chunked_path(monkeypatch, transposed):
    p = _private()
    monkeypatch.setattr(p.cpu, "_CHUNK_ELEMENTS", 1)
    topo = topology("coo-arbitrary-b16", "cpu")
    s, b = _operands(topo, transposed, torch.float64, "cpu")
    got = p.cpu.dsd(s.data, b, *p.meta(topo), transposed)
    _check(got, s, b, reference_topology("coo-arbitrary-b16"), torch.float64, msg="dsd chunked")


@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "coo-arbitrary-b16"])
def test_dsd_gradcheck_fp64(case, transposed):
    topo = topology(case, "cpu")
    s, b = _operands(topo, transposed, torch.float64, "cpu", n=3)
    data = s.data.requires_grad_(True)
    b.requires_grad_(True)
    with backend.prefer_on_cpu("cpu"):
        assert torch.autograd.gradcheck(lambda d, b: bm.dsd(s.with_data(d), b), (data, b))


@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "moe-b64", "coo-arbitrary-b16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dsd_gradients_match_dense(path, case, dtype, transposed):
    topo = topology(case, path)
    s, b = _operands(topo, transposed, dtype, path)
    data = s.data.requires_grad_(True)
    b.requires_grad_(True)
    y = bm.dsd(s, b)
    dy = randn(y.shape, dtype, path, scale=sparse_scale(topo, not transposed), seed=5)
    ddata, db = torch.autograd.grad(y, (data, b), dy)
    _check_grads(ddata, db, s, b, reference_topology(case), dy, dtype, msg=f"dsd {case}")


def test_dsd_rejects_bad_arguments(path):
    topo = topology("moe-ragged-empty-expert-b16", path)  # 48 x 96
    s, b = _operands(topo, False, torch.float32, path)
    with pytest.raises(TypeError, match="dsd: s must be a SparseMatrix, got Tensor"):
        bm.dsd(s.to_dense(), b)
    with pytest.raises(ValueError, match=r"dsd: b must be 2-D or grouped 3-D \[G, R, N\], got shape \(96,\)"):
        bm.dsd(s, b[:, 0])
    with pytest.raises(ValueError, match=r"dsd: s has 96 columns \(shape \(48, 96\)\) but b has 48 rows"):
        bm.dsd(s, b[:48])
    with pytest.raises(ValueError, match=r"dsd: s has 48 columns \(shape \(96, 48\)\) but b has 96 rows"):
        bm.dsd(s.t(), b)
    with pytest.raises(TypeError, match="dsd: s.data is torch.float32 but b is torch.bfloat16"):
        bm.dsd(s, b.bfloat16())
    with pytest.raises(ValueError, match="dsd: b is on unsupported device 'meta'"):
        bm.dsd(bm.SparseMatrix(topo.to("cpu"), s.data.cpu()), b.to("meta"))
    bad = bm.SparseMatrix(topo, s.data)
    bad.data = s.data[:, :8, :8]  # data swapped behind the constructor's back: block size 8 != 16
    with pytest.raises(ValueError, match=r"dsd: s.data has shape \(6, 8, 8\) but its topology needs \(nnz=6, 16, 16\)"):
        bm.dsd(bad, b)


# -- grouped b: [G, R, N] standing for B [G*R, N], B[g*R + r, n] = b[g, r, n] ----------------
# (case, R) with R dividing the rows of B for both S (K = 96 / 128 / 80) and S^T (K = 48 /
# 128 / 64): groups that are block rows, several blocks, straddling experts' columns.
GROUPED_CASES = [
    pytest.param("moe-ragged-empty-expert-b16", 16, id="one-block-groups-b16"),
    pytest.param("moe-ragged-empty-expert-b16", 48, id="groups-straddle-experts-b16"),
    pytest.param("moe-b64", 64, id="b64"),
    pytest.param("coo-arbitrary-b16", 16, id="coo-arbitrary-b16"),
]


def _grouped_k(topo, transposed, group):
    k = topo.shape[0] if transposed else topo.shape[1]
    return group if k % group == 0 else topo.block_size


@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("case,group", GROUPED_CASES)
def test_dsd_grouped_b_matches_dense(path, case, group, transposed, layout):
    topo = topology(case, path)
    group = _grouped_k(topo, transposed, group)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        s, b = _operands(topo, transposed, dtype, path)
        y = bm.dsd(s, grouped(b, "rows", group, layout))
        assert y.dtype == dtype and y.is_contiguous()
        _check(y, s, b, reference_topology(case), dtype, msg=f"dsd grouped {case} R={group} {dtype}")


@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "no-tokens-b16", "coo-arbitrary-b16"])
def test_dsd_grouped_b_writes_every_element(path, case, transposed, layout):
    topo = topology(case, path)
    s, b = _operands(topo, transposed, torch.float32, path)
    out = poisoned((s.shape[0], N), torch.float32, path)
    w = grouped(b, "rows", topo.block_size, layout)
    assert _private().dsd_out(s.data, w, topo, transposed, out=out) is out
    _check(out, s, b, reference_topology(case), torch.float32, msg=f"dsd grouped poisoned {case}")


@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("case,group", [GROUPED_CASES[1], GROUPED_CASES[3]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dsd_grouped_b_gradients_match_dense(path, case, group, transposed, layout, dtype):
    # S^T's data gradient reads b as SDD's left operand [G*R, N] (a reshape): covered here.
    topo = topology(case, path)
    group = _grouped_k(topo, transposed, group)
    s, b = _operands(topo, transposed, dtype, path)
    data = s.data.requires_grad_(True)
    w = grouped(b, "rows", group, layout).requires_grad_(True)
    y = bm.dsd(s, w)
    dy = randn(y.shape, dtype, path, scale=sparse_scale(topo, not transposed), seed=5)
    ddata, dw = torch.autograd.grad(y, (data, w), dy)
    assert dw.shape == w.shape
    _check_grads(ddata, dw, s, b, reference_topology(case), dy, dtype, msg=f"dsd grouped {case}")


@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "coo-arbitrary-b16"])
def test_dsd_grouped_b_gradcheck_fp64(case, transposed):
    topo = topology(case, "cpu")
    s, b = _operands(topo, transposed, torch.float64, "cpu", n=3)
    data = s.data.requires_grad_(True)
    w = grouped(b, "rows", 16, "transposed-storage").requires_grad_(True)
    with backend.prefer_on_cpu("cpu"):
        assert torch.autograd.gradcheck(lambda d, w: bm.dsd(s.with_data(d), w), (data, w))


@pytest.mark.parametrize("transposed", TRANSPOSED)
def test_dsd_grouped_cpu_chunked_path(monkeypatch, transposed):
    p = _private()
    monkeypatch.setattr(p.cpu, "_CHUNK_ELEMENTS", 1)
    topo = topology("coo-arbitrary-b16", "cpu")
    s, b = _operands(topo, transposed, torch.float64, "cpu")
    w = grouped(b, "rows", 16, "transposed-storage")
    _check(p.cpu.dsd(s.data, w, *p.meta(topo), transposed), s, b, reference_topology("coo-arbitrary-b16"),
           torch.float64, msg="dsd grouped chunked")


def test_dsd_grouped_b_rejects_bad_shapes(path):
    topo = topology("moe-ragged-empty-expert-b16", path)  # 48 x 96, block 16
    s, b = _operands(topo, False, torch.float32, path)
    with pytest.raises(ValueError, match=r"dsd: grouped b has shape \(4, 24, 40\); its R = 24 must be a multiple "
                                         r"of the block size 16"):
        bm.dsd(s, b.reshape(4, 24, N))
    with pytest.raises(ValueError, match=r"dsd: b must be 2-D or grouped 3-D \[G, R, N\], got shape \(2, 3, 16, 40\)"):
        bm.dsd(s, b.reshape(2, 3, 16, N))
    with pytest.raises(ValueError, match=r"dsd: s has 96 columns \(shape \(48, 96\)\) but b has 64 rows"):
        bm.dsd(s, b.reshape(6, 16, N)[:4])
    with pytest.raises(ValueError, match=r"dsd: s has 48 columns \(shape \(96, 48\)\) but b has 96 rows"):
        bm.dsd(s.t(), b.reshape(6, 16, N))


def _gpu_layer(block_size):
    g = torch.Generator().manual_seed(block_size)
    tokens = torch.randint(0, 300, (8,), generator=g).tolist()
    tokens[5] = 0
    return moe_topology(tokens, 256, block_size).to("cuda"), moe_reference_topology(tokens, 256, block_size)


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True], ids=["S", "St"])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_dsd_gpu(block_size, dtype, transposed):
    topo, ref_topo = _gpu_layer(block_size)
    s, b = _operands(topo, transposed, dtype, "cuda", n=520)
    _check(bm.dsd(s, b), s, b, ref_topo, dtype, msg=f"dsd gpu b={block_size}")
    data = s.data.requires_grad_(True)
    b.requires_grad_(True)
    y = bm.dsd(s, b)
    dy = randn(y.shape, dtype, "cuda", scale=sparse_scale(topo, not transposed), seed=5)
    ddata, db = torch.autograd.grad(y, (data, b), dy)
    _check_grads(ddata, db, s, b, ref_topo, dy, dtype, msg="dsd gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("transposed", [False, True], ids=["S", "St"])
@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dsd_grouped_gpu(block_size, dtype, transposed, layout):
    # b as a weight stack [G, R, N] read in place (R = the block size: works for S and S^T),
    # and its gradients; the CPU twins are the test_dsd_grouped_b_* tests on the interpreter.
    topo, ref_topo = _gpu_layer(block_size)
    s, b = _operands(topo, transposed, dtype, "cuda", n=520)
    data = s.data.requires_grad_(True)
    w = grouped(b, "rows", block_size, layout).requires_grad_(True)
    y = bm.dsd(s, w)
    _check(y, s, b, ref_topo, dtype, msg=f"dsd grouped gpu b={block_size}")
    dy = randn(y.shape, dtype, "cuda", scale=sparse_scale(topo, not transposed), seed=5)
    ddata, dw = torch.autograd.grad(y, (data, w), dy)
    _check_grads(ddata, dw, s, b, ref_topo, dy, dtype, msg="dsd grouped gpu")
