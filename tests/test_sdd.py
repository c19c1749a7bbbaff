"""SDD (kernels/sdd.py, cpu/products.py sdd, ops.sdd) against ``(a @ b) * mask`` in float64."""

import pytest
import torch

from blocksparse_moe import backend, ops
from blocksparse_moe.ops import products
from blocksparse_moe.cpu import products as cpu_products
from blocksparse_moe.cpu import rectangles as cpu_rectangles
from blocksparse_moe.matrix import SparseMatrix
from product_cases import GROUPED_LAYOUTS, case_params, dense_blocks, grouped, moe_topology, randn, topology
from tolerances import assert_close, poisoned

K = 24  # not a multiple of the 32-wide K tile: the K mask is exercised


def _operands(topo, dtype, device, k=K, seed=0):
    m, n = topo.shape
    a = randn((m, k), dtype, device, seed=seed)
    b = randn((k, n), dtype, device, scale=k ** -0.5, seed=seed + 1)
    return a, b


def _expected(a, b, topo):
    dense = (a.double() @ b.double()) * topo.to_dense_mask()
    return dense


@pytest.mark.parametrize("case,dtype", case_params())
def test_sdd_matches_dense(path, case, dtype):
    topo = topology(case, path)
    a, b = _operands(topo, dtype, path)
    s = ops.sdd(a, b, topo)
    assert isinstance(s, SparseMatrix) and s.shape == topo.shape and s.dtype == dtype and not s.transposed
    expected = _expected(a, b, topo)
    assert_close(s.data, dense_blocks(expected, topo), dtype, msg=f"sdd {case} data")
    assert_close(s.to_dense(), expected, dtype, msg=f"sdd {case} dense")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdd_transposed_dense_operands(path, dtype):
    # The backward passes hand a.t() / b.t() views to sdd: read through strides, no copy.
    topo = topology("moe-ragged-empty-expert-b16", path)
    a0, b0 = _operands(topo, dtype, path)
    a = a0.t().contiguous().t()  # same values, column-major
    b = b0.t().contiguous().t()
    assert a.stride(0) == 1 and b.stride(0) == 1
    s = ops.sdd(a, b, topo)
    assert_close(s.to_dense(), _expected(a0, b0, topo), dtype, msg="sdd column-major operands")


@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "moe-b64", "coo-arbitrary-b16"])
def test_sdd_writes_every_element(path, case):
    topo = topology(case, path)
    a, b = _operands(topo, torch.float32, path)
    out = poisoned((topo.nnz, topo.block_size, topo.block_size), torch.float32, path)
    got = products._sdd(a, b, topo, out=out)
    assert got is out
    assert_close(out, dense_blocks(_expected(a, b, topo), topo), torch.float32, msg=f"sdd poisoned {case}")


def test_sdd_strided_output(path):
    # out may be any strided view: here each block is stored transposed.
    topo = topology("moe-b64", path)
    a, b = _operands(topo, torch.float32, path)
    out = poisoned((topo.nnz, 64, 64), torch.float32, path).transpose(1, 2)
    products._sdd(a, b, topo, out=out)
    assert_close(out, dense_blocks(_expected(a, b, topo), topo), torch.float32, msg="sdd strided out")


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
    products._sdd(x, b, topo, out=out, a_rows=a_rows)
    a = torch.where((a_rows >= 0)[:, None], x[a_rows.clamp(min=0).long()], torch.zeros((), dtype=dtype))
    assert_close(out, dense_blocks(_expected(a, b, topo), topo), dtype, msg="sdd a_rows")


def test_sdd_cpu_chunked_path(monkeypatch):
    # Tiny chunks: the generic (non-rectangle) CPU path must give the same blocks over many bmm chunks.
    monkeypatch.setattr(cpu_rectangles, "_CHUNK_ELEMENTS", 1)
    topo = topology("coo-arbitrary-b16", "cpu")
    a, b = _operands(topo, torch.float64, "cpu")
    meta = products._meta(topo)
    assert cpu_rectangles.rectangles(topo.row_indices, topo.column_indices, topo.offsets) is None
    got = cpu_products.sdd(a, b, *meta, 16)
    assert_close(got, dense_blocks(_expected(a, b, topo), topo), torch.float64)


