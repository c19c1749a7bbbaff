"""Autograd for every op, and the functional API users call.

This is the only module that defines ``torch.autograd.Function``s. Each op checks its
arguments (raising ``ValueError``/``TypeError`` that name the argument), asks ``backend``
which back end runs it, and calls a launcher in ``kernels/`` or the CPU path.

Every launch goes through a ``blocksparse_moe::`` custom op (``_library.custom_op``), so
the Functions below trace under ``torch.compile`` without a graph break: Dynamo traces
their forward and backward, and each launch is one opaque node with a fake implementation.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch.autograd.function import once_differentiable
from torch.fx.experimental.symbolic_shapes import guard_or_false

from . import _grouped, backend
from ._library import custom_op
from .matrix import SparseMatrix
from .routing import Routing
from .topology import Topology

# ---------------------------------------------------------------------------------------
# Block-sparse products: sdd, dsd, dds
# ---------------------------------------------------------------------------------------
# The backward of each product is made of the other products (stk's scheme), so three
# kernels cover the six passes:
#   sdd  C = (A @ B) on S's blocks:   dA = dsd(dC, B^T)          dB = dsd(dC^T, A)^T
#   dsd  Y = S @ B:                   dS = sdd(dY, B^T) on S     dB = dsd(S^T, dY)
#        Y = S^T @ B:                 dS = sdd(B, dY^T) on S     dB = dsd(S, dY)
#   dds  Y = A @ S:                   dA = dds(dY, S^T)          dS = sdd(A^T, dY) on S
#        Y = A @ S^T:                 dA = dds(dY, S)            dS = sdd(dY^T, A) on S
# Transposes of dense operands are views: the kernels and the CPU path take strides.
# Index ranges of the topology are not re-validated per call (that would synchronise a
# GPU): Topology's constructors (make_topology, from_block_coo) build them in range.
#
# Grouped dense operands (``_grouped.py``): sdd's b may be ``[G, K, C]`` (B = the columns
# of b[0], .., b[G-1] side by side) and dsd's b ``[G, R, N]`` (B = their rows stacked), so
# an expert weight stack is read in place whatever its layout. ``transpose(-2, -1)`` turns
# one kind into the other, so the backward formulas above hold unchanged; gradients of a
# grouped b come back in its 3-D shape (views of the 2-D product results).



_PRODUCT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _topology_meta(topology: Topology):
    """The six metadata tensors, in the order every product launcher takes them."""
    return (topology.row_indices, topology.column_indices, topology.offsets,
            topology.column_indices_t, topology.offsets_t, topology.block_offsets_t)


def _sdd_launch(a, b, *meta_and_block_size, out=None, a_rows=None):
    if backend.select(a) == "cpu":
        from .cpu.products import sdd as impl
    else:
        from .kernels.sdd import sdd as impl
    return impl(a, b, *meta_and_block_size, out=out, a_rows=a_rows)


def _dsd_launch(data, b, *meta_and_transposed, out=None):
    if backend.select(data) == "cpu":
        from .cpu.products import dsd as impl
    else:
        from .kernels.dsd import dsd as impl
    return impl(data, b, *meta_and_transposed, out=out)


def _dds_launch(a, data, *meta_and_transposed, out=None):
    if backend.select(a) == "cpu":
        from .cpu.products import dds as impl
    else:
        from .kernels.dds import dds as impl
    return impl(a, data, *meta_and_transposed, out=out)


# The products as custom ops: the topology passed as its six tensors, fresh contiguous outputs.
def _sdd_fake(a, b, row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t,
              block_size):
    return a.new_empty((row_indices.shape[0], block_size, block_size))


@custom_op("sdd", _sdd_fake)
def _sdd_op(a: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
            offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
            block_offsets_t: torch.Tensor, block_size: int) -> torch.Tensor:
    return _sdd_launch(a, b, row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t,
                       block_size)


def _dsd_fake(data, b, row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t,
              transposed):
    rows = (offsets_t if transposed else offsets).shape[0] - 1
    return data.new_empty((rows * data.shape[1], b.shape[-1]))  # b [K, N] or grouped [G, R, N]


@custom_op("dsd", _dsd_fake)
def _dsd_op(data: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
            offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
            block_offsets_t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return _dsd_launch(data, b, row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t,
                       transposed)


def _dds_fake(a, data, row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t,
              transposed):
    cols = (offsets if transposed else offsets_t).shape[0] - 1
    return data.new_empty((a.shape[0], cols * data.shape[1]))


@custom_op("dds", _dds_fake)
def _dds_op(a: torch.Tensor, data: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
            offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
            block_offsets_t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return _dds_launch(a, data, row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t,
                       transposed)


# ``out=`` / ``a_rows=`` (tests' poisoned buffers, the fused gather) call the launchers directly.
def _sdd_impl(a, b, topology, out=None, a_rows=None):
    if out is None and a_rows is None:
        return _sdd_op(a, b, *_topology_meta(topology), topology.block_size)
    return _sdd_launch(a, b, *_topology_meta(topology), topology.block_size, out=out, a_rows=a_rows)


def _dsd_impl(data, b, topology, transposed, out=None):
    if out is None:
        return _dsd_op(data, b, *_topology_meta(topology), transposed)
    return _dsd_launch(data, b, *_topology_meta(topology), transposed, out=out)


def _dds_impl(a, data, topology, transposed, out=None):
    if out is None:
        return _dds_op(a, data, *_topology_meta(topology), transposed)
    return _dds_launch(a, data, *_topology_meta(topology), transposed, out=out)


def _check_matrix_arg(op: str, name: str, t, grouped: str = "") -> None:
    """``t`` is a 2-D tensor, or with ``grouped`` (its 3-D shape, e.g. "[G, K, C]") 3-D too."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if grouped and t.dim() not in (2, 3):
        raise ValueError(f"{op}: {name} must be 2-D or grouped 3-D {grouped}, got shape {tuple(t.shape)}")
    if not grouped and t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")


