"""Permutes of the dropless MoE: token rows <-> expert-sorted (padded) rows, in Triton.

A *slot* is ``s = t * k + j`` (token ``t``'s ``j``-th choice). ``rows[s]`` is the row of slot
``s`` in the permuted layout (``routing.rows`` unpadded, ``routing.padded_rows`` padded) and
``row_slots`` is its inverse: ``row_slots[rows[s]] = s``, ``-1`` on padding rows.

    gather        out[r, :] = w[s] * x[s // k, :]   with s = row_slots[r]; out[r, :] = 0 if s == -1
    scatter       out[t, :] = sum_j w[t, j] * y[rows[t*k + j], :]        (w = 1 without weights)
    scatter_wgrad dw[t, j]  = sum_h dout[t, h] * y[rows[t*k + j], h]     (weight grad of scatter)
    invert_rows   row_slots[rows[s]] = s, other entries -1

Shapes and strides (elements). Every 2-D operand has unit stride along H; its row stride
is an argument, so row slices of a larger buffer need no copy:
    x    [T, H]  stride_x     y    [R, H]  stride_y     dout [T, H]  stride_dout
    w    [T, k]  (stride_wt, stride_wj), fp32 or the data's dtype
    rows / row_slots  int32, contiguous; R = T*k (unpadded) or P (padded)
    out  [R, H] / [T, H] / dw [T, k]: contiguous, written completely (padding rows as zeros)
Topology metadata: none; only the routing's row maps.

Grids: gather (R, cdiv(H, BLOCK_H)): each program owns one output row tile, so padding
rows are written by the program that owns them and nothing is written twice.
scatter (T, cdiv(H, BLOCK_H)): one program sums its token's k rows in fp32 in a fixed
order, so the result is deterministic without atomics. scatter_wgrad (T*k,): one program
per slot loops over H. invert_rows (cdiv(T*k, BLOCK),): ``rows`` is a permutation into
``[0, R)``, so every write target is distinct.

All arithmetic is fp32 (fp16/bf16 operands are upcast on load, the output rounded once);
float64 is not supported here (the CPU path handles it).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import launch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _gather_kernel(x_ptr, row_slots_ptr, w_ptr, out_ptr, H, top_k, stride_x, stride_out, stride_wt, stride_wj,
                   HAS_W: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs < H
    slot = tl.load(row_slots_ptr + row)
    valid = slot >= 0
    # Padding rows (slot -1) read nothing and store zeros.
    tok = tl.where(valid, slot // top_k, 0).to(tl.int64)
    # One comparison instead of `in_h & valid`: Triton 3.9's interpreter turns `&` of
    # boolean masks into integers, which tl.load then rejects.
    vals = tl.load(x_ptr + tok * stride_x + offs, mask=offs < tl.where(valid, H, 0), other=0.0).to(tl.float32)
    if HAS_W:
        # Padding rows read no weight (a NaN or inf weight must not leak into them).
        j = tl.where(valid, slot - (slot // top_k) * top_k, 0)
        w = tl.load(w_ptr + tok * stride_wt + j * stride_wj, mask=valid, other=0.0).to(tl.float32)
        vals = vals * w
    tl.store(out_ptr + row * stride_out + offs, vals.to(out_ptr.dtype.element_ty), mask=in_h)


@triton.jit
def _scatter_kernel(y_ptr, rows_ptr, w_ptr, out_ptr, H, top_k, stride_y, stride_out, stride_wt, stride_wj,
                    HAS_W: tl.constexpr, BLOCK_H: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in range(0, top_k):
        r = tl.load(rows_ptr + tok * top_k + j).to(tl.int64)
        v = tl.load(y_ptr + r * stride_y + offs, mask=in_h, other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + tok * stride_wt + j * stride_wj).to(tl.float32)
        acc += v
    tl.store(out_ptr + tok * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=in_h)


@triton.jit
def _scatter_wgrad_kernel(dout_ptr, y_ptr, rows_ptr, dw_ptr, H, top_k, stride_dout, stride_y,
                          BLOCK_H: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)
    tok = slot // top_k
    r = tl.load(rows_ptr + slot).to(tl.int64)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        in_h = offs < H
        a = tl.load(dout_ptr + tok * stride_dout + offs, mask=in_h, other=0.0).to(tl.float32)
        b = tl.load(y_ptr + r * stride_y + offs, mask=in_h, other=0.0).to(tl.float32)
        acc += a * b
    tl.store(dw_ptr + slot, tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty))


@triton.jit
def _invert_rows_kernel(rows_ptr, row_slots_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    r = tl.load(rows_ptr + offs, mask=m, other=0)
    tl.store(row_slots_ptr + r, offs.to(tl.int32), mask=m)


# ---------------------------------------------------------------------------------------
# Launchers. ops.py validates user arguments; these re-check only what would make a kernel
# read or write out of bounds (shapes, strides, dtypes of the buffers they are handed).
# ---------------------------------------------------------------------------------------


def _block_h(H: int, block_h: Optional[int]) -> int:
    if block_h is None:
        # One tile covers H up to 1024 elements: a permute is a pure copy, wider tiles
        # only add registers.
        return max(16, min(triton.next_power_of_2(max(H, 1)), 1024))
    if block_h < 16 or block_h & (block_h - 1):
        raise ValueError(f"permute: block_h must be a power of two >= 16, got {block_h}")
    return block_h


def _num_warps(block_h: int) -> int:
    return min(max(block_h // 256, 1), 8)


def _check_data(name: str, t: torch.Tensor) -> None:
    # An empty tensor is never addressed: its strides (0 for the gradient of an empty .sum())
    # do not matter.
    if t.dim() != 2 or (t.numel() and t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"permute: {name} must be 2-D with unit stride along H, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"permute: {name} must be float32/float16/bfloat16 on the Triton path, got {t.dtype}")


def _check_index(name: str, t: torch.Tensor, n: int) -> None:
    if t.dtype != torch.int32 or t.dim() != 1 or t.numel() != n or not t.is_contiguous():
        raise ValueError(f"permute: {name} must be a contiguous int32 vector of {n} entries, "
                         f"got {t.dtype} shape {tuple(t.shape)}")


def _check_weights(weights: Optional[torch.Tensor], T: int, top_k: int) -> None:
    if weights is None:
        return
    if tuple(weights.shape) != (T, top_k):
        raise ValueError(f"permute: weights must be [{T}, {top_k}], got {tuple(weights.shape)}")
    if weights.dtype not in _DTYPES:
        raise TypeError(f"permute: weights must be float32/float16/bfloat16, got {weights.dtype}")


def _make_out(out: Optional[torch.Tensor], shape, dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"permute: out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def invert_rows(rows: torch.Tensor, num_rows: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``row_slots [num_rows]`` int32 with ``row_slots[rows[s]] = s`` and -1 elsewhere.

    ``rows`` must be a permutation into ``[0, num_rows)`` (what routing produces).
    """
    n = rows.numel()
    _check_index("rows", rows, n)
    out = _make_out(out, (num_rows,), torch.int32, rows.device)
    out.fill_(-1)
    if n:
        block = 1024
        launch(_invert_rows_kernel, (triton.cdiv(n, block),), rows, out, n, device=rows.device, BLOCK=block)
    return out