@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "coo-arbitrary-b16"])
def test_sdd_gradcheck_fp64(case):
    topo = topology(case, "cpu")
    a, b = _operands(topo, torch.float64, "cpu", k=5)
    a.requires_grad_(True)
    b.requires_grad_(True)
    with backend.prefer_on_cpu("cpu"):
        assert torch.autograd.gradcheck(lambda a, b: ops.sdd(a, b, topo).data, (a, b))


@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "moe-b64", "coo-arbitrary-b16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdd_gradients_match_dense(path, case, dtype):
    topo = topology(case, path)
    a, b = _operands(topo, dtype, path)
    a.requires_grad_(True)
    b.requires_grad_(True)
    s = ops.sdd(a, b, topo)
    ddata = randn(s.data.shape, dtype, path, seed=7)
    da, db = torch.autograd.grad(s.data, (a, b), ddata)

    a64 = a.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    dense = (a64 @ b64) * topo.to_dense_mask()
    ddense = SparseMatrix(topo, ddata.double()).to_dense()
    da_ref, db_ref = torch.autograd.grad(dense, (a64, b64), ddense)
    assert_close(da, da_ref, dtype, msg=f"sdd da {case}")
    assert_close(db, db_ref, dtype, msg=f"sdd db {case}")


def test_sdd_rejects_bad_arguments(path):
    topo = topology("moe-ragged-empty-expert-b16", path)
    a, b = _operands(topo, torch.float32, path)
    with pytest.raises(ValueError, match=r"sdd: a must be 2-D, got shape \(48,\)"):
        ops.sdd(a[:, 0], b, topo)
    with pytest.raises(ValueError, match="sdd: a has 24 columns but b has 23 rows"):
        ops.sdd(a, b[:23], topo)
    with pytest.raises(ValueError, match="sdd: a @ b would be 32x96 but the topology is 48x96"):
        ops.sdd(a[:32], b, topo)
    with pytest.raises(TypeError, match="sdd: a is torch.float32 but b is torch.float16"):
        ops.sdd(a, b.half(), topo)
    with pytest.raises(TypeError, match="sdd: a has dtype torch.int32"):
        ops.sdd(a.int(), b.int(), topo)
    with pytest.raises(TypeError, match="sdd: topology must be a Topology"):
        ops.sdd(a, b, topo.to_dense_mask())
    with pytest.raises(ValueError, match="sdd: a is on cpu but the topology is on meta"):
        ops.sdd(a.cpu(), b.cpu(), topo.to("meta"))
    with pytest.raises(ValueError, match="sdd: b is on unsupported device 'meta'"):
        ops.sdd(a.cpu(), b.to("meta"), topo.to("cpu"))


def test_sdd_fp64_only_on_cpu_path(path):
    topo = topology("moe-ragged-empty-expert-b16", path)
    a, b = _operands(topo, torch.float64, path)
    if backend.select(a) == "cpu":
        assert_close(ops.sdd(a, b, topo).to_dense(), _expected(a, b, topo), torch.float64)
    else:
        with pytest.raises(TypeError, match="sdd: a has dtype torch.float64; supported here"):
            ops.sdd(a, b, topo)


def test_tf32_switch_follows_torch():
    # fp32 kernels use TF32 exactly when torch.matmul would; reading the legacy flag after
    # the new API was used raises in torch, which must not break a launch.
    from blocksparse_moe.kernels import _common

    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert _common.tf32_allowed()
        matmul.fp32_precision = "ieee"
        assert not _common.tf32_allowed()
    finally:
        matmul.fp32_precision = old
    assert _common.input_precision(torch.bfloat16) == "ieee"


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
        s = ops.sdd(a, w, topo)
        assert s.dtype == dtype and s.shape == topo.shape
        assert_close(s.to_dense(), _expected(a, b, topo), dtype, msg=f"sdd grouped {case} C={group} {dtype}")


