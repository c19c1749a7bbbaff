"""FP8 experts of transformers' fine-grained FP8 (``FP8Experts``) on :func:`expert_mlp`.

transformers' ``FineGrainedFP8Config`` swaps each ``.experts`` module for ``FP8Experts``
(integrations/finegrained_fp8.py), which dispatches through its own interface,
``ALL_FP8_EXPERTS_FUNCTIONS`` (hence ``transformers.register``'s second registration). It holds

  gate_up_proj [E, 2F, H] (up_proj [E, F, H] without a gate)  float8_e4m3fn
  gate_up_proj_scale_inv [E, max(ceil(2F/128), 2), ceil(H/128)] float32 (or ue8m0)
  down_proj [E, H, F] float8_e4m3fn,  down_proj_scale_inv [E, ceil(H/128), ceil(F/128)]

with ``block_size = (128, 128)``, or ``None`` for one scale per tensor (``[E, 2, 1]`` for
gate_up: gate and up each their own). ``*_scale_inv`` multiplies (it dequantizes): exactly
blocksparse_moe's scale, so down_proj and its scale are passed as their transpose(1, 2)
views, no copy. Activations are quantized dynamically (``activation_scheme="dynamic"``),
per 1x128 group, as blocksparse_moe does.

The gate_up scale has rows for the packed [2F] rows, ``ceil(2F/128)`` (the format's), or for
gate and up quantized as separate [F, H] projections and concatenated (checkpoints store
gate_proj and up_proj apart; transformers allocates 2 rows at least for that reason),
``2 * ceil(F/128)``. When the two counts differ the halves are read separately: each is
zero-padded to a multiple of 128 rows, which makes the concatenated scales the packed ones
of the padded weight (the padded rows meet zero rows of down_proj: exact). When they agree
and F is not a multiple of 128 (F = 96: 2 rows either way) the packed reading is taken,
which is what a block-fp8 matmul over the [2F, H] weight computes. One scale per tensor
(``[E, 2, 1]``: the gate's and the up's) is repeated over each half's blocks and read per half.
"""

from __future__ import annotations

import torch

from .. import backend
from ..ops.experts import expert_mlp
from ..topology import block_size_for_call
from .transformers import _fused_activation, _pad_inner, _uses_default_gate, pick_block_size

__all__ = ["fp8_experts_forward"]


def _fp8_standard_gate(module: torch.nn.Module) -> bool:
    """``act(gate) * up`` on ``chunk(2)``: transformers' default gate, or ``FP8Experts``' own
    with no softcap, no clamp and no SwiGLU-OAI alpha."""
    if _uses_default_gate(module):
        return True
    try:
        from transformers.integrations.finegrained_fp8 import FP8Experts
    except ImportError:  # pragma: no cover - depends on the transformers version
        return False
    fn = getattr(getattr(module, "_apply_gate", None), "__func__", None)
    return fn is FP8Experts._apply_gate and all(
        getattr(module, a, None) is None for a in ("gate_softcap", "swiglu_alpha", "limit"))


