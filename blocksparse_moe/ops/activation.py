"""Activations and GLUs on sparse blocks: ``sparse_activation``, ``sparse_glu``, ``sparse_glu_packed``.

The expert activation runs on the [nnz, b, b] blocks the SDD produced, never on a dense
[P, E*F] tensor: an elementwise op does not care where a block sits. Padding rows are
computed like the others and dropped by the unpermute. Each autograd Function saves only
its inputs and recomputes act(gate) in backward, so a GLU layer keeps three [nnz, b, b]
tensors alive (gate, up and the product the DSD saves), not five.

Two GLU layouts, both copy-free:
* sparse_glu(gate, up): two SparseMatrix on one topology (two SDDs, MegaBlocks' w1/v1).
* sparse_glu_packed(h, topology): ONE SDD over the packed [E, 2F, H] weight (transformers'
  gate_up_proj) gives a P x E*2F matrix whose block row r holds [F/b gate blocks | F/b up
  blocks] of its expert, contiguous in `data`; viewed [P/b, 2L] (L = (F/b)*b*b) the
  gate is [:, :L] and up is [:, L:], and the result [P/b, L] is exactly the data of the
  P x E*F matrix on `topology`. The backward writes both halves of one gradient buffer.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch.autograd.function import once_differentiable
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .. import backend, checks
from ..library import custom_op
from ..matrix import SparseMatrix
from ..topology import Topology
from ._layout import unit_stride_cols

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
# Hugging Face's names for the same functions ("gelu_new"/"gelu_pytorch_tanh": tanh GELU).
_ACTIVATION_ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def canonical_activation(name: str, op: str = "activation") -> str:
    """The canonical name of an activation (one of ``ACTIVATIONS``), aliases resolved."""
    if not isinstance(name, str):
        raise TypeError(f"{op}: activation must be a str, got {type(name).__name__}")
    name = _ACTIVATION_ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {name!r}; expected one of {ACTIVATIONS} "
                         f"(or an alias in {sorted(_ACTIVATION_ALIASES)})")
    return name


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D, unit-column-stride view of ``t`` for the launchers (copies only if strided)."""
    if t.dim() == 2 and unit_stride_cols(t):
        return t
    return t.contiguous().view(1, -1)


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) with unit column stride: incoming gradients are, else one copy."""
    return t if unit_stride_cols(t) else t.contiguous()


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    # The torch path's elementwise results follow the operands' layout; the ops promise
    # (and their fakes say) contiguous outputs. A no-op for every layout the ops pass in.
    return t if t.is_contiguous() else t.contiguous()


def _glu_forward_fake(gate, up, act):
    return gate.new_empty(gate.shape)


@custom_op("glu_forward", _glu_forward_fake)
def _glu_forward(gate: torch.Tensor, up: Optional[torch.Tensor], act: int) -> torch.Tensor:
    return _contiguous(backend.impl(gate).glu_forward(gate, up, act))


def _glu_backward_fake(dout, gate, up, act):
    return [gate.new_empty(gate.shape) for _ in range(1 if up is None else 2)]


@custom_op("glu_backward", _glu_backward_fake)
def _glu_backward(dout: torch.Tensor, gate: torch.Tensor, up: Optional[torch.Tensor], act: int) -> List[torch.Tensor]:
    """``[dgate]`` (``up`` None) or ``[dgate, dup]``."""
    dgate, dup = backend.impl(gate).glu_backward(dout, gate, up, act)
    return [_contiguous(dgate)] if up is None else [_contiguous(dgate), _contiguous(dup)]


def _glu_backward_packed_fake(dout, packed, act):
    return packed.new_empty(packed.shape)


@custom_op("glu_backward_packed", _glu_backward_packed_fake)
def _glu_backward_packed(dout: torch.Tensor, packed: torch.Tensor, act: int) -> torch.Tensor:
    """The gradient of ``act(packed[:, :L]) * packed[:, L:]`` as one ``[R, 2L]`` buffer."""
    half = packed.shape[1] // 2
    grad = torch.empty(packed.shape, dtype=packed.dtype, device=packed.device)
    backend.impl(packed).glu_backward(dout, packed[:, :half], packed[:, half:], act,
                                          dgate=grad[:, :half], dup=grad[:, half:])
    return grad


class _GLUFn(torch.autograd.Function):
    """``act(gate) * up`` (``up`` None: ``act(gate)``); 2-D ``[R, L]`` operands, any row stride."""

    @staticmethod
    def forward(ctx, gate, up, act: int):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return _glu_forward(gate, up, act)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        grads = _glu_backward(_unit_cols(dout), gate, up, ctx.act)
        return grads[0], (grads[1] if up is not None else None), None


class _PackedGLUFn(torch.autograd.Function):
    """``act(h[:, :L]) * h[:, L:]`` for ``h [R, 2L]``; the gradient is one ``[R, 2L]`` buffer."""

    @staticmethod
    def forward(ctx, packed, act: int):
        ctx.act = act
        ctx.save_for_backward(packed)
        half = packed.shape[1] // 2
        return _glu_forward(packed[:, :half], packed[:, half:], act)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        (packed,) = ctx.saved_tensors
        return _glu_backward_packed(_unit_cols(dout), packed, ctx.act), None


def _check_activation_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a SparseMatrix or a tensor, got {type(t).__name__}")
    checks.float_tensor(op, name, t)


def sparse_activation(s, activation: str):
    """``act(s)`` elementwise on the stored blocks of ``s`` (a SparseMatrix or a tensor).

    Returns the same kind as ``s`` (same topology and transpose flag for a SparseMatrix).
    Differentiable in ``s.data``. Non-contiguous data is copied once.
    """
    op = "sparse_activation"
    act = ACTIVATIONS.index(canonical_activation(activation, op))
    data = s.data if isinstance(s, SparseMatrix) else s
    _check_activation_tensor(op, "s", data)
    out = _GLUFn.apply(_as_rows(data), None, act).view(data.shape)
    return s.with_data(out) if isinstance(s, SparseMatrix) else out


def sparse_glu(gate, up, activation: str):
    """``act(gate) * up`` elementwise (SwiGLU for ``"silu"``, GeGLU for ``"gelu"``).

    ``gate`` and ``up`` are both SparseMatrix on one topology (two SDDs of one routing) or
    both tensors of one shape. Differentiable in both; non-contiguous data is copied once
    (2-D tensors with unit column stride, e.g. column slices, are read in place).
    """
    op = "sparse_glu"
    act = ACTIVATIONS.index(canonical_activation(activation, op))
    if isinstance(gate, SparseMatrix) != isinstance(up, SparseMatrix):
        raise TypeError(f"{op}: gate and up must both be SparseMatrix or both tensors, got "
                        f"{type(gate).__name__} and {type(up).__name__}")
    sparse = isinstance(gate, SparseMatrix)
    if sparse:
        tg, tu = gate.topology, up.topology
        if tg is not tu and (tg.shape != tu.shape or tg.block_size != tu.block_size or tg.nnz != tu.nnz):
            raise ValueError(f"{op}: gate and up have different topologies: shape {tg.shape} vs {tu.shape}, "
                             f"block_size {tg.block_size} vs {tu.block_size}, nnz {tg.nnz} vs {tu.nnz}")
        if gate.transposed != up.transposed:
            raise ValueError(f"{op}: gate.transposed={gate.transposed} but up.transposed={up.transposed}")
    g = gate.data if sparse else gate
    u = up.data if sparse else up
    _check_activation_tensor(op, "gate", g)
    _check_activation_tensor(op, "up", u)
    if g.shape != u.shape:
        raise ValueError(f"{op}: gate has shape {tuple(g.shape)} but up has shape {tuple(u.shape)}")
    checks.same_dtype(op, (("gate", g), ("up", u)))
    checks.same_device(op, (("gate", g), ("up", u)))
    g2, u2 = _as_rows(g), _as_rows(u)
    if g2.shape != u2.shape:  # one was 2-D in place, the other flattened
        g2, u2 = g.contiguous().view(1, -1), u.contiguous().view(1, -1)
    out = _GLUFn.apply(g2, u2, act).view(g.shape)
    return gate.with_data(out) if sparse else out


def sparse_glu_packed(h, activation: str, topology: "Topology | None" = None):
    """GLU of a packed ``[gate | up]`` product: one SDD over transformers' ``gate_up_proj``.

    * ``h`` a SparseMatrix ``P x E*2F`` (block row ``r`` of expert ``e`` holds that expert's
      ``2F/b`` blocks: gate then up) and ``topology`` the ``P x E*F`` topology of the result;
      both made by ``make_topology`` from one ``padded_bins`` (e.g. ``route(...,
      ffn_hidden_size=F).topology`` and ``make_topology(padded_bins, E, 2F, b)``).
      Returns the SparseMatrix ``act(gate) * up`` on ``topology``.
    * ``h`` a tensor ``[..., 2F]`` (dense rows ``[gate | up]``, a shared expert's
      ``x @ w1^T``): returns ``[..., F]``; ``topology`` must be None.

    No data moves: the halves are read through strides. Differentiable in ``h``.
    """
    op = "sparse_glu_packed"
    act = ACTIVATIONS.index(canonical_activation(activation, op))
    if isinstance(h, SparseMatrix):
        if not isinstance(topology, Topology):
            raise TypeError(f"{op}: topology (the P x E*F result topology) must be a Topology for a "
                            f"SparseMatrix h, got {type(topology).__name__}")
        if h.transposed:
            raise ValueError(f"{op}: h must not be transposed")
        ti, to = h.topology, topology
        b = ti.block_size
        if (to.block_size != b or to.shape[0] != ti.shape[0] or ti.shape[1] != 2 * to.shape[1]
                or ti.nnz != 2 * to.nnz or to.device != ti.device):
            raise ValueError(f"{op}: h is {ti.shape} with {ti.nnz} blocks of {b}; topology must be "
                             f"({ti.shape[0]}, {ti.shape[1] // 2}) with {ti.nnz // 2} blocks of {b} on {ti.device}, "
                             f"got {to.shape} with {to.nnz} blocks of {to.block_size} on {to.device}")
        _check_activation_tensor(op, "h.data", h.data)
        rows = ti.shape[0] // b
        # No tokens: nothing to compute, keep the graph. Under torch.compile ``rows`` is an
        # unbacked size and the general path below (which handles 0 rows) is traced instead.
        if guard_or_false(rows == 0):
            return SparseMatrix(to, h.data[:0] * 0)
        # Row width without a -1 (compiled code must not infer it from 0 elements); under
        # compile nnz is rows * blocks-per-row symbolically and the quotient is exact.
        width = ti.nnz // rows * b * b
        out = _PackedGLUFn.apply(h.data.contiguous().view(rows, width), act)
        return SparseMatrix(to, out.view(to.nnz, b, b))
    if topology is not None:
        raise ValueError(f"{op}: topology is only for a SparseMatrix h")
    _check_activation_tensor(op, "h", h)
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"{op}: h must be [..., 2F] with an even last dimension, got {tuple(h.shape)}")
    rows2 = h.reshape(-1, h.shape[-1]) if h.shape[-1] else h.reshape(-1, 0)
    if rows2.shape[1] > 1 and rows2.stride(1) != 1:
        rows2 = rows2.contiguous()
    out = _PackedGLUFn.apply(rows2, act)
    return out.view(*h.shape[:-1], h.shape[-1] // 2)

