"""Block-sparse products: ``sdd``, ``dsd``, ``dds`` (autograd and the public functions).

The backward of each product is made of the other products (stk's scheme), so three
kernels cover the six passes:

    sdd  C = (A @ B) on S's blocks:   dA = dsd(dC, B^T)          dB = dsd(dC^T, A)^T
    dsd  Y = S @ B:                   dS = sdd(dY, B^T) on S     dB = dsd(S^T, dY)
         Y = S^T @ B:                 dS = sdd(B, dY^T) on S     dB = dsd(S, dY)
    dds  Y = A @ S:                   dA = dds(dY, S^T)          dS = sdd(A^T, dY) on S
         Y = A @ S^T:                 dA = dds(dY, S)            dS = sdd(dY^T, A) on S

Transposes of dense operands are views: both back ends take strides. Index ranges of the
topology are not re-validated per call (that would synchronise a GPU): Topology's
constructors build them in range.

Grouped dense operands (``grouped.py``): sdd's b may be ``[G, K, C]`` and dsd's b
``[G, R, N]``, so an expert weight stack is read in place whatever its layout;
``transpose(-2, -1)`` turns one kind into the other, so the formulas above hold unchanged,
and gradients of a grouped b come back in its 3-D shape.

Every launch without ``out=`` goes through one ``blocksparse_moe::product`` custom op, so
the Functions trace under ``torch.compile``: a custom op cannot take a ``Topology``, hence
the six metadata tensors in the op's signature.
"""

from __future__ import annotations


import torch
from torch.autograd.function import once_differentiable

from .. import backend, checks, grouped
from ..library import custom_op
from ..matrix import SparseMatrix
from ..topology import Topology


def _meta(topology: Topology):
    """The six metadata tensors, in the order every product launcher takes them."""
    return (topology.row_indices, topology.column_indices, topology.offsets,
            topology.column_indices_t, topology.offsets_t, topology.block_offsets_t)


def _launch(kind: str, lhs, rhs, meta, arg, out=None, a_rows=None):
    """Run ``kind`` ("sdd": arg = block size; "dsd"/"dds": arg = transposed) on the back end."""
    impl = backend.impl(lhs)
    if kind == "sdd":
        return impl.sdd(lhs, rhs, *meta, arg, out=out, a_rows=a_rows)
    return getattr(impl, kind)(lhs, rhs, *meta, bool(arg), out=out)


def _product_fake(kind, lhs, rhs, row_indices, column_indices, offsets, column_indices_t, offsets_t,
                  block_offsets_t, arg):
    if kind == "sdd":
        return lhs.new_empty((row_indices.shape[0], arg, arg))
    bs = lhs.shape[1] if kind == "dsd" else rhs.shape[1]
    rows_t = (offsets_t if arg else offsets).shape[0] - 1
    if kind == "dsd":  # rhs [K, N] or grouped [G, R, N]
        return lhs.new_empty((rows_t * bs, rhs.shape[-1]))
    cols = (offsets if arg else offsets_t).shape[0] - 1
    return rhs.new_empty((lhs.shape[0], cols * bs))


@custom_op("product", _product_fake)
def _product(kind: str, lhs: torch.Tensor, rhs: torch.Tensor, row_indices: torch.Tensor,
             column_indices: torch.Tensor, offsets: torch.Tensor, column_indices_t: torch.Tensor,
             offsets_t: torch.Tensor, block_offsets_t: torch.Tensor, arg: int) -> torch.Tensor:
    return _launch(kind, lhs, rhs, (row_indices, column_indices, offsets, column_indices_t, offsets_t,
                                    block_offsets_t), arg)


def _run(kind: str, lhs, rhs, topology: Topology, arg, out=None, a_rows=None):
    # ``out=`` / ``a_rows=`` (tests' poisoned buffers, the row gather) call the launchers directly.
    if out is None and a_rows is None:
        return _product(kind, lhs, rhs, *_meta(topology), int(arg))
    return _launch(kind, lhs, rhs, _meta(topology), arg, out=out, a_rows=a_rows)


def _sdd(a, b, topology, out=None, a_rows=None):
    return _run("sdd", a, b, topology, topology.block_size, out=out, a_rows=a_rows)


