"""Run any 🤗 transformers MoE model's experts on the block-sparse kernels.

Importing this module (or calling :func:`register`, which is idempotent) adds an experts
implementation named ``"blocksparse_moe"`` to transformers' ``ExpertsInterface``, so::

    import blocksparse_moe.integrations.transformers  # registers "blocksparse_moe"
    model.set_experts_implementation("blocksparse_moe")

runs every ``@use_experts_implementation`` experts module (Mixtral, Qwen2/3-MoE, OLMoE,
GPT-OSS, DeepSeek, ...) dropless, with autograd. The standard forms (transformers' default
gate, or no gate, with an activation the kernels know) run the fused expert path,
:func:`blocksparse_moe.expert_mlp`, the same function ``DroplessMoE`` runs. A custom
``_apply_gate``, an activation the kernels do not know or a post-expert norm sits between
the two products, so those forms compose the public unfused ops around the module's own
function: ``route -> padded_gather -> sdd -> gate -> dsd -> padded_scatter``. transformers is an optional dependency (extra
``[transformers]``); nothing here downloads weights.

Experts whose weights are float8_e4m3fn with block scales (transformers' fine-grained FP8,
``FP8Experts``: ``*_proj`` plus ``*_proj_scale_inv``) run :func:`expert_mlp`'s fp8 path
(``transformers_fp8.py`` says how their layouts and scales map).

How the module's weight layouts map onto the two products (``E`` experts, hidden ``H``,
inner width ``F``, block size ``b``). Both products take the weights as *grouped* operands
(``blocksparse_moe/grouped.py``: a 3-D stack read through its three strides), so no expert
weight is copied per call, whatever ``is_transposed`` says:

* ``gate_up_proj`` (or ``up_proj`` when ``has_gate`` is False) is the SDD's right operand
  ``[H, E*W]``, ``W = 2F`` (gated) or ``F``, passed as the ``[E, H, W]`` stack (the module's
  ``[E, H, W]`` itself, or the ``transpose(1, 2)`` view of ``[E, W, H]``): expert ``e`` owns
  columns ``e*W .. (e+1)*W - 1`` in the module's own column order, so the SDD's block row of
  expert ``e`` holds exactly the ``[gate | up]`` (or interleaved) row transformers computes.
* ``down_proj`` is the DSD's right operand ``[E*F, H]``, passed as the ``[E, F, H]`` stack
  (the module's ``[E, F, H]``, or the ``transpose(1, 2)`` view of ``[E, H, F]``, which no 2-D
  view could express).
* ``F`` must be a multiple of a block size; the largest of 128/64/32/16 dividing ``F`` is
  used. Otherwise ``F`` is padded with zero columns to a multiple of 16 (gate/up halves
  padded separately so column ``i`` of gate still meets column ``i`` of up): the padded
  columns meet zero rows of ``down_proj``, and a custom gate is handed only the real
  columns, so the result is exact. Padding copies the weights each call; prefer an ``F``
  divisible by 16.

torch.compile: the forward has no host read outside the ops (the routing's ``P`` sizes
every topology, as in ``moe.expert_mlp``), so a module compiled with ``fullgraph=True``
traces into one graph; ``P`` is an unbacked symbolic size there.

Gating. transformers' default ``_apply_gate`` is ``act(gate) * up`` on ``chunk(2)``: it is
applied blockwise on the SDD's blocks, gate block ``c`` with up block ``c`` of the same row,
without moving data. A custom ``_apply_gate`` (GPT-OSS's clamped, interleaved SwiGLU,
DeepSeek-V4's clamp, ...) only promises to map ``[S, 2F]`` rows to ``[S, F]`` rows, so it
gets exactly that: the blocks are viewed as the dense ``[P, 2F]`` rows (one copy), gated,
and put back into blocks (one copy).

Biases (``has_bias``) are added per row from the expert that owns the row (from
``padded_bins``); padding rows get them too but are never read back by the scatter, so
they get no gradient. ``has_post_expert_norm`` applies the module's norm to the DSD's rows.

Expert parallelism: when transformers shards the experts (``module._is_expert_parallel``),
ids outside ``[0, num_experts)`` mark pairs whose expert lives on another rank. They are
routed to one extra, virtual expert that the products never see (its rows are cut off
before the SDD and come back as zeros), so they cost no matmul and contribute exactly zero,
to the output and to every gradient. Outside expert parallelism such ids are an error.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

try:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, _default_apply_gate
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "blocksparse_moe.integrations.transformers needs transformers with the ExpertsInterface "
        "(transformers >= 5): pip install 'blocksparse_moe[transformers]'") from exc

from .. import checks, ops
from ..matrix import SparseMatrix
from ..ops.experts import autocast_operands, expert_mlp
from ..routing import route
from ..topology import SUPPORTED_BLOCK_SIZES, block_size_for_call, make_topology

IMPLEMENTATION_NAME = "blocksparse_moe"

__all__ = ["IMPLEMENTATION_NAME", "blocksparse_experts_forward", "pick_block_size", "register"]


def pick_block_size(ffn_hidden_size: int, max_block_size: int = 128) -> Tuple[int, int]:
    """``(block_size, padded_ffn_hidden_size)`` for an expert inner width ``F``.

    The largest supported block size (<= ``max_block_size``) that divides ``F``; when none
    does, the smallest block size and ``F`` rounded up to it (the caller pads with zeros).
    """
    if isinstance(ffn_hidden_size, bool) or not isinstance(ffn_hidden_size, int) or ffn_hidden_size < 1:
        raise ValueError(f"blocksparse_moe experts: intermediate size must be a positive int, got {ffn_hidden_size!r}")
    candidates = [b for b in sorted(SUPPORTED_BLOCK_SIZES, reverse=True) if b <= max_block_size]
    if not candidates:
        raise ValueError(f"blocksparse_moe experts: max_block_size {max_block_size} is below every supported "
                         f"block size {SUPPORTED_BLOCK_SIZES}")
    for b in candidates:
        if ffn_hidden_size % b == 0:
            return b, ffn_hidden_size
    b = candidates[-1]
    return b, -(-ffn_hidden_size // b) * b


def _uses_default_gate(module: torch.nn.Module) -> bool:
    fn = getattr(module, "_apply_gate", None)
    return getattr(fn, "__func__", None) is _default_apply_gate


def _fused_activation(act_fn) -> Optional[str]:
    """The name :mod:`blocksparse_moe.ops` knows ``act_fn`` by, or None (then torch runs it).

    Exact types only: a subclass may have changed ``forward``.
    """
    from transformers import activations as hf_act

    kind = type(act_fn)
    if kind in (torch.nn.SiLU, hf_act.SiLUActivation):
        return "silu"
    if kind is torch.nn.ReLU:
        return "relu"
    if kind is torch.nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act_fn.approximate)
    if kind is hf_act.GELUActivation and getattr(act_fn, "act", None) is F.gelu:
        return "gelu"
    if kind is hf_act.GELUTanh:
        act = getattr(act_fn, "act", None)
        if getattr(act, "func", None) is F.gelu and getattr(act, "keywords", None) == {"approximate": "tanh"}:
            return "gelu_tanh"
    return None


def _pad_inner(t: torch.Tensor, dim: int, width: int, padded: int, groups: int, interleaved: bool) -> torch.Tensor:
    """Zero-pad the inner width ``width -> padded`` of ``t`` along ``dim``.

    ``t.shape[dim] == groups * width``: ``groups`` is 2 for a gate/up pair, 1 otherwise.
    Concatenated layout ``[gate(F) | up(F)]`` pads each half; interleaved ``[g0, u0, g1, ...]``
    pads whole pairs at the end. Either way gate column ``i`` still meets up column ``i``.
    """
    if padded == width:
        return t
    dim = dim % t.dim()
    shape = list(t.shape)
    split = [width, groups] if interleaved else [groups, width]
    t = t.reshape(shape[:dim] + split + shape[dim + 1:])
    inner = dim if interleaved else dim + 1
    pad = [0, 0] * (t.dim() - 1 - inner) + [0, padded - width]
    t = F.pad(t, pad)
    return t.reshape(shape[:dim] + [groups * padded] + shape[dim + 1:])


def _expert_of_block_row(padded_bins: torch.Tensor, num_experts: int, block_size: int, block_rows: int) -> torch.Tensor:
    """``[P/b]`` int64: the expert owning each block row (from the inclusive ``padded_bins``)."""
    bins = padded_bins[:num_experts].to(torch.int64)
    counts = torch.diff(bins, prepend=bins.new_zeros(1)) // block_size
    # output_size avoids a device->host sync on GPU.
    return torch.repeat_interleave(torch.arange(num_experts, device=bins.device), counts, output_size=block_rows)


def blocksparse_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"blocksparse_moe"`` experts forward (same signature as transformers' ``eager``).

    Under ``torch.autocast`` (CPU or CUDA) the experts run in the autocast dtype: the
    module's weights and biases are cast once per call (gradients reach them in their own
    dtype), autocast is off for the ops inside, and the result is in the autocast dtype.

    Args:
        self: an experts module decorated with ``@use_experts_implementation`` (reads its
            ``num_experts``, ``has_gate``, ``has_bias``, ``is_transposed``,
            ``is_concatenated``, ``has_post_expert_norm``, ``_is_expert_parallel`` and weights).
            An optional attribute ``blocksparse_moe_max_block_size`` caps the block size
            (smaller blocks pad less when few tokens reach each expert).
        hidden_states: ``[T, H]``.
        top_k_index: ``[T, k]`` expert ids.
        top_k_weights: ``[T, k]`` routing weights.

    Returns:
        ``[T, H]`` in ``hidden_states.dtype`` (the autocast dtype under autocast):
        ``sum_j w[t, j] * expert_{id[t, j]}(x[t])``.
    """
    # Weights and biases as the products take them: the module's own, or cast once to the
    # autocast dtype (then hidden_states too, and autocast off inside).
    params = {name: getattr(self, name, None) for name in
              ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")}
    if any(checks.is_fp8(params[n]) for n in ("gate_up_proj", "up_proj", "down_proj")):
        from .transformers_fp8 import fp8_experts_forward  # a module that imports this one

        return fp8_experts_forward(self, params, hidden_states, top_k_index, top_k_weights)
    names = [n for n, t in params.items() if isinstance(t, torch.Tensor)]
    (hidden_states, *cast), amp_off = autocast_operands(hidden_states, *(params[n] for n in names))
    params.update(zip(names, cast))
    with amp_off:
        return _experts_forward(self, params, hidden_states, top_k_index, top_k_weights)


def _experts_forward(self: torch.nn.Module, params: dict, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    if hidden_states.dim() != 2:
        raise ValueError(f"blocksparse_moe experts: hidden_states must be [T, H], got {tuple(hidden_states.shape)}")
    num_tokens = hidden_states.shape[0]
    if top_k_index.dim() != 2 or top_k_index.shape[0] != num_tokens:
        raise ValueError(f"blocksparse_moe experts: top_k_index must be [T={num_tokens}, k], "
                         f"got {tuple(top_k_index.shape)}")
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(f"blocksparse_moe experts: top_k_weights has shape {tuple(top_k_weights.shape)}, "
                         f"expected {tuple(top_k_index.shape)} like top_k_index")
    top_k = top_k_index.shape[1]
    num_experts = int(self.num_experts)
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    transposed = getattr(self, "is_transposed", False)
    default_gate = has_gate and _uses_default_gate(self)
    # The default gate is chunk(2) whatever the flag says; a custom one follows the flag.
    interleaved = has_gate and not default_gate and not getattr(self, "is_concatenated", True)
    groups = 2 if has_gate else 1

    w_in = params["gate_up_proj"] if has_gate else params["up_proj"]
    w_out = params["down_proj"]
    if w_in.dim() != 3 or w_in.shape[0] != num_experts:
        raise ValueError(f"blocksparse_moe experts: {'gate_up_proj' if has_gate else 'up_proj'} has shape "
                         f"{tuple(w_in.shape)}, expected [{num_experts}, ...]")
    width = w_in.shape[2] if transposed else w_in.shape[1]
    if width % groups:
        raise ValueError(f"blocksparse_moe experts: gate_up_proj has an odd inner width {width}")
    ffn = width // groups
    block_size, ffn_padded = pick_block_size(ffn, getattr(self, "blocksparse_moe_max_block_size", 128))
    dtype = w_in.dtype

    # The products' grouped operands, views of the module's weights in either layout (no
    # copy unless F is padded): w1 [E, H, W] for the SDD, w2 [E, F, H] for the DSD.
    w1 = w_in if transposed else w_in.transpose(1, 2)
    w1 = _pad_inner(w1, 2, ffn, ffn_padded, groups, interleaved)
    w2 = w_out if transposed else w_out.transpose(1, 2)
    w2 = _pad_inner(w2, 1, ffn, ffn_padded, 1, False)

    expert_parallel = bool(getattr(self, "_is_expert_parallel", False))
    fused = _fused_activation(getattr(self, "act_fn", None)) if (default_gate or not has_gate) else None
    if fused is not None and not getattr(self, "has_post_expert_norm", False):
        return _fused_forward(self, hidden_states, top_k_index, top_k_weights, w1, w2, has_gate, has_bias,
                              interleaved, ffn, ffn_padded, block_size, fused, expert_parallel)

    # A custom gate, an activation or a post-expert norm that expert_mlp does not fuse:
    # the public unfused ops, with the module's own functions in between.
    # Expert parallelism: ids of experts on other ranks go to a virtual expert E.
    ids = top_k_index
    if expert_parallel:
        ids = torch.where((ids < 0) | (ids >= num_experts), torch.full_like(ids, num_experts), ids)
        routing = route(ids.contiguous(), num_experts + 1, block_size)
        # P without the virtual expert's rows (their padded_bins entry is the last).
        topo_in = make_topology(routing.padded_bins[:num_experts], num_experts, groups * ffn_padded, block_size)
    else:
        # route() builds the SDD's topology and knows P from it (under torch.compile: one
        # symbolic P that every later op takes its sizes from, no host read).
        routing = route(ids.contiguous(), num_experts, block_size, ffn_hidden_size=groups * ffn_padded)
        topo_in = routing.topology
    rows = topo_in.shape[0]
    topo_hidden = topo_in if not has_gate else make_topology(
        routing.padded_bins[:num_experts], num_experts, ffn_padded, block_size, padded_tokens=rows)
    block_rows = rows // block_size

    x = hidden_states if hidden_states.dtype == dtype else hidden_states.to(dtype)
    x_perm = ops.padded_gather(x.contiguous(), routing, top_k)
    if expert_parallel:
        # Drop the virtual expert's rows: a contiguous prefix, no copy. Under torch.compile
        # rows and P are two unbacked sizes; the check tells the compiler rows <= P.
        torch._check(rows <= routing.padded_tokens)
        x_perm = x_perm.narrow(0, 0, rows)

    expert_of_block_row: Optional[torch.Tensor] = None
    if has_bias:
        expert_of_block_row = _expert_of_block_row(routing.padded_bins, num_experts, block_size, block_rows)

    h = ops.sdd(x_perm, w1, topo_in)
    fb = ffn_padded // block_size
    data = h.data.view(block_rows, groups * fb, block_size, block_size)
    bias1 = None
    if has_bias:
        b1 = params["gate_up_proj_bias"] if has_gate else params["up_proj_bias"]
        bias1 = _pad_inner(b1, 1, ffn, ffn_padded, groups, interleaved)[expert_of_block_row]  # [R, W]

    if bias1 is not None:
        # Block (r, c) holds columns c*b .. c*b+b-1 of its row's expert.
        data = data + bias1.view(block_rows, groups * fb, 1, block_size)
    if not has_gate:
        if fused is not None:
            act = ops.sparse_activation(data.reshape(-1, block_size, block_size), fused)
        else:
            act = self.act_fn(data)
    elif default_gate and fused is not None:
        # act(gate) * up on the packed blocks, gate block c with up block fb + c (no copy).
        hp = SparseMatrix(topo_in, data.reshape(-1, block_size, block_size), False)
        act = ops.sparse_glu_packed(hp, fused, topo_hidden).data
    elif default_gate:
        act = self.act_fn(data[:, :fb]) * data[:, fb:]
    else:
        # A custom gate maps [S, 2F] rows to [S, F] rows: give it exactly the dense rows.
        # With a padded F it sees only the real columns: it may mix a row's columns (a
        # softmax over F, a norm), and zero columns would change the real ones.
        dense = data.transpose(1, 2).reshape(rows, 2 * ffn_padded)
        if ffn_padded != ffn:
            dense = dense[:, :2 * ffn] if interleaved else dense.view(rows, 2, ffn_padded)[:, :, :ffn].reshape(rows, -1)
        gated = self._apply_gate(dense)
        if tuple(gated.shape) != (rows, ffn):
            raise ValueError(f"blocksparse_moe experts: _apply_gate returned shape {tuple(gated.shape)}, "
                             f"expected {(rows, ffn)}")
        if ffn_padded != ffn:
            gated = F.pad(gated, (0, ffn_padded - ffn))
        act = gated.view(block_rows, block_size, fb, block_size).transpose(1, 2)
    act = act.reshape(block_rows * fb, block_size, block_size).contiguous()
    y = ops.dsd(SparseMatrix(topo_hidden, act, False), w2)  # [P, H]

    if has_bias:
        y = y + params["down_proj_bias"][expert_of_block_row].repeat_interleave(block_size, 0)
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    if expert_parallel:
        y = F.pad(y, (0, 0, 0, routing.padded_tokens - rows))  # the virtual expert's rows: zeros
    # fp32 router weights stay fp32: the scatter sums in fp32 anyway.
    weights = top_k_weights if top_k_weights.dtype in (y.dtype, torch.float32) else top_k_weights.to(y.dtype)
    out = ops.padded_scatter(y, routing, weights, top_k)
    return out.to(hidden_states.dtype)


def _fused_forward(self, hidden_states, top_k_index, top_k_weights, w1, w2, has_gate, has_bias, interleaved,
                   ffn, ffn_padded, block_size, activation, expert_parallel):
    """The standard forms (default gate or none, a known activation) on :func:`expert_mlp`."""
    groups = 2 if has_gate else 1
    ids, weights = top_k_index, top_k_weights
    if expert_parallel:
        # Pairs whose expert lives on another rank contribute exactly zero here: weight 0
        # (so no gradient either) and any valid id (it is computed, then multiplied by 0).
        away = (ids < 0) | (ids >= int(self.num_experts))
        ids = torch.where(away, torch.zeros_like(ids), ids)
        weights = torch.where(away, torch.zeros_like(weights), weights)
    b1 = b2 = None
    if has_bias:
        b1 = _pad_inner(self.gate_up_proj_bias if has_gate else self.up_proj_bias, 1, ffn, ffn_padded, groups,
                        interleaved)
        b2 = self.down_proj_bias
    x = hidden_states if hidden_states.dtype == w1.dtype else hidden_states.to(w1.dtype)
    if weights.dtype not in (x.dtype, torch.float32):
        weights = weights.to(x.dtype)
    # The ids come from the model's own router (a top-k over E logits, or masked into range
    # above under expert parallelism): in range by construction, so no check and nothing
    # read back to the host (a decode step stays capturable in a CUDA graph). The row
    # padding is chosen per call from T*k (16 at decode), capped by the module's block size.
    slots = ids.shape[0] * ids.shape[1]
    block_size = min(block_size, block_size_for_call(slots, int(self.num_experts), ffn_padded,
                                                     "blocksparse_moe experts: the inner width"))
    out = expert_mlp(x, ids, weights, w1.transpose(1, 2), w2, b1, b2, activation=activation, glu=has_gate,
                     block_size=block_size, check_indices=False)
    return out.to(hidden_states.dtype)


def register() -> None:
    """Register ``"blocksparse_moe"`` in transformers' ``ExpertsInterface`` (idempotent), and in
    the fine-grained FP8 experts' interface where transformers has one."""
    if ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION_NAME) is not blocksparse_experts_forward:
        ExpertsInterface.register(IMPLEMENTATION_NAME, blocksparse_experts_forward)
    try:
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8ExpertsInterface
    except ImportError:  # pragma: no cover - a transformers without fine-grained FP8
        return
    if ALL_FP8_EXPERTS_FUNCTIONS.get(IMPLEMENTATION_NAME) is not blocksparse_experts_forward:
        FP8ExpertsInterface.register(IMPLEMENTATION_NAME, blocksparse_experts_forward)


register()