def _fp8_block_scale(op: str, name: str, scale: torch.Tensor, row_blocks: int, col_blocks: int,
                     per_tensor: bool) -> torch.Tensor:
    """A module's ``*_scale_inv`` as float32 ``[E, rows, col_blocks]`` block scales, where
    ``rows`` is what it holds (checked by the caller); per-tensor scales ``[E, r, 1]`` are
    repeated over the blocks (``r`` = 1, or 2 for gate and up: each half's rows)."""
    if scale.dtype != torch.float32:
        if scale.dtype.is_floating_point and scale.element_size() == 1:  # ue8m0 powers of two: exact in float32
            scale = scale.to(torch.float32)
        else:
            raise TypeError(f"{op}: {name} must be float32 (or float8_e8m0fnu), got {scale.dtype}")
    if per_tensor:
        if scale.dim() != 3 or scale.shape[2] != 1:
            raise ValueError(f"{op}: {name} of a per-tensor fp8 module must be [E, r, 1], got {tuple(scale.shape)}")
        r = scale.shape[1]
        scale = scale.repeat_interleave(row_blocks // r if r and row_blocks % r == 0 else 1, dim=1)
        scale = scale.expand(-1, -1, col_blocks)
    return scale


def fp8_experts_forward(self: torch.nn.Module, params: dict, hidden_states: torch.Tensor,
                         top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The fp8 experts of transformers' fine-grained FP8 on :func:`expert_mlp` (see the module
    docstring); called by ``transformers.blocksparse_experts_forward`` for fp8 weights."""
    from ..fp8 import GROUP, FP8_DTYPE

    op = "blocksparse_moe experts (fp8)"
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    transposed = getattr(self, "is_transposed", False)
    in_name = "gate_up_proj" if has_gate else "up_proj"
    w_in, w_out = params[in_name], params["down_proj"]
    for name, w in ((in_name, w_in), ("down_proj", w_out)):
        if not isinstance(w, torch.Tensor) or w.dtype != FP8_DTYPE:
            raise TypeError(f"{op}: {name} must be float8_e4m3fn with the other expert weights, got "
                            f"{getattr(w, 'dtype', type(w).__name__)} (fp4 experts are not supported)")
    if getattr(self, "activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"{op}: activation_scheme {self.activation_scheme!r} is not supported; blocksparse_moe "
                         f"quantizes activations dynamically per 1x128 group")
    block = getattr(self, "block_size", (GROUP, GROUP))
    per_tensor = block is None
    if not per_tensor and tuple(block) != (GROUP, GROUP):
        raise ValueError(f"{op}: weight block size {tuple(block)} is not supported (128x128 blocks or one scale "
                         f"per tensor)")
    activation = _fused_activation(getattr(self, "act_fn", None))
    if activation is None or (has_gate and not _fp8_standard_gate(self)) or getattr(self, "has_post_expert_norm",
                                                                                    False):
        raise ValueError(f"{op}: only act(gate) * up (or act(up)) experts with silu/gelu/gelu_tanh/relu and no "
                         f"post-expert norm run in fp8 here; use transformers' own fp8 experts implementation")
    if hidden_states.dim() != 2:
        raise ValueError(f"{op}: hidden_states must be [T, H], got {tuple(hidden_states.shape)}")
    num_experts = int(self.num_experts)
    groups = 2 if has_gate else 1
    # [E, W, H] and [E, F, H] views, their scales in the same orientation.
    w1 = w_in.transpose(1, 2) if transposed else w_in
    w2 = w_out if transposed else w_out.transpose(1, 2)
    s1 = getattr(self, f"{in_name}_scale_inv")
    s2 = getattr(self, "down_proj_scale_inv")
    s1 = s1.transpose(1, 2) if transposed else s1
    s2 = s2 if transposed else s2.transpose(1, 2)
    experts, width, hidden = w1.shape
    if width % groups:
        raise ValueError(f"{op}: {in_name} has an odd inner width {width}")
    ffn = width // groups
    hb, fb = -(-hidden // GROUP), -(-ffn // GROUP)
    packed_rows, half_rows = -(-width // GROUP), groups * fb
    # One scale per tensor for each of gate and up ([E, 2, 1]) is read per half like block scales.
    per_half_tensor = per_tensor and groups == 2 and s1.dim() == 3 and s1.shape[1] == 2
    s1 = _fp8_block_scale(op, f"{in_name}_scale_inv", s1, half_rows, hb, per_tensor)
    s2 = _fp8_block_scale(op, "down_proj_scale_inv", s2, fb, hb, per_tensor)
    if tuple(s1.shape) not in ((experts, packed_rows, hb), (experts, half_rows, hb)):
        raise ValueError(f"{op}: {in_name}_scale_inv has {tuple(s1.shape)} in the [E, W, H] orientation; expected "
                         f"[{experts}, {packed_rows}, {hb}] (packed rows) or [{experts}, {half_rows}, {hb}] (gate "
                         f"and up apart)")
    halves = per_half_tensor or s1.shape[1] != packed_rows  # gate and up scaled apart
    if (halves and ffn % GROUP) or ffn % 16:
        # Zero rows appended to each half (to a multiple of 128 when the halves have scales of
        # their own, else of 16, the smallest block size): exact, see above. A copy per call.
        step = GROUP if halves else 16
        if not halves and groups == 2:  # the up half's rows would move across scale blocks
            raise ValueError(f"{op}: F = {ffn} with packed gate_up scales must be a multiple of 16")
        ffn_padded = -(-ffn // step) * step
        w1 = _pad_fp8_rows(w1, ffn, ffn_padded, groups)
        w2 = _pad_fp8_rows(w2, ffn, ffn_padded, 1)  # padded rows stay within the scales' blocks
    else:
        ffn_padded = ffn
    block_size, _ = pick_block_size(ffn_padded, getattr(self, "blocksparse_moe_max_block_size", 128))
    # The row padding per call, as for bf16 experts (16 at decode), capped by the module's.
    block_size = min(block_size, block_size_for_call(top_k_index.numel(), num_experts, ffn_padded, op))
    b1 = b2 = None
    if has_bias:
        b1 = _pad_inner(params["gate_up_proj_bias" if has_gate else "up_proj_bias"], 1, ffn, ffn_padded, groups, False)
        b2 = params["down_proj_bias"]
    # The ids come from the model's router (in range by construction, or masked into range
    # here under expert parallelism): no check, nothing read back, as in _fused_forward.
    ids, weights = top_k_index, top_k_weights
    if getattr(self, "_is_expert_parallel", False):  # other ranks' pairs: weight 0 and a valid id
        away = (ids < 0) | (ids >= num_experts)
        ids = torch.where(away, torch.zeros_like(ids), ids)
        weights = torch.where(away, torch.zeros_like(weights), weights)
    x = hidden_states
    if x.dtype == torch.float32 and backend.select(x) != "cpu" and not torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.bfloat16)  # the fp8 kernels take bf16/fp16 activations (quantized to e4m3 inside)
    out = expert_mlp(x, ids, weights, w1, w2, b1, b2, activation=activation, glu=has_gate, block_size=block_size,
                     check_indices=False, w1_scale=s1.contiguous(), w2_scale=s2.contiguous())
    return out.to(hidden_states.dtype) if not torch.is_autocast_enabled(x.device.type) else out


def _pad_fp8_rows(w: torch.Tensor, ffn: int, padded: int, groups: int) -> torch.Tensor:
    """``[E, groups*ffn, K]`` -> ``[E, groups*padded, K]`` with zero rows after each group
    (fp8 has no pad kernel: a zero tensor and a copy)."""
    if padded == ffn:
        return w
    e, _, k = w.shape
    out = w.new_zeros((e, groups, padded, k))
    out[:, :, :ffn] = w.reshape(e, groups, ffn, k)
    return out.view(e, groups * padded, k)
