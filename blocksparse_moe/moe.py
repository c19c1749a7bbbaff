"""DroplessMoE: the Mixture-of-Experts layer users call. Thin: it only composes ops.

    x [T, H] -> Router (top-k ids and weights) -> expert_mlp (the fused expert path:
    gather + GLU in the first product, weighted scatter in the second, no host read)
    [+ shared expert]

No token is dropped and there is no capacity factor: each expert's group of rows is padded
only to the next block boundary (``P <= T*k + E*(b-1)`` rows in all).

Weight layout (``E`` experts, hidden ``H``, expert width ``F``, ``G = 2`` for a GLU and
``G = 1`` for a plain MLP):

    w1  [E, G*F, H]   expert e's input projection, exactly an ``nn.Linear(H, G*F).weight``;
                      for a GLU rows ``[0, F)`` are the gate (activated) and rows ``[F, 2F)``
                      the up projection: transformers' ``gate_up_proj`` (``is_transposed=False``,
                      ``chunk(2)`` order), i.e. Mixtral's ``cat([w1, w3])``.
    w2  [E, F, H]     expert e's output projection *transposed*: ``w2[e] = nn.Linear(F, H).weight.T``
                      (transformers' ``down_proj[e].T``, Mixtral's ``w2.T``).
    b1  [E, G*F]      optional, added to the SDD blocks (gate and up halves like ``w1``).
    b2  [E, H]        optional, added to each expert's output (before the top-k weighting).

Why this layout: each expert's matrices are ``nn.Linear`` weights, and the products read
them in place, with no copy per call, as grouped operands (``grouped.py``), whatever their
strides.

:func:`~blocksparse_moe.ops.experts.expert_mlp` is the expert path as a function of expert
ids and weights, for integrations that own their router and parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from . import ops
from .checks import check_float
from .ops.experts import autocast_operands, expert_mlp, tokens_per_expert
from .router import SCORES, Router
from .topology import block_size_for, check_block_size


@dataclass
class MoEAux:
    """Side outputs of :class:`DroplessMoE` for one forward.

    Attributes:
        aux_loss: ``load_balancing_coef * load_balancing_loss + z_loss_coef * z_loss``; add
            it to the training loss (zero when both coefficients are zero).
        load_balancing_loss: unscaled Switch/Mixtral balancing loss (1 when uniform).
        z_loss: unscaled router z-loss.
        tokens_per_expert: ``[E]`` int32 slots routed to each expert (for logging and
            ``Router.update_expert_bias``).
        router_logits: ``[T, E]`` float32 (float64 for float64 layers).
        expert_indices: ``[T, k]`` int64 chosen experts.
        expert_weights: ``[T, k]`` float32 (float64) weights of the chosen experts.
    """

    aux_loss: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    router_logits: torch.Tensor
    expert_indices: torch.Tensor
    expert_weights: torch.Tensor


class DenseMLP(nn.Module):
    """One always-on MLP in the experts' layout (the DeepSeek/Qwen2-MoE shared expert).

    ``w1 [G*S, H]`` (``[gate | up]`` rows for a GLU), ``w2 [S, H]`` (``nn.Linear(S, H).weight.T``),
    ``b1 [G*S]``, ``b2 [H]``; the activation runs through the same op as the experts'.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, activation: str = "silu", glu: bool = True,
                 bias: bool = False, dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = ops.canonical_activation(activation, "DenseMLP")
        self.glu = bool(glu)
        groups = 2 if glu else 1
        kw = dict(dtype=dtype, device=device)
        self.w1 = nn.Parameter(torch.empty(groups * ffn_hidden_size, hidden_size, **kw))
        self.w2 = nn.Parameter(torch.empty(ffn_hidden_size, hidden_size, **kw))
        self.b1 = nn.Parameter(torch.empty(groups * ffn_hidden_size, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.empty(hidden_size, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s init for each projection: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        _uniform(self.w1, self.hidden_size)
        _uniform(self.b1, self.hidden_size)
        _uniform(self.w2, self.ffn_hidden_size)
        _uniform(self.b2, self.ffn_hidden_size)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
                f"activation={self.activation!r}, glu={self.glu}, bias={self.b1 is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (x, w1, w2, b1, b2), amp_off = autocast_operands(x, self.w1, self.w2, self.b1, self.b2)
        with amp_off:
            h = torch.nn.functional.linear(x, w1, b1)
            a = ops.sparse_glu_packed(h, self.activation) if self.glu else ops.sparse_activation(h, self.activation)
            y = a @ w2
            return y if b2 is None else y + b2


def _uniform(p: Optional[torch.Tensor], fan_in: int) -> None:
    if p is not None:
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(p, -bound, bound)


class DroplessMoE(nn.Module):
    """A dropless Mixture-of-Experts MLP layer on block-sparse products (MegaBlocks).

    Args:
        hidden_size: ``H``.
        ffn_hidden_size: ``F``, each expert's inner width; a multiple of ``block_size`` (of 16).
        num_experts: ``E``.
        top_k: experts per token.
        activation: ``"silu"`` (default; SwiGLU with ``glu=True``), ``"gelu"``,
            ``"gelu_tanh"``, ``"relu"``.
        glu: gated experts ``act(x Wg) * (x Wu)`` (Mixtral, Qwen, DeepSeek) or a plain MLP.
        bias: expert (and shared-expert) biases ``b1``, ``b2``.
        block_size: the row padding of the expert path, 16, 32, 64 or 128, dividing
            ``ffn_hidden_size``; smaller blocks pad less when experts get few rows each.
            ``None`` (default): chosen per call from the token count
            (:func:`~blocksparse_moe.topology.block_size_for_call`: 16 for a decode step, up
            to the largest dividing ``ffn_hidden_size`` for a large prefill).
        score, renormalize, scaling_factor, jitter_noise, expert_bias, load_balancing_coef,
            z_loss_coef: the router's (see :class:`~blocksparse_moe.router.Router`).
        shared_expert_size: width of an always-on dense MLP beside the routed ones
            (DeepSeek / Qwen2-MoE shared expert); 0 for none.
        shared_expert_gate: scale the shared expert by ``sigmoid(x @ g)`` (Qwen2-MoE).
        dtype, device: of every parameter.

    ``forward(x [..., H], expert_indices=None) -> (out [..., H], MoEAux)``. Parameters:
    ``router.weight [E, H]``, ``w1 [E, G*F, H]``, ``w2 [E, F, H]``, ``b1 [E, G*F]``,
    ``b2 [E, H]`` and ``shared_expert`` (a :class:`DenseMLP`), ``shared_expert_gate [1, H]``;
    see the module docstring for the layout.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int, *,
                 activation: str = "silu", glu: bool = True, bias: bool = False, block_size: Optional[int] = None,
                 score: str = "softmax", renormalize: bool = True, scaling_factor: float = 1.0,
                 jitter_noise: float = 0.0, expert_bias: bool = False, load_balancing_coef: float = 0.0,
                 z_loss_coef: float = 0.0, shared_expert_size: int = 0, shared_expert_gate: bool = False,
                 dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("ffn_hidden_size", ffn_hidden_size),
                        ("num_experts", num_experts), ("top_k", top_k), ("shared_expert_size", shared_expert_size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"DroplessMoE: {name} must be an int, got {type(v).__name__}")
            if v < (0 if name == "shared_expert_size" else 1):
                raise ValueError(f"DroplessMoE: {name} must be >= {0 if name == 'shared_expert_size' else 1}, got {v}")
        if block_size is None:
            block_size_for(ffn_hidden_size, "DroplessMoE: ffn_hidden_size")  # some block size must divide F
        else:
            check_block_size(block_size)
        if block_size is not None and ffn_hidden_size % block_size:
            raise ValueError(f"DroplessMoE: ffn_hidden_size ({ffn_hidden_size}) must be a multiple of block_size "
                             f"({block_size}); pick a block size dividing it (16, 32, 64, 128)")
        if top_k > num_experts:
            raise ValueError(f"DroplessMoE: top_k ({top_k}) must be <= num_experts ({num_experts})")
        if score not in SCORES:
            raise ValueError(f"DroplessMoE: score must be one of {SCORES}, got {score!r}")
        if shared_expert_gate and not shared_expert_size:
            raise ValueError("DroplessMoE: shared_expert_gate needs shared_expert_size > 0")
        check_float("DroplessMoE", "scaling_factor", scaling_factor, low=0.0, low_open=True)
        check_float("DroplessMoE", "jitter_noise", jitter_noise, low=0.0, high=1.0, high_open=True)
        check_float("DroplessMoE", "load_balancing_coef", load_balancing_coef, low=0.0)
        check_float("DroplessMoE", "z_loss_coef", z_loss_coef, low=0.0)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        kw = dict(dtype=dtype, device=device)
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.activation = ops.canonical_activation(activation, "DroplessMoE")
        self.glu = bool(glu)
        self.block_size = block_size
        self.router = Router(hidden_size, num_experts, top_k, score=score, renormalize=renormalize,
                             scaling_factor=scaling_factor, jitter_noise=jitter_noise, expert_bias=expert_bias,
                             load_balancing_coef=load_balancing_coef, z_loss_coef=z_loss_coef, **kw)
        groups = 2 if glu else 1
        self.w1 = nn.Parameter(torch.empty(num_experts, groups * ffn_hidden_size, hidden_size, **kw))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size, **kw))
        self.b1 = nn.Parameter(torch.empty(num_experts, groups * ffn_hidden_size, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size, **kw)) if bias else None
        self.shared_expert = (DenseMLP(hidden_size, shared_expert_size, activation=self.activation, glu=glu,
                                       bias=bias, **kw) if shared_expert_size else None)
        self.shared_expert_gate = nn.Parameter(torch.empty(1, hidden_size, **kw)) if shared_expert_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert like ``nn.Linear`` (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and
        biases: fan_in ``H`` for ``w1``/``b1``, ``F`` for ``w2``/``b2``); router and shared
        expert likewise."""
        self.router.reset_parameters()
        _uniform(self.w1, self.hidden_size)
        _uniform(self.b1, self.hidden_size)
        _uniform(self.w2, self.ffn_hidden_size)
        _uniform(self.b2, self.ffn_hidden_size)
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters()
        _uniform(self.shared_expert_gate, self.hidden_size)

    def extra_repr(self) -> str:
        s = (f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
             f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
             f"glu={self.glu}, bias={self.b1 is not None}, block_size={self.block_size}")
        if self.shared_expert is not None:
            s += f", shared_expert_size={self.shared_expert.ffn_hidden_size}"
        return s

    def shared_output(self, x2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus the shared expert's output on ``x2 [T, H]`` (gated when the layer has a
        gate); ``out`` itself when the layer has no shared expert."""
        if self.shared_expert is None:
            return out
        shared = self.shared_expert(x2)
        if self.shared_expert_gate is not None:
            shared = shared * torch.sigmoid(x2 @ self.shared_expert_gate.t())
        return out + shared

    def forward(self, x: torch.Tensor, expert_indices: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, MoEAux]:
        """``x [..., H]`` -> ``(out [..., H], aux)``.

        ``expert_indices [T, k]`` (``T`` = tokens after flattening the leading dims), when
        given, replaces the router's top-k choice; the weights are still the router's scores
        of those experts. Tests force routing distributions with it; integrations replay one.

        ``x`` may have any strides. Under ``torch.autocast`` (CPU or CUDA) the experts and the
        shared expert run in the autocast dtype with the parameters cast once per call
        (gradients flow back to them in their own dtype), the router stays in float32
        (see :class:`~blocksparse_moe.router.Router`), and ``out`` is in the autocast dtype.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"DroplessMoE: x must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"DroplessMoE: x must be [..., {self.hidden_size}], got shape {tuple(x.shape)}")
        amp = (torch.get_autocast_dtype(x.device.type)
               if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type) else None)
        if x.dtype != self._param_dtype() and x.dtype != amp:
            raise TypeError(f"DroplessMoE: x is {x.dtype} but the layer's parameters are {self._param_dtype()}"
                            + (f" (and autocast's dtype is {amp})" if amp is not None else ""))
        if x.device != self.w1.device:
            raise ValueError(f"DroplessMoE: x is on {x.device} but the layer's parameters are on {self.w1.device}")
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        r = self.router(x2, expert_indices)
        # The router's ids are in range: top-k by construction, or checked by the router
        # when given, so the expert path reads nothing back to the host.
        out = expert_mlp(x2, r.indices, r.weights, self.w1, self.w2, self.b1, self.b2, activation=self.activation,
                         glu=self.glu, block_size=self.block_size, check_indices=False, **self._fp8_scales())
        out = self.shared_output(x2, out)
        aux = MoEAux(aux_loss=r.aux_loss, load_balancing_loss=r.load_balancing_loss, z_loss=r.z_loss,
                     tokens_per_expert=tokens_per_expert(r.indices, self.num_experts), router_logits=r.logits,
                     expert_indices=r.indices, expert_weights=r.weights)
        return out.view(shape), aux

    # -- for tests and the main job --------------------------------------------------------
    def reference_weights(self, dtype: Optional[torch.dtype] = None) -> dict:
        """The parameters as :func:`blocksparse_moe.reference.moe_reference` keyword arguments.

        The reference takes per-expert ``[F, H]`` matrices (``w1`` gate, ``w3`` up, ``w2``),
        so the packed ``w1`` is split here; ``dtype`` (e.g. float64) casts copies that
        stay connected to the parameters (gradients flow back through the cast).
        """
        def c(t):
            return None if t is None else (t if dtype is None else t.to(dtype))

        f = self.ffn_hidden_size
        w1, w2 = self.dequantized_weights(dtype) if self.is_fp8 else (self.w1, self.w2)
        w1, w2 = c(w1), c(w2)
        b1 = c(self.b1)
        kw = dict(router_weight=c(self.router.weight), w2=w2, b2=c(self.b2), top_k=self.top_k,
                  activation=self.activation, score=self.router.score, renormalize=self.router.renormalize,
                  scaling_factor=self.router.scaling_factor, expert_bias=self.router.expert_bias)
        if self.glu:
            kw.update(w1=w1[:, :f], w3=w1[:, f:], b1=None if b1 is None else b1[:, :f],
                      b3=None if b1 is None else b1[:, f:])
        else:
            kw.update(w1=w1, w3=None, b1=b1, b3=None)
        if self.shared_expert is not None:
            se = self.shared_expert
            s = se.ffn_hidden_size
            sw1, sb1 = c(se.w1), c(se.b1)
            shared = dict(w2=c(se.w2), b2=c(se.b2), gate=c(self.shared_expert_gate))
            if self.glu:
                shared.update(w1=sw1[:s], w3=sw1[s:], b1=None if sb1 is None else sb1[:s],
                              b3=None if sb1 is None else sb1[s:])
            else:
                shared.update(w1=sw1, w3=None, b1=sb1, b3=None)
            kw["shared"] = shared
        return kw

    # -- FP8 serving ------------------------------------------------------------------------
    @property
    def is_fp8(self) -> bool:
        """True once :meth:`to_fp8` has quantized the experts."""
        return getattr(self, "w1_scale", None) is not None

    def _param_dtype(self) -> torch.dtype:
        """The dtype of the layer's float parameters (the router's once the experts are fp8)."""
        return self.router.weight.dtype if self.is_fp8 else self.w1.dtype

    def _fp8_scales(self) -> dict:
        return dict(w1_scale=self.w1_scale, w2_scale=self.w2_scale) if self.is_fp8 else {}

    @torch.no_grad()
    def to_fp8(self) -> "DroplessMoE":
        """Serve the experts in FP8 (DeepSeek-V3 / Qwen3-FP8 format, ``blocksparse_moe/fp8.py``).

        Quantizes ``w1 [E, G*F, H]`` and ``w2 [E, F, H]`` with the 128x128 block quantizer
        (``fp8.quantize_weight_blockwise``; ``w2``'s blocks in its ``[F, H]`` orientation) and
        replaces the two parameters by float8_e4m3fn buffers ``w1``/``w2`` beside float32
        buffers ``w1_scale [E, ceil(G*F/128), ceil(H/128)]`` and ``w2_scale [E, ceil(F/128),
        ceil(H/128)]``: the bf16 expert weights are freed, the state dict holds the fp8 ones
        (call ``to_fp8()`` on a fresh layer before ``load_state_dict`` of a quantized one).
        Forward then quantizes x and the activation per 1x128 group on the fly
        (:func:`~blocksparse_moe.ops.experts.expert_mlp` with ``w1_scale``/``w2_scale``); x
        must be bf16/fp16 on a GPU (sm_89+), bf16/fp16/fp32 on the CPU path. Router, biases
        and shared expert keep their dtype.

        Training the experts in fp8 is not supported: the fp8 weights get no gradient.
        Backward still reaches x, the router, the biases and the shared expert, through the
        dequantized weights (straight-through for the activation quantization). Cast the
        layer (``.to(dtype)``) before ``to_fp8``: a cast afterwards would turn the fp8
        buffers into plain floats, which the expert path rejects. Returns ``self``.
        """
        from .fp8 import quantize_weight_blockwise

        if self.is_fp8:
            return self
        w1, w1_scale = quantize_weight_blockwise(self.w1)
        w2, w2_scale = quantize_weight_blockwise(self.w2)
        del self.w1, self.w2  # the parameters go; buffers of the same names take their place
        self.register_buffer("w1", w1)
        self.register_buffer("w2", w2)
        self.register_buffer("w1_scale", w1_scale)
        self.register_buffer("w2_scale", w2_scale)
        return self

    def dequantized_weights(self, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(w1, w2)`` of an fp8 layer dequantized (``w * scale`` per 128x128 block) to ``dtype``
        (default: the layer's parameter dtype); the weights the fp8 forward multiplies by."""
        from .fp8 import dequantize_weight_blockwise

        if not self.is_fp8:
            raise ValueError("DroplessMoE.dequantized_weights: the layer is not fp8 (call to_fp8() first)")
        dtype = self._param_dtype() if dtype is None else dtype
        return (dequantize_weight_blockwise(self.w1, self.w1_scale, dtype),
                dequantize_weight_blockwise(self.w2, self.w2_scale, dtype))
