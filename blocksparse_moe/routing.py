"""Expert assignment -> sorted slots, bins, padded bins and the topology.

A *slot* is one (token, choice) pair: slot ``s = t * top_k + j`` is token ``t``'s ``j``-th
expert. Routing sorts the ``T * k`` slots by expert (stably, so slots of one expert keep
token order) and lays the experts' groups out one after another, each group padded to a
multiple of the block size. Everything is int32.

    tokens_per_expert[E]  histogram of expert ids
    bins[E]               inclusive cumsum of tokens_per_expert
    padded_bins[E]        inclusive cumsum of tokens_per_expert rounded up to block_size
    indices[T*k]          slot stored at each sorted position
    bin_ids[T*k]          expert of each sorted position
    rows[T*k]             sorted (unpadded) row of each slot: the inverse of ``indices``
    padded_rows[T*k]      row of each slot in the padded ``[P, H]`` layout

The native ops of ``blocksparse_moe._C`` compute all of these (CPU and CUDA); without the
extension a torch implementation gives the same results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .topology import Topology, check_block_size

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Routing:
    """The result of :func:`route` (see module docstring for each field)."""

    indices: torch.Tensor
    bin_ids: torch.Tensor
    tokens_per_expert: torch.Tensor
    bins: torch.Tensor
    padded_bins: torch.Tensor
    rows: torch.Tensor
    padded_rows: torch.Tensor
    num_experts: int
    top_k: int
    block_size: int
    topology: Optional[Topology] = None

    @property
    def num_tokens(self) -> int:
        return self.indices.numel() // self.top_k if self.top_k else 0

    @property
    def padded_tokens(self) -> int:
        """``P``: rows after padding (one host read on a GPU)."""
        return int(self.padded_bins[-1]) if self.padded_bins.numel() else 0


def check_route_args(expert_indices: torch.Tensor, num_experts: int, block_size: int) -> None:
    if not isinstance(expert_indices, torch.Tensor):
        raise TypeError(f"route: expert_indices must be a tensor, got {type(expert_indices).__name__}")
    if expert_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"route: expert_indices must be int32 or int64, got {expert_indices.dtype}")
    if expert_indices.dim() != 2:
        raise ValueError(f"route: expert_indices must be [T, k], got shape {tuple(expert_indices.shape)}")
    if expert_indices.shape[1] < 1:
        raise ValueError("route: expert_indices must have k >= 1 columns")
    if not expert_indices.is_contiguous():
        raise ValueError("route: expert_indices must be contiguous")
    if expert_indices.device.type not in ("cpu", "cuda"):
        raise ValueError(f"route: expert_indices is on unsupported device {expert_indices.device}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"route: num_experts must be an int, got {type(num_experts).__name__}")
    if num_experts < 1:
        raise ValueError(f"route: num_experts must be >= 1, got {num_experts}")
    check_block_size(block_size)
    n = expert_indices.numel()
    # P <= T*k + E*(b-1) must fit the int32 outputs.
    if n + num_experts * (block_size - 1) > _INT32_MAX:
        raise ValueError(f"route: T*k + E*(block_size-1) = {n} + {num_experts}*{block_size - 1} exceeds the int32 "
                         "range of the routing indices")
    if n:
        lo, hi = torch.aminmax(expert_indices)
        lo, hi = torch.stack([lo, hi]).tolist()  # one host read (a synchronization on CUDA)
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"route: expert_indices must lie in [0, {num_experts}), got values in [{lo}, {hi}]")


def route(expert_indices: torch.Tensor, num_experts: int, block_size: int, *,
          ffn_hidden_size: Optional[int] = None) -> Routing:
    """Group the slots of ``expert_indices [T, k]`` by expert and pad each group to a block.

    Args:
        expert_indices: ``[T, k]`` int32/int64 expert id of each token's choices.
        num_experts: ``E``; every id must lie in ``[0, E)`` (checked, one host read on GPU).
        block_size: ``b``, one of 16, 32, 64, 128.
        ffn_hidden_size: when given, also builds ``routing.topology``, the ``P x (E*F)``
            topology of the hidden activation.
    """
    check_route_args(expert_indices, num_experts, block_size)
    from . import _native

    top_k = expert_indices.shape[1]
    r = _native.route(expert_indices, num_experts, block_size)
    topo = None
    if ffn_hidden_size is not None:
        from .topology import make_topology

        topo = make_topology(r["padded_bins"], num_experts, ffn_hidden_size, block_size)
    return Routing(num_experts=num_experts, top_k=top_k, block_size=block_size, topology=topo, **r)


def route_torch(expert_indices: torch.Tensor, num_experts: int, block_size: int) -> dict:
    """Pure-torch routing (fallback when ``_C`` is missing); returns the int32 fields."""
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
