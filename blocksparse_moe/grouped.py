"""Grouped dense operands: a stack of weights read in place as one 2-D product operand.

An MoE's expert weights are a stack ``w [G, R, C]`` (one ``[R, C]`` matrix per expert), and
a product wants them as one 2-D operand whose grouped dimension is the concatenation over
the experts. When the stack's layout makes that concatenation a strided 2-D view, a view
is enough; when it does not (transformers' ``down_proj [E, H, F]`` seen as ``[E*F, H]``,
GPT-OSS's ``gate_up_proj [E, H, 2F]`` seen as ``[H, E*2F]``), ``reshape`` would copy the
whole weight on every call. The products therefore take the 3-D tensor itself.

The one convention: ``w[g]`` is the ``g``-th piece of the 2-D operand ``B``, pieces
concatenated along the product's grouped dimension, i.e. ``B = torch.cat(list(w), dim)``:

* SDD's ``b``, grouped along N (its columns): ``w [G, K, C]``, ``B [K, G*C]``,
  ``B[k, g*C + c] = w[g, k, c]``.
* DSD's ``b``, grouped along K (its rows): ``w [G, R, N]``, ``B [G*R, N]``,
  ``B[g*R + r, n] = w[g, r, n]``.

``B.t()`` of one kind is the other kind with ``w.transpose(1, 2)``, so the backward passes
(which use transposed operands) stay grouped: ``w.transpose(-2, -1)`` is the transpose for
both the 2-D and the grouped form. The grouped size (``C``, resp. ``R``) must be a multiple
of the block size, so a block row/column of ``B`` lies inside one group: the kernels find
the group with one integer division per block and read ``w`` through its three strides.
"""

from __future__ import annotations

from typing import Tuple

import torch


def grouped_cols(op: str, b: torch.Tensor, n: int, block_size: int) -> Tuple[int, int]:
    """``(stride_g, C)`` of SDD's ``b`` (``[K, n]``, or grouped ``[G, K, C]`` with ``G*C = n``).

    A 2-D ``b`` is one group (``C = n``, ``stride_g`` 0). Raises ``ValueError`` for a shape
    that does not give ``n`` columns or a ``C`` that is not a multiple of ``block_size``.
    """
    if b.dim() == 2:
        if b.shape[1] != n:
            raise ValueError(f"{op}: b has {b.shape[1]} columns but the topology has {n}")
        return 0, max(n, 1)
    if b.dim() != 3:
        raise ValueError(f"{op}: b must be 2-D [K, N] or grouped 3-D [G, K, C], got shape {tuple(b.shape)}")
    g, _, c = b.shape
    if c % block_size:
        raise ValueError(f"{op}: grouped b has shape {tuple(b.shape)}; its C = {c} must be a multiple of the "
                         f"block size {block_size}")
    if g * c != n:
        raise ValueError(f"{op}: grouped b {tuple(b.shape)} gives G*C = {g * c} columns but the topology has {n}")
    return b.stride(0), max(c, 1)


def grouped_rows(op: str, b: torch.Tensor, k: int, block_size: int) -> Tuple[int, int]:
    """``(stride_g, R)`` of DSD's ``b`` (``[k, N]``, or grouped ``[G, R, N]`` with ``G*R = k``)."""
    if b.dim() == 2:
        if b.shape[0] != k:
            raise ValueError(f"{op}: b has {b.shape[0]} rows but the sparse operand has {k} columns")
        return 0, max(k, 1)
    if b.dim() != 3:
        raise ValueError(f"{op}: b must be 2-D [K, N] or grouped 3-D [G, R, N], got shape {tuple(b.shape)}")
    g, r, _ = b.shape
    if r % block_size:
        raise ValueError(f"{op}: grouped b has shape {tuple(b.shape)}; its R = {r} must be a multiple of the "
                         f"block size {block_size}")
    if g * r != k:
        raise ValueError(f"{op}: grouped b {tuple(b.shape)} gives G*R = {g * r} rows but the sparse operand has "
                         f"{k} columns")
    return b.stride(0), max(r, 1)


def flat_shape(b: torch.Tensor, along: str) -> Tuple[int, int]:
    """The ``(rows, cols)`` of the 2-D operand ``b`` stands for (``along`` "cols" or "rows")."""
    if b.dim() == 2:
        return b.shape[0], b.shape[1]
    g, r, c = b.shape
    return (r, g * c) if along == "cols" else (g * r, c)


def flat_grad(grad: torch.Tensor, b: torch.Tensor, along: str) -> torch.Tensor:
    """A gradient of the 2-D operand (``[K, N]``) in ``b``'s grouped shape (a view of the
    products' contiguous results; autograd copies it into ``b``'s layout if it must)."""
    if b.dim() == 2:
        return grad
    g, r, c = b.shape
    if along == "cols":  # [K, G*C] -> [G, K, C]
        return grad.reshape(r, g, c).transpose(0, 1)
    return grad.reshape(g, r, c)  # [G*R, N] -> [G, R, N]
