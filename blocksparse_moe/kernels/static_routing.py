"""Sync-free routing for the fused expert path: every shape static, every value on the device.

The routing of :mod:`blocksparse_moe.routing` sizes its outputs by the real number of padded
rows ``P``, which the host has to read (a synchronisation on a GPU, an unbacked size under
torch.compile). The fused path (``kernels/experts.py``) instead sizes everything by the
static bound

    P_max = b * floor((T*k + m*(b-1)) / b),   m = min(E, T*k)      (0 when T*k == 0)

(at most ``m`` experts hold a slot and each pads fewer than ``b`` rows, so ``P <= T*k +
m*(b-1)``; ``P`` is a multiple of ``b``, hence at most that rounded down to ``b``. Reached when
each of ``m`` experts holds 1 mod b slots) and lets its kernels read the real layout on the
device and skip the rest. At decode (``T*k <= E``) that is ``T*k*b`` rows. The bound is a
function of the shapes only; under torch.compile ``T`` may be a SymInt (``torch.sym_min``:
no branch on a symbolic value).

Layout (slot ``s = t*k + j`` is token ``t``'s ``j``-th choice; experts in id order, each
group of slots in slot order, padded to a multiple of ``b``):

    row_slots        [P_max]       int32  slot held by each padded row, -1 on padding rows
                                          and on the rows past the real ``P``
    block_expert     [P_max / b]   int32  expert owning each block row; ``E`` past the real
                                          ``P`` (the kernels' early-exit test)
    expert_offsets   [E + 1]       int32  first padded row of each expert (exclusive cumsum
                                          of the padded counts); expert ``e`` owns rows
                                          ``[expert_offsets[e], expert_offsets[e+1])``
    tokens_per_expert [E]          int32  slots routed to each expert (for logging / aux losses)

Two Triton launches and four ``torch.empty``, nothing else, so a decode step pays two kernel
launches for its routing (CUDA tensors, and CPU tensors under the interpreter; the CPU back
end sorts its own slots in ``cpu/experts.py``):
    ``_count_kernel``  grid (E,). Program ``e`` scans the ``T*k`` ids in ``CHUNK`` steps and
                       writes ``tokens_per_expert[e]``.
    ``_place_kernel``  grid (E,). Program ``e`` reads all ``E`` counts, sums the padded
                       counts before it (its first row) and in all (``P``), rescans the ids
                       and stores each of its slots at first row + rank (rank: running count
                       plus an in-chunk cumsum of the matches, so slot order is kept), -1 on
                       its padding rows, ``e`` on its block rows, ``expert_offsets[e]`` (the
                       last program also ``[E]``); every program fills a share of the rows
                       past ``P`` with -1 / ``E``. Every output element is stored by exactly
                       one program, no atomics: deterministic.
  Cost (estimated, not timed on a GPU yet): every program reads all ``T*k`` ids, once per
  launch, so O(E * T*k) loads and compares in all (L2 hits after the first), while the
  latency is one program's ``T*k / CHUNK`` chunk steps per launch (the E programs run at
  once): one step at decode (T*k up to 1024), 64 at a prefill of T*k = 64K. With T*k in the
  millions and E in the hundreds the loads reach gigabytes of L2 traffic (~0.5 ms on an
  H100), where a sort-based routing would be cheaper; the expert products still dwarf it.
Nothing reads device data on the host (no ``.item()``, ``nonzero``, boolean masking), so
CUDA graphs can capture it. Under ``torch.compile`` :func:`static_route` is the custom op
``blocksparse_moe::static_route`` (its fake gives the shapes).

Expert ids must lie in ``[0, E)``: the router's top-k is in range by construction and the
ops layer range-checks ids a caller passes in (that check reads data, so it is not here).
An id outside ``[0, E)`` belongs to no expert (its slot is dropped), never an out-of-bounds access in the kernels: they
take experts only from ``block_expert`` (values in ``[0, E]``, ``E`` means "skip") and slots
only from ``row_slots`` (values in ``[-1, T*k)``).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..library import custom_op
from . import _common

_INT32_MAX = 2**31 - 1
BLOCK_SIZES = (16, 32, 64, 128)

# Ids per scan step. 1024 int64 ids are 8 per thread of 4 warps: one step covers a decode
# step's T*k, and a prefill's T*k takes T*k/1024 steps per program.
_CHUNK = 1024
# Experts whose counts one step of _place_kernel's prefix sum reads (E <= 1024 in one step).
_EXPERT_CHUNK = 1024
# Covers a padding run (< b <= 128 rows).
_PAD = 128
_NUM_WARPS = 4

# A debugging switch for tests: fill the outputs with POISON before the kernels run, so an
# element no program stores shows up (no valid output value is negative below -1).
POISON_OUTPUTS = False
POISON = -7


def padded_rows_bound(num_tokens: int, top_k: int, num_experts: int, block_size: int) -> int:
    """``P_max = round_down(T*k + min(E, T*k)*(b-1), b)``: the static bound on padded rows, 0
    without slots (then ``min(E, T*k) = 0``). Shapes only; ``num_tokens`` may be a SymInt."""
    slots = num_tokens * top_k
    bound = slots + torch.sym_min(num_experts, slots) * (block_size - 1)
    # P is a multiple of b and at most `bound`, so it is at most bound rounded DOWN to b.
    return bound // block_size * block_size


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
        raise ValueError(f"static_route: T*k + min(E, T*k)*(block_size-1) = {t * k} + "
                         f"min({num_experts}, {t * k})*{block_size - 1} padded rows (expert_indices "
                         f"{tuple(expert_indices.shape)}) exceed the int32 range of the row indices")


# -- Triton ---------------------------------------------------------------------------------
# ids_ptr: expert_indices [T, k] (int32 or int64) read through its strides; slot s lives at
# (s // top_k) * stride_t + (s % top_k) * stride_k. The launcher passes a contiguous tensor as
# top_k = stride_t = stride_k = 1 (offset s): Triton specializes the 1s, so the common case
# has no division. The scans count chunks and make slots in int64: T*k <= 2^31 - 1, but the
# last chunk's lanes may pass 2^31.

@triton.jit
def _slot_ids(ids_ptr, s, valid, top_k, stride_t, stride_k):
    """The expert ids of slots ``s`` (-1 where not ``valid``)."""
    t = s // top_k
    offset = t * stride_t + (s - t * top_k) * stride_k
    return tl.load(ids_ptr + offset, mask=valid, other=-1)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_slots, top_k, stride_t, stride_k, CHUNK: tl.constexpr):
    """``counts[e] = #{s : ids[s] == e}`` for ``e = program_id``."""
    e = tl.program_id(0)
    lanes = tl.arange(0, CHUNK)
    hits = tl.zeros((CHUNK,), tl.int32)  # per lane, reduced once after the scan
    for i in range(0, (num_slots - 1) // CHUNK + 1):  # num_slots >= 1; no num_slots + CHUNK overflow
        start = tl.cast(i, tl.int64) * CHUNK
        valid = lanes < num_slots - start
        ids = _slot_ids(ids_ptr, start + lanes, valid, top_k, stride_t, stride_k)
        hits += (ids == e).to(tl.int32)
    tl.store(counts_ptr + e, tl.sum(hits, axis=0))


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, row_slots_ptr, block_expert_ptr, offsets_ptr,
                  num_slots, num_experts, block_size, p_max, top_k, stride_t, stride_k,
                  CHUNK: tl.constexpr, EXPERT_CHUNK: tl.constexpr, PAD: tl.constexpr):
    """Expert ``e = program_id``'s rows, block rows and offset, and a share of the tail."""
    e = tl.program_id(0)
    # First row of e (padded counts before e) and P (all padded counts): the exclusive
    # cumsum of the padded counts at e, without a cumsum (one masked sum per chunk).
    lanes_e = tl.arange(0, EXPERT_CHUNK)
    before = tl.zeros((EXPERT_CHUNK,), tl.int32)
    every = tl.zeros((EXPERT_CHUNK,), tl.int32)
    for e0 in range(0, num_experts, EXPERT_CHUNK):
        experts = e0 + lanes_e
        c = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
        padded = (c + block_size - 1) // block_size * block_size
        every += padded
        before += tl.where(experts < e, padded, 0)
    first_row = tl.sum(before, axis=0)
    total = tl.sum(every, axis=0)
    count = tl.load(counts_ptr + e)
    padded_count = (count + block_size - 1) // block_size * block_size

    # Slots, in slot order: a match's rank is the matches before its chunk plus its
    # inclusive in-chunk cumsum, minus one.
    lanes = tl.arange(0, CHUNK)
    if count > 0:
        seen = 0
        for i in range(0, (num_slots - 1) // CHUNK + 1):
            start = tl.cast(i, tl.int64) * CHUNK
            valid = lanes < num_slots - start
            s = start + lanes
            hit = (_slot_ids(ids_ptr, s, valid, top_k, stride_t, stride_k) == e).to(tl.int32)
            rank = seen + tl.cumsum(hit, axis=0) - 1
            tl.store(row_slots_ptr + first_row + rank, s.to(tl.int32), mask=hit != 0)
            seen += tl.sum(hit, axis=0)
    pad = tl.arange(0, PAD)
    tl.store(row_slots_ptr + first_row + count + pad, tl.full((PAD,), -1, tl.int32), mask=pad < padded_count - count)

    # e's block rows: [first_row / b, (first_row + padded_count) / b).
    first_block = first_row // block_size
    num_blocks = padded_count // block_size
    for b0 in range(0, num_blocks, CHUNK):
        blocks = b0 + lanes
        tl.store(block_expert_ptr + first_block + blocks, tl.full((CHUNK,), 0, tl.int32) + e,
                 mask=blocks < num_blocks)
    tl.store(offsets_ptr + e, first_row)
    if e == num_experts - 1:
        tl.store(offsets_ptr + num_experts, total)

    # Rows [P, P_max) and block rows [P/b, P_max/b), CHUNK-wide pieces dealt round-robin to
    # the programs. The tail is under min(E, T*k)*(b-1) + b rows, far from the int32 limit.
    step = tl.num_programs(0) * CHUNK
    for r0 in range(e * CHUNK, p_max - total, step):
        tl.store(row_slots_ptr + total + r0 + lanes, tl.full((CHUNK,), -1, tl.int32),
                 mask=lanes < p_max - total - r0)
    tail_blocks = (p_max - total) // block_size
    for b0 in range(e * CHUNK, tail_blocks, step):
        tl.store(block_expert_ptr + total // block_size + b0 + lanes, tl.full((CHUNK,), 0, tl.int32) + num_experts,
                 mask=lanes < tail_blocks - b0)


def _static_route_triton(expert_indices: torch.Tensor, num_experts: int, block_size: int
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`static_route` in two Triton launches (see the module docstring)."""
    t, k = expert_indices.shape
    n = t * k
    p_max = padded_rows_bound(t, k, num_experts, block_size)
    device = expert_indices.device
    new = ((lambda size: torch.full((size,), POISON, dtype=torch.int32, device=device)) if POISON_OUTPUTS else
           (lambda size: torch.empty((size,), dtype=torch.int32, device=device)))
    row_slots, block_expert = new(p_max), new(p_max // block_size)
    offsets, counts = new(num_experts + 1), new(num_experts)
    if n == 0:  # nothing to scan; the two small vectors are zeros (no empty buffer reaches a kernel)
        return row_slots, block_expert, offsets.zero_(), counts.zero_()
    if expert_indices.is_contiguous():
        geometry = (1, 1, 1)  # slot s at offset s
    else:
        geometry = (k, expert_indices.stride(0), expert_indices.stride(1))
    _common.launch(_count_kernel, (num_experts,), expert_indices, counts, n, *geometry,
                   device=device, CHUNK=_CHUNK, num_warps=_NUM_WARPS)
    _common.launch(_place_kernel, (num_experts,), expert_indices, counts, row_slots, block_expert, offsets,
                   n, num_experts, block_size, p_max, *geometry,
                   device=device, CHUNK=_CHUNK, EXPERT_CHUNK=_EXPERT_CHUNK, PAD=_PAD, num_warps=_NUM_WARPS)
    return row_slots, block_expert, offsets, counts


# -- entry point ----------------------------------------------------------------------------

def _static_route_fake(expert_indices, num_experts, block_size):
    t, k = expert_indices.shape
    p_max = padded_rows_bound(t, k, num_experts, block_size)
    new = lambda size: expert_indices.new_empty((size,), dtype=torch.int32)  # noqa: E731
    return new(p_max), new(p_max // block_size), new(num_experts + 1), new(num_experts)


@custom_op("static_route", _static_route_fake)
def _static_route(expert_indices: torch.Tensor, num_experts: int, block_size: int
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernels' layout (checked arguments): CUDA tensors, or CPU tensors under the
    interpreter. This module is part of the Triton back end; the CPU back end sorts its own
    slots (``cpu/experts.py``)."""
    return _static_route_triton(expert_indices, num_experts, block_size)


def static_route(expert_indices: torch.Tensor, num_experts: int, block_size: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_slots, block_expert, expert_offsets, tokens_per_expert)`` of ``expert_indices [T, k]``.

    See the module docstring for each output. Shapes depend only on ``T, k, E, b``; no host
    read of device data. Deterministic (integer counts, no atomics). Any strides.
    """
    check_static_route_args(expert_indices, num_experts, block_size)
    return _static_route(expert_indices, num_experts, block_size)
