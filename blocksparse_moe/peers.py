"""The expert paths a user would otherwise run, on a :class:`DroplessMoE` layer's own weights.

The main job (``python -m blocksparse_moe``) times each beside the layer, with the layer's
own router and shared expert around it, so only the expert path differs:

    torch loop               a GEMM pair per expert in plain torch, tokens picked with
                             ``torch.where`` (what model code without a kernel package does;
                             it reads each expert's size on the host)
    transformers grouped_mm  transformers' "grouped_mm" experts (``torch._grouped_mm``) on
                             the same tensors, when transformers is installed (bias-free GLUs)
    dense ceiling            ``T*k`` rows through ONE expert-sized MLP, no router: the same
                             useful FLOPs with no routing at all (the rows are repeated
                             beforehand, not timed)

``peer_forward(layer, name, x)`` returns ``forward(x) -> out`` or raises ``RuntimeError``
saying why that peer cannot run here; nothing is copied from the layer's parameters
(gradients of the first two reach them). ``compare_peers`` checks each peer's output against
the layer's and hands back the forwards of the ones that agree, for the caller to time
beside the layer (``timing.time_rounds``).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Tuple

import torch
import torch.nn.functional as F

from .moe import DroplessMoE

__all__ = ["PEERS", "compare_peers", "peer_forward", "transformers_experts", "transformers_module"]

PEERS = ("torch loop", "transformers grouped_mm", "dense ceiling")

_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(h)
    if activation == "silu":
        return F.silu(h)
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def _loop(layer: DroplessMoE) -> Callable:
    ffn = layer.w2.shape[1]

    def experts(x2: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x2)
        for e in range(layer.num_experts):
            token, slot = torch.where(ids == e)
            if token.numel() == 0:
                continue
            h = F.linear(x2[token], layer.w1[e], None if layer.b1 is None else layer.b1[e])
            a = _act(h[:, :ffn], layer.activation) * h[:, ffn:] if layer.glu else _act(h, layer.activation)
            y = a @ layer.w2[e]
            if layer.b2 is not None:
                y = y + layer.b2[e]
            out = out.index_add(0, token, y * weights[token, slot, None].to(y.dtype))
        return out
    return experts


def transformers_module(w1: torch.Tensor, w2: torch.Tensor, top_k: int, activation: str = "silu") -> torch.nn.Module:
    """A transformers ``MixtralExperts`` (a bias-free GLU) on the stacks ``w1 [E, 2F, H]``
    and ``w2 [E, F, H]``, read in place (gradients reach them). ``RuntimeError`` when
    transformers is missing."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError as exc:
        raise RuntimeError(f"not available ({exc})") from None
    experts, ffn, hidden = w2.shape
    config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                           num_experts_per_tok=top_k, hidden_act=_HF_ACT[activation])
    with torch.device("meta"):
        module = MixtralExperts(config)
    # Our stacks in transformers' layout: gate_up_proj [E, 2F, H] is w1 itself, down_proj
    # [E, H, F] a view of w2 [E, F, H].
    del module.gate_up_proj, module.down_proj
    module.gate_up_proj = w1
    module.down_proj = w2.transpose(1, 2)
    return module


def transformers_experts(module: torch.nn.Module, impl: str = "grouped_mm") -> Callable:
    """``experts(x [T, H], ids [T, k], weights [T, k]) -> [T, H]``: transformers' experts
    implementation ``impl`` (``"grouped_mm"``, ``"batched_mm"``, or ``"eager"``, the
    module's own per-expert loop) on a transformers experts ``module``."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError as exc:
        raise RuntimeError(f"not available ({exc})") from None
    fn = type(module).forward.__wrapped__ if impl == "eager" else ALL_EXPERTS_FUNCTIONS[impl]
    return lambda x2, ids, weights: fn(module, x2, ids, weights)


def _transformers_grouped_mm(layer: DroplessMoE) -> Callable:
    if not layer.glu or layer.b1 is not None or layer.b2 is not None:
        raise RuntimeError("transformers' experts are bias-free GLUs; this layer is not one")
    return transformers_experts(transformers_module(layer.w1, layer.w2, layer.top_k, layer.activation))


def peer_forward(layer: DroplessMoE, name: str, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward(inp) -> out`` computing ``layer(inp)[0]`` with peer ``name``'s expert path
    (the dense ceiling: its own MLP on ``x``'s rows repeated ``k`` times, whatever ``inp``)."""
    if name not in PEERS:
        raise ValueError(f"peer_forward: name must be one of {PEERS}, got {name!r}")
    hidden = layer.hidden_size
    if name == "dense ceiling":
        g = torch.Generator().manual_seed(0)
        ffn = layer.w2.shape[1]
        width = layer.w1.shape[1]
        w1 = (torch.randn(width, hidden, generator=g) / hidden ** 0.5).to(x.device, x.dtype).requires_grad_()
        w2 = (torch.randn(ffn, hidden, generator=g) / ffn ** 0.5).to(x.device, x.dtype).requires_grad_()
        rows = x.reshape(-1, hidden).repeat_interleave(layer.top_k, 0)

        def ceiling(inp: torch.Tensor) -> torch.Tensor:
            r = rows.detach().requires_grad_(inp.requires_grad)
            h = r @ w1.t()
            a = _act(h[:, :ffn], layer.activation) * h[:, ffn:] if layer.glu else _act(h, layer.activation)
            out = (a @ w2).view(-1, layer.top_k, hidden).sum(1)
            return layer.shared_output(inp.reshape(-1, hidden), out).view(inp.shape)
        return ceiling
    experts = _loop(layer) if name == "torch loop" else _transformers_grouped_mm(layer)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        x2 = inp.reshape(-1, hidden)
        r = layer.router(x2)
        return layer.shared_output(x2, experts(x2, r.indices, r.weights)).view(inp.shape)
    return forward


def compare_peers(layer: DroplessMoE, x: torch.Tensor, rtol: float, atol: float) -> Iterator[Tuple[str, Dict]]:
    """``(name, {"check": ..., "forward": forward})`` for every peer, in ``PEERS`` order.
    ``check``: ``"same output"``, ``"-"`` (the dense ceiling computes another function),
    ``"DIFFERS"``, or ``"skipped: why"``; ``forward`` (``peer_forward``'s, to time) only with
    the first two.

    ``rtol``/``atol`` bound each implementation's distance from the exact result, so two
    correct ones may be twice that apart: "same output" is within ``2*rtol``/``2*atol`` of
    ``layer(x)`` (NaN never is)."""
    with torch.no_grad():
        ours = layer(x)[0]
    for name in PEERS:
        try:
            forward = peer_forward(layer, name, x)
            with torch.no_grad():
                out = forward(x)
        except RuntimeError as exc:
            yield name, dict(check=f"skipped: {exc}"[:120])
            continue
        if name != "dense ceiling" and not torch.allclose(out, ours, rtol=2 * rtol, atol=2 * atol):
            yield name, dict(check="DIFFERS")
            continue
        yield name, dict(check="-" if name == "dense ceiling" else "same output", forward=forward)