@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("case,group", [GROUPED_CASES[1], GROUPED_CASES[3], GROUPED_CASES[4]])
def test_sdd_grouped_b_writes_every_element(path, case, group, layout):
    topo = topology(case, path)
    a, b = _operands(topo, torch.float32, path)
    out = poisoned((topo.nnz, topo.block_size, topo.block_size), torch.float32, path)
    assert products._sdd(a, grouped(b, "cols", group, layout), topo, out=out) is out
    assert_close(out, dense_blocks(_expected(a, b, topo), topo), torch.float32, msg=f"sdd grouped poisoned {case}")


def test_sdd_grouped_b_with_a_rows(path):
    # The fused gather and a grouped weight together (the transformers layer's SDD).
    topo = moe_topology([5, 0, 20], 32, 16).to(path)
    m = topo.shape[0]
    x = randn((30, K), torch.float32, path, seed=3)
    a_rows = torch.arange(m, dtype=torch.int32) % 31 - 1  # -1 rows are padding
    a_rows = a_rows.to(path)
    _, b = _operands(topo, torch.float32, path)
    out = poisoned((topo.nnz, 16, 16), torch.float32, path)
    products._sdd(x, grouped(b, "cols", 32, "contiguous"), topo, out=out, a_rows=a_rows)
    a = torch.where((a_rows >= 0)[:, None], x[a_rows.clamp(min=0).long()], torch.zeros(()))
    assert_close(out, dense_blocks(_expected(a, b, topo), topo), torch.float32, msg="sdd grouped a_rows")