def _dsd(data, b, topology, transposed, out=None):
    return _run("dsd", data, b, topology, transposed, out=out)


def _dds(a, data, topology, transposed, out=None):
    return _run("dds", a, data, topology, transposed, out=out)


class _SddFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, topology):
        ctx.save_for_backward(a, b)
        ctx.topology = topology
        return _sdd(a, b, topology)

    @staticmethod
    @once_differentiable
    def backward(ctx, ddata):
        a, b = ctx.saved_tensors
        topo = ctx.topology
        # b.transpose(-2, -1): b.t(), or for a grouped [G, K, C] b the [G, C, K] operand
        # grouped along DSD's K (B^T stacks the transposed groups).
        da = _dsd(ddata, b.transpose(-2, -1), topo, False) if ctx.needs_input_grad[0] else None
        db = None
        if ctx.needs_input_grad[1]:
            # A^T @ dC as (dC^T @ A)^T: written row-major in b's own [.., K] order, so for a
            # weight stored [E, 2F, H] (read as its transpose) the gradient needs no copy.
            db = grouped.flat_grad(_dsd(ddata, a, topo, True).t(), b, "cols")
        return da, db, None


class _DsdFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, data, b, topology, transposed):
        ctx.save_for_backward(data, b)
        ctx.topology, ctx.transposed = topology, transposed
        return _dsd(data, b, topology, transposed)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        data, b = ctx.saved_tensors
        topo, transposed = ctx.topology, ctx.transposed
        ddata = db = None
        if ctx.needs_input_grad[0]:
            if transposed:
                # b is SDD's left operand here, which is never grouped: its rows stacked
                # (a view when the layout allows, else one copy in backward).
                rows = b if b.dim() == 2 else b.reshape(b.shape[0] * b.shape[1], b.shape[2])
                ddata = _sdd(rows, dout.t(), topo)
            else:
                ddata = _sdd(dout, b.transpose(-2, -1), topo)  # grouped [G, N, R] along SDD's N
        if ctx.needs_input_grad[1]:
            db = grouped.flat_grad(_dsd(data, dout, topo, not transposed), b, "rows")
        return ddata, db, None, None


class _DdsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, data, topology, transposed):
        ctx.save_for_backward(a, data)
        ctx.topology, ctx.transposed = topology, transposed
        return _dds(a, data, topology, transposed)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        a, data = ctx.saved_tensors
        topo, transposed = ctx.topology, ctx.transposed
        da = ddata = None
        if ctx.needs_input_grad[0]:
            da = _dds(dout, data, topo, not transposed)
        if ctx.needs_input_grad[1]:
            ddata = _sdd(dout.t(), a, topo) if transposed else _sdd(a.t(), dout, topo)
        return da, ddata, None, None


def _check_sparse(op: str, name: str, s) -> None:
    if not isinstance(s, SparseMatrix):
        raise TypeError(f"{op}: {name} must be a SparseMatrix, got {type(s).__name__}")
    topo, data = s.topology, s.data
    b = topo.block_size
    checks.tensor(op, f"{name}.data", data)
    if tuple(data.shape) != (topo.nnz, b, b):
        raise ValueError(f"{op}: {name}.data has shape {tuple(data.shape)} but its topology needs "
                         f"(nnz={topo.nnz}, {b}, {b})")
    if data.device != topo.device:
        raise ValueError(f"{op}: {name}.data is on {data.device} but its topology is on {topo.device}")


def _check_dense(op: str, named) -> None:
    for name, t in named:
        checks.float_tensor(op, name, t)
    checks.same_dtype(op, named)
    checks.same_device(op, named)


