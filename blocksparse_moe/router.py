"""The top-k router of a Mixture-of-Experts layer, and its auxiliary losses.

For tokens ``x [T, H]`` and ``E`` experts the router computes, in float32 for any input
dtype narrower than that, gate matmul included (float64 stays float64):

    logits  = x @ weight^T                                   [T, E]
    scores  = softmax(logits)   or   sigmoid(logits)         [T, E]
    indices = top_k(scores + expert_bias)                    [T, k]   (selection only)
    weights = scores[indices]  (/ their sum if renormalize) * scaling_factor   [T, k]

* ``score="softmax"`` with ``renormalize=True`` is Mixtral / Qwen3-MoE (``norm_topk_prob``);
  ``renormalize=False`` is Qwen2-MoE / Switch. ``score="sigmoid"`` with ``renormalize=True``
  and an ``expert_bias`` is DeepSeek-V3.
* ``expert_bias`` (a buffer, no gradient) implements DeepSeek-V3's auxiliary-loss-free load
  balancing: it is added to the scores only to *choose* experts, never to the weights that
  scale the expert outputs. :meth:`Router.update_expert_bias` nudges it after each step:
  ``bias_e += rate * sign(mean_load - load_e)`` (under-loaded experts become more attractive).
* ``jitter_noise = eps`` multiplies the router's *input* by ``U(1 - eps, 1 + eps)`` noise in
  training mode only (Switch Transformer; the experts see the clean input).

Losses (returned unscaled; :class:`RouterOutput` ``aux_loss`` is the coefficient-weighted sum
that the caller adds to its training loss):

* load balancing (Switch Transformer eq. 4, Mixtral, Megatron's normalisation):
  ``L_lb = E * sum_e f_e * P_e`` with ``f_e = (#slots routed to e) / (T * k)`` (no gradient)
  and ``P_e = mean_t p_te``, ``p`` the per-token-normalised scores (the softmax itself; sigmoid
  scores divided by their per-token sum). Perfectly uniform routing gives ``L_lb = 1``.
  (Hugging Face's ``load_balancing_loss_func`` divides counts by ``T`` instead of ``T * k``,
  so its value is ``k`` times this one.)
* router z-loss (ST-MoE, Zoph et al. 2022 eq. 5): ``L_z = mean_t (logsumexp_e logits_te)^2``;
  keeps the logits small so the float32 softmax stays accurate.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .checks import check_float
from .ops.router import router_logits
from .routing import checked_expert_ids

SCORES = ("softmax", "sigmoid")


@dataclass
class RouterOutput:
    """What :class:`Router` returns for ``T`` tokens.

    ``logits``/``scores`` are ``[T, E]`` float32 (float64 for float64 inputs); ``weights`` is
    ``[T, k]`` in that dtype too (the scale of each chosen expert's output: the unpermute
    takes float32 weights and sums in float32, so they are never rounded to bf16); ``indices``
    ``[T, k]`` int64 expert ids; ``load_balancing_loss``, ``z_loss`` unscaled scalars in the
    logits' dtype; ``aux_loss`` their coefficient-weighted sum (add it to the training loss).
    """

    logits: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    aux_loss: torch.Tensor


def load_balancing_loss(scores: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` (see module docstring); 0 for zero tokens.

    Args:
        scores: ``[T, E]`` router scores (softmax or sigmoid); gradients flow through ``P_e``.
        indices: ``[T, k]`` chosen experts (``f_e`` is a count: no gradient).
        num_experts: ``E``.
    """
    t, k = indices.shape
    if t == 0:
        return scores.sum() * 0.0  # keeps the graph (and the dtype) for an empty batch
    # A bincount whose output size is fixed (bincount's is data-dependent: a graph break
    # under torch.compile); integer adds, so exact and deterministic.
    flat = indices.reshape(-1).to(torch.int64)
    counts = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat)).to(scores.dtype)
    f = counts / (t * k)
    p = scores / scores.sum(dim=-1, keepdim=True)
    return num_experts * torch.dot(f, p.mean(dim=0))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean_t (logsumexp_e logits_te)^2`` (ST-MoE router z-loss); 0 for zero tokens."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