def gather(x: torch.Tensor, row_slots: torch.Tensor, top_k: int, weights: Optional[torch.Tensor] = None,
           out: Optional[torch.Tensor] = None, block_h: Optional[int] = None) -> torch.Tensor:
    """``out[r] = w[s] * x[s // top_k]`` for ``s = row_slots[r]``; zero rows where ``s == -1``.

    ``x [T, H]``, ``row_slots [R]`` int32, ``weights [T, top_k]`` or None -> ``out [R, H]``
    in ``x``'s dtype.
    """
    _check_data("x", x)
    T, H = x.shape
    R = row_slots.numel()
    _check_index("row_slots", row_slots, R)
    _check_weights(weights, T, top_k)
    out = _make_out(out, (R, H), x.dtype, x.device)
    if R == 0 or H == 0:
        return out
    bh = _block_h(H, block_h)
    w = weights if weights is not None else x  # never read without HAS_W
    wst, wsj = (weights.stride(0), weights.stride(1)) if weights is not None else (0, 0)
    launch(_gather_kernel, (R, triton.cdiv(H, bh)),
           x, row_slots, w, out, H, top_k, x.stride(0), out.stride(0), wst, wsj,
           device=x.device, HAS_W=weights is not None, BLOCK_H=bh, num_warps=_num_warps(bh))
    return out


def scatter(y: torch.Tensor, rows: torch.Tensor, top_k: int, weights: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None, block_h: Optional[int] = None) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * y[rows[t*k + j]]``: ``y [R, H]``, ``rows [T*k]`` -> ``[T, H]``."""
    _check_data("y", y)
    H = y.shape[1]
    if top_k < 1 or rows.numel() % top_k:
        raise ValueError(f"permute: rows has {rows.numel()} entries, not a multiple of top_k={top_k}")
    T = rows.numel() // top_k
    _check_index("rows", rows, T * top_k)
    _check_weights(weights, T, top_k)
    out = _make_out(out, (T, H), y.dtype, y.device)
    if T == 0 or H == 0:
        return out
    bh = _block_h(H, block_h)
    w = weights if weights is not None else y
    wst, wsj = (weights.stride(0), weights.stride(1)) if weights is not None else (0, 0)
    launch(_scatter_kernel, (T, triton.cdiv(H, bh)),
           y, rows, w, out, H, top_k, y.stride(0), out.stride(0), wst, wsj,
           device=y.device, HAS_W=weights is not None, BLOCK_H=bh, num_warps=_num_warps(bh))
    return out


def scatter_wgrad(dout: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, top_k: int,
                  out: Optional[torch.Tensor] = None, block_h: Optional[int] = None) -> torch.Tensor:
    """``dw[t, j] = <dout[t], y[rows[t*k + j]]>``: ``dout [T, H]``, ``y [R, H]`` -> ``dw [T, k]``.

    ``dw`` is float32 unless ``out`` (contiguous ``[T, k]``, any supported dtype) is given.
    """
    _check_data("dout", dout)
    _check_data("y", y)
    T, H = dout.shape
    if y.shape[1] != H:
        raise ValueError(f"permute: dout has H={H} but y has H={y.shape[1]}")
    _check_index("rows", rows, T * top_k)
    if out is None:
        out = torch.empty((T, top_k), dtype=torch.float32, device=dout.device)
    else:
        _make_out(out, (T, top_k), out.dtype, dout.device)
        if out.dtype not in _DTYPES:
            raise TypeError(f"permute: out must be float32/float16/bfloat16, got {out.dtype}")
    if T == 0:
        return out
    if H == 0:
        return out.zero_()
    bh = _block_h(H, block_h)
    launch(_scatter_wgrad_kernel, (T * top_k,), dout, y, rows, out, H, top_k, dout.stride(0), y.stride(0),
           device=dout.device, BLOCK_H=bh, num_warps=_num_warps(bh))
    return out