def _check_group_size(op: str, b: torch.Tensor, dim: int, block_size: int) -> None:
    """A grouped operand's grouped size must be a multiple of the block size."""
    if b.dim() == 3 and b.shape[dim] % block_size:
        name = "C" if dim == 2 else "R"
        raise ValueError(f"{op}: grouped b has shape {tuple(b.shape)}; its {name} = {b.shape[dim]} must be a "
                         f"multiple of the block size {block_size}")


def _check_sparse_arg(op: str, name: str, s) -> None:
    if not isinstance(s, SparseMatrix):
        raise TypeError(f"{op}: {name} must be a SparseMatrix, got {type(s).__name__}")
    topo, data = s.topology, s.data
    b = topo.block_size
    if not isinstance(data, torch.Tensor) or tuple(data.shape) != (topo.nnz, b, b):
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"{op}: {name}.data has shape {shape} but its topology needs (nnz={topo.nnz}, {b}, {b})")
    if data.device != topo.device:
        raise ValueError(f"{op}: {name}.data is on {data.device} but its topology is on {topo.device}")


def _check_dtype_device(op: str, named) -> None:
    """Same dtype and device for every (name, tensor); dtype supported by the back end."""
    (first_name, first), *rest = named
    for name, t in rest:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {first_name} is {first.dtype} but {name} is {t.dtype}")
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{op}: {first_name} is on {first.device} but {name} is on {t.device}")
    allowed = _PRODUCT_DTYPES
    if backend.select(first) == "cpu":
        allowed = allowed + (torch.float64,)  # the torch path runs fp64 (gradcheck)
    if first.dtype not in allowed:
        raise TypeError(f"{op}: {first_name} has dtype {first.dtype}; supported here: "
                        f"{', '.join(str(d) for d in allowed)}")


class _SddFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, topology):
        ctx.save_for_backward(a, b)
        ctx.topology = topology
        return _sdd_impl(a, b, topology)

    @staticmethod
    @once_differentiable
    def backward(ctx, ddata):
        a, b = ctx.saved_tensors
        topo = ctx.topology
        # b.transpose(-2, -1): b.t(), or for a grouped [G, K, C] b the [G, C, K] operand
        # grouped along DSD's K (B^T stacks the transposed groups).
        da = _dsd_impl(ddata, b.transpose(-2, -1), topo, False) if ctx.needs_input_grad[0] else None
        db = None
        if ctx.needs_input_grad[1]:
            # A^T @ dC as (dC^T @ A)^T: the same products as dds(A^T, dC), but the result
            # is written row-major in b's own [.., K] order, so for a weight stored
            # [E, 2F, H] (read as its transpose) the gradient needs no transposing copy.
            db = _grouped.flat_grad(_dsd_impl(ddata, a, topo, True).t(), b, "cols")
        return da, db, None


