"""DroplessMoE: the Mixture-of-Experts layer users call. Thin: it only composes ops.

    x [T, H] -> Router -> route(expert ids) -> padded_gather -> sdd (x_perm @ W1^T on the
    topology) -> activation / GLU on the blocks -> dsd (h @ W2) -> padded_scatter (weighted
    sum of each token's k rows) [+ biases] [+ shared expert]

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

Why this layout: each expert's matrices are ``nn.Linear`` weights, and both products read
them in place, with no copy per call, as grouped operands (``_grouped.py``): the SDD's right
operand ``[H, E*G*F]`` is the stack ``w1.transpose(1, 2)`` (block columns ``e*G*F/b ..``
belong to expert ``e``), the DSD's ``[E*F, H]`` is the stack ``w2``; any strides work. A
GLU uses ONE SDD over the packed ``[gate | up]`` weight: in the ``P x E*2F`` result each
block row holds its expert's ``F/b`` gate blocks followed by its ``F/b`` up blocks, so
``ops.sparse_glu_packed`` reads both halves through strides and writes the ``P x E*F``
hidden matrix the DSD consumes.

:func:`expert_mlp` is the same pipeline as a function of a given :class:`Routing` and weights
(for integrations that own their router and parameters).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ContextManager, Optional, Tuple

import torch
from torch import nn

from . import ops
from .matrix import SparseMatrix
from .router import SCORES, Router, check_float
from .routing import Routing, route
from .topology import check_block_size, make_topology


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


def _check_weight(w: torch.Tensor, name: str, shape: Tuple[int, int, int]) -> None:
    if tuple(w.shape) != shape:
        raise ValueError(f"expert_mlp: {name} must be {list(shape)}, got {list(w.shape)}")


def _add_column_bias(s: SparseMatrix, bias: torch.Tensor) -> SparseMatrix:
    """``s + bias`` broadcast over rows, on the stored blocks only (``bias [N]``, ``s [M, N]``).

    Padding rows get the bias too; the unpermute never reads them, so they neither change
    the output nor send gradient back.
    """
    b = s.block_size
    per_block = bias.view(-1, b)[s.topology.column_indices.long()]  # [nnz, b]
    return s.with_data(s.data + per_block.unsqueeze(1))


def _autocast_operands(x: torch.Tensor, *tensors: Optional[torch.Tensor]
                       ) -> Tuple[Tuple[Optional[torch.Tensor], ...], ContextManager]:
    """Mixed precision at the entry of the expert path, as MegaBlocks does it.

    Under ``torch.autocast`` on ``x``'s device, ``x`` and ``tensors`` (the expert weights and
    biases) that are float32/float16/bfloat16 are cast to the autocast dtype here, once per
    call (once per step: the casts are differentiable, so gradients reach the fp32
    parameters in their own dtype), and the returned context turns autocast off for the
    ops inside, which then run in that dtype instead of being re-cast op by op. float64
    is left alone, as autocast leaves it. Outside autocast: the tensors unchanged and a
    null context. Returns ``((x, *tensors), context)``.
    """
    device = x.device.type
    if not (device in ("cpu", "cuda") and torch.is_autocast_enabled(device)):
        return (x, *tensors), contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        if t is None or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return t
        return t.to(dtype)
    return tuple(cast(t) for t in (x, *tensors)), torch.autocast(device, enabled=False)


def expert_mlp(x: torch.Tensor, routing: Routing, weights: Optional[torch.Tensor], w1: torch.Tensor,
               w2: torch.Tensor, b1: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None, *,
               activation: str = "silu", glu: bool = True) -> torch.Tensor:
    """Every token's ``k`` expert MLPs, weighted and summed: the dropless MoE without its router.

    ``out[t] = sum_j weights[t, j] * (MLP_{e(t, j)}(x[t]))`` with ``MLP_e(x) =
    (act(x W1g_e^T + b1g_e) * (x W1u_e^T + b1u_e)) W2_e + b2_e`` (GLU) or
    ``act(x W1_e^T + b1_e) W2_e + b2_e`` (plain MLP).

    Args:
        x: ``[T, H]``.
        routing: ``route(expert_indices [T, k], E, block_size)``; its ``topology`` is used
            when it was built with ``ffn_hidden_size=F``, made here otherwise.
        weights: ``[T, k]`` (x's dtype or float32), or None for weights 1.
        w1, w2, b1, b2: see the module docstring (``w1 [E, G*F, H]``, ``w2 [E, F, H]``).
        activation: ``"silu"``, ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` (or HF aliases).
        glu: ``w1`` packs ``[gate | up]`` (``G = 2``).

    Returns ``[T, H]`` in x's dtype. Differentiable in x, weights, w1, w2, b1, b2.

    Any strides: an ``x`` without unit stride along ``H`` (``x[:, ::2]``, ``x.t()``) is copied
    once to a contiguous tensor for the permute kernels. Under ``torch.autocast`` the experts
    run in the autocast dtype (x and the weights cast once, float32 ``weights`` kept) and
    the result is in that dtype.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"expert_mlp: routing must be a Routing, got {type(routing).__name__}")
    for name, t in (("x", x), ("w1", w1), ("w2", w2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expert_mlp: {name} must be a tensor, got {type(t).__name__}")
    (x, w1, w2, b1, b2), amp_off = _autocast_operands(x, w1, w2, b1, b2)
    if (weights is not None and x.dtype != weights.dtype and weights.dtype != torch.float32
            and not isinstance(amp_off, contextlib.nullcontext)):
        weights = weights.to(x.dtype)  # under autocast: the router's float32 stays float32
    with amp_off:
        return _expert_mlp(x, routing, weights, w1, w2, b1, b2, activation=activation, glu=glu)


def _expert_mlp(x: torch.Tensor, routing: Routing, weights: Optional[torch.Tensor], w1: torch.Tensor,
                w2: torch.Tensor, b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], *, activation: str,
                glu: bool) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expert_mlp: x must be [T, H], got shape {tuple(x.shape)}")
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expert_mlp: w1 and w2 must be 3-D [E, ., H], got {tuple(w1.shape)} and {tuple(w2.shape)}")
    tokens, hidden = x.shape
    experts, ffn, _ = w2.shape
    groups = 2 if glu else 1
    b = routing.block_size
    if routing.num_experts != experts:
        raise ValueError(f"expert_mlp: routing has {routing.num_experts} experts but w2 has {experts}")
    if routing.num_tokens != tokens:
        raise ValueError(f"expert_mlp: routing has {routing.num_tokens} tokens but x has {tokens} rows")
    if ffn % b:
        raise ValueError(f"expert_mlp: ffn_hidden_size {ffn} must be a multiple of the block size {b}")
    _check_weight(w1, "w1", (experts, groups * ffn, hidden))
    _check_weight(w2, "w2", (experts, ffn, hidden))
    for name, t, shape in (("b1", b1, (experts, groups * ffn)), ("b2", b2, (experts, hidden))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"expert_mlp: {name} must be {list(shape)}, got {list(t.shape)}")
    for name, t in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"expert_mlp: {name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
    k = routing.top_k
    if weights is not None and tuple(weights.shape) != (tokens, k):
        raise ValueError(f"expert_mlp: weights must be [T, k] = [{tokens}, {k}], got {tuple(weights.shape)}")

    # Every topology gets the routing's P when it is known: no second host read, and under
    # torch.compile one symbolic P for the whole layer.
    topo_hidden = routing.topology
    if topo_hidden is None or topo_hidden.shape[1] != experts * ffn:
        topo_hidden = make_topology(routing.padded_bins, experts, ffn, b, padded_tokens=routing.known_padded_tokens)
    topo_in = topo_hidden if groups == 1 else make_topology(routing.padded_bins, experts, groups * ffn, b,
                                                            padded_tokens=topo_hidden.shape[0])

    if tokens == 0:
        # Nothing to route. Every input stays in the graph (zero gradients), and no kernel
        # sees the zero-stride gradient of an empty ``out.sum()``.
        return _empty_output(x, weights, w1, w2, b1, b2)
    if x.dim() == 2 and x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()  # the permutes read rows with unit stride along H (documented copy)
    x_perm = ops.padded_gather(x, routing, k)  # [P, H], padding rows zero
    # The weights are grouped operands (any strides, read in place): w1^T [E, H, G*F] is the
    # SDD's b grouped along its columns, w2 [E, F, H] the DSD's b grouped along its rows.
    h = ops.sdd(x_perm, w1.transpose(1, 2), topo_in)  # P x E*G*F on the expert blocks only
    if b1 is not None:
        h = _add_column_bias(h, b1.reshape(-1))
    if glu:
        a = ops.sparse_glu_packed(h, activation, topo_hidden)
    else:
        a = ops.sparse_activation(h, activation)
    y = ops.dsd(a, w2)  # [P, H]
    out = ops.padded_scatter(y, routing, weights, k)
    if b2 is not None:
        # Each slot's expert output bias, weighted like the expert output itself.
        slot_expert = routing.bin_ids.long()[routing.rows.long()].view(tokens, k)
        bias = b2[slot_expert]  # [T, k, H]
        if weights is not None:
            bias = bias * weights.unsqueeze(-1)
        out = out + bias.sum(1).to(out.dtype)
    return out


def _empty_output(x: torch.Tensor, *inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """``[0, H]`` output of zero tokens, connected to every input so backward gives zeros."""
    out = x.new_zeros(x.shape)
    for t in (x, *inputs):
        if t is not None and t.requires_grad:
            out = out + t.sum().to(out.dtype) * 0
    return out


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
        (x, w1, w2, b1, b2), amp_off = _autocast_operands(x, self.w1, self.w2, self.b1, self.b2)
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
        ffn_hidden_size: ``F``, each expert's inner width; a multiple of ``block_size``.
        num_experts: ``E``.
        top_k: experts per token.
        activation: ``"silu"`` (default; SwiGLU with ``glu=True``), ``"gelu"``,
            ``"gelu_tanh"``, ``"relu"``.
        glu: gated experts ``act(x Wg) * (x Wu)`` (Mixtral, Qwen, DeepSeek) or a plain MLP.
        bias: expert (and shared-expert) biases ``b1``, ``b2``.
        block_size: 16, 32, 64 or 128; smaller blocks pad less for fine-grained experts.
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
                 activation: str = "silu", glu: bool = True, bias: bool = False, block_size: int = 128,
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
        check_block_size(block_size)
        if ffn_hidden_size % block_size:
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
        if x.dtype != self.w1.dtype and x.dtype != amp:
            raise TypeError(f"DroplessMoE: x is {x.dtype} but the layer's parameters are {self.w1.dtype}"
                            + (f" (and autocast's dtype is {amp})" if amp is not None else ""))
        if x.device != self.w1.device:
            raise ValueError(f"DroplessMoE: x is on {x.device} but the layer's parameters are on {self.w1.device}")
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        r = self.router(x2, expert_indices)
        routing = route(r.indices.contiguous(), self.num_experts, self.block_size,
                        ffn_hidden_size=self.ffn_hidden_size)
        out = expert_mlp(x2, routing, r.weights, self.w1, self.w2, self.b1, self.b2,
                         activation=self.activation, glu=self.glu)
        if self.shared_expert is not None:
            shared = self.shared_expert(x2)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(x2 @ self.shared_expert_gate.t())
            out = out + shared
        aux = MoEAux(aux_loss=r.aux_loss, load_balancing_loss=r.load_balancing_loss, z_loss=r.z_loss,
                     tokens_per_expert=routing.tokens_per_expert, router_logits=r.logits,
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
        w1 = c(self.w1)
        b1 = c(self.b1)
        kw = dict(router_weight=c(self.router.weight), w2=c(self.w2), b2=c(self.b2), top_k=self.top_k,
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
