"""The fused expert path: every token's ``k`` expert MLPs, weighted and summed (``expert_mlp``).

    out[t] = sum_j weights[t, j] * MLP_{e(t, j)}(x[t])
    MLP_e(x) = (act(x W1g_e^T + b1g_e) * (x W1u_e^T + b1u_e)) W2_e + b2_e      (GLU)
    MLP_e(x) = act(x W1_e^T + b1_e) W2_e + b2_e                                (plain MLP)

This is what ``DroplessMoE`` and the transformers backend run. Unlike the unfused
MegaBlocks pipeline (``padded_gather -> sdd -> activation -> dsd -> padded_scatter``, still
public in ``ops.permute``/``ops.products``/``ops.activation``), each back end computes the
whole path in as few passes as it can:

* Triton (``kernels/experts.py``): the first product reads x's rows straight from the tokens
  and writes ``act(gate) * up`` from one program; the second multiplies each row by its
  top-k weight and writes it to its token's slot. Sizes come from the static bound on padded
  rows, ``P <= T*k + E*(b-1)``: no host read of device data in forward or backward, so the
  layer can be captured in a CUDA graph.
* CPU (``cpu/experts.py``): per-expert contiguous row ranges and one GEMM per expert; the
  block layout is the GPU's.

Forward and backward are one ``blocksparse_moe::`` custom op each, so ``torch.compile``
sees two opaque nodes whose fakes give static shapes. What backward keeps is the back end's
``saved`` list (the pre-activation and the sort order), plus the inputs.

Expert ids passed by a caller are range-checked (on CPU tensors a ``ValueError``; on a GPU a
device-side assert, so nothing is read back). The layer's own router produces ids in range by
construction and skips that check (``check_indices=False``).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, List, Optional, Sequence, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from .. import backend, checks
from ..library import custom_op
from ..routing import Routing, checked_expert_ids
from ..topology import block_size_for_call, check_block_size
from .activation import canonical_activation


def _forward_fake(x, expert_indices, weights, w1, w2, b1, b2, num_experts, act, glu, block_size, keep):
    out, saved = backend.impl(x).experts_forward_fake(x, expert_indices, weights, w1, w2, b1, b2,
                                                      num_experts=num_experts, act=act, glu=glu,
                                                      block_size=block_size, keep=keep)
    return [out, *saved]


@custom_op("experts_forward", _forward_fake)
def _forward(x: torch.Tensor, expert_indices: torch.Tensor, weights: Optional[torch.Tensor], w1: torch.Tensor,
             w2: torch.Tensor, b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], num_experts: int, act: str,
             glu: bool, block_size: int, keep: bool) -> List[torch.Tensor]:
    """``[out, *saved]`` of the back end's ``experts_forward`` (``keep``: whether backward will
    run, so the pre-activation is stored; without, its saved entry has no rows)."""
    out, saved = backend.impl(x).experts_forward(x, expert_indices, weights, w1, w2, b1, b2,
                                                 num_experts=num_experts, act=act, glu=glu, block_size=block_size,
                                                 keep=keep)
    return [out, *saved]


def _backward_fake(dout, saved, x, expert_indices, weights, w1, w2, b1, b2, num_experts, act, glu, block_size,
                   needs):
    # The strides both back ends give: dx and dweights row-major whatever x's and the
    # weights' layouts, the parameters' gradients in their parameter's own strides.
    inputs = (x, weights, w1, w2, b1, b2)
    out = []
    for i, (t, need) in enumerate(zip(inputs, needs)):
        if need and t is not None:
            out.append(t.new_empty(t.shape) if i < 2 else torch.empty_like(t))
    return out


@custom_op("experts_backward", _backward_fake)
def _backward(dout: torch.Tensor, saved: List[torch.Tensor], x: torch.Tensor, expert_indices: torch.Tensor,
              weights: Optional[torch.Tensor], w1: torch.Tensor, w2: torch.Tensor, b1: Optional[torch.Tensor],
              b2: Optional[torch.Tensor], num_experts: int, act: str, glu: bool, block_size: int,
              needs: List[bool]) -> List[torch.Tensor]:
    """The gradients the back end computed, for the inputs of ``needs`` that exist, in order."""
    grads = backend.impl(x).experts_backward(dout, list(saved), x, expert_indices, weights, w1, w2, b1, b2,
                                             num_experts=num_experts, act=act, glu=glu, block_size=block_size,
                                             needs_input_grad=tuple(needs))
    inputs = (x, weights, w1, w2, b1, b2)
    return [g for g, t, need in zip(grads, inputs, needs) if need and t is not None]


class _ExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, w1, w2, b1, b2, expert_indices, num_experts, act, glu, block_size, keep):
        out, *saved = _forward(x, expert_indices, weights, w1, w2, b1, b2, num_experts, act, glu, block_size, keep)
        ctx.save_for_backward(x, weights, w1, w2, b1, b2, expert_indices, *saved)
        ctx.config = (num_experts, act, glu, block_size)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weights, w1, w2, b1, b2, expert_indices, *saved = ctx.saved_tensors
        inputs = (x, weights, w1, w2, b1, b2)
        needs = [bool(n) and t is not None for n, t in zip(ctx.needs_input_grad[:6], inputs)]
        if not any(needs):
            return (None,) * 12
        grads = iter(_backward(dout, saved, x, expert_indices, weights, w1, w2, b1, b2, *ctx.config, needs))
        return (*(next(grads) if need else None for need in needs), None, None, None, None, None, None)


def _expert_ids(op: str, routing: Union[torch.Tensor, Routing], tokens: int, device: torch.device,
                check: bool) -> torch.Tensor:
    """``[T, k]`` int64 contiguous expert ids from ids or from a :class:`Routing`."""
    if isinstance(routing, Routing):
        # The routing sorted the slots: put each expert id back at its slot (no host read).
        ids = torch.empty(routing.indices.numel(), dtype=torch.int64, device=routing.indices.device)
        ids[routing.indices.long()] = routing.bin_ids.long()
        ids = ids.view(routing.num_tokens, routing.top_k)
    else:
        checks.tensor(op, "expert_indices", routing)
        if routing.dtype not in checks.INDEX_DTYPES:
            raise TypeError(f"{op}: expert_indices must be int32 or int64, got {routing.dtype}")
        checks.dims(op, "expert_indices", routing, (2,), "[T, k]")
        ids = routing
    if ids.shape[0] != tokens:
        raise ValueError(f"{op}: expert_indices has {ids.shape[0]} rows but x has {tokens} tokens")
    if ids.shape[1] < 1:
        raise ValueError(f"{op}: expert_indices must have k >= 1 columns, got shape {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{op}: expert_indices is on {ids.device} but x is on {device}")
    return ids


def autocast_operands(x: torch.Tensor, *tensors: Optional[torch.Tensor]
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


def expert_mlp(x: torch.Tensor, expert_indices: Union[torch.Tensor, Routing], weights: Optional[torch.Tensor],
               w1: torch.Tensor, w2: torch.Tensor, b1: Optional[torch.Tensor] = None,
               b2: Optional[torch.Tensor] = None, *, activation: str = "silu", glu: bool = True,
               block_size: Optional[int] = None, check_indices: bool = True, w1_scale: Optional[torch.Tensor] = None,
               w2_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every token's ``k`` expert MLPs, weighted and summed: the dropless MoE without its router.

    Args:
        x: ``[T, H]``, any strides; fp32/fp16/bf16 (fp64 on the CPU path).
        expert_indices: ``[T, k]`` int32/int64 expert ids (a :class:`Routing` from
            :func:`blocksparse_moe.route` is accepted too). Duplicates within a row are allowed.
        weights: ``[T, k]`` in x's dtype or float32, or None for weights 1.
        w1: ``[E, G*F, H]`` (``G = 2`` for a GLU: gate rows ``[0, F)``, up rows ``[F, 2F)``), any strides.
        w2: ``[E, F, H]`` (``w2[e] = down_proj[e].T``), any strides.
        b1, b2: optional ``[E, G*F]`` and ``[E, H]`` biases (b2 is weighted like its expert's output).
        activation: ``"silu"``, ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` (or Hugging Face aliases).
        glu: ``w1`` packs ``[gate | up]``.
        block_size: the row padding of the GPU kernels (16, 32, 64, 128; F must be a
            multiple); default: the routing's, else chosen per call from ``T*k``, ``E`` and
            ``F`` (:func:`~blocksparse_moe.topology.block_size_for_call`: 16 at decode).
        check_indices: range-check ``expert_indices``: a ``ValueError`` on CPU tensors, a
            device-side assert on a GPU (no host read). Pass False only for ids in ``[0, E)``
            by construction (a router's top-k).
        w1_scale, w2_scale: float32 block scales of float8_e4m3fn ``w1``/``w2`` (the FP8 path,
            see :func:`_expert_mlp_fp8` and ``blocksparse_moe/fp8.py``): ``[E, ceil(G*F/128),
            ceil(H/128)]`` and ``[E, ceil(F/128), ceil(H/128)]`` (w2's in its ``[F, H]``
            orientation). None for fp16/bf16/fp32 weights. fp8 weights serve forward; they get
            no gradient (x, weights, b1, b2 get the dequantized layer's, see there).

    Returns:
        ``[T, H]`` in x's dtype, accumulated in fp32. Differentiable in x, weights, w1, w2, b1, b2.
        Deterministic: the ``k`` slots of a token are summed in a fixed order, no atomics.
        Under ``torch.autocast`` the experts run in the autocast dtype (x and the weights cast
        once per call, float32 ``weights`` kept) and the result is in that dtype.
    """
    op = "expert_mlp"
    for name, t in (("x", x), ("w1", w1), ("w2", w2)):
        checks.tensor(op, name, t)
    if any(checks.is_fp8(t) for t in (x, w1, w2)) or w1_scale is not None or w2_scale is not None:
        return _expert_mlp_fp8(op, x, expert_indices, weights, w1, w2, b1, b2, w1_scale, w2_scale, activation, glu,
                               block_size, check_indices)
    (x, w1, w2, b1, b2), amp_off = autocast_operands(x, w1, w2, b1, b2)
    if weights is not None and isinstance(weights, torch.Tensor) and weights.dtype not in (x.dtype, torch.float32):
        if not isinstance(amp_off, contextlib.nullcontext):
            weights = weights.to(x.dtype)  # under autocast: the router's float32 stays float32
    with amp_off:
        return _expert_mlp(op, x, expert_indices, weights, w1, w2, b1, b2, activation, glu, block_size,
                           check_indices)