def sdd(a: torch.Tensor, b: torch.Tensor, topology: Topology) -> SparseMatrix:
    """``(a @ b)`` computed only on ``topology``'s blocks: a ``SparseMatrix`` of that topology.

    ``a [M, K]``, ``b [K, N]`` with ``(M, N) == topology.shape``; fp32/fp16/bf16 (and fp64 on
    the CPU path), accumulated in fp32. Differentiable in ``a`` and ``b``. Any strides.

    ``b`` may be *grouped*: ``[G, K, C]`` standing for the ``[K, G*C]`` operand whose columns
    ``g*C .. g*C + C - 1`` are ``b[g]`` (``B[k, g*C + c] = b[g, k, c]``), e.g. an expert weight
    stack ``[E, H, W]``; ``C`` must be a multiple of the block size. It is read through its
    three strides, never copied, and its gradient has its 3-D shape.
    """
    op = "sdd"
    checks.tensor(op, "a", a)
    checks.tensor(op, "b", b)
    checks.dims(op, "a", a, (2,), "2-D")
    checks.dims(op, "b", b, (2, 3), "2-D or grouped 3-D [G, K, C]")
    if not isinstance(topology, Topology):
        raise TypeError(f"{op}: topology must be a Topology, got {type(topology).__name__}")
    k_b, n_b = grouped.flat_shape(b, "cols")
    if a.shape[1] != k_b:
        raise ValueError(f"{op}: a has {a.shape[1]} columns but b has {k_b} rows")
    grouped.grouped_cols(op, b, n_b, topology.block_size)
    if (a.shape[0], n_b) != tuple(topology.shape):
        raise ValueError(f"{op}: a @ b would be {a.shape[0]}x{n_b} but the topology is "
                         f"{topology.shape[0]}x{topology.shape[1]} (a {tuple(a.shape)}, b {tuple(b.shape)})")
    checks.same_device(op, (("a", a), ("the topology", topology.row_indices)))
    _check_dense(op, (("a", a), ("b", b)))
    return SparseMatrix(topology, _SddFn.apply(a, b, topology))


def dsd(s: SparseMatrix, b: torch.Tensor) -> torch.Tensor:
    """``s @ b`` for a block-sparse ``s [M, K]`` (or a transposed one, ``s.t()``) and ``b [K, N]``.

    Returns a dense ``[M, N]``; rows of empty block rows are zero. Differentiable in
    ``s.data`` and ``b``.

    ``b`` may be *grouped*: ``[G, R, N]`` standing for the ``[G*R, N]`` operand whose rows
    ``g*R .. g*R + R - 1`` are ``b[g]`` (``B[g*R + r, n] = b[g, r, n]``), e.g. an expert weight
    stack ``[E, F, H]`` in any layout; ``R`` must be a multiple of the block size. It is read
    through its three strides, never copied, and its gradient has its 3-D shape. (The
    gradient of ``s.data`` for a transposed ``s`` reads ``b`` as ``[G*R, N]``: a view when
    the strides allow, else one copy in backward.)
    """
    op = "dsd"
    _check_sparse(op, "s", s)
    checks.tensor(op, "b", b)
    checks.dims(op, "b", b, (2, 3), "2-D or grouped 3-D [G, R, N]")
    k_b, _ = grouped.flat_shape(b, "rows")
    if s.shape[1] != k_b:
        raise ValueError(f"{op}: s has {s.shape[1]} columns (shape {s.shape}) but b has {k_b} rows "
                         f"(shape {tuple(b.shape)})")
    grouped.grouped_rows(op, b, k_b, s.block_size)
    _check_dense(op, (("s.data", s.data), ("b", b)))
    return _DsdFn.apply(s.data, b, s.topology, s.transposed)


def dds(a: torch.Tensor, s: SparseMatrix) -> torch.Tensor:
    """``a @ s`` for a dense ``a [M, K]`` and a block-sparse ``s [K, N]`` (or ``s.t()``).

    Returns a dense ``[M, N]``. Differentiable in ``a`` and ``s.data``.
    """
    op = "dds"
    checks.tensor(op, "a", a)
    checks.dims(op, "a", a, (2,), "2-D")
    _check_sparse(op, "s", s)
    if a.shape[1] != s.shape[0]:
        raise ValueError(f"{op}: a has {a.shape[1]} columns (shape {tuple(a.shape)}) but s has {s.shape[0]} rows "
                         f"(shape {s.shape})")
    _check_dense(op, (("a", a), ("s.data", s.data)))
    return _DdsFn.apply(a, s.data, s.topology, s.transposed)
