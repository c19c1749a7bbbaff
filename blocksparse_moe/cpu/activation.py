"""Torch twin of ``kernels/activation.py``: activation and GLU, forward and backward.

Same formulas, codes and signatures as the Triton launchers (``act``: 0 silu, 1 gelu (erf),
2 gelu_tanh, 3 relu). fp16/bf16 inputs are computed in fp32 and rounded once at the end,
as the kernel does; fp64 stays fp64.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _act_and_grad(x: torch.Tensor, act: int, need_grad: bool):
    if act == 0:
        s = torch.sigmoid(x)
        return x * s, (s * (1.0 + x * (1.0 - s)) if need_grad else None)
    if act == 1:
        cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
        y = x * cdf
        return y, (cdf + x * torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi)) if need_grad else None)
    if act == 2:
        k0, k1 = math.sqrt(2.0 / math.pi), 0.044715
        t = torch.tanh(k0 * (x + k1 * x * x * x))
        y = 0.5 * x * (1.0 + t)
        return y, (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k0 * (1.0 + 3.0 * k1 * x * x) if need_grad else None)
    if act == 3:
        pos = x > 0
        return torch.where(pos, x, torch.zeros_like(x)), (pos.to(x.dtype) if need_grad else None)
    raise ValueError(f"glu: act must be 0 (silu), 1 (gelu), 2 (gelu_tanh) or 3 (relu), got {act}")


def _store(value: torch.Tensor, like: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return value.to(like.dtype)
    out.copy_(value)
    return out


def glu_forward(gate: torch.Tensor, up: Optional[torch.Tensor], act: int,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(gate) * up`` (or ``act(gate)`` when ``up`` is None)."""
    cd = _compute_dtype(gate)
    y, _ = _act_and_grad(gate.to(cd), act, False)
    if up is not None:
        y = y * up.to(cd)
    return _store(y, gate, out)


def glu_backward(dout: torch.Tensor, gate: torch.Tensor, up: Optional[torch.Tensor], act: int,
                 dgate: Optional[torch.Tensor] = None,
                 dup: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dout * act'(gate) [* up], dout * act(gate) | None)``."""
    cd = _compute_dtype(gate)
    g, d = gate.to(cd), dout.to(cd)
    a, da = _act_and_grad(g, act, True)
    if up is None:
        return _store(d * da, gate, dgate), None
    u = up.to(cd)
    return _store(d * u * da, gate, dgate), _store(d * a, gate, dup)
