"""SDD (kernels/sdd.py, cpu/products.py sdd, bm.sdd) against ``reference.sdd_reference`` in float64.

The expected blocks are ``(a @ b)`` cut at the stored blocks of the case's pattern as the
reference builds it (``product_cases.reference_topology``: never the package's topology
build or ``to_dense``). fp16/bf16 results must also be the float64 reference rounded once
(``assert_rounded_once``): the kernels accumulate in fp32 and round once.
"""

from types import SimpleNamespace

import pytest
import torch

import blocksparse_moe as bm
from blocksparse_moe import backend, reference
from product_cases import (GROUPED_LAYOUTS, case_params, grouped, moe_reference_topology, moe_topology, randn,
                           reference_topology, topology)
from tolerances import assert_close, assert_op, poisoned, reference_with_magnitude

K = 24  # not a multiple of the 32-wide K tile: the K mask is exercised


def _private():
    """PRIVATE HOOKS, the only ones in this file (repoint when ops.py becomes ops/, issue 10):
    the launch with an ``out=`` buffer (to poison it) and ``a_rows``, the six metadata
    tensors, the CPU module (its chunked path) and the kernels' TF32 switch."""
    from blocksparse_moe.cpu import products as cpu_products
    from blocksparse_moe.ops import products
    from blocksparse_moe.kernels import _common

    return SimpleNamespace(sdd_out=products._sdd, meta=products._meta, cpu=cpu_products, common=_common)


def _operands(topo, dtype, device, k=K, seed=0):
    m, n = topo.shape
    a = randn((m, k), dtype, device, seed=seed)
    b = randn((k, n), dtype, device, scale=k ** -0.5, seed=seed + 1)
    return a, b


def _check(got, a, b, ref_topo, dtype, msg):
    """``got [nnz, b, b]`` against the reference blocks; ``b`` is the 2-D ``B``."""
    want, magnitude = reference_with_magnitude(lambda a, b: reference.sdd_reference(a, b, ref_topo), (a, b))
    assert_op(got, want, dtype, terms=a.shape[1], magnitude=magnitude, msg=msg)


def _check_grads(da, db, a, b, ref_topo, ddata, dtype, msg):
    """Gradients of ``<sdd(a, b).data, ddata>``: ``da = dC @ B^T`` (a dsd, sums over N) and
    ``db = A^T @ dC`` (sums over M), each one product rounded once."""
    _, _, (da_ref, db_ref), (da_mag, db_mag) = reference_with_magnitude(
        lambda a, b: reference.sdd_reference(a, b, ref_topo), (a, b), ddata)
    m, n = ref_topo["shape"]
    assert_op(da, da_ref, dtype, terms=n, magnitude=da_mag, msg=f"{msg} da")
    db = db if db.dim() == 2 else torch.cat(list(db), dim=1)  # a grouped [G, K, C] stands for [K, G*C]
    assert_op(db, db_ref, dtype, terms=m, magnitude=db_mag, msg=f"{msg} db")


@pytest.mark.parametrize("case,dtype", case_params())
def test_sdd_matches_dense(path, case, dtype):
    topo = topology(case, path)
    ref_topo = reference_topology(case)
    a, b = _operands(topo, dtype, path)
    s = bm.sdd(a, b, topo)
    assert isinstance(s, bm.SparseMatrix) and s.shape == topo.shape and s.dtype == dtype and not s.transposed
    _check(s.data, a, b, ref_topo, dtype, msg=f"sdd {case} data")
    # the package's to_dense against the reference's dense matrix of the same blocks
    assert_close(s.to_dense(), reference.block_dense(s.data.double().cpu(), ref_topo), dtype, msg=f"sdd {case} dense")


