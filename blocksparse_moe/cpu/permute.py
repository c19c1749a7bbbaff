"""Permutes on the CPU path, in torch: the same functions as ``kernels/permute.py``.

Same formulas, shapes and ``row_slots`` convention as the Triton launchers (see that
module's header). Arithmetic is fp32 for fp32/fp16/bf16 data (rounded once to the output
dtype, like the kernels) and float64 for float64 data, so gradcheck can run on this path.
Deterministic: every output element is written by one index_select / reduction in a fixed
order; no index_add. Each function makes one pass over its output (the gather writes
padding rows with the rest, then zeroes them; the scatter scales its gathered copy in
place), since on the CPU these are memory-bound.
"""

from __future__ import annotations

from typing import Optional

import torch

from .precision import compute_dtype


def _make_out(out: Optional[torch.Tensor], shape, dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"permute: out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def invert_rows(rows: torch.Tensor, num_rows: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``row_slots [num_rows]`` int32 with ``row_slots[rows[s]] = s`` and -1 elsewhere."""
    out = _make_out(out, (num_rows,), torch.int32, rows.device)
    out.fill_(-1)
    # rows is a permutation into [0, num_rows): index_copy_ targets are distinct.
    out.index_copy_(0, rows.long(), torch.arange(rows.numel(), dtype=torch.int32, device=rows.device))
    return out


def gather(x: torch.Tensor, row_slots: torch.Tensor, top_k: int, weights: Optional[torch.Tensor] = None,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[r] = w[s] * x[s // top_k]`` for ``s = row_slots[r]``; zero rows where ``s == -1``."""
    T, H = x.shape
    R = row_slots.numel()
    out = _make_out(out, (R, H), x.dtype, x.device)
    if T == 0 or R == 0:
        return out.zero_()
    # One pass writes every row (padding rows read token 0, then are zeroed): no zero-fill
    # of the whole output and no staging copy of the gathered rows.
    slots = row_slots.long().clamp(min=0)
    torch.index_select(x, 0, torch.div(slots, top_k, rounding_mode="floor"), out=out)
    if weights is not None:
        acc = compute_dtype(x.dtype)
        w = weights.reshape(-1).index_select(0, slots).to(acc).unsqueeze(1)
        if out.dtype == acc:
            out.mul_(w)
        else:
            out.copy_(out.to(acc) * w)
    padding = torch.nonzero(row_slots < 0).squeeze(1)
    if padding.numel():
        out.index_fill_(0, padding, 0)
    return out


def scatter(y: torch.Tensor, rows: torch.Tensor, top_k: int, weights: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * y[rows[t*k + j]]``: ``y [R, H]``, ``rows [T*k]`` -> ``[T, H]``."""
    H = y.shape[1]
    T = rows.numel() // top_k
    out = _make_out(out, (T, H), y.dtype, y.device)
    acc = compute_dtype(y.dtype)
    g = y.index_select(0, rows.long()).to(acc).view(T, top_k, H)  # a fresh copy: scaled in place
    if weights is not None:
        g.mul_(weights.to(acc).unsqueeze(2))
    if out.dtype == acc:
        return torch.sum(g, 1, out=out)
    out.copy_(g.sum(1))
    return out


def scatter_wgrad(dout: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, top_k: int,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dw[t, j] = <dout[t], y[rows[t*k + j]]>`` -> ``[T, k]`` (float32, or float64 for float64 data,
    unless ``out`` is given)."""
    T, H = dout.shape
    acc = compute_dtype(dout.dtype)
    g = y.index_select(0, rows.long()).to(acc).view(T, top_k, H)
    dw = torch.bmm(g, dout.to(acc).unsqueeze(2)).squeeze(2)
    if out is None:
        return dw
    out = _make_out(out, (T, top_k), out.dtype, dout.device)
    out.copy_(dw)
    return out
