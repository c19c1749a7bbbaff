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

from . import backend, checks, native
from .library import custom_op
from .native.fallback import ROUTE_FIELDS
from .topology import Topology, check_block_size, make_topology, padded_block_rows

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


def _checked_expert_ids_fake(expert_indices, num_experts, op):
    return expert_indices.new_empty(expert_indices.shape, dtype=torch.int64)


@custom_op("checked_expert_ids", _checked_expert_ids_fake)
def _checked_expert_ids(expert_indices: torch.Tensor, num_experts: int, op: str) -> torch.Tensor:
    if expert_indices.numel() and backend.checks_on_device(expert_indices):
        # On a GPU the check runs on the device: no synchronisation, capturable in a CUDA
        # graph. An id out of range raises a device-side assert with this message at the
        # next synchronisation, and the kernels queued after it never run.
        ok = ((expert_indices >= 0) & (expert_indices < num_experts)).all()
        torch._assert_async(ok, f"{op}: expert_indices must lie in [0, {num_experts})")
    else:
        checks.ids_in_range(op, "expert_indices", expert_indices, num_experts)  # the one host read
    return expert_indices.to(torch.int64, memory_format=torch.contiguous_format, copy=True)


def checked_expert_ids(op: str, expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """A contiguous int64 copy of caller-given expert ids, once each lies in ``[0, E)``.

    THE range check of expert ids: ids from a caller must not send a kernel out of bounds.
    On CPU tensors an id out of range is a ``ValueError`` naming the range (one read of host
    memory); on a GPU the check is a device-side assert (``torch._assert_async``), so it
    reads nothing back and a CUDA graph can capture it. Ids that are in range by
    construction (a router's top-k) skip it. It is an op, so torch.compile does not trace
    into the read.
    """
    return _checked_expert_ids(expert_indices, num_experts, op)


def _route_fake(expert_indices, num_experts, block_size):
    n = expert_indices.numel()
    sizes = (n, n, num_experts, num_experts, num_experts, n, n)  # ROUTE_FIELDS order
    return tuple(expert_indices.new_empty(size, dtype=torch.int32) for size in sizes)


@custom_op("route", _route_fake)
def _route(expert_indices: torch.Tensor, num_experts: int, block_size: int
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routing fields in ``ROUTE_FIELDS`` order (ids already range-checked)."""
    r = native.route(expert_indices, num_experts, block_size)
    return tuple(r[name] for name in ROUTE_FIELDS)


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
    ids = checked_expert_ids("route", expert_indices, num_experts)
    r = dict(zip(ROUTE_FIELDS, _route(ids, num_experts, block_size)))
    topo = padded = None
    if ffn_hidden_size is not None:
        topo = make_topology(r["padded_bins"], num_experts, ffn_hidden_size, block_size)
        padded = topo.shape[0]
    elif torch.compiler.is_compiling():
        # Reading P would break the graph: make it once, as an unbacked size, here.
        padded = padded_block_rows(r["padded_bins"], block_size) * block_size
    return Routing(num_experts=num_experts, top_k=top_k, block_size=block_size, topology=topo,
                   known_padded_tokens=padded, **r)
