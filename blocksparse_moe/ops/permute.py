"""Permutes: ``padded_gather`` / ``padded_scatter``, ``gather`` / ``scatter`` (autograd + public API).

Slot ``s = t*k + j`` (token ``t``'s ``j``-th expert) lives at row ``rows[s]`` of the permuted
layout: ``routing.padded_rows`` for the padded ``[P, H]`` layout, ``routing.rows`` for the
unpadded ``[T*k, H]`` one. The kernels that own output rows need the inverse map
``row_slots`` (-1 on padding): ``routing.indices`` for the unpadded layout, built by
``invert_rows`` for the padded one.

The fused expert path (``ops/experts.py``) does not use these: they stay public, tested
building blocks of the unfused MegaBlocks formulation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import backend, checks
from ..library import custom_op
from ..routing import Routing
from ._layout import with_unit_stride

# ---------------------------------------------------------------------------------------
# Permutes: padded_gather / padded_scatter, gather / scatter
# ---------------------------------------------------------------------------------------
# Slot s = t*k + j (token t's j-th expert) lives at row rows[s] of the permuted layout:
# routing.padded_rows for the padded [P, H] layout, routing.rows for the unpadded [T*k, H]
# one. The kernels that own output rows need the inverse map row_slots (-1 on padding):
# routing.indices for the unpadded layout, built by invert_rows for the padded one.


def _gather_fake(x, row_slots, top_k, weights):
    return x.new_empty((row_slots.shape[0], x.shape[1]))


@custom_op("gather", _gather_fake)
def _permute_gather(x: torch.Tensor, row_slots: torch.Tensor, top_k: int,
                    weights: Optional[torch.Tensor]) -> torch.Tensor:
    return backend.impl(x).gather(x, row_slots, top_k, weights)


def _scatter_fake(y, rows, top_k, weights):
    return y.new_empty((rows.shape[0] // top_k, y.shape[1]))


@custom_op("scatter", _scatter_fake)
def _permute_scatter(y: torch.Tensor, rows: torch.Tensor, top_k: int,
                     weights: Optional[torch.Tensor]) -> torch.Tensor:
    return backend.impl(y).scatter(y, rows, top_k, weights)


def _scatter_wgrad_fake(dout, y, rows, top_k, dtype):
    return dout.new_empty((dout.shape[0], top_k), dtype=dtype)


@custom_op("scatter_wgrad", _scatter_wgrad_fake)
def _permute_scatter_wgrad(dout: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, top_k: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """``dw [T, k]`` in ``dtype`` (the weights')."""
    out = torch.empty((dout.shape[0], top_k), dtype=dtype, device=dout.device)
    return backend.impl(dout).scatter_wgrad(dout, y, rows, top_k, out=out)


def _invert_rows_fake(rows, num_rows):
    return rows.new_empty((num_rows,), dtype=torch.int32)


@custom_op("invert_rows", _invert_rows_fake)
def _permute_invert_rows(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return backend.impl(rows).invert_rows(rows, num_rows)


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
        return _permute_scatter(with_unit_stride(dout), rows, ctx.top_k, None), None, None, None


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
        dout = with_unit_stride(dout)
        dy = dw = None
        if ctx.needs_input_grad[0]:
            if row_slots is None:
                row_slots = _permute_invert_rows(rows, ctx.num_rows)
            dy = _permute_gather(dout, row_slots, ctx.top_k, weights)
        if weights is not None and ctx.needs_input_grad[1]:
            dw = _permute_scatter_wgrad(dout, y, rows, ctx.top_k, weights.dtype)
        return dy, dw, None, None, None


def _check_routing(op: str, routing, top_k, device: torch.device) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"{op}: routing must be a Routing (from blocksparse_moe.route), got {type(routing).__name__}")
    checks.int_arg(op, "top_k", top_k)
    if top_k != routing.top_k:
        raise ValueError(f"{op}: top_k={top_k} but routing was built with top_k={routing.top_k}")
    for name in ("indices", "rows", "padded_rows"):
        t = getattr(routing, name)
        checks.index_vector(op, f"routing.{name}", t, t.numel())
        if t.device != device:
            raise ValueError(f"{op}: routing.{name} is on {t.device} but the data is on {device}")


def _check_data(op: str, name: str, t) -> None:
    checks.float_tensor(op, name, t)
    checks.dims(op, name, t, (2,), "2-D")


def _check_gather_args(op: str, x, routing, top_k) -> None:
    _check_data(op, "x", x)
    _check_routing(op, routing, top_k, x.device)
    if x.shape[0] != routing.num_tokens:
        raise ValueError(f"{op}: x has {x.shape[0]} rows (tokens) but routing has {routing.num_tokens} tokens "
                         f"(x shape {tuple(x.shape)})")


def _check_scatter_args(op: str, y, routing, weights, top_k, num_rows: int) -> None:
    _check_data(op, "y", y)
    _check_routing(op, routing, top_k, y.device)
    if y.shape[0] != num_rows:
        raise ValueError(f"{op}: y must have {num_rows} rows for this routing, got shape {tuple(y.shape)}")
    checks.top_k_weights(op, weights, "y", y, routing.num_tokens, top_k)


def padded_gather(x: torch.Tensor, routing: Routing, top_k: int) -> torch.Tensor:
    """Permute token rows into the expert-sorted, block-padded layout.

    Args:
        x: ``[T, H]`` token activations, any strides (a copy is made unless H has unit stride).
        routing: from :func:`blocksparse_moe.route` for these ``T`` tokens.
        top_k: ``k``; must equal ``routing.top_k``.

    Returns:
        ``[P, H]`` in ``x``'s dtype: row ``routing.padded_rows[s]`` holds ``x[s // k]`` and
        padding rows are zero. ``P = routing.padded_tokens`` (one host read on a GPU).
        Differentiable w.r.t. ``x`` (backward: an unweighted ``padded_scatter``).
    """
    _check_gather_args("padded_gather", x, routing, top_k)
    row_slots = _permute_invert_rows(routing.padded_rows, routing.padded_tokens)
    return _GatherFn.apply(with_unit_stride(x), routing.padded_rows, row_slots, top_k)


def gather(x: torch.Tensor, routing: Routing, top_k: int) -> torch.Tensor:
    """Like :func:`padded_gather` without padding: ``[T*k, H]``, row ``routing.rows[s]`` = ``x[s // k]``."""
    _check_gather_args("gather", x, routing, top_k)
    return _GatherFn.apply(with_unit_stride(x), routing.rows, routing.indices, top_k)


def padded_scatter(y: torch.Tensor, routing: Routing, weights: torch.Tensor | None,
                   top_k: int) -> torch.Tensor:
    """Un-permute expert outputs back to tokens, combining each token's ``k`` rows.

    Args:
        y: ``[P, H]`` in the padded layout of ``routing`` (padding rows are never read); any
            strides (a copy is made unless H has unit stride).
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
    return _ScatterFn.apply(with_unit_stride(y), weights, routing.padded_rows, None, top_k)


def scatter(y: torch.Tensor, routing: Routing, weights: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """Like :func:`padded_scatter` for the unpadded ``[T*k, H]`` layout (``routing.rows``)."""
    _check_scatter_args("scatter", y, routing, weights, top_k, routing.num_tokens * top_k)
    return _ScatterFn.apply(with_unit_stride(y), weights, routing.rows, routing.indices, top_k)
