"""DDS (kernels/dds.py on the DSD kernel, cpu/products.py dds, bm.dds) against
``reference.dds_reference`` in float64, for S and for its transpose S^T.

The reference builds S block by block from the case's pattern as ``reference.py`` makes it
(``product_cases.reference_topology``), never with the package's ``to_dense``. fp16/bf16
results must also be the float64 reference rounded once.
"""

from types import SimpleNamespace

import pytest
import torch

import blocksparse_moe as bm
from blocksparse_moe import backend, reference
from product_cases import (GROUPED_LAYOUTS, case_params, grouped, moe_reference_topology, moe_topology, randn,
                           reference_topology, sparse_scale, topology)
from tolerances import assert_close, assert_op, poisoned, reference_with_magnitude

M = 40  # rows of the dense operand: not a multiple of the 32-wide tile, the mask is exercised

TRANSPOSED = [pytest.param(False, id="S"), pytest.param(True, id="St")]


def _private():
    """PRIVATE HOOKS, the only ones in this file (repoint when ops.py becomes ops/, issue 10):
    the launch with an ``out=`` buffer (to poison it), the six metadata tensors and the CPU
    module (its chunked path)."""
    from blocksparse_moe.cpu import products as cpu_products
    from blocksparse_moe.ops import products

    return SimpleNamespace(dds_out=products._dds, meta=products._meta, cpu=cpu_products)


def _operands(topo, transposed, dtype, device, m=M, seed=0):
    # a @ S reduces over S's rows (over S^T's rows = S's columns when transposed).
    s = bm.SparseMatrix(topo, randn((topo.nnz, topo.block_size, topo.block_size), dtype, device,
                                 scale=sparse_scale(topo, not transposed), seed=seed))
    if transposed:
        s = s.t()
    a = randn((m, s.shape[0]), dtype, device, seed=seed + 1)
    return a, s


def _check(got, a, s, ref_topo, dtype, msg):
    """``got`` against ``a @ S`` (``a @ S^T``); an element sums at most K = a.shape[1] terms."""
    want, magnitude = reference_with_magnitude(
        lambda a, d: reference.dds_reference(a, d, ref_topo, s.transposed), (a, s.data))
    assert_op(got, want, dtype, terms=a.shape[1], magnitude=magnitude, msg=msg)


def _check_grads(da, ddata, a, s, ref_topo, dy, dtype, msg):
    """Gradients of ``<dds(a, s), dy>``: ``da = dy @ S^T`` (sums over N) and ``ddata``
    (a^T @ dy at the stored blocks, sums over the M rows)."""
    _, _, (da_ref, dd_ref), (da_mag, dd_mag) = reference_with_magnitude(
        lambda a, d: reference.dds_reference(a, d, ref_topo, s.transposed), (a, s.data), dy)
    assert_op(da, da_ref, dtype, terms=dy.shape[1], magnitude=da_mag, msg=f"{msg} da")
    assert_op(ddata, dd_ref, dtype, terms=dy.shape[0], magnitude=dd_mag, msg=f"{msg} ddata")


@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("case,dtype", case_params())
def test_dds_matches_dense(path, case, dtype, transposed):
    topo = topology(case, path)
    a, s = _operands(topo, transposed, dtype, path)
    y = bm.dds(a, s)
    assert y.dtype == dtype and y.is_contiguous()
    _check(y, a, s, reference_topology(case), dtype, msg=f"dds {case} transposed={transposed}")


@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dds_transposed_dense_operand(path, dtype, transposed):
    # The weight gradient of the MoE is dds(x^T, dh): a is a transposed view.
    topo = topology("moe-b64", path)
    a0, s = _operands(topo, transposed, dtype, path)
    a = a0.t().contiguous().t()
    assert a.stride(0) == 1
    _check(bm.dds(a, s), a0, s, reference_topology("moe-b64"), dtype, msg="dds column-major a")


@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "moe-b128-tiny", "no-tokens-b16",
                                  "coo-arbitrary-b16"])
