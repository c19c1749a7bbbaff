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

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from ._library import custom_op
from .topology import Topology, check_block_size

_INT32_MAX = 2**31 - 1
ROUTE_FIELDS = ("indices", "bin_ids", "tokens_per_expert", "bins", "padded_bins", "rows", "padded_rows")


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
    # P when it is known without reading padded_bins: the topology's row count, or under
    # torch.compile the symbolic size route() made (one size that every op of this routing
    # shares). None: padded_tokens reads padded_bins[-1].
    known_padded_tokens: Optional[int] = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.indices.numel() // self.top_k if self.top_k else 0

    @property
    def padded_tokens(self) -> int:
        """``P``: rows after padding (one host read on a GPU unless ``known_padded_tokens``)."""
        if self.known_padded_tokens is not None:
            return self.known_padded_tokens
        return int(self.padded_bins[-1]) if self.padded_bins.numel() else 0


def check_route_args(expert_indices: torch.Tensor, num_experts: int, block_size: int) -> None:
    """Checks of :func:`route` that read no data (the expert-id range is checked by the op)."""
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


def _route_fake(expert_indices, num_experts, block_size):
    n = expert_indices.numel()
    sizes = (n, n, num_experts, num_experts, num_experts, n, n)  # ROUTE_FIELDS order
    return tuple(expert_indices.new_empty(size, dtype=torch.int32) for size in sizes)


@custom_op("route", _route_fake)
def _route(expert_indices: torch.Tensor, num_experts: int, block_size: int
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routing fields in ``ROUTE_FIELDS`` order; checks the expert-id range first.

    The range check reads the data (one host read, a synchronization on CUDA), so it lives
    here, inside the op, where torch.compile does not trace it.
    """
    if expert_indices.numel():
        lo, hi = torch.aminmax(expert_indices)
        lo, hi = torch.stack([lo, hi]).tolist()
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"route: expert_indices must lie in [0, {num_experts}), got values in [{lo}, {hi}]")
    from . import _native

    r = _native.route(expert_indices, num_experts, block_size)
    return tuple(r[name] for name in ROUTE_FIELDS)


def _padded_block_rows_fake(padded_bins, block_size):
    return torch.library.get_ctx().new_dynamic_size()


@custom_op("padded_block_rows", _padded_block_rows_fake)
def padded_block_rows(padded_bins: torch.Tensor, block_size: int) -> int:
    """``P / block_size`` for ``P = padded_bins[-1]`` (one host read on a GPU).

    Under torch.compile this is an unbacked size; it counts block rows rather than rows so
    that the compiler knows ``P`` is a multiple of the block size.
    """
    p = int(padded_bins[-1]) if padded_bins.numel() else 0
    if p < 0 or p % block_size:
        raise ValueError(f"padded_block_rows: padded_bins[-1] = {p} is not a non-negative multiple of "
                         f"block_size {block_size}")
    return p // block_size


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
    top_k = expert_indices.shape[1]
    r = dict(zip(ROUTE_FIELDS, _route(expert_indices, num_experts, block_size)))
    topo = padded = None
    if ffn_hidden_size is not None:
        from .topology import make_topology

        topo = make_topology(r["padded_bins"], num_experts, ffn_hidden_size, block_size)
        padded = topo.shape[0]
    elif torch.compiler.is_compiling():
        # Reading P would break the graph: make it once, as an unbacked size, here.
        padded = padded_block_rows(r["padded_bins"], block_size) * block_size
    return Routing(num_experts=num_experts, top_k=top_k, block_size=block_size, topology=topo,
                   known_padded_tokens=padded, **r)


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
