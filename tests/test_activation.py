"""Activation and GLU on sparse blocks (ops.sparse_activation / ops.sparse_glu).

Compared with ``reference.activation_reference`` in float64 (autograd of the reference gives
the expected gradients), on the CPU path and the Triton kernel (interpreted on CPU).
"""

import pytest
import torch

from blocksparse_moe import backend, ops, reference
from blocksparse_moe.matrix import SparseMatrix
from blocksparse_moe.topology import Topology, make_topology
from tolerances import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sparse_pair(dtype, device, block_size=16):
    # A 3x2-block pattern with one empty block row; values cover both signs and the tails.
    topo = Topology.from_block_coo(torch.tensor([0, 0, 2]), torch.tensor([0, 1, 1]),
                                   (3 * block_size, 2 * block_size), block_size).to(device)
    gen = torch.Generator().manual_seed(block_size)
    g = (torch.randn(topo.nnz, block_size, block_size, generator=gen) * 3).to(dtype).to(device)
    u = torch.randn(topo.nnz, block_size, block_size, generator=gen).to(dtype).to(device)
    return topo, g, u


def _run(path, dtype, activation, glu):
    if dtype == torch.float64 and backend.uses_triton(torch.empty(0, device=path)):
        pytest.skip("float64 runs on the CPU path only")
    topo, g, u = sparse_pair(dtype, path)
    g.requires_grad_(True)
    u.requires_grad_(True)
    gs, us = SparseMatrix(topo, g), SparseMatrix(topo, u)
    out = ops.sparse_glu(gs, us, activation) if glu else ops.sparse_activation(gs, activation)
    assert isinstance(out, SparseMatrix) and out.topology is topo
    dout = torch.randn(out.data.shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(path)
    out.data.backward(dout)

    g64 = g.detach().double().requires_grad_(True)
    u64 = u.detach().double().requires_grad_(True)
    want = reference.activation_reference(g64, ops.canonical_activation(activation))
    if glu:
        want = want * u64
    want.backward(dout.double())
    assert_close(out.data, want, dtype, msg="out")
    assert_close(g.grad, g64.grad, dtype, msg="dgate")
    if glu:
        assert_close(u.grad, u64.grad, dtype, msg="dup")


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("glu", [True, False], ids=["glu", "mlp"])
def test_activation_fp32(path, activation, glu):
    _run(path, torch.float32, activation, glu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_swiglu_dtypes(path, dtype):
    _run(path, dtype, "silu", True)


def test_dense_tensor_and_poisoned_out(path):
    # The same op on a dense tensor (the shared expert uses it); the launcher writes every
    # element of a NaN-poisoned output.
    from tolerances import poisoned

    x = torch.randn(5, 48, device=path)
    u = torch.randn(5, 48, device=path)
    got = ops.sparse_glu(x, u, "gelu")
    assert_close(got, reference.activation_reference(x.double(), "gelu") * u.double(), torch.float32)
    impl = backend.impl(x)
    out = poisoned(x.shape, x.dtype, path)
    impl.glu_forward(x, u, 0, out=out)
    assert_close(out, reference.activation_reference(x.double(), "silu") * u.double(), torch.float32)
    dg, du = poisoned(x.shape, x.dtype, path), poisoned(x.shape, x.dtype, path)
    impl.glu_backward(torch.ones_like(x), x, u, 3, dgate=dg, dup=du)
    assert_close(dg, (x > 0).double() * u.double(), torch.float32)
    assert_close(du, x.double().clamp_min(0), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_packed_glu_on_moe_topology(path, dtype, activation):
    """One SDD over a packed [gate | up] weight: block row r holds F/b gate then F/b up blocks.

    Expert 0 has two block rows, expert 1 none (empty expert), expert 2 one: the result on
    the P x E*F topology must be act(gate) * up of the matching columns, in every block.
    """
    b, experts, ffn = 16, 3, 32
    padded_bins = torch.tensor([2 * b, 2 * b, 3 * b], dtype=torch.int32, device=path)
    topo_in = make_topology(padded_bins, experts, 2 * ffn, b)
    topo_out = make_topology(padded_bins, experts, ffn, b)
    gen = torch.Generator().manual_seed(3)
    data = (torch.randn(topo_in.nnz, b, b, generator=gen) * 2).to(dtype).to(path).requires_grad_(True)
    out = ops.sparse_glu_packed(SparseMatrix(topo_in, data), activation, topo_out)
    assert out.topology is topo_out
    dout = torch.randn(out.data.shape, generator=gen).to(dtype).to(path)
    out.data.backward(dout)

    d64 = data.detach().double().requires_grad_(True)
    dense = SparseMatrix(topo_in, d64).to_dense().view(3 * b, experts, 2, ffn)  # [P, E, gate|up, F]
    want = reference.activation_reference(dense[:, :, 0], activation) * dense[:, :, 1]
    want = want.reshape(3 * b, experts * ffn) * topo_out.to_dense_mask().to(want.dtype)
    got_dense = out.to_dense()
    assert_close(got_dense, want, dtype, msg="out")
    (want * SparseMatrix(topo_out, dout.double()).to_dense()).sum().backward()
    assert_close(data.grad, d64.grad, dtype, msg="dh")


def test_packed_glu_on_dense_rows(path):
    # The shared expert's [T, 2S] rows: act(h[:, :S]) * h[:, S:].
    h = torch.randn(7, 2 * 24, device=path, requires_grad=True)
    out = ops.sparse_glu_packed(h, "silu")
    out.backward(torch.ones_like(out))
    h64 = h.detach().double().requires_grad_(True)
    want = reference.activation_reference(h64[:, :24], "silu") * h64[:, 24:]
    want.sum().backward()
    assert_close(out, want, torch.float32)
    assert_close(h.grad, h64.grad, torch.float32)


def test_empty_sparse_matrix(path):
    topo = Topology.from_block_coo(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                                   (0, 32), 16).to(path)
    s = SparseMatrix(topo, torch.zeros(0, 16, 16, device=path, requires_grad=True))
    out = ops.sparse_glu(s, s, "silu")
    out.data.sum().backward()
    assert out.data.shape == (0, 16, 16)
    # Zero tokens on the MoE topologies: zero block rows, still differentiable.
    pb = torch.zeros(2, dtype=torch.int32, device=path)
    h = SparseMatrix(make_topology(pb, 2, 64, 16), torch.zeros(0, 16, 16, device=path, requires_grad=True))
    out = ops.sparse_glu_packed(h, "silu", make_topology(pb, 2, 32, 16))
    assert out.data.shape == (0, 16, 16)


def test_bad_arguments():
    topo, g, u = sparse_pair(torch.float32, "cpu")
    s = SparseMatrix(topo, g)
    with pytest.raises(ValueError, match="sparse_glu: unknown activation 'tanh'"):
        ops.sparse_glu(s, s, "tanh")
    with pytest.raises(TypeError, match="must both be SparseMatrix or both tensors"):
        ops.sparse_glu(s, u, "silu")
    with pytest.raises(TypeError, match="gate is torch.float32 but up is torch.float16"):
        ops.sparse_glu(g, u.half(), "silu")
    with pytest.raises(ValueError, match="gate has shape"):
        ops.sparse_glu(g, u[:1], "silu")
    other = Topology.from_block_coo(torch.tensor([0]), torch.tensor([0]), (48, 32), 16)
    with pytest.raises(ValueError, match="different topologies"):
        ops.sparse_glu(s, SparseMatrix(other, g[:1]), "silu")
    with pytest.raises(ValueError, match="transposed"):
        ops.sparse_glu(s, s.t(), "silu")
    with pytest.raises(TypeError, match="SparseMatrix or a tensor"):
        ops.sparse_activation([1.0], "silu")
    with pytest.raises(TypeError, match="torch.int64"):
        ops.sparse_activation(torch.zeros(3, dtype=torch.int64), "silu")
    with pytest.raises(ValueError, match="even last dimension"):
        ops.sparse_glu_packed(torch.zeros(3, 5), "silu")
    with pytest.raises(TypeError, match="topology"):
        ops.sparse_glu_packed(s, "silu")
    with pytest.raises(ValueError, match="topology must be"):
        ops.sparse_glu_packed(s, "silu", topo)