# K well above one K tile: 32 (interpreter), 32 and 64 (sm_90 configs), and not a multiple
# of either, so the loop over K tiles runs several times and ends on a masked tail. Kills:
# an sdd that runs only its first K tile (every dtype), and one that rounds its fp32
# accumulator to fp16/bf16 after each K tile (the rounded-once check, fp16/bf16).
LONG_K = [pytest.param(100, id="K100-3-tiles-and-a-tail"), pytest.param(300, id="K300-9-tiles-and-a-tail")]
LONG_K_CASES = ["moe-ragged-empty-expert-b16", "moe-b64", "coo-arbitrary-b16"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("k", LONG_K)
@pytest.mark.parametrize("case", LONG_K_CASES)
def test_sdd_long_k(path, case, k, dtype):
    topo = topology(case, path)
    a, b = _operands(topo, dtype, path, k=k, seed=11)
    _check(bm.sdd(a, b, topo).data, a, b, reference_topology(case), dtype, msg=f"sdd {case} K={k}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sdd_long_k_gradients(path, dtype):
    # The backward's products reduce over N and M, which the short cases keep within a tile too.
    case = "moe-ragged-empty-expert-b16"
    topo = topology(case, path)
    a, b = _operands(topo, dtype, path, k=100, seed=12)
    a.requires_grad_(True)
    b.requires_grad_(True)
    s = bm.sdd(a, b, topo)
    ddata = randn(s.data.shape, dtype, path, scale=topo.shape[0] ** -0.5, seed=13)
    da, db = torch.autograd.grad(s.data, (a, b), ddata)
    _check_grads(da, db, a, b, reference_topology(case), ddata, dtype, msg="sdd K=100")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdd_transposed_dense_operands(path, dtype):
    # The backward passes hand a.t() / b.t() views to sdd: read through strides, no copy.
    case = "moe-ragged-empty-expert-b16"
    topo = topology(case, path)
    a0, b0 = _operands(topo, dtype, path)
    a = a0.t().contiguous().t()  # same values, column-major
    b = b0.t().contiguous().t()
    assert a.stride(0) == 1 and b.stride(0) == 1
    _check(bm.sdd(a, b, topo).data, a0, b0, reference_topology(case), dtype, msg="sdd column-major operands")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "moe-b64", "coo-arbitrary-b16"])
def test_sdd_writes_every_element(path, case, dtype):
    topo = topology(case, path)
    a, b = _operands(topo, dtype, path)
    out = poisoned((topo.nnz, topo.block_size, topo.block_size), dtype, path)
    got = _private().sdd_out(a, b, topo, out=out)
    assert got is out
    _check(out, a, b, reference_topology(case), dtype, msg=f"sdd poisoned {case}")


def test_sdd_strided_output(path):
    # out may be any strided view: here each block is stored transposed.
    topo = topology("moe-b64", path)
    a, b = _operands(topo, torch.float32, path)
    out = poisoned((topo.nnz, 64, 64), torch.float32, path).transpose(1, 2)
    _private().sdd_out(a, b, topo, out=out)
    _check(out, a, b, reference_topology("moe-b64"), torch.float32, msg="sdd strided out")


def _gathered_rows(x, a_rows):
    """The reference's A for an ``a_rows`` read: row i is x[a_rows[i]], or zero where -1."""
    x64 = x.detach().double().cpu()
    rows = [x64[i] if i >= 0 else torch.zeros_like(x64[0]) for i in a_rows.tolist()]
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdd_gathers_a_rows(path, dtype):
    # The fused form: A's rows read through an index, -1 = zero row (a padding row).
    topo = moe_topology([5, 0, 20], 32, 16).to(path)
    m = topo.shape[0]
    x = randn((30, K), dtype, path, seed=3)
    g = torch.Generator().manual_seed(4)
    a_rows = torch.randint(0, 30, (m,), generator=g, dtype=torch.int32)
    a_rows[torch.randperm(m, generator=g)[:10]] = -1
    a_rows = a_rows.to(path)
    _, b = _operands(topo, dtype, path)
    out = poisoned((topo.nnz, 16, 16), dtype, path)
    _private().sdd_out(x, b, topo, out=out, a_rows=a_rows)
    _check(out, _gathered_rows(x, a_rows.cpu()), b, moe_reference_topology([5, 0, 20], 32, 16), dtype,
           msg="sdd a_rows")