def _expert_mlp(op, x, expert_indices, weights, w1, w2, b1, b2, activation, glu, block_size, check_indices):
    for name, t in (("x", x), ("w1", w1), ("w2", w2)):
        checks.float_tensor(op, name, t)
    for name, t in (("b1", b1), ("b2", b2)):
        checks.float_tensor(op, name, t, optional=True)
    checks.dims(op, "x", x, (2,), "[T, H]")
    checks.dims(op, "w1", w1, (3,), "[E, G*F, H]")
    checks.dims(op, "w2", w2, (3,), "[E, F, H]")
    named = (("x", x), ("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2))
    checks.same_dtype(op, named)
    checks.same_device(op, named)
    tokens, hidden = x.shape
    experts, ffn, _ = w2.shape
    groups = 2 if glu else 1
    checks.shape(op, "w1", w1, (experts, groups * ffn, hidden), "[E, G*F, H]")
    checks.shape(op, "w2", w2, (experts, ffn, hidden), "[E, F, H]")
    if b1 is not None:
        checks.shape(op, "b1", b1, (experts, groups * ffn), "[E, G*F]")
    if b2 is not None:
        checks.shape(op, "b2", b2, (experts, hidden), "[E, H]")
    act = canonical_activation(activation, op)
    ids, block_size = _routing_args(op, expert_indices, x, weights, w2, block_size, check_indices)
    # Inference (grad mode off, or no input needing a gradient) stores no pre-activation: a
    # forward then allocates a, y and out only, below the floor of a training step.
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weights, w1, w2, b1, b2))
    return _ExpertsFn.apply(x, weights, w1, w2, b1, b2, ids, experts, act, bool(glu), block_size, keep)