class Router(nn.Module):
    """Linear top-k router with Switch/Mixtral balancing loss, z-loss and DeepSeek expert bias.

    Args:
        hidden_size: ``H``.
        num_experts: ``E``.
        top_k: experts per token, ``1 <= top_k <= E``.
        score: ``"softmax"`` or ``"sigmoid"``.
        renormalize: divide the ``k`` chosen scores by their sum (Mixtral, DeepSeek-V3).
        scaling_factor: multiplies the weights (DeepSeek-V3's ``routed_scaling_factor``).
        jitter_noise: multiplicative uniform noise on the router input, training only.
        expert_bias: keep an ``expert_bias [E]`` float32 buffer for aux-loss-free balancing.
        load_balancing_coef, z_loss_coef: weights of the two losses in ``aux_loss``.

    The gate weight is ``[E, H]`` (``nn.Linear(H, E, bias=False).weight``), initialised like
    ``nn.Linear``.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, score: str = "softmax",
                 renormalize: bool = True, scaling_factor: float = 1.0, jitter_noise: float = 0.0,
                 expert_bias: bool = False, load_balancing_coef: float = 0.0, z_loss_coef: float = 0.0,
                 dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("num_experts", num_experts), ("top_k", top_k)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"Router: {name} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"Router: {name} must be >= 1, got {v}")
        if top_k > num_experts:
            raise ValueError(f"Router: top_k ({top_k}) must be <= num_experts ({num_experts})")
        if score not in SCORES:
            raise ValueError(f"Router: score must be one of {SCORES}, got {score!r}")
        # Every float hyper-parameter: a NaN scaling factor would make every output NaN.
        check_float("Router", "scaling_factor", scaling_factor, low=0.0, low_open=True)
        # jitter scales inputs by U(1 - eps, 1 + eps): eps in [0, 1)
        check_float("Router", "jitter_noise", jitter_noise, low=0.0, high=1.0, high_open=True)
        check_float("Router", "load_balancing_coef", load_balancing_coef, low=0.0)
        check_float("Router", "z_loss_coef", z_loss_coef, low=0.0)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.score = score
        self.renormalize = bool(renormalize)
        self.scaling_factor = float(scaling_factor)
        self.jitter_noise = float(jitter_noise)
        self.load_balancing_coef = float(load_balancing_coef)
        self.z_loss_coef = float(z_loss_coef)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device))
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        else:
            self.expert_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s init: U(-1/sqrt(H), 1/sqrt(H)); the expert bias back to zero."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()

    def extra_repr(self) -> str:
        s = (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
             f"score={self.score!r}, renormalize={self.renormalize}")
        if self.scaling_factor != 1.0:
            s += f", scaling_factor={self.scaling_factor}"
        if self.jitter_noise:
            s += f", jitter_noise={self.jitter_noise}"
        if self.expert_bias is not None:
            s += ", expert_bias=True"
        if self.load_balancing_coef:
            s += f", load_balancing_coef={self.load_balancing_coef}"
        if self.z_loss_coef:
            s += f", z_loss_coef={self.z_loss_coef}"
        return s

    def forward(self, x: torch.Tensor, expert_indices: Optional[torch.Tensor] = None) -> RouterOutput:
        """Route ``x [T, H]``.

        ``expert_indices [T, k]``, when given, replaces the top-k selection (weights are still
        the router's scores of those experts, so the router gets its gradient); tests use it
        to force a routing distribution, integrations to replay a routing.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Router: x must be a tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"Router: x must be [T, {self.hidden_size}], got shape {tuple(x.shape)}")
        amp = (torch.get_autocast_dtype(x.device.type)
               if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type) else None)
        if x.dtype != self.weight.dtype and x.dtype != amp:
            raise TypeError(f"Router: x is {x.dtype} but the router weight is {self.weight.dtype}")
        t = x.shape[0]
        if expert_indices is not None:
            if expert_indices.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"Router: expert_indices must be int32 or int64, got {expert_indices.dtype}")
            if expert_indices.shape != (t, self.top_k):
                raise ValueError(f"Router: expert_indices must be [{t}, {self.top_k}], got {tuple(expert_indices.shape)}")
            if expert_indices.device != x.device:
                raise ValueError(f"Router: expert_indices is on {expert_indices.device} but x is on {x.device}")
            forced = checked_expert_ids("Router", expert_indices, self.num_experts)
        if self.training and self.jitter_noise > 0:
            eps = self.jitter_noise
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        # float32 logits (float64 stays float64); see ops/router.py for why and how. Under
        # torch.autocast too: autocast would run the gate in bf16/fp16, so it is turned off
        # here and the router stays float32 (x of the autocast dtype is accepted).
        with torch.autocast(x.device.type, enabled=False) if amp is not None else contextlib.nullcontext():
            logits = router_logits(x, self.weight)
            if self.score == "softmax":
                scores = torch.softmax(logits, dim=-1)
            else:
                scores = torch.sigmoid(logits)
        if expert_indices is None:
            with torch.no_grad():
                selection = scores if self.expert_bias is None else scores + self.expert_bias
                indices = torch.topk(selection, self.top_k, dim=-1).indices
        else:
            indices = forced
        weights = torch.gather(scores, 1, indices)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.scaling_factor != 1.0:
            weights = weights * self.scaling_factor
        lb = load_balancing_loss(scores, indices, self.num_experts)
        z = z_loss(logits)
        aux = self.load_balancing_coef * lb + self.z_loss_coef * z
        return RouterOutput(logits=logits, scores=scores, weights=weights, indices=indices,
                            load_balancing_loss=lb, z_loss=z, aux_loss=aux)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor, rate: float = 1e-3) -> None:
        """DeepSeek-V3's aux-loss-free balancing step: ``bias_e += rate * sign(mean_load - load_e)``.

        Call once per optimizer step with the tokens each expert received (summed over the
        step's micro-batches, e.g. ``aux.tokens_per_expert``); over-loaded experts get a lower
        bias and are chosen less often. Needs ``expert_bias=True``.
        """
        if self.expert_bias is None:
            raise RuntimeError("Router.update_expert_bias: the router was built with expert_bias=False")
        rate = check_float("Router.update_expert_bias", "rate", rate, low=0.0)
        if tokens_per_expert.shape != (self.num_experts,):
            raise ValueError(f"Router.update_expert_bias: tokens_per_expert must be [{self.num_experts}], "
                             f"got {tuple(tokens_per_expert.shape)}")
        load = tokens_per_expert.to(device=self.expert_bias.device, dtype=torch.float32)
        self.expert_bias += rate * torch.sign(load.mean() - load)