def test_sdd_cpu_chunked_path(monkeypatch):
    # Tiny chunks: the generic (non-rectangle) CPU path must give the same blocks over many bmm chunks.
    p = _private()
    monkeypatch.setattr(p.cpu, "_CHUNK_ELEMENTS", 1)
    topo = topology("coo-arbitrary-b16", "cpu")
    a, b = _operands(topo, torch.float64, "cpu")
    assert p.cpu.rectangles(topo.row_indices, topo.column_indices, topo.offsets) is None
    got = p.cpu.sdd(a, b, *p.meta(topo), 16)
    _check(got, a, b, reference_topology("coo-arbitrary-b16"), torch.float64, msg="sdd chunked")


@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "coo-arbitrary-b16"])
def test_sdd_gradcheck_fp64(case):
    topo = topology(case, "cpu")
    a, b = _operands(topo, torch.float64, "cpu", k=5)
    a.requires_grad_(True)
    b.requires_grad_(True)
    with backend.prefer_on_cpu("cpu"):
        assert torch.autograd.gradcheck(lambda a, b: bm.sdd(a, b, topo).data, (a, b))


@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "moe-b64", "coo-arbitrary-b16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdd_gradients_match_dense(path, case, dtype):
    topo = topology(case, path)
    a, b = _operands(topo, dtype, path)
    a.requires_grad_(True)
    b.requires_grad_(True)
    s = bm.sdd(a, b, topo)
    ddata = randn(s.data.shape, dtype, path, seed=7)
    da, db = torch.autograd.grad(s.data, (a, b), ddata)
    _check_grads(da, db, a, b, reference_topology(case), ddata, dtype, msg=f"sdd {case}")


def test_sdd_rejects_bad_arguments(path):
    topo = topology("moe-ragged-empty-expert-b16", path)
    a, b = _operands(topo, torch.float32, path)
    with pytest.raises(ValueError, match=r"sdd: a must be 2-D, got shape \(48,\)"):
        bm.sdd(a[:, 0], b, topo)
    with pytest.raises(ValueError, match="sdd: a has 24 columns but b has 23 rows"):
        bm.sdd(a, b[:23], topo)
    with pytest.raises(ValueError, match="sdd: a @ b would be 32x96 but the topology is 48x96"):
        bm.sdd(a[:32], b, topo)
    with pytest.raises(TypeError, match="sdd: a is torch.float32 but b is torch.float16"):
        bm.sdd(a, b.half(), topo)
    with pytest.raises(TypeError, match="sdd: a has dtype torch.int32"):
        bm.sdd(a.int(), b.int(), topo)
    with pytest.raises(TypeError, match="sdd: topology must be a Topology"):
        bm.sdd(a, b, topo.to_dense_mask())
    with pytest.raises(ValueError, match="sdd: a is on cpu but the topology is on meta"):
        bm.sdd(a.cpu(), b.cpu(), topo.to("meta"))
    with pytest.raises(ValueError, match="sdd: b is on unsupported device 'meta'"):
        bm.sdd(a.cpu(), b.to("meta"), topo.to("cpu"))


def test_sdd_fp64_only_on_cpu_path(path):
    case = "moe-ragged-empty-expert-b16"
    topo = topology(case, path)
    a, b = _operands(topo, torch.float64, path)
    if backend.select(a) == "cpu":
        _check(bm.sdd(a, b, topo).data, a, b, reference_topology(case), torch.float64, msg="sdd fp64")
    else:
        with pytest.raises(TypeError, match="sdd: a has dtype torch.float64; supported here"):
            bm.sdd(a, b, topo)


def test_tf32_switch_follows_torch():
    # fp32 kernels use TF32 exactly when torch.matmul would; reading the legacy flag after
    # the new API was used raises in torch, which must not break a launch.
    common = _private().common
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert common.tf32_allowed()
        matmul.fp32_precision = "ieee"
        assert not common.tf32_allowed()
    finally:
        matmul.fp32_precision = old
    assert common.input_precision(torch.bfloat16) == "ieee"