def _routing_args(op, expert_indices, x, weights, w2, block_size, check_indices) -> Tuple[torch.Tensor, int]:
    """``(ids [T, k] int64 contiguous, row padding b)`` of a call whose tensors are checked:
    the ids from ids or a :class:`Routing` (range-checked when asked), ``b`` the routing's,
    the caller's or the per-call choice (:func:`~blocksparse_moe.topology.block_size_for_call`),
    and the top-k weights against them. The one place both expert paths (the fp8 one too)
    read their routing arguments."""
    tokens = x.shape[0]
    experts, ffn, _ = w2.shape
    if isinstance(expert_indices, Routing):
        if expert_indices.num_experts != experts:
            raise ValueError(f"{op}: routing has {expert_indices.num_experts} experts but w2 has {experts}")
        block_size = expert_indices.block_size if block_size is None else block_size
    ids = _expert_ids(op, expert_indices, tokens, x.device, check_indices)
    k = ids.shape[1]
    if ffn < 1:
        raise ValueError(f"{op}: w2 has F = 0 columns {tuple(w2.shape)}: experts need an inner width >= 1")
    if block_size is None:
        block_size = block_size_for_call(tokens * k, experts, ffn, f"{op}: w2's F")
    check_block_size(block_size, f"{op}: block_size")
    if ffn % block_size:
        raise ValueError(f"{op}: F = {ffn} (w2 {tuple(w2.shape)}) must be a multiple of block_size {block_size}")
    checks.top_k_weights(op, weights, "x", x, tokens, k)
    if check_indices and not isinstance(expert_indices, Routing):
        return checked_expert_ids(op, ids, experts), block_size
    return ids.to(torch.int64).contiguous(), block_size


