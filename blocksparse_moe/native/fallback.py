"""Torch builds of the native routing and topology ops: what runs when ``_C`` cannot.

Same arguments and results as the native ops (int32 tensors on the input's device), written
with torch ops. They read sizes on the host (``P``), like the native topology op does.
Tests compare both against ``blocksparse_moe/reference.py``, never against each other.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

ROUTE_FIELDS = ("indices", "bin_ids", "tokens_per_expert", "bins", "padded_bins", "rows", "padded_rows")
TOPOLOGY_FIELDS = ("row_indices", "column_indices", "offsets", "column_indices_t", "offsets_t", "block_offsets_t")


def route_torch(expert_indices: torch.Tensor, num_experts: int, block_size: int) -> Dict[str, torch.Tensor]:
    """The routing fields (``ROUTE_FIELDS``) of flat expert ids, in torch."""
    flat = expert_indices.reshape(-1).to(torch.int64)
    n = flat.numel()
    device = flat.device
    i32 = torch.int32
    tpe = torch.bincount(flat, minlength=num_experts)
    bins = torch.cumsum(tpe, 0)
    padded = (tpe + block_size - 1) // block_size * block_size
    padded_bins = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    bin_ids = flat[order]
    rows = torch.empty(n, dtype=torch.int64, device=device)
    rows[order] = torch.arange(n, device=device)
    group_start = bins - tpe
    padded_start = padded_bins - padded
    padded_rows = torch.empty_like(rows)
    padded_rows[order] = torch.arange(n, device=device) - group_start[bin_ids] + padded_start[bin_ids]
    return dict(indices=order.to(i32), bin_ids=bin_ids.to(i32), tokens_per_expert=tpe.to(i32), bins=bins.to(i32),
                padded_bins=padded_bins.to(i32), rows=rows.to(i32), padded_rows=padded_rows.to(i32))


def coo_fields(rows: torch.Tensor, cols: torch.Tensor, shape: Tuple[int, int],
               block_size: int) -> Dict[str, torch.Tensor]:
    """The six topology fields of row-major sorted block coordinates (int64), with the transpose."""
    m, n = shape
    device = rows.device
    nbr, nbc = m // block_size, n // block_size
    offsets = torch.zeros(nbr + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=nbr), 0)
    # A stable sort by column keeps blocks of one column in row order.
    block_offsets_t = torch.argsort(cols, stable=True)
    offsets_t = torch.zeros(nbc + 1, dtype=torch.int64, device=device)
    offsets_t[1:] = torch.cumsum(torch.bincount(cols, minlength=nbc), 0)
    i32 = torch.int32
    return dict(row_indices=rows.to(i32).contiguous(), column_indices=cols.to(i32).contiguous(),
                offsets=offsets.to(i32), column_indices_t=rows[block_offsets_t].to(i32).contiguous(),
                offsets_t=offsets_t.to(i32), block_offsets_t=block_offsets_t.to(i32).contiguous())


def topology_torch(padded_bins: torch.Tensor, num_experts: int, ffn_hidden_size: int,
                   block_size: int) -> Tuple[Dict[str, torch.Tensor], int]:
    """``(fields, P)`` of the MoE topology ``P x (E*F)`` for ``padded_bins``, in torch."""
    b = block_size
    fb = ffn_hidden_size // b
    pb = padded_bins.to(torch.int64)
    device = pb.device
    p = int(pb[-1]) if pb.numel() else 0
    starts = torch.cat([pb.new_zeros(1), pb[:-1]])
    lengths = pb - starts
    if bool((lengths < 0).any()) or bool((pb % b != 0).any()):
        raise ValueError(f"make_topology: padded_bins must be non-decreasing multiples of block_size ({b}), "
                         f"got P = padded_bins[-1] = {p}")
    rows_per_expert = lengths // b
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=device), rows_per_expert)
    rows = torch.arange(p // b, device=device).repeat_interleave(fb)
    cols = (expert_of_row[:, None] * fb + torch.arange(fb, device=device)[None, :]).reshape(-1)
    return coo_fields(rows, cols, (p, num_experts * ffn_hidden_size), b), p