@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("case,group", [GROUPED_CASES[1], GROUPED_CASES[2], GROUPED_CASES[4]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdd_grouped_b_gradients_match_dense(path, case, group, layout, dtype):
    topo = topology(case, path)
    a, b = _operands(topo, dtype, path)
    w = grouped(b, "cols", group, layout).requires_grad_(True)
    a.requires_grad_(True)
    s = ops.sdd(a, w, topo)
    ddata = randn(s.data.shape, dtype, path, seed=7)
    da, dw = torch.autograd.grad(s.data, (a, w), ddata)
    assert dw.shape == w.shape

    a64 = a.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    dense = (a64 @ torch.cat(list(w64), dim=1)) * topo.to_dense_mask()
    da_ref, dw_ref = torch.autograd.grad(dense, (a64, w64), SparseMatrix(topo, ddata.double()).to_dense())
    assert_close(da, da_ref, dtype, msg=f"sdd grouped da {case}")
    assert_close(dw, dw_ref, dtype, msg=f"sdd grouped dw {case}")


@pytest.mark.parametrize("case,group", [GROUPED_CASES[2], GROUPED_CASES[4]])
def test_sdd_grouped_b_gradcheck_fp64(case, group):
    topo = topology(case, "cpu")
    a, b = _operands(topo, torch.float64, "cpu", k=5)
    w = grouped(b, "cols", group, "contiguous").requires_grad_(True)
    a.requires_grad_(True)
    with backend.prefer_on_cpu("cpu"):
        assert torch.autograd.gradcheck(lambda a, w: ops.sdd(a, w, topo).data, (a, w))


def test_sdd_grouped_cpu_chunked_path(monkeypatch):
    from blocksparse_moe.cpu import products as cpu_products

    monkeypatch.setattr(cpu_rectangles, "_CHUNK_ELEMENTS", 1)
    topo = topology("coo-arbitrary-b16", "cpu")
    a, b = _operands(topo, torch.float64, "cpu")
    got = cpu_products.sdd(a, grouped(b, "cols", 16, "transposed-storage"), *products._meta(topo), 16)
    assert_close(got, dense_blocks(_expected(a, b, topo), topo), torch.float64)


def test_sdd_grouped_b_rejects_bad_shapes(path):
    topo = topology("moe-ragged-empty-expert-b16", path)  # 48 x 96, block 16
    a, b = _operands(topo, torch.float32, path)
    with pytest.raises(ValueError, match=r"sdd: grouped b has shape \(4, 24, 24\); its C = 24 must be a multiple "
                                         r"of the block size 16"):
        ops.sdd(a, b.reshape(24, 4, 24).transpose(0, 1), topo)
    with pytest.raises(ValueError, match=r"sdd: b must be 2-D or grouped 3-D \[G, K, C\], got shape \(2, 3, 24, 16\)"):
        ops.sdd(a, b.reshape(24, 6, 16).permute(1, 0, 2).reshape(2, 3, 24, 16), topo)
    with pytest.raises(ValueError, match=r"sdd: b must be 2-D or grouped 3-D \[G, K, C\], got shape \(2304,\)"):
        ops.sdd(a, b.reshape(-1), topo)
    with pytest.raises(ValueError, match="sdd: a @ b would be 48x64 but the topology is 48x96"):
        ops.sdd(a, grouped(b, "cols", 16, "contiguous")[:4], topo)
    with pytest.raises(ValueError, match="sdd: a has 24 columns but b has 23 rows"):
        ops.sdd(a, grouped(b, "cols", 16, "contiguous")[:, :23], topo)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_sdd_gpu(block_size, dtype):
    # The compiled kernels (autotuned on sm_90) on MoE-sized layers; the CPU twin is
    # test_sdd_matches_dense on the interpreter.
    g = torch.Generator().manual_seed(block_size)
    tokens = torch.randint(0, 300, (8,), generator=g).tolist()
    tokens[3] = 0
    topo = moe_topology(tokens, 256, block_size).to("cuda")
    a, b = _operands(topo, dtype, "cuda", k=512)
    s = ops.sdd(a, b, topo)
    assert_close(s.to_dense(), _expected(a, b, topo), dtype, msg=f"sdd gpu b={block_size}")
    a.requires_grad_(True)
    b.requires_grad_(True)
    # db sums over all P rows: scaled so it is O(1) (the table's fp32 bound assumes that).
    ddata = randn((topo.nnz, block_size, block_size), dtype, "cuda", scale=topo.shape[0] ** -0.5, seed=9)
    da, db = torch.autograd.grad(ops.sdd(a, b, topo).data, (a, b), ddata)
    ddense = SparseMatrix(topo, ddata.double()).to_dense()
    assert_close(da, ddense @ b.detach().double().t(), dtype, msg="sdd gpu da")
    assert_close(db, a.detach().double().t() @ ddense, dtype, msg="sdd gpu db")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdd_grouped_gpu(block_size, dtype, layout):
    # An expert weight stack [E, K, F] read in place on an MoE-sized layer, and its gradients;
    # the CPU twins are the test_sdd_grouped_b_* tests on the interpreter.
    g = torch.Generator().manual_seed(block_size)
    tokens = torch.randint(0, 300, (8,), generator=g).tolist()
    tokens[3] = 0
    topo = moe_topology(tokens, 256, block_size).to("cuda")
    a, b = _operands(topo, dtype, "cuda", k=512)
    w = grouped(b, "cols", 256, layout).requires_grad_(True)
    a.requires_grad_(True)
    s = ops.sdd(a, w, topo)
    assert_close(s.to_dense(), _expected(a, b, topo), dtype, msg=f"sdd grouped gpu b={block_size}")
    # dW sums over all P rows: scaled so it is O(1) (the table's fp32 bound assumes that).
    ddata = randn((topo.nnz, block_size, block_size), dtype, "cuda", scale=topo.shape[0] ** -0.5, seed=9)
    da, dw = torch.autograd.grad(s.data, (a, w), ddata)
    ddense = SparseMatrix(topo, ddata.double()).to_dense()
    assert_close(da, ddense @ b.double().t(), dtype, msg="sdd grouped gpu da")
    assert_close(torch.cat(list(dw), dim=1), a.detach().double().t() @ ddense, dtype, msg="sdd grouped gpu dw")