# -- FP8 weights (blocksparse_moe/fp8.py's format) -----------------------------------------

def _forward_fp8_fake(x, expert_indices, weights, w1, w1_scale, w2, w2_scale, b1, b2, num_experts, act, glu,
                      block_size):
    return x.new_empty(x.shape)


@custom_op("experts_forward_fp8", _forward_fp8_fake)
def _forward_fp8(x: torch.Tensor, expert_indices: torch.Tensor, weights: Optional[torch.Tensor], w1: torch.Tensor,
                 w1_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, b1: Optional[torch.Tensor],
                 b2: Optional[torch.Tensor], num_experts: int, act: str, glu: bool, block_size: int) -> torch.Tensor:
    """``out [T, H]`` of the back end's ``experts_forward_fp8``."""
    return backend.impl(x).experts_forward_fp8(x, expert_indices, weights, w1, w1_scale, w2, w2_scale, b1, b2,
                                               num_experts=num_experts, act=act, glu=glu, block_size=block_size)


class _Fp8ExpertsFn(torch.autograd.Function):
    """The fp8 forward; backward through the dequantized weights (see :func:`_expert_mlp_fp8`)."""

    @staticmethod
    def forward(ctx, x, weights, b1, b2, w1, w1_scale, w2, w2_scale, expert_indices, num_experts, act, glu,
                block_size):
        out = _forward_fp8(x, expert_indices, weights, w1, w1_scale, w2, w2_scale, b1, b2, num_experts, act, glu,
                           block_size)
        ctx.save_for_backward(x, weights, b1, b2, w1, w1_scale, w2, w2_scale, expert_indices)
        ctx.config = (num_experts, act, glu, block_size)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        from ..fp8 import dequantize_weight_blockwise

        x, weights, b1, b2, w1, w1_scale, w2, w2_scale, expert_indices = ctx.saved_tensors
        needs = [bool(n) and t is not None for n, t in zip(ctx.needs_input_grad[:4], (x, weights, b1, b2))]
        if not any(needs):
            return (None,) * 13
        # The gradient of the layer with the dequantized weights (in x's dtype) at x: the
        # activation quantization is passed straight through. The bf16 path recomputes the
        # pre-activation it keeps; the fp8 weights themselves are frozen (no gradient).
        w1d = dequantize_weight_blockwise(w1, w1_scale, x.dtype)
        w2d = dequantize_weight_blockwise(w2, w2_scale, x.dtype)
        _, *saved = _forward(x, expert_indices, weights, w1d, w2d, b1, b2, *ctx.config, True)
        need_x, need_w, need_b1, need_b2 = needs
        grads = iter(_backward(dout, saved, x, expert_indices, weights, w1d, w2d, b1, b2, *ctx.config,
                               [need_x, need_w, False, False, need_b1, need_b2]))
        return (*(next(grads) if need else None for need in needs), *(None,) * 9)


