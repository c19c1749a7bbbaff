"""Torch twin of ``kernels/activation.py``: activation and GLU, forward and backward.

Same formulas, codes and signatures as the Triton launchers (``act``: 0 silu, 1 gelu (erf),
2 gelu_tanh, 3 relu). fp16/bf16 inputs are computed in fp32 and rounded once at the end,
as the kernel does; fp64 stays fp64.

On the CPU these are memory-bound passes over ``[R, L]`` blocks several MiB large, so the
cost is the number of passes: each activation and its derivative is one fused ATen
kernel (``silu``, ``gelu`` and their ``*_backward``), the GLU product is done in place, and
results go straight into ``out=`` / ``dgate=`` / ``dup=`` when they are in the compute dtype
(the packed GLU's gradient halves): the forward is two passes, the backward four. relu
keeps the kernel's ``where(x > 0, ...)`` form (NaN -> 0, which ``threshold`` would not give).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .precision import compute_dtype


def _check_act(act: int) -> None:
    if act not in (0, 1, 2, 3):
        raise ValueError(f"glu: act must be 0 (silu), 1 (gelu), 2 (gelu_tanh) or 3 (relu), got {act}")


def _act_into(x: torch.Tensor, act: int, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``act(x)`` in one pass, into ``out`` when given (else a fresh contiguous tensor)."""
    aten = torch.ops.aten
    if act == 0:
        return aten.silu(x) if out is None else aten.silu.out(x, out=out)
    if act in (1, 2):
        approximate = "none" if act == 1 else "tanh"
        return aten.gelu(x, approximate=approximate) if out is None else aten.gelu.out(x, approximate=approximate,
                                                                                        out=out)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(x > 0, x, zero) if out is None else torch.where(x > 0, x, zero, out=out)


def _act_backward_into(d: torch.Tensor, x: torch.Tensor, act: int, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``d * act'(x)`` in one pass, into ``out`` when given (``out`` may be ``d`` itself)."""
    aten = torch.ops.aten
    if act == 0:
        return aten.silu_backward(d, x) if out is None else aten.silu_backward.grad_input(d, x, grad_input=out)
    if act in (1, 2):
        approximate = "none" if act == 1 else "tanh"
        if out is None:
            return aten.gelu_backward(d, x, approximate=approximate)
        return aten.gelu_backward.grad_input(d, x, approximate=approximate, grad_input=out)
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    return torch.where(x > 0, d, zero) if out is None else torch.where(x > 0, d, zero, out=out)


def _target(out: Optional[torch.Tensor], cd: torch.dtype) -> Optional[torch.Tensor]:
    """``out`` when results can be written into it directly (already the compute dtype)."""
    return out if out is not None and out.dtype == cd else None


def _store(value: torch.Tensor, like: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return value if value.dtype == like.dtype else value.to(like.dtype)
    if value is not out:
        out.copy_(value)
    return out


def glu_forward(gate: torch.Tensor, up: Optional[torch.Tensor], act: int,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(gate) * up`` (or ``act(gate)`` when ``up`` is None)."""
    _check_act(act)
    cd = compute_dtype(gate.dtype)
    y = _act_into(gate.to(cd), act, _target(out, cd))
    if up is not None:
        y.mul_(up.to(cd))
    return _store(y, gate, out)


def glu_backward(dout: torch.Tensor, gate: torch.Tensor, up: Optional[torch.Tensor], act: int,
                 dgate: Optional[torch.Tensor] = None,
                 dup: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dout * act'(gate) [* up], dout * act(gate) | None)``."""
    _check_act(act)
    cd = compute_dtype(gate.dtype)
    g, d = gate.to(cd), dout.to(cd)
    if up is None:
        return _store(_act_backward_into(d, g, act, _target(dgate, cd)), gate, dgate), None
    u = up.to(cd)
    # dgate = act'(g) * (d * u): the product first (into dgate when it can take it), then
    # the derivative in place over it.
    into = _target(dgate, cd)
    du = torch.mul(d, u) if into is None else torch.mul(d, u, out=into)
    dg = _act_backward_into(du, g, act, du)
    a = _act_into(g, act, _target(dup, cd))
    a.mul_(d)
    return _store(dg, gate, dgate), _store(a, gate, dup)
