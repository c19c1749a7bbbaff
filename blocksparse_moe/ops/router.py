"""The router's logits ``x @ W^T`` in float32 for half-precision ``x``, without a float32 copy of x.

The gate runs in float32 (float64 stays float64), as DeepSeek-V3 and Megatron's router do:
bf16 logits would round each weight by ~0.4% and flip near-tied choices. Autograd of
``linear(x.float(), W.float())`` would keep a float32 copy of ``x`` for backward (half a
bf16 routed row per token at k = 4) and make its gradient in float32 before rounding it.
This Function keeps ``x`` itself, and in backward rounds the ``[T, E]`` logit gradient to
x's dtype once and multiplies in that dtype (fp32 accumulation): ``dx`` is made directly in
x's dtype, and ``dW`` in W's, where both end up anyway.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import backend


class _LogitsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return backend.mm_float32(x, weight.t())

    @staticmethod
    @once_differentiable
    def backward(ctx, dlogits):
        x, weight = ctx.saved_tensors
        d = dlogits.to(x.dtype)
        dx = d @ weight if ctx.needs_input_grad[0] else None
        dw = d.t() @ x if ctx.needs_input_grad[1] else None
        return dx, dw


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [T, H] @ weight[E, H]^T`` in ``promote(x.dtype, float32)``; differentiable in both."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    if x.dtype == cdt or weight.dtype != x.dtype:
        return torch.nn.functional.linear(x.to(cdt), weight.to(cdt))
    return _LogitsFn.apply(x, weight)
