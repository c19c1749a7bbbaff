"""Elementwise activation and GLU on the blocks of a SparseMatrix (or any tensor rows).

    forward:   out = act(gate)                  (up is None: plain MLP)
               out = act(gate) * up             (GLU: SwiGLU, GeGLU, ReGLU)
    backward:  dgate = dout * act'(gate) [* up],   dup = dout * act(gate)

``act``: 0 silu ``x * sigmoid(x)``, 1 gelu (erf) ``x * Phi(x)``, 2 gelu_tanh
``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, 3 relu ``max(x, 0)``.

Shapes/strides: every tensor argument is 2-D ``[R, L]`` with unit column stride and its own
row stride. That covers the two layouts the MoE needs without a copy:

* separate gate/up matrices: ``data.view(1, nnz*b*b)`` (one row);
* the packed ``[gate | up]`` SDD output of one block row per expert row: ``data`` of the
  ``P x E*2F`` matrix viewed ``[P/b, 2*L]`` with ``L = (F/b)*b*b``; ``gate = [:, :L]``,
  ``up = [:, L:]`` (row stride ``2L``), and the backward writes ``dgate``/``dup`` into the
  two halves of one gradient buffer.

The topology is not read: an elementwise op does not care where a block sits, and the
padding rows of a block are computed like any other (the unpermute drops them).
Loads in the storage dtype, computes in fp32, stores in the storage dtype.
Grid: ``(R * cdiv(L, BLOCK),)`` (1-D, so any number of rows fits), program
``pid`` handles row ``pid // cdiv(L, BLOCK)``, columns ``(pid % cdiv(L, BLOCK)) * BLOCK + [0, BLOCK)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import check_launch_dtype, launch

# tl.constexpr, not plain floats: the GPU compiler rejects a Python global read inside
# @triton.jit code ("Cannot access global variable"), the interpreter does not (so gelu
# once passed every CPU test and compiled for no GPU; tests/test_compile_targets.py).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_C = tl.constexpr(0.044715)


@triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    """``(act(x), act'(x))`` in fp32 for the activation code ``ACT`` (see module docstring)."""
    if ACT == 0:
        s = tl.sigmoid(x)
        y = x * s
        dy = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(x * _SQRT1_2))
        pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        y = x * cdf
        dy = cdf + x * pdf
    elif ACT == 2:
        inner = _SQRT_2_OVER_PI * (x + _GELU_C * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh without libdevice (works interpreted)
        y = 0.5 * x * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * x * x)
    else:
        pos = x > 0.0
        y = tl.where(pos, x, 0.0)
        dy = tl.where(pos, 1.0, 0.0)
    return y, dy


@triton.jit
def _glu_fwd_kernel(gate_ptr, up_ptr, out_ptr, L, stride_g, stride_u, stride_o,
                    ACT: tl.constexpr, HAS_UP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nb = tl.cdiv(L, BLOCK)
    row = pid // nb
    cols = (pid % nb) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < L
    g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    y, _ = _act_and_grad(g, ACT)
    if HAS_UP:
        y = y * tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, L, stride_d, stride_g, stride_u, stride_dg,
                    stride_du, ACT: tl.constexpr, HAS_UP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nb = tl.cdiv(L, BLOCK)
    row = pid // nb
    cols = (pid % nb) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < L
    dout = tl.load(dout_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    if HAS_UP:
        u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dgate_ptr + row * stride_dg + cols, (dout * u * da).to(dgate_ptr.dtype.element_ty), mask=mask)
        tl.store(dup_ptr + row * stride_du + cols, (dout * a).to(dup_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dgate_ptr + row * stride_dg + cols, (dout * da).to(dgate_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


def _check(op: str, ref: torch.Tensor, name: str, t: Optional[torch.Tensor]) -> None:
    if t is None:
        return
    check_launch_dtype(op, t, name)
    if t.dim() != 2 or t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{op}: {name} is {tuple(t.shape)} {t.dtype} on {t.device}, expected 2-D "
                         f"{tuple(ref.shape)} {ref.dtype} on {ref.device}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{op}: {name} must have unit column stride, got strides {t.stride()}")


def _check_act(op: str, act: int) -> None:
    if act not in (0, 1, 2, 3):
        raise ValueError(f"{op}: act must be 0 (silu), 1 (gelu), 2 (gelu_tanh) or 3 (relu), got {act}")


def _grid(rows: int, cols: int):
    return (rows * triton.cdiv(cols, _BLOCK),)


def glu_forward(gate: torch.Tensor, up: Optional[torch.Tensor], act: int,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(gate) * up`` (``act(gate)`` when ``up`` is None) into ``out`` ``[R, L]`` (contiguous if None)."""
    op = "glu_forward"
    _check_act(op, act)
    _check(op, gate, "gate", gate)
    _check(op, gate, "up", up)
    _check(op, gate, "out", out)
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    rows, cols = gate.shape
    if rows and cols:
        u = gate if up is None else up
        launch(_glu_fwd_kernel, _grid(rows, cols), gate, u, out, cols, gate.stride(0), u.stride(0), out.stride(0),
               device=gate.device, ACT=act, HAS_UP=up is not None, BLOCK=_BLOCK)
    return out


def glu_backward(dout: torch.Tensor, gate: torch.Tensor, up: Optional[torch.Tensor], act: int,
                 dgate: Optional[torch.Tensor] = None,
                 dup: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dgate, dup)`` of :func:`glu_forward` (``dup`` is None when ``up`` is None)."""
    op = "glu_backward"
    _check_act(op, act)
    _check(op, gate, "gate", gate)
    for name, t in (("dout", dout), ("up", up), ("dgate", dgate), ("dup", dup)):
        _check(op, gate, name, t)
    if dgate is None:
        dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if up is not None and dup is None:
        dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    rows, cols = gate.shape
    if rows and cols:
        u = gate if up is None else up
        du = dgate if up is None else dup
        launch(_glu_bwd_kernel, _grid(rows, cols), dout, gate, u, dgate, du, cols, dout.stride(0), gate.stride(0),
               u.stride(0), dgate.stride(0), du.stride(0), device=gate.device, ACT=act,
               HAS_UP=up is not None, BLOCK=_BLOCK)
    return dgate, (dup if up is not None else None)