# -- grouped b: [G, K, C] standing for B [K, G*C], B[k, g*C + c] = b[g, k, c] ----------------
# (case, C): groups that are the experts, smaller than an expert (a rectangle cut in
# pieces), straddling experts, and on the arbitrary pattern.
GROUPED_CASES = [
    pytest.param("moe-ragged-empty-expert-b16", 32, id="group-is-expert-b16"),
    pytest.param("moe-ragged-empty-expert-b16", 16, id="half-expert-groups-b16"),
    pytest.param("moe-ragged-empty-expert-b16", 48, id="groups-straddle-experts-b16"),
    pytest.param("moe-b64", 64, id="group-is-expert-b64"),
    pytest.param("coo-arbitrary-b16", 16, id="coo-arbitrary-b16"),
]


@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("case,group", GROUPED_CASES)
def test_sdd_grouped_b_matches_dense(path, case, group, layout):
    topo = topology(case, path)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        a, b = _operands(topo, dtype, path)
        w = grouped(b, "cols", group, layout)
        s = bm.sdd(a, w, topo)
        assert s.dtype == dtype and s.shape == topo.shape
        _check(s.data, a, b, reference_topology(case), dtype, msg=f"sdd grouped {case} C={group} {dtype}")


@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("case,group", [GROUPED_CASES[1], GROUPED_CASES[3], GROUPED_CASES[4]])
def test_sdd_grouped_b_writes_every_element(path, case, group, layout):
    topo = topology(case, path)
    a, b = _operands(topo, torch.float32, path)
    out = poisoned((topo.nnz, topo.block_size, topo.block_size), torch.float32, path)
    assert _private().sdd_out(a, grouped(b, "cols", group, layout), topo, out=out) is out
    _check(out, a, b, reference_topology(case), torch.float32, msg=f"sdd grouped poisoned {case}")


def test_sdd_grouped_b_with_a_rows(path):
    # The fused gather and a grouped weight together (the transformers layer's SDD).
    topo = moe_topology([5, 0, 20], 32, 16).to(path)
    m = topo.shape[0]
    x = randn((30, K), torch.float32, path, seed=3)
    a_rows = torch.arange(m, dtype=torch.int32) % 31 - 1  # -1 rows are padding
    _, b = _operands(topo, torch.float32, path)
    out = poisoned((topo.nnz, 16, 16), torch.float32, path)
    _private().sdd_out(x, grouped(b, "cols", 32, "contiguous"), topo, out=out, a_rows=a_rows.to(path))
    _check(out, _gathered_rows(x, a_rows), b, moe_reference_topology([5, 0, 20], 32, 16), torch.float32,
           msg="sdd grouped a_rows")