def _expert_mlp_fp8(op, x, expert_indices, weights, w1, w2, b1, b2, w1_scale, w2_scale, activation, glu, block_size,
                    check_indices):
    """:func:`expert_mlp` with float8_e4m3fn ``w1``/``w2`` and their float32 block scales.

    The format (``blocksparse_moe/fp8.py``; DeepSeek-V3 / Qwen3-FP8): weight element ``(n, k)``
    of expert ``e`` is ``w[e, n, k] * scale[e, n // 128, k // 128]``; ``x`` and ``a = act(g) *
    u`` are quantized on the fly per token and 1x128 group along the reduction dimension
    (``s = max(amax, 1e-4) / 448``); the products accumulate in float32; the pre-activation is
    rounded to x's dtype as in the bf16 path. ``x`` is bf16/fp16 (float32 too on the CPU
    path; never fp8: it is quantized inside); biases and the output are in x's dtype.

    A GPU needs fp8 tensor cores (sm_89+); an older one is an error, not a silent fallback.

    Backward: gradients reach ``x``, ``weights``, ``b1`` and ``b2``, those of the layer with
    the dequantized weights (straight-through for the activation quantization), computed by
    the bf16 path on dequantized copies (one forward recomputed). The fp8 weights and their
    scales are frozen: they get no gradient (serving and adapters, not training the experts).
    """
    from ..fp8 import scale_shape

    if checks.is_fp8(x):
        raise TypeError(f"{op}: x is {x.dtype}; the fp8 path quantizes activations itself (per 1x128 group), "
                        f"pass x in bfloat16 or float16")
    if not checks.is_fp8(w1) and not checks.is_fp8(w2):
        checks.no_fp8_scales(op, (("w1_scale", w1_scale), ("w2_scale", w2_scale)), "w1 and w2")
    for name, t in (("w1", w1), ("w2", w2)):
        if not checks.is_fp8(t):
            other = "w2" if name == "w1" else "w1"
            raise TypeError(f"{op}: {other} is float8_e4m3fn but {name} is {t.dtype}; both expert weights must be "
                            f"float8_e4m3fn with their block scales")
    (x, b1, b2), amp_off = autocast_operands(x, b1, b2)
    if isinstance(weights, torch.Tensor) and weights.dtype not in (x.dtype, torch.float32):
        if not isinstance(amp_off, contextlib.nullcontext):
            weights = weights.to(x.dtype)  # under autocast: the router's float32 stays float32
    with amp_off:
        allowed = checks.fp8_activation_dtypes(x)
        if x.dtype not in allowed:
            raise TypeError(f"{op}: x has dtype {x.dtype}; with fp8 weights x must be one of "
                            f"{', '.join(str(d).replace('torch.', '') for d in allowed)} here")
        for name, t in (("b1", b1), ("b2", b2)):
            checks.float_tensor(op, name, t, optional=True)
        checks.dims(op, "x", x, (2,), "[T, H]")
        checks.dims(op, "w1", w1, (3,), "[E, G*F, H]")
        checks.dims(op, "w2", w2, (3,), "[E, F, H]")
        checks.same_dtype(op, (("x", x), ("b1", b1), ("b2", b2)))
        tokens, hidden = x.shape
        experts, ffn, _ = w2.shape
        groups = 2 if glu else 1
        checks.shape(op, "w1", w1, (experts, groups * ffn, hidden), "[E, G*F, H]")
        checks.shape(op, "w2", w2, (experts, ffn, hidden), "[E, F, H]")
        checks.fp8_weight(op, "w1", w1, "w1_scale", w1_scale, scale_shape(experts, groups * ffn, hidden),
                          "[E, ceil(G*F/128), ceil(H/128)]")
        checks.fp8_weight(op, "w2", w2, "w2_scale", w2_scale, scale_shape(experts, ffn, hidden),
                          "[E, ceil(F/128), ceil(H/128)] (w2's [F, H] orientation)")
        if b1 is not None:
            checks.shape(op, "b1", b1, (experts, groups * ffn), "[E, G*F]")
        if b2 is not None:
            checks.shape(op, "b2", b2, (experts, hidden), "[E, H]")
        checks.same_device(op, (("x", x), ("w1", w1), ("w2", w2), ("w1_scale", w1_scale), ("w2_scale", w2_scale),
                                ("b1", b1), ("b2", b2)))
        checks.fp8_device(op, "w1", w1)
        act = canonical_activation(activation, op)
        ids, block_size = _routing_args(op, expert_indices, x, weights, w2, block_size, check_indices)
        return _Fp8ExpertsFn.apply(x, weights, b1, b2, w1, w1_scale, w2, w2_scale, ids, experts, act, bool(glu),
                                   block_size)


def tokens_per_expert(expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` int32 count of the slots routed to each expert (no host read)."""
    flat = expert_indices.reshape(-1).to(torch.int64)
    # scatter_add_ has a static output size (bincount's is data-dependent and syncs a GPU);
    # integer adds, so exact and deterministic.
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat)).to(torch.int32)


__all__: Sequence[str] = ["expert_mlp", "tokens_per_expert"]