def test_dds_writes_every_element(path, case, transposed):
    # Output columns no stored block reaches (empty expert, the coo case's empty column,
    # everything with no tokens) must be zeros, not the poison.
    topo = topology(case, path)
    a, s = _operands(topo, transposed, torch.float32, path)
    out = poisoned((M, s.shape[1]), torch.float32, path)
    got = _private().dds_out(a, s.data, topo, transposed, out=out)
    assert got is out
    _check(out, a, s, reference_topology(case), torch.float32, msg=f"dds poisoned {case}")


def test_dds_strided_output(path):
    topo = topology("moe-ragged-empty-expert-b16", path)
    a, s = _operands(topo, False, torch.float32, path)
    out = poisoned((s.shape[1], M), torch.float32, path).t()
    _private().dds_out(a, s.data, topo, False, out=out)
    _check(out, a, s, reference_topology("moe-ragged-empty-expert-b16"), torch.float32, msg="dds column-major out")


@pytest.mark.parametrize("transposed", TRANSPOSED)
def test_dds_cpu_chunked_path(monkeypatch, transposed):
    p = _private()
    monkeypatch.setattr(p.cpu, "_CHUNK_ELEMENTS", 1)
    topo = topology("coo-arbitrary-b16", "cpu")
    a, s = _operands(topo, transposed, torch.float64, "cpu")
    got = p.cpu.dds(a, s.data, *p.meta(topo), transposed)
    _check(got, a, s, reference_topology("coo-arbitrary-b16"), torch.float64, msg="dds chunked")


@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "coo-arbitrary-b16"])
def test_dds_gradcheck_fp64(case, transposed):
    topo = topology(case, "cpu")
    a, s = _operands(topo, transposed, torch.float64, "cpu", m=3)
    a.requires_grad_(True)
    data = s.data.requires_grad_(True)
    with backend.prefer_on_cpu("cpu"):
        assert torch.autograd.gradcheck(lambda a, d: bm.dds(a, s.with_data(d)), (a, data))