class _DsdFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, data, b, topology, transposed):
        ctx.save_for_backward(data, b)
        ctx.topology, ctx.transposed = topology, transposed
        return _dsd_impl(data, b, topology, transposed)

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
                ddata = _sdd_impl(rows, dout.t(), topo)
            else:
                ddata = _sdd_impl(dout, b.transpose(-2, -1), topo)  # grouped [G, N, R] along SDD's N
        if ctx.needs_input_grad[1]:
            db = _grouped.flat_grad(_dsd_impl(data, dout, topo, not transposed), b, "rows")
        return ddata, db, None, None


class _DdsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, data, topology, transposed):
        ctx.save_for_backward(a, data)
        ctx.topology, ctx.transposed = topology, transposed
        return _dds_impl(a, data, topology, transposed)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        a, data = ctx.saved_tensors
        topo, transposed = ctx.topology, ctx.transposed
        da = ddata = None
        if ctx.needs_input_grad[0]:
            da = _dds_impl(dout, data, topo, not transposed)
        if ctx.needs_input_grad[1]:
            ddata = _sdd_impl(dout.t(), a, topo) if transposed else _sdd_impl(a.t(), dout, topo)
        return da, ddata, None, None


def sdd(a: torch.Tensor, b: torch.Tensor, topology: Topology) -> SparseMatrix:
    """``(a @ b)`` computed only on ``topology``'s blocks: a ``SparseMatrix`` of that topology.

    ``a [M, K]``, ``b [K, N]`` with ``(M, N) == topology.shape``; fp32/fp16/bf16 (and fp64 on
    the CPU path), accumulated in fp32. Differentiable in ``a`` and ``b``. Any strides.

    ``b`` may be *grouped*: ``[G, K, C]`` standing for the ``[K, G*C]`` operand whose columns
    ``g*C .. g*C + C - 1`` are ``b[g]`` (``B[k, g*C + c] = b[g, k, c]``), e.g. an expert weight
    stack ``[E, H, W]``; ``C`` must be a multiple of the block size. It is read through its
    three strides, never copied, and its gradient has its 3-D shape.
    """
    _check_matrix_arg("sdd", "a", a)
    _check_matrix_arg("sdd", "b", b, grouped="[G, K, C]")
    if not isinstance(topology, Topology):
        raise TypeError(f"sdd: topology must be a Topology, got {type(topology).__name__}")
    k_b, n_b = _grouped.flat_shape(b, "cols")
    if a.shape[1] != k_b:
        raise ValueError(f"sdd: a has {a.shape[1]} columns but b has {k_b} rows")
    _check_group_size("sdd", b, 2, topology.block_size)
    if (a.shape[0], n_b) != tuple(topology.shape):
        raise ValueError(f"sdd: a @ b would be {a.shape[0]}x{n_b} but the topology is "
                         f"{topology.shape[0]}x{topology.shape[1]} (a {tuple(a.shape)}, b {tuple(b.shape)})")
    if topology.device != a.device:
        raise ValueError(f"sdd: a is on {a.device} but the topology is on {topology.device}")
    _check_dtype_device("sdd", (("a", a), ("b", b)))
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
    _check_sparse_arg("dsd", "s", s)
    _check_matrix_arg("dsd", "b", b, grouped="[G, R, N]")
    k_b, _ = _grouped.flat_shape(b, "rows")
    if s.shape[1] != k_b:
        raise ValueError(f"dsd: s has {s.shape[1]} columns (shape {s.shape}) but b has {k_b} rows "
                         f"(shape {tuple(b.shape)})")
    _check_group_size("dsd", b, 1, s.block_size)
    _check_dtype_device("dsd", (("s.data", s.data), ("b", b)))
    return _DsdFn.apply(s.data, b, s.topology, s.transposed)


def dds(a: torch.Tensor, s: SparseMatrix) -> torch.Tensor:
    """``a @ s`` for a dense ``a [M, K]`` and a block-sparse ``s [K, N]`` (or ``s.t()``).

    Returns a dense ``[M, N]``. Differentiable in ``a`` and ``s.data``.
    """
    _check_matrix_arg("dds", "a", a)
    _check_sparse_arg("dds", "s", s)
    if a.shape[1] != s.shape[0]:
        raise ValueError(f"dds: a has {a.shape[1]} columns (shape {tuple(a.shape)}) but s has {s.shape[0]} rows "
                         f"(shape {s.shape})")
    _check_dtype_device("dds", (("a", a), ("s.data", s.data)))
    return _DdsFn.apply(a, s.data, s.topology, s.transposed)


