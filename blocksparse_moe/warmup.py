"""Warm-up before CUDA-graph capture: run every kernel a step will launch once, outside the graph.

A Triton kernel's first launch for an autotune key compiles and times its candidate configs:
that synchronises and allocates, which a CUDA graph capture forbids. The fused expert path
keys its tiles by the row padding, the token-count class of the call and the layer's sizes
(``kernels/experts.py``), and picks the row padding from the shapes only
(``topology.block_size_for_call``), so which kernels a step launches, with which keys, depends
on the token count and never on the routing. One forward per token count a server will run
(the decode batch sizes, a prefill length) therefore tunes everything a later capture of
those steps launches::

    import blocksparse_moe as bm
    bm.warmup(model, token_counts=[1, 2, 4, 8, 16, 32, 64])   # DroplessMoE layers or a transformers model
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(...)                                        # no tuning, no host read inside

It finds every :class:`~blocksparse_moe.DroplessMoE` in ``module`` and every transformers
experts module (one holding ``down_proj`` and ``gate_up_proj``/``up_proj`` stacks and
``num_experts``), and runs each on random tokens with random distinct experts per token.
``backward=True`` also runs backward, for training steps captured in a graph. On CPU tensors
it runs the same calls (nothing to tune, but the same code path).
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from .moe import DroplessMoE
from .ops.experts import expert_mlp

__all__ = ["warmup"]


def _experts_modules(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    found = []
    for name, m in module.named_modules():
        if isinstance(m, DroplessMoE):
            found.append((name, m))
        elif (isinstance(getattr(m, "down_proj", None), torch.Tensor) and hasattr(m, "num_experts")
              and isinstance(getattr(m, "gate_up_proj", getattr(m, "up_proj", None)), torch.Tensor)):
            found.append((name, m))
    return found


def _config_top_k(module: nn.Module) -> Optional[int]:
    config = getattr(module, "config", None)
    for attr in ("num_experts_per_tok", "moe_topk", "top_k"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _random_routing(tokens: int, experts: int, top_k: int, device, generator) -> Tuple[torch.Tensor, torch.Tensor]:
    scores = torch.rand(tokens, experts, generator=generator).to(device)
    weights, ids = torch.topk(scores, top_k, dim=1)  # distinct experts per token, like a router
    return ids, weights / weights.sum(1, keepdim=True)


def warmup(module: nn.Module, token_counts: Iterable[int], *, top_k: Optional[int] = None,
           backward: bool = False, seed: int = 0) -> int:
    """Run every expert layer of ``module`` once per token count; returns the number of calls.

    Args:
        module: a :class:`~blocksparse_moe.DroplessMoE`, a model holding some, or a transformers
            model whose experts run the ``"blocksparse_moe"`` implementation.
        token_counts: the token counts ``T`` of the steps to capture (for ``generate()``: the
            batch sizes of decode steps, and the prompt lengths if prefills are captured too).
        top_k: experts per token of transformers experts modules; default: the model's
            ``config.num_experts_per_tok``. A ``DroplessMoE`` uses its own.
        backward: also run backward (for captured training steps).
        seed: of the random tokens and routing (the tiles do not depend on them).

    Raises:
        ValueError: a token count below 1, no expert layer in ``module``, or no ``top_k`` for
            a transformers experts module.
    """
    counts = [int(t) for t in token_counts]
    bad = [t for t in counts if t < 1]
    if bad or not counts:
        raise ValueError(f"warmup: token_counts must be ints >= 1, got {counts}")
    layers = _experts_modules(module)
    if not layers:
        raise ValueError(f"warmup: {type(module).__name__} holds no DroplessMoE and no transformers experts module")
    config_k = _config_top_k(module) if top_k is None else top_k
    generator = torch.Generator().manual_seed(seed)
    calls = 0
    for name, layer in layers:
        for tokens in counts:
            with torch.set_grad_enabled(backward):
                out = _run(name, layer, tokens, config_k, generator)
                if backward:
                    out.float().sum().backward()
            calls += 1
    if backward:
        module.zero_grad(set_to_none=True)
    return calls


def _run(name: str, layer: nn.Module, tokens: int, top_k: Optional[int], generator) -> torch.Tensor:
    if isinstance(layer, DroplessMoE):
        p = layer.w1
        x = torch.randn(tokens, layer.hidden_size, generator=generator).to(p.device, p.dtype)
        ids, weights = _random_routing(tokens, layer.num_experts, layer.top_k, p.device, generator)
        return expert_mlp(x, ids, weights.to(p.dtype), layer.w1, layer.w2, layer.b1, layer.b2,
                          activation=layer.activation, glu=layer.glu, block_size=layer.block_size,
                          check_indices=False)
    if top_k is None:
        raise ValueError(f"warmup: pass top_k for the experts module {name!r} (its model has no "
                         "config.num_experts_per_tok)")
    from .integrations.transformers import blocksparse_experts_forward

    w_in = getattr(layer, "gate_up_proj", None)
    w_in = w_in if isinstance(w_in, torch.Tensor) else layer.up_proj
    hidden = w_in.shape[1] if getattr(layer, "is_transposed", False) else w_in.shape[2]
    x = torch.randn(tokens, hidden, generator=generator).to(w_in.device, w_in.dtype)
    ids, weights = _random_routing(tokens, int(layer.num_experts), top_k, w_in.device, generator)
    return blocksparse_experts_forward(layer, x, ids, weights.to(w_in.dtype))
