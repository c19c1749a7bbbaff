"""Sync-free routing for the fused expert path: every shape static, every value on the device.

The routing of :mod:`blocksparse_moe.routing` sizes its outputs by the real number of padded
rows ``P``, which the host has to read (a synchronisation on a GPU, an unbacked size under
torch.compile). The fused path (``kernels/experts.py``) instead sizes everything by the
static bound

    P_max = round_up(T*k + E*(b-1), b)      (0 when T*k == 0)

and lets its kernels read the real layout on the device and skip the rest. This module
builds that layout from ``expert_indices [T, k]`` with device-side torch ops of static shape
(a stable sort, ``searchsorted`` for the experts' group bounds, cumsums): no
``.item()``, ``nonzero``, ``bincount`` or boolean masking, so nothing reads the GPU from
the host and CUDA graphs can capture it.

Layout (slot ``s = t*k + j`` is token ``t``'s ``j``-th choice; experts in id order, each
group of slots in token order, padded to a multiple of ``b``):

    row_slots        [P_max]       int32  slot held by each padded row, -1 on padding rows
                                          and on the rows past the real ``P``
    block_expert     [P_max / b]   int32  expert owning each block row; ``E`` past the real
                                          ``P`` (the kernels' early-exit test)
    expert_offsets   [E + 1]       int32  first padded row of each expert (exclusive cumsum
                                          of the padded counts); expert ``e`` owns rows
                                          ``[expert_offsets[e], expert_offsets[e+1])``
    tokens_per_expert [E]          int32  slots routed to each expert (for logging / aux losses)

Expert ids must lie in ``[0, E)``: the router's top-k is in range by construction and the
ops layer range-checks ids a caller passes in (that check reads data, so it is not here).
An id outside ``[0, E)`` gives a wrong layout or an index error, never an out-of-bounds
access in the kernels: they take experts only from ``block_expert`` (``searchsorted`` keeps
it in ``[0, E]``, and ``E`` means "skip") and slots only from ``row_slots`` (values in
``[-1, T*k)``).
"""

from __future__ import annotations

from typing import Tuple

import torch

_INT32_MAX = 2**31 - 1
BLOCK_SIZES = (16, 32, 64, 128)


def padded_rows_bound(num_tokens: int, top_k: int, num_experts: int, block_size: int) -> int:
    """``P_max = round_up(T*k + E*(b-1), b)``, 0 without slots: the static bound on padded rows."""
    slots = num_tokens * top_k
    if slots == 0:
        return 0
    bound = slots + num_experts * (block_size - 1)
    return (bound + block_size - 1) // block_size * block_size


def check_static_route_args(expert_indices: torch.Tensor, num_experts: int, block_size: int) -> None:
    """Checks that read no data: dtype, shape, sizes, block size, int32 range of the rows."""
    if not isinstance(expert_indices, torch.Tensor):
        raise TypeError(f"static_route: expert_indices must be a tensor, got {type(expert_indices).__name__}")
    if expert_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"static_route: expert_indices must be int32 or int64, got {expert_indices.dtype}")
    if expert_indices.dim() != 2 or expert_indices.shape[1] < 1:
        raise ValueError(f"static_route: expert_indices must be [T, k] with k >= 1, got {tuple(expert_indices.shape)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"static_route: num_experts must be an int >= 1, got {num_experts!r}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"static_route: block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    t, k = expert_indices.shape
    if padded_rows_bound(t, k, num_experts, block_size) > _INT32_MAX:
        raise ValueError(f"static_route: T*k + E*(block_size-1) = {t * k} + {num_experts}*{block_size - 1} "
                         "exceeds the int32 range of the row indices")


def static_route(expert_indices: torch.Tensor, num_experts: int, block_size: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_slots, block_expert, expert_offsets, tokens_per_expert)`` of ``expert_indices [T, k]``.

    See the module docstring for each output. Shapes depend only on ``T, k, E, b``; no host
    read of device data. Deterministic (a stable sort and integer sums).
    """
    check_static_route_args(expert_indices, num_experts, block_size)
    t, k = expert_indices.shape
    n = t * k
    p_max = padded_rows_bound(t, k, num_experts, block_size)
    device = expert_indices.device
    i64 = torch.int64
    flat = expert_indices.reshape(-1).to(i64)

    # Sorted position i holds slot order[i] of expert sorted_e[i]. Each expert's group
    # starts where searchsorted finds it: the histogram without atomics of any kind (so it
    # also runs under torch.use_deterministic_algorithms).
    sorted_e, order = torch.sort(flat, stable=True)
    bounds = torch.searchsorted(sorted_e, torch.arange(num_experts + 1, dtype=i64, device=device))
    group_start = bounds[:-1]
    counts = bounds[1:] - group_start
    padded = (counts + (block_size - 1)) // block_size * block_size
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded

    # A slot's padded row: its expert's first padded row plus its rank inside the group.
    rank = torch.arange(n, dtype=i64, device=device) - group_start[sorted_e]
    padded_row = padded_start[sorted_e] + rank
    row_slots = torch.full((p_max,), -1, dtype=torch.int32, device=device)
    row_slots.scatter_(0, padded_row, order.to(torch.int32))

    # Block row r belongs to the first expert whose padded range ends after row r*b;
    # empty experts (zero-width ranges) are skipped by right=True, rows past P get E.
    starts = torch.arange(0, p_max, block_size, dtype=i64, device=device)
    block_expert = torch.searchsorted(padded_end, starts, right=True).to(torch.int32)
    expert_offsets = torch.cat([padded_end.new_zeros(1), padded_end]).to(torch.int32)
    return row_slots, block_expert, expert_offsets, counts.to(torch.int32)