# ---------------------------------------------------------------------------------------
# Permutes: padded_gather / padded_scatter, gather / scatter
# ---------------------------------------------------------------------------------------
# Slot s = t*k + j (token t's j-th expert) lives at row rows[s] of the permuted layout:
# routing.padded_rows for the padded [P, H] layout, routing.rows for the unpadded [T*k, H]
# one. The kernels that own output rows need the inverse map row_slots (-1 on padding):
# routing.indices for the unpadded layout, built by invert_rows for the padded one.


_PERMUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _permute_impl(t: torch.Tensor):
    """The permute module of the back end that runs on ``t``'s device."""
    if backend.select(t) == "cpu":
        from .cpu import permute as impl
    else:
        from .kernels import permute as impl
    return impl


def _gather_fake(x, row_slots, top_k, weights):
    return x.new_empty((row_slots.shape[0], x.shape[1]))


@custom_op("gather", _gather_fake)
def _permute_gather(x: torch.Tensor, row_slots: torch.Tensor, top_k: int,
                    weights: Optional[torch.Tensor]) -> torch.Tensor:
    return _permute_impl(x).gather(x, row_slots, top_k, weights)


def _scatter_fake(y, rows, top_k, weights):
    return y.new_empty((rows.shape[0] // top_k, y.shape[1]))


@custom_op("scatter", _scatter_fake)
def _permute_scatter(y: torch.Tensor, rows: torch.Tensor, top_k: int,
                     weights: Optional[torch.Tensor]) -> torch.Tensor:
    return _permute_impl(y).scatter(y, rows, top_k, weights)


def _scatter_wgrad_fake(dout, y, rows, top_k, dtype):
    return dout.new_empty((dout.shape[0], top_k), dtype=dtype)


@custom_op("scatter_wgrad", _scatter_wgrad_fake)
def _permute_scatter_wgrad(dout: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, top_k: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """``dw [T, k]`` in ``dtype`` (the weights')."""
    out = torch.empty((dout.shape[0], top_k), dtype=dtype, device=dout.device)
    return _permute_impl(dout).scatter_wgrad(dout, y, rows, top_k, out=out)


def _invert_rows_fake(rows, num_rows):
    return rows.new_empty((num_rows,), dtype=torch.int32)


@custom_op("invert_rows", _invert_rows_fake)
def _permute_invert_rows(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return _permute_impl(rows).invert_rows(rows, num_rows)


def _unit_stride_cols(t: torch.Tensor) -> bool:
    """Whether 2-D ``t`` has unit column stride (or at most one column, where it is moot).

    The width may be an unbacked size under torch.compile: asking ``shape[1] <= 1`` of it
    would need its value, so the stride is asked first and the width only if it can be
    decided (a copy otherwise, which is always correct).
    """
    return t.stride(1) == 1 or guard_or_false(t.shape[1] <= 1)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    # Incoming gradients can be expanded views (e.g. the grad of .sum()); the kernels
    # need unit stride along H, so those (and only those) are copied.
    return t if t.dim() == 2 and _unit_stride_cols(t) else t.contiguous()


class _GatherFn(torch.autograd.Function):
    """``out[rows[s]] = x[s // k]``; backward: ``dx[t] = sum_j dout[rows[t*k + j]]``."""

    @staticmethod
    def forward(ctx, x, rows, row_slots, top_k):
        ctx.save_for_backward(rows)
        ctx.top_k = top_k
        return _permute_gather(x, row_slots, top_k, None)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        (rows,) = ctx.saved_tensors
        return _permute_scatter(_unit_stride(dout), rows, ctx.top_k, None), None, None, None


class _ScatterFn(torch.autograd.Function):
    """``out[t] = sum_j w[t, j] * y[rows[t*k + j]]``.

    Backward: ``dy[rows[s]] = w[s] * dout[s // k]`` (padding rows zero) and
    ``dw[t, j] = <dout[t], y[rows[t*k + j]]>``, both in fp32 and without atomics.
    """

    @staticmethod
    def forward(ctx, y, weights, rows, row_slots, top_k):
        # y is kept only when the weights need a gradient; row_slots (None for the padded
        # layout) is built in backward when dy is needed.
        need_dw = weights is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(y if need_dw else None, weights, rows, row_slots)
        ctx.top_k, ctx.num_rows = top_k, y.shape[0]
        return _permute_scatter(y, rows, top_k, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        y, weights, rows, row_slots = ctx.saved_tensors
        dout = _unit_stride(dout)
        dy = dw = None
        if ctx.needs_input_grad[0]:
            if row_slots is None:
                row_slots = _permute_invert_rows(rows, ctx.num_rows)
            dy = _permute_gather(dout, row_slots, ctx.top_k, weights)
        if weights is not None and ctx.needs_input_grad[1]:
            dw = _permute_scatter_wgrad(dout, y, rows, ctx.top_k, weights.dtype)
        return dy, dw, None, None, None


def _check_permute_routing(op: str, routing, top_k, device: torch.device) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"{op}: routing must be a Routing (from blocksparse_moe.route), got {type(routing).__name__}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"{op}: top_k must be an int, got {type(top_k).__name__}")
    if top_k != routing.top_k:
        raise ValueError(f"{op}: top_k={top_k} but routing was built with top_k={routing.top_k}")
    for name in ("indices", "rows", "padded_rows"):
        t = getattr(routing, name)
        if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{op}: routing.{name} must be a contiguous int32 vector, "
                             f"got {t.dtype} shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{op}: routing.{name} is on {t.device} but the data is on {device}")


def _check_permute_data(op: str, name: str, t, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _PERMUTE_DTYPES:
        raise TypeError(f"{op}: {name} must be float32/float16/bfloat16 (float64 on the CPU path), got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} is on unsupported device '{t.device}' (cpu or cuda)")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other operands are on {device}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{op}: {name} must have unit stride along its last dim (row strides are fine), "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")


def _check_permute_backend(op: str, t: torch.Tensor) -> None:
    if t.dtype == torch.float64 and backend.select(t) != "cpu":
        raise TypeError(f"{op}: float64 runs on the CPU path only; the Triton kernels take "
                        f"float32/float16/bfloat16")


def _check_gather_args(op: str, x, routing, top_k) -> None:
    _check_permute_data(op, "x", x)
    _check_permute_routing(op, routing, top_k, x.device)
    if x.shape[0] != routing.num_tokens:
        raise ValueError(f"{op}: x has {x.shape[0]} rows (tokens) but routing has {routing.num_tokens} tokens "
                         f"(x shape {tuple(x.shape)})")
    _check_permute_backend(op, x)


def _check_scatter_args(op: str, y, routing, weights, top_k, num_rows: int) -> None:
    _check_permute_data(op, "y", y)
    _check_permute_routing(op, routing, top_k, y.device)
    if y.shape[0] != num_rows:
        raise ValueError(f"{op}: y must have {num_rows} rows for this routing, got shape {tuple(y.shape)}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"{op}: weights must be a tensor or None, got {type(weights).__name__}")
        if weights.dtype not in (y.dtype, torch.float32):
            raise TypeError(f"{op}: weights must have y's dtype ({y.dtype}) or float32, got {weights.dtype}")
        if weights.device != y.device:
            raise ValueError(f"{op}: weights is on {weights.device} but y is on {y.device}")
        T = routing.num_tokens
        if tuple(weights.shape) != (T, top_k):
            raise ValueError(f"{op}: weights must be [T, top_k] = [{T}, {top_k}], got {tuple(weights.shape)}")
    _check_permute_backend(op, y)


def padded_gather(x: torch.Tensor, routing: Routing, top_k: int) -> torch.Tensor:
    """Permute token rows into the expert-sorted, block-padded layout.

    Args:
        x: ``[T, H]`` token activations (unit stride along H; any row stride).
        routing: from :func:`blocksparse_moe.route` for these ``T`` tokens.
        top_k: ``k``; must equal ``routing.top_k``.

    Returns:
        ``[P, H]`` in ``x``'s dtype: row ``routing.padded_rows[s]`` holds ``x[s // k]`` and
        padding rows are zero. ``P = routing.padded_tokens`` (one host read on a GPU).
        Differentiable w.r.t. ``x`` (backward: an unweighted ``padded_scatter``).
    """
    _check_gather_args("padded_gather", x, routing, top_k)
    row_slots = _permute_invert_rows(routing.padded_rows, routing.padded_tokens)
    return _GatherFn.apply(x, routing.padded_rows, row_slots, top_k)


def gather(x: torch.Tensor, routing: Routing, top_k: int) -> torch.Tensor:
    """Like :func:`padded_gather` without padding: ``[T*k, H]``, row ``routing.rows[s]`` = ``x[s // k]``."""
    _check_gather_args("gather", x, routing, top_k)
    return _GatherFn.apply(x, routing.rows, routing.indices, top_k)


def padded_scatter(y: torch.Tensor, routing: Routing, weights: torch.Tensor | None,
                   top_k: int) -> torch.Tensor:
    """Un-permute expert outputs back to tokens, combining each token's ``k`` rows.

    Args:
        y: ``[P, H]`` in the padded layout of ``routing`` (padding rows are never read).
        routing: from :func:`blocksparse_moe.route`.
        weights: ``[T, k]`` in ``y``'s dtype or float32 (e.g. router probabilities), or None
            for weights 1.
        top_k: ``k``; must equal ``routing.top_k``.

    Returns:
        ``[T, H]`` in ``y``'s dtype: ``out[t] = sum_j weights[t, j] * y[padded_rows[t*k + j]]``,
        summed in fp32 in a fixed order (deterministic). Differentiable w.r.t. ``y`` and
        ``weights``. Checking ``P`` costs one host read on a GPU.
    """
    _check_scatter_args("padded_scatter", y, routing, weights, top_k, routing.padded_tokens)
    return _ScatterFn.apply(y, weights, routing.padded_rows, None, top_k)


def scatter(y: torch.Tensor, routing: Routing, weights: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """Like :func:`padded_scatter` for the unpadded ``[T*k, H]`` layout (``routing.rows``)."""
    _check_scatter_args("scatter", y, routing, weights, top_k, routing.num_tokens * top_k)
    return _ScatterFn.apply(y, weights, routing.rows, routing.indices, top_k)

# ---------------------------------------------------------------------------------------
# Activations on sparse blocks (elementwise on SparseMatrix.data)
# ---------------------------------------------------------------------------------------
# The expert activation runs on the [nnz, b, b] blocks the SDD produced, never on a dense
# [P, E*F] tensor: an elementwise op does not care where a block sits. Padding rows are
# computed like the others and dropped by the unpermute. Each autograd Function saves only
# its inputs and recomputes act(gate) in backward, so a GLU layer keeps three [nnz, b, b]
# tensors alive (gate, up and the product the DSD saves), not five.
#
# Two GLU layouts, both copy-free:
# * sparse_glu(gate, up): two SparseMatrix on one topology (two SDDs, MegaBlocks' w1/v1).
# * sparse_glu_packed(h, topology): ONE SDD over the packed [E, 2F, H] weight (transformers'
#   gate_up_proj) gives a P x E*2F matrix whose block row r holds [F/b gate blocks | F/b up
#   blocks] of its expert, contiguous in `data`; viewed [P/b, 2L] (L = (F/b)*b*b) the
#   gate is [:, :L] and up is [:, L:], and the result [P/b, L] is exactly the data of the
#   P x E*F matrix on `topology`. The backward writes both halves of one gradient buffer.


ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
# Hugging Face's names for the same functions ("gelu_new"/"gelu_pytorch_tanh": tanh GELU).
_ACTIVATION_ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def canonical_activation(name: str, op: str = "activation") -> str:
    """The canonical name of an activation (one of ``ACTIVATIONS``), aliases resolved."""
    if not isinstance(name, str):
        raise TypeError(f"{op}: activation must be a str, got {type(name).__name__}")
    name = _ACTIVATION_ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {name!r}; expected one of {ACTIVATIONS} "
                         f"(or an alias in {sorted(_ACTIVATION_ALIASES)})")
    return name


def _activation_impl(t: torch.Tensor):
    if backend.select(t) == "cpu":
        from .cpu import activation as impl
    else:
        from .kernels import activation as impl
    return impl


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D, unit-column-stride view of ``t`` for the launchers (copies only if strided)."""
    if t.dim() == 2 and _unit_stride_cols(t):
        return t
    return t.contiguous().view(1, -1)


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) with unit column stride: incoming gradients are, else one copy."""
    return t if _unit_stride_cols(t) else t.contiguous()


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    # The torch path's elementwise results follow the operands' layout; the ops promise
    # (and their fakes say) contiguous outputs. A no-op for every layout the ops pass in.
    return t if t.is_contiguous() else t.contiguous()


def _glu_forward_fake(gate, up, act):
    return gate.new_empty(gate.shape)


@custom_op("glu_forward", _glu_forward_fake)
def _glu_forward(gate: torch.Tensor, up: Optional[torch.Tensor], act: int) -> torch.Tensor:
    return _contiguous(_activation_impl(gate).glu_forward(gate, up, act))


def _glu_backward_fake(dout, gate, up, act):
    return [gate.new_empty(gate.shape) for _ in range(1 if up is None else 2)]


@custom_op("glu_backward", _glu_backward_fake)
def _glu_backward(dout: torch.Tensor, gate: torch.Tensor, up: Optional[torch.Tensor], act: int) -> List[torch.Tensor]:
    """``[dgate]`` (``up`` None) or ``[dgate, dup]``."""
    dgate, dup = _activation_impl(gate).glu_backward(dout, gate, up, act)
    return [_contiguous(dgate)] if up is None else [_contiguous(dgate), _contiguous(dup)]


def _glu_backward_packed_fake(dout, packed, act):
    return packed.new_empty(packed.shape)


@custom_op("glu_backward_packed", _glu_backward_packed_fake)
def _glu_backward_packed(dout: torch.Tensor, packed: torch.Tensor, act: int) -> torch.Tensor:
    """The gradient of ``act(packed[:, :L]) * packed[:, L:]`` as one ``[R, 2L]`` buffer."""
    half = packed.shape[1] // 2
    grad = torch.empty(packed.shape, dtype=packed.dtype, device=packed.device)
    _activation_impl(packed).glu_backward(dout, packed[:, :half], packed[:, half:], act,
                                          dgate=grad[:, :half], dup=grad[:, half:])
    return grad


class _GLUFn(torch.autograd.Function):
    """``act(gate) * up`` (``up`` None: ``act(gate)``); 2-D ``[R, L]`` operands, any row stride."""

    @staticmethod
    def forward(ctx, gate, up, act: int):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return _glu_forward(gate, up, act)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        grads = _glu_backward(_unit_cols(dout), gate, up, ctx.act)
        return grads[0], (grads[1] if up is not None else None), None


class _PackedGLUFn(torch.autograd.Function):
    """``act(h[:, :L]) * h[:, L:]`` for ``h [R, 2L]``; the gradient is one ``[R, 2L]`` buffer."""

    @staticmethod
    def forward(ctx, packed, act: int):
        ctx.act = act
        ctx.save_for_backward(packed)
        half = packed.shape[1] // 2
        return _glu_forward(packed[:, :half], packed[:, half:], act)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        (packed,) = ctx.saved_tensors
        return _glu_backward_packed(_unit_cols(dout), packed, ctx.act), None


def _check_activation_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a SparseMatrix or a tensor, got {type(t).__name__}")
    if t.dtype not in _ACTIVATION_DTYPES:
        raise TypeError(f"{op}: {name} must be one of {_ACTIVATION_DTYPES}, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} is on unsupported device {t.device}")
    if t.dtype == torch.float64 and backend.select(t) != "cpu":
        raise TypeError(f"{op}: float64 runs on the CPU path only; {name} is float64 on the "
                        f"{backend.select(t)} back end")


def sparse_activation(s, activation: str):
    """``act(s)`` elementwise on the stored blocks of ``s`` (a SparseMatrix or a tensor).

    Returns the same kind as ``s`` (same topology and transpose flag for a SparseMatrix).
    Differentiable in ``s.data``. Non-contiguous data is copied once.
    """
    op = "sparse_activation"
    act = ACTIVATIONS.index(canonical_activation(activation, op))
    data = s.data if isinstance(s, SparseMatrix) else s
    _check_activation_tensor(op, "s", data)
    out = _GLUFn.apply(_as_rows(data), None, act).view(data.shape)
    return s.with_data(out) if isinstance(s, SparseMatrix) else out


def sparse_glu(gate, up, activation: str):
    """``act(gate) * up`` elementwise (SwiGLU for ``"silu"``, GeGLU for ``"gelu"``).

    ``gate`` and ``up`` are both SparseMatrix on one topology (two SDDs of one routing) or
    both tensors of one shape. Differentiable in both; non-contiguous data is copied once
    (2-D tensors with unit column stride, e.g. column slices, are read in place).
    """
    op = "sparse_glu"
    act = ACTIVATIONS.index(canonical_activation(activation, op))
    if isinstance(gate, SparseMatrix) != isinstance(up, SparseMatrix):
        raise TypeError(f"{op}: gate and up must both be SparseMatrix or both tensors, got "
                        f"{type(gate).__name__} and {type(up).__name__}")
    sparse = isinstance(gate, SparseMatrix)
    if sparse:
        tg, tu = gate.topology, up.topology
        if tg is not tu and (tg.shape != tu.shape or tg.block_size != tu.block_size or tg.nnz != tu.nnz):
            raise ValueError(f"{op}: gate and up have different topologies: shape {tg.shape} vs {tu.shape}, "
                             f"block_size {tg.block_size} vs {tu.block_size}, nnz {tg.nnz} vs {tu.nnz}")
        if gate.transposed != up.transposed:
            raise ValueError(f"{op}: gate.transposed={gate.transposed} but up.transposed={up.transposed}")
    g = gate.data if sparse else gate
    u = up.data if sparse else up
    _check_activation_tensor(op, "gate", g)
    _check_activation_tensor(op, "up", u)
    if g.shape != u.shape:
        raise ValueError(f"{op}: gate has shape {tuple(g.shape)} but up has shape {tuple(u.shape)}")
    if g.dtype != u.dtype:
        raise TypeError(f"{op}: gate is {g.dtype} but up is {u.dtype}")
    if g.device != u.device:
        raise ValueError(f"{op}: gate is on {g.device} but up is on {u.device}")
    g2, u2 = _as_rows(g), _as_rows(u)
    if g2.shape != u2.shape:  # one was 2-D in place, the other flattened
        g2, u2 = g.contiguous().view(1, -1), u.contiguous().view(1, -1)
    out = _GLUFn.apply(g2, u2, act).view(g.shape)
    return gate.with_data(out) if sparse else out


def sparse_glu_packed(h, activation: str, topology: "Topology | None" = None):
    """GLU of a packed ``[gate | up]`` product: one SDD over transformers' ``gate_up_proj``.

    * ``h`` a SparseMatrix ``P x E*2F`` (block row ``r`` of expert ``e`` holds that expert's
      ``2F/b`` blocks: gate then up) and ``topology`` the ``P x E*F`` topology of the result;
      both made by ``make_topology`` from one ``padded_bins`` (e.g. ``route(...,
      ffn_hidden_size=F).topology`` and ``make_topology(padded_bins, E, 2F, b)``).
      Returns the SparseMatrix ``act(gate) * up`` on ``topology``.
    * ``h`` a tensor ``[..., 2F]`` (dense rows ``[gate | up]``, a shared expert's
      ``x @ w1^T``): returns ``[..., F]``; ``topology`` must be None.

    No data moves: the halves are read through strides. Differentiable in ``h``.
    """
    op = "sparse_glu_packed"
    act = ACTIVATIONS.index(canonical_activation(activation, op))
    if isinstance(h, SparseMatrix):
        if not isinstance(topology, Topology):
            raise TypeError(f"{op}: topology (the P x E*F result topology) must be a Topology for a "
                            f"SparseMatrix h, got {type(topology).__name__}")
        if h.transposed:
            raise ValueError(f"{op}: h must not be transposed")
        ti, to = h.topology, topology
        b = ti.block_size
        if (to.block_size != b or to.shape[0] != ti.shape[0] or ti.shape[1] != 2 * to.shape[1]
                or ti.nnz != 2 * to.nnz or to.device != ti.device):
            raise ValueError(f"{op}: h is {ti.shape} with {ti.nnz} blocks of {b}; topology must be "
                             f"({ti.shape[0]}, {ti.shape[1] // 2}) with {ti.nnz // 2} blocks of {b} on {ti.device}, "
                             f"got {to.shape} with {to.nnz} blocks of {to.block_size} on {to.device}")
        _check_activation_tensor(op, "h.data", h.data)
        rows = ti.shape[0] // b
        # No tokens: nothing to compute, keep the graph. Under torch.compile ``rows`` is an
        # unbacked size and the general path below (which handles 0 rows) is traced instead.
        if guard_or_false(rows == 0):
            return SparseMatrix(to, h.data[:0] * 0)
        # Row width without a -1 (compiled code must not infer it from 0 elements); under
        # compile nnz is rows * blocks-per-row symbolically and the quotient is exact.
        width = ti.nnz // rows * b * b
        out = _PackedGLUFn.apply(h.data.contiguous().view(rows, width), act)
        return SparseMatrix(to, out.view(to.nnz, b, b))
    if topology is not None:
        raise ValueError(f"{op}: topology is only for a SparseMatrix h")
    _check_activation_tensor(op, "h", h)
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"{op}: h must be [..., 2F] with an even last dimension, got {tuple(h.shape)}")
    rows2 = h.reshape(-1, h.shape[-1]) if h.shape[-1] else h.reshape(-1, 0)
    if rows2.shape[1] > 1 and rows2.stride(1) != 1:
        rows2 = rows2.contiguous()
    out = _PackedGLUFn.apply(rows2, act)
    return out.view(*h.shape[:-1], h.shape[-1] // 2)