@pytest.mark.parametrize("transposed", TRANSPOSED)
@pytest.mark.parametrize("case", ["moe-ragged-empty-expert-b16", "moe-b64", "coo-arbitrary-b16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dds_gradients_match_dense(path, case, dtype, transposed):
    topo = topology(case, path)
    a, s = _operands(topo, transposed, dtype, path)
    a.requires_grad_(True)
    data = s.data.requires_grad_(True)
    y = bm.dds(a, s)
    dy = randn(y.shape, dtype, path, scale=sparse_scale(topo, transposed), seed=5)
    da, ddata = torch.autograd.grad(y, (a, data), dy)
    _check_grads(da, ddata, a, s, reference_topology(case), dy, dtype, msg=f"dds {case}")


def test_dds_gradient_of_expanded_output_grad(path):
    # y.sum() hands backward a stride-0 (expanded) gradient: taken through strides as well.
    topo = topology("moe-ragged-empty-expert-b16", path)
    a, s = _operands(topo, False, torch.float32, path)
    a.requires_grad_(True)
    data = s.data.requires_grad_(True)
    y = bm.dds(a, s)
    da, ddata = torch.autograd.grad(y.sum(), (a, data))
    _check_grads(da, ddata, a, s, reference_topology("moe-ragged-empty-expert-b16"), torch.ones(y.shape),
                 torch.float32, msg="dds of sum")


def test_dds_rejects_bad_arguments(path):
    topo = topology("moe-ragged-empty-expert-b16", path)  # S is 48 x 96
    a, s = _operands(topo, False, torch.float32, path)
    with pytest.raises(TypeError, match="dds: s must be a SparseMatrix, got Tensor"):
        bm.dds(a, s.to_dense())
    with pytest.raises(TypeError, match="dds: a must be a tensor, got list"):
        bm.dds([[1.0]], s)
    with pytest.raises(ValueError, match=r"dds: a has 40 columns \(shape \(48, 40\)\) but s has 48 rows"):
        bm.dds(a.t(), s)
    with pytest.raises(ValueError, match=r"dds: a has 48 columns \(shape \(40, 48\)\) but s has 96 rows"):
        bm.dds(a, s.t())
    with pytest.raises(TypeError, match="dds: a is torch.float16 but s.data is torch.float32"):
        bm.dds(a.half(), s)
    with pytest.raises(ValueError, match="dds: a is on unsupported device 'meta'"):
        bm.dds(a.to("meta"), bm.SparseMatrix(topo.to("cpu"), s.data.cpu()))


# -- grouped weights: dds has no grouped operand (its dense operand is an activation), but it
# computes the weight gradient of an SDD whose b is grouped, dW = dds(x^T, dH) viewed [G, K, C].

@pytest.mark.parametrize("layout", GROUPED_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dds_weight_gradients_of_grouped_expert_mlp(path, dtype, layout):
    # x -> sdd(x, W1 [E, H, F]) -> relu on the blocks -> dsd(., W2 [E, F, H]): every backward
    # product (dsd with W1^T grouped along K, dds for dW1, sdd with W2^T grouped along N,
    # dsd with S^T for dW2) against the dense float64 chain.
    topo = moe_topology([5, 0, 20], 32, 16).to(path)
    (p, n), h = topo.shape, 24
    x = randn((p, h), dtype, path, seed=1).requires_grad_(True)
    w1 = grouped(randn((h, n), dtype, path, scale=h ** -0.5, seed=2), "cols", 32, layout).requires_grad_(True)
    w2 = grouped(randn((n, h), dtype, path, scale=32 ** -0.5, seed=3), "rows", 32, layout).requires_grad_(True)
    act = bm.sdd(x, w1, topo)
    y = bm.dsd(act.with_data(torch.relu(act.data)), w2)
    dy = randn(y.shape, dtype, path, seed=4)
    dx, dw1, dw2 = torch.autograd.grad(y, (x, w1, w2), dy)
    assert dw1.shape == w1.shape and dw2.shape == w2.shape

    ref_topo = moe_reference_topology([5, 0, 20], 32, 16)
    x64, w164, w264 = (t.detach().double().requires_grad_(True) for t in (x, w1, w2))
    hid = torch.relu(reference.sdd_reference(x64, torch.cat(list(w164), dim=1), ref_topo))
    y64 = reference.dsd_reference(hid, torch.cat(list(w264), dim=0), ref_topo)
    refs = torch.autograd.grad(y64, (x64, w164, w264), dy.double())
    for name, got, ref in zip(("dx", "dw1", "dw2"), (dx, dw1, dw2), refs):
        assert_close(got, ref, dtype, "layer", msg=f"grouped expert mlp {name}")  # rounded hidden blocks


def test_dds_rejects_grouped_operand(path):
    topo = topology("moe-ragged-empty-expert-b16", path)
    a, s = _operands(topo, False, torch.float32, path)
    with pytest.raises(ValueError, match=r"dds: a must be 2-D, got shape \(2, 40, 24\)"):
        bm.dds(a.reshape(40, 2, 24).transpose(0, 1), s)


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True], ids=["S", "St"])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_dds_gpu(block_size, dtype, transposed):
    g = torch.Generator().manual_seed(block_size)
    tokens = torch.randint(0, 300, (8,), generator=g).tolist()
    tokens[0] = 0
    topo, ref_topo = moe_topology(tokens, 256, block_size).to("cuda"), moe_reference_topology(tokens, 256, block_size)
    a, s = _operands(topo, transposed, dtype, "cuda", m=520)
    _check(bm.dds(a, s), a, s, ref_topo, dtype, msg=f"dds gpu b={block_size}")
    a.requires_grad_(True)
    data = s.data.requires_grad_(True)
    y = bm.dds(a, s)
    dy = randn(y.shape, dtype, "cuda", scale=sparse_scale(topo, transposed), seed=5)
    da, ddata = torch.autograd.grad(y, (a, data), dy)
    _check_grads(da, ddata, a, s, ref_topo, dy, dtype, msg="dds gpu")