@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("case,group", [GROUPED_CASES[1], GROUPED_CASES[2], GROUPED_CASES[4]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdd_grouped_b_gradients_match_dense(path, case, group, layout, dtype):
    topo = topology(case, path)
    a, b = _operands(topo, dtype, path)
    w = grouped(b, "cols", group, layout).requires_grad_(True)
    a.requires_grad_(True)
    s = bm.sdd(a, w, topo)
    ddata = randn(s.data.shape, dtype, path, seed=7)
    da, dw = torch.autograd.grad(s.data, (a, w), ddata)
    assert dw.shape == w.shape
    _check_grads(da, dw, a, b, reference_topology(case), ddata, dtype, msg=f"sdd grouped {case}")


@pytest.mark.parametrize("case,group", [GROUPED_CASES[2], GROUPED_CASES[4]])
def test_sdd_grouped_b_gradcheck_fp64(case, group):
    topo = topology(case, "cpu")
    a, b = _operands(topo, torch.float64, "cpu", k=5)
    w = grouped(b, "cols", group, "contiguous").requires_grad_(True)
    a.requires_grad_(True)
    with backend.prefer_on_cpu("cpu"):
        assert torch.autograd.gradcheck(lambda a, w: bm.sdd(a, w, topo).data, (a, w))


def test_sdd_grouped_cpu_chunked_path(monkeypatch):
    p = _private()
    monkeypatch.setattr(p.cpu, "_CHUNK_ELEMENTS", 1)
    topo = topology("coo-arbitrary-b16", "cpu")
    a, b = _operands(topo, torch.float64, "cpu")
    got = p.cpu.sdd(a, grouped(b, "cols", 16, "transposed-storage"), *p.meta(topo), 16)
    _check(got, a, b, reference_topology("coo-arbitrary-b16"), torch.float64, msg="sdd grouped chunked")


def test_sdd_grouped_b_rejects_bad_shapes(path):
    topo = topology("moe-ragged-empty-expert-b16", path)  # 48 x 96, block 16
    a, b = _operands(topo, torch.float32, path)
    with pytest.raises(ValueError, match=r"sdd: grouped b has shape \(4, 24, 24\); its C = 24 must be a multiple "
                                         r"of the block size 16"):
        bm.sdd(a, b.reshape(24, 4, 24).transpose(0, 1), topo)
    with pytest.raises(ValueError, match=r"sdd: b must be 2-D or grouped 3-D \[G, K, C\], got shape \(2, 3, 24, 16\)"):
        bm.sdd(a, b.reshape(24, 6, 16).permute(1, 0, 2).reshape(2, 3, 24, 16), topo)
    with pytest.raises(ValueError, match=r"sdd: b must be 2-D or grouped 3-D \[G, K, C\], got shape \(2304,\)"):
        bm.sdd(a, b.reshape(-1), topo)
    with pytest.raises(ValueError, match="sdd: a @ b would be 48x64 but the topology is 48x96"):
        bm.sdd(a, grouped(b, "cols", 16, "contiguous")[:4], topo)
    with pytest.raises(ValueError, match="sdd: a has 24 columns but b has 23 rows"):
        bm.sdd(a, grouped(b, "cols", 16, "contiguous")[:, :23], topo)


def _gpu_layer(block_size):
    g = torch.Generator().manual_seed(block_size)
    tokens = torch.randint(0, 300, (8,), generator=g).tolist()
    tokens[3] = 0
    return moe_topology(tokens, 256, block_size).to("cuda"), moe_reference_topology(tokens, 256, block_size)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_sdd_gpu(block_size, dtype):
    # The compiled kernels (autotuned on sm_90) on MoE-sized layers, K = 520 (8 tiles of 64
    # and a masked tail); the CPU twins are test_sdd_matches_dense / test_sdd_long_k on the
    # interpreter.
    topo, ref_topo = _gpu_layer(block_size)
    a, b = _operands(topo, dtype, "cuda", k=520)
    _check(bm.sdd(a, b, topo).data, a, b, ref_topo, dtype, msg=f"sdd gpu b={block_size}")
    a.requires_grad_(True)
    b.requires_grad_(True)
    # db sums over all P rows: scaled so it is O(1) (the table's fp32 bound assumes that).
    ddata = randn((topo.nnz, block_size, block_size), dtype, "cuda", scale=topo.shape[0] ** -0.5, seed=9)
    da, db = torch.autograd.grad(bm.sdd(a, b, topo).data, (a, b), ddata)
    _check_grads(da, db, a, b, ref_topo, ddata, dtype, msg="sdd gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdd_grouped_gpu(block_size, dtype, layout):
    # An expert weight stack [E, K, F] read in place on an MoE-sized layer, and its gradients;
    # the CPU twins are the test_sdd_grouped_b_* tests on the interpreter.
    topo, ref_topo = _gpu_layer(block_size)
    a, b = _operands(topo, dtype, "cuda", k=520)
    w = grouped(b, "cols", 256, layout).requires_grad_(True)
    a.requires_grad_(True)
    s = bm.sdd(a, w, topo)
    _check(s.data, a, b, ref_topo, dtype, msg=f"sdd grouped gpu b={block_size}")
    # dW sums over all P rows: scaled so it is O(1) (the table's fp32 bound assumes that).
    ddata = randn((topo.nnz, block_size, block_size), dtype, "cuda", scale=topo.shape[0] ** -0.5, seed=9)
    da, dw = torch.autograd.grad(s.data, (a, w), ddata)
    _check_grads(da, dw, a, b, ref_topo, ddata, dtype, msg="sdd grouped gpu")
