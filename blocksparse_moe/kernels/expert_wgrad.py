"""The fused expert path's weight gradients (issue 18, item 5): per expert, over its rows,

    dW[e]   = sum_{r in rows(e)} L[slot(r)]^T R_r          [C, N]
    db_L[e] = sum_{r in rows(e)} L[slot(r)]                 [C]   (SUM_L: db1, row sums of dh)
    db_R[e] = sum_{r in rows(e)} R_r                        [N]   (SUM_R: db2, sums of w_s dout_t)
    R_r     = w_s * src[tok(r)]  (HAS_WEIGHTS)  or  src[tok(r)]

with ``rows(e) = [expert_offsets[e], expert_offsets[e+1])``, expert e's padded rows (a
multiple of the row padding ``b``), ``slot(r) = row_slots[r]`` (-1: a padding row, a zero row
of L and R), ``tok(r) = slot(r) // k``. ``experts.experts_backward`` runs it twice: dW2 and db2
(L = a ``[T*k, F]``, src = dout, weighted) and dW1 and db1 (L = dh ``[T*k, G*F]``, src = x).

Why a split. The grid has one program per (expert, tile of dW). Under skewed routing (every
token to one expert) only that expert's ``C/BLOCK_M x N/BLOCK_N`` programs work, and each walks
all ``T*k`` rows: for Qwen3-30B-A3B's dW2 (768 x 2048) 96 programs on a 132-SM H100. So a long
row range is cut into chunks of ``S`` rows, each chunk one program per tile, and a second
small pass sums each split expert's chunk partials.

Chunks, sync-free (no host read; every grid and buffer shape from static sizes only):
  * ``S = chunk_rows(P_max, C, N, b)``, a multiple of b, from static sizes only (never the
    routing, the device or the autotuned tile): ``splits = clamp(ceil(TARGET_CTAS /
    tiles_128), 1, P_max // MIN_CHUNK_ROWS)`` with ``tiles_128 = ceil(C/128) * ceil(N/128)``,
    ``S = round_up(ceil(P_max / splits), b)``. TARGET_CTAS is a constant, not the SM count of
    the GPU at hand, so the chunking, hence the fp32 summation order, hence the bits of dW,
    are the same on every GPU and in every process. ``SPLIT_ROWS`` overrides S (tests).
  * Expert e with ``R_e`` rows has ``n_e = ceil(R_e / S)`` chunks. R_e and S are multiples of
    b, so ``n_e - 1 = (R_e - b) // S`` for ``R_e > 0`` and the extra chunks sum to at most
    ``X = (P_max - b) // S`` (sum of floors <= floor of the sum, ``sum R_e <= P_max``).
  * Grid ``((E + X) * C/BLOCK_M, cdiv(N, BLOCK_N))``, chunk slot by chunk slot (each slot's
    tiles in GROUP bands, as before): slot ``s < E`` is chunk 0 of expert s, slot ``E + q``
    the q-th extra chunk in expert order, found from a vector load of expert_offsets and a
    cumsum (``_chunk_table``). Slots past the real extra chunks run no step and store nothing.
  * An expert with one chunk (or none: zeros) stores dW[e] and its bias sums directly, in
    the output dtype, exactly as without a split (bitwise the same). An expert with ``n_e >=
    2`` chunks stores each chunk's fp32 partial at workspace position ``first_part(e) + j``
    (``first_part``: an exclusive cumsum of n_e over the split experts; at most
    ``sum n_e <= 2 * sum (n_e - 1) <= 2X`` positions), and ``_wgrad_sum_kernel`` adds them
    in chunk order in fp32 and stores dW[e] (and the bias sums) once: deterministic, no
    atomics. ``X = 0`` (small problems, or enough tiles already): no workspace, no second
    launch, the kernel compiled without the split code (``SPLIT=False``).

Workspace bytes: ``2X * C * N * 4`` (+ ``2X * (C + N) * 4`` for bias sums). ``X < splits``
(S >= P_max / splits) and ``splits - 1 < TARGET_CTAS / tiles_128``, so ``2X * C * N <= 2 *
TARGET_CTAS * 128 * 128``: at most ~34.6 MB whatever the layer, e.g. 25 MB for each of
Qwen3-30B-A3B's dW1 and dW2 at T = 4096.

Arguments (through their strides unless said):
    l    [T*k, C]   left operand by slot;  src [T, N] gathered by token;  gw [T, k] top-k weights
    dw   [E, C, N]  output (the weights' strides), db_l [E, C], db_r [E, N]
    ws   [2X, C, N] fp32, wsl [2X, C], wsr [2X, N]: the partials of split experts
    row_slots [P_max] int32, expert_offsets [E+1] int32 (see static_routing.py)
Reads expert_offsets and row_slots; the weight-gradient kernel's row steps are BLOCK_K
(``BLOCK_K | b``), with the next step's slots loaded one step ahead.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._rowtile import GROUP, _grouped, _tokens

# The chunk length's inputs (see the module docstring). 2 x 132: two waves of programs on an
# H100, fixed for every GPU so results are bitwise equal across GPUs and processes.
TARGET_CTAS = 264
# The shortest chunk: a chunk's fp32 partial tile goes to the workspace and back (8 bytes per
# element: 128 KiB for 128 x 128) while the chunk reads 2 * (BLOCK_M + BLOCK_N) bf16 operand
# bytes per row (512 at 128 x 128); from 1024 rows the round trip is at most a quarter of
# that. Small problems (P_max < 2048) do not split, and allocate no workspace.
MIN_CHUNK_ROWS = 1024
# Tests: force the chunk length S (rows, a positive multiple of the row padding b), None: the
# rule of chunk_rows.
SPLIT_ROWS: Optional[int] = None
# The second pass's tile (fp32 partials, elementwise sums): 32 x 128 fp32 on 4 warps.
_SUM_TILE = (32, 128)


@triton.jit
def _chunk_table(expert_offsets_ptr, NUM_EXPERTS, CHUNK, EXPERTS_P2: tl.constexpr):
    """Per expert (one lane each; lanes past E are empty experts): ``(lane, n_e, extra_end,
    first_part)``, n_e = ceil(R_e / CHUNK) chunks, extra_end the running count of extra
    chunks ``(n_e - 1)+`` up to and including e, first_part the workspace position of e's
    first partial (an exclusive cumsum of n_e over the experts with n_e >= 2)."""
    lane = tl.arange(0, EXPERTS_P2)
    real = lane < NUM_EXPERTS
    lo = tl.load(expert_offsets_ptr + lane, mask=real, other=0)
    hi = tl.load(expert_offsets_ptr + lane + 1, mask=real, other=0)
    chunks = (hi - lo + CHUNK - 1) // CHUNK
    parts = tl.where(chunks > 1, chunks, 0)
    return lane, chunks, tl.cumsum(tl.maximum(chunks - 1, 0), 0), tl.cumsum(parts, 0) - parts


@triton.jit
def _pick(v, lane, i):
    """``v[i]`` of a per-expert vector (0 when i is past its lanes)."""
    return tl.sum(tl.where(lane == i, v, 0), axis=0)


@triton.jit
def _chunk_of(chunk_slot, expert_offsets_ptr, NUM_EXPERTS, CHUNK, EXPERTS_P2: tl.constexpr):
    """``(e, j, n_e, part)`` of a chunk slot: its expert (E or more: an unused slot), which of
    the expert's n_e chunks it is, and the workspace position of its partial when n_e >= 2.
    Slot ``s < E`` is chunk 0 of expert s; slot ``E + q`` the q-th extra chunk, which belongs
    to the first expert whose running count of extra chunks passes q."""
    lane, chunks, extra_end, first_part = _chunk_table(expert_offsets_ptr, NUM_EXPERTS, CHUNK, EXPERTS_P2)
    q = chunk_slot - NUM_EXPERTS
    e = tl.where(q < 0, chunk_slot, tl.sum((extra_end <= q).to(tl.int32), axis=0))
    n_e = _pick(chunks, lane, e)
    j = tl.where(q < 0, 0, q - _pick(extra_end, lane, e) + n_e)
    return e, j, n_e, (_pick(first_part, lane, e) + j).to(tl.int64)


@triton.jit
def _wgrad_kernel(l_ptr, src_ptr, gw_ptr, dw_ptr, dbl_ptr, dbr_ptr, ws_ptr, wsl_ptr, wsr_ptr,
                  row_slots_ptr, expert_offsets_ptr,
                  C, N, TOP_K, NUM_EXPERTS, CHUNK,
                  stride_lr, stride_lc, stride_st, stride_sn, stride_gt, stride_gj,
                  stride_de, stride_dc, stride_dn, stride_ble, stride_blc, stride_bre, stride_brn,
                  stride_pp, stride_pc, stride_pn, stride_plp, stride_plc, stride_prp, stride_prn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  HAS_WEIGHTS: tl.constexpr, STORE_DW: tl.constexpr, SUM_L: tl.constexpr, SUM_R: tl.constexpr,
                  SPLIT: tl.constexpr, EXPERTS_P2: tl.constexpr,
                  INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    tiles_c = C // BLOCK_M
    tiles_n = tl.num_programs(1)
    # Chunk slot by chunk slot in launch order (one chunk's rows of L and R, then the next's),
    # and inside a slot in bands of GROUP column tiles of dW, so a chunk's operands are read
    # from HBM about once instead of once per tile of the other dimension.
    lin = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    chunk_slot = lin // (tiles_c * tiles_n)
    tc, pid_n = _grouped(lin % (tiles_c * tiles_n), tiles_c, tiles_n, GROUP)
    # int64: times the strides of x and dW, which strided views can make large.
    cc = (tc * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    nn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = nn < N
    offs_r = tl.arange(0, BLOCK_K)
    if SPLIT:
        e, j, _, _ = _chunk_of(chunk_slot, expert_offsets_ptr, NUM_EXPERTS, CHUNK, EXPERTS_P2)
        valid = e < NUM_EXPERTS
        start = tl.load(expert_offsets_ptr + e, mask=valid, other=0) + j * CHUNK
        end = tl.minimum(tl.load(expert_offsets_ptr + e + 1, mask=valid, other=0), start + CHUNK)
    else:
        e = chunk_slot
        start = tl.load(expert_offsets_ptr + e)
        end = tl.load(expert_offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sum_l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # The rows [start, end) are a multiple of b long (BLOCK_K | b). An empty range runs no
    # step. The slots of the next BLOCK_K rows are loaded one step ahead, so that the operand
    # loads of a step depend on no load of the same step and the pipeliner can keep
    # num_stages of them in flight.
    nxt = start + offs_r
    slots_next = tl.load(row_slots_ptr + nxt, mask=nxt < end, other=-1)
    for r0 in range(start, end, BLOCK_K):
        slots = slots_next
        nxt = r0 + BLOCK_K + offs_r
        slots_next = tl.load(row_slots_ptr + nxt, mask=nxt < end, other=-1)
        ok = slots >= 0
        slot, tok = _tokens(slots, ok, TOP_K)
        # L is [T*k, C] by slot (h's gradient, or a): a padding row is a zero column of L^T.
        l = tl.load(l_ptr + slot[None, :] * stride_lr + cc[:, None] * stride_lc, mask=ok[None, :], other=0.0)
        r = tl.load(src_ptr + tok[:, None] * stride_st + nn[None, :] * stride_sn,
                    mask=ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_WEIGHTS:
            wv = tl.load(gw_ptr + tok * stride_gt + (slot - tok * TOP_K) * stride_gj, mask=ok, other=0.0)
            r = (r.to(tl.float32) * wv.to(tl.float32)[:, None]).to(src_ptr.dtype.element_ty)
        acc = _common.dot(l, r, acc, INTERPRET, INPUT_PRECISION)
        if SUM_L:
            sum_l += tl.sum(l.to(tl.float32), axis=1)
        if SUM_R:
            sum_r += tl.sum(r.to(tl.float32), axis=0)
    if SPLIT:
        # Found again rather than carried across the loop: fewer registers live through it.
        e, j, n_e, part = _chunk_of(chunk_slot, expert_offsets_ptr, NUM_EXPERTS, CHUNK, EXPERTS_P2)
        to_ws = (e < NUM_EXPERTS) & (n_e > 1)
        direct = (e < NUM_EXPERTS) & (n_e <= 1)  # one chunk, or none (an empty expert stores zeros)
        if STORE_DW:
            if to_ws:  # a chunk of a split expert: its fp32 partial, summed by _wgrad_sum_kernel
                tl.store(ws_ptr + part * stride_pp + cc[:, None] * stride_pc + nn[None, :] * stride_pn, acc,
                         mask=n_ok[None, :])
            elif direct:
                tl.store(dw_ptr + e.to(tl.int64) * stride_de + cc[:, None] * stride_dc + nn[None, :] * stride_dn,
                         acc.to(dw_ptr.dtype.element_ty), mask=n_ok[None, :])
        # The bias sums: one masked store to each destination, not a store in each branch of
        # an if: with the loop's row sum used in two branches, Triton 3.6's
        # OptimizeThreadLocality pass aborted (sm_90, TF32, 4 warps, 4 stages). The masks are
        # tl.where, not `tensor & scalar`: the interpreter rejects that mask's dtype.
        e_db = tl.where(direct, e, 0).to(tl.int64)
        if SUM_L:
            if pid_n == 0:
                tl.store(wsl_ptr + part * stride_plp + cc * stride_plc, sum_l, mask=tl.where(to_ws, cc >= 0, False))
                tl.store(dbl_ptr + e_db * stride_ble + cc * stride_blc, sum_l.to(dbl_ptr.dtype.element_ty),
                         mask=tl.where(direct, cc >= 0, False))
        if SUM_R:
            if tc == 0:
                tl.store(wsr_ptr + part * stride_prp + nn * stride_prn, sum_r, mask=tl.where(to_ws, n_ok, False))
                tl.store(dbr_ptr + e_db * stride_bre + nn * stride_brn, sum_r.to(dbr_ptr.dtype.element_ty),
                         mask=tl.where(direct, n_ok, False))
    else:
        e64 = e.to(tl.int64)
        if STORE_DW:
            tl.store(dw_ptr + e64 * stride_de + cc[:, None] * stride_dc + nn[None, :] * stride_dn,
                     acc.to(dw_ptr.dtype.element_ty), mask=n_ok[None, :])
        if SUM_L:
            if pid_n == 0:
                tl.store(dbl_ptr + e64 * stride_ble + cc * stride_blc, sum_l.to(dbl_ptr.dtype.element_ty))
        if SUM_R:
            if tc == 0:
                tl.store(dbr_ptr + e64 * stride_bre + nn * stride_brn, sum_r.to(dbr_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _sum_parts(ptrs, stride_part, n_parts, mask):
    """The fp32 sum of ``n_parts`` consecutive workspace partials at ``ptrs``, in order."""
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for _j in range(1, n_parts):
        ptrs += stride_part
        acc += tl.load(ptrs, mask=mask, other=0.0)
    return acc


@triton.jit
def _wgrad_sum_kernel(dw_ptr, dbl_ptr, dbr_ptr, ws_ptr, wsl_ptr, wsr_ptr, expert_offsets_ptr,
                      C, N, NUM_EXPERTS, CHUNK,
                      stride_de, stride_dc, stride_dn, stride_ble, stride_blc, stride_bre, stride_brn,
                      stride_pp, stride_pc, stride_pn, stride_plp, stride_plc, stride_prp, stride_prn,
                      BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, EXPERTS_P2: tl.constexpr,
                      STORE_DW: tl.constexpr, SUM_L: tl.constexpr, SUM_R: tl.constexpr):
    """Program (i, c, n): the i-th split expert in expert order (none: nothing to do), tile
    (c, n) of its dW and bias sums = its n_e fp32 partials added in chunk order, stored once."""
    i = tl.program_id(0)
    tc = tl.program_id(1)
    tn = tl.program_id(2)
    lane, chunks, _, first_part = _chunk_table(expert_offsets_ptr, NUM_EXPERTS, CHUNK, EXPERTS_P2)
    e = tl.sum((tl.cumsum((chunks > 1).to(tl.int32), 0) <= i).to(tl.int32), axis=0)
    if e < NUM_EXPERTS:
        n_e = _pick(chunks, lane, e)
        base = _pick(first_part, lane, e).to(tl.int64)
        e64 = e.to(tl.int64)
        cc = (tc * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        nn = (tn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        c_ok = cc < C
        n_ok = nn < N
        if STORE_DW:
            mask = c_ok[:, None] & n_ok[None, :]
            acc = _sum_parts(ws_ptr + base * stride_pp + cc[:, None] * stride_pc + nn[None, :] * stride_pn,
                             stride_pp, n_e, mask)
            tl.store(dw_ptr + e64 * stride_de + cc[:, None] * stride_dc + nn[None, :] * stride_dn,
                     acc.to(dw_ptr.dtype.element_ty), mask=mask)
        if SUM_L:
            if tn == 0:
                acc_l = _sum_parts(wsl_ptr + base * stride_plp + cc * stride_plc, stride_plp, n_e, c_ok)
                tl.store(dbl_ptr + e64 * stride_ble + cc * stride_blc, acc_l.to(dbl_ptr.dtype.element_ty), mask=c_ok)
        if SUM_R:
            if tc == 0:
                acc_r = _sum_parts(wsr_ptr + base * stride_prp + nn * stride_prn, stride_prp, n_e, n_ok)
                tl.store(dbr_ptr + e64 * stride_bre + nn * stride_brn, acc_r.to(dbr_ptr.dtype.element_ty), mask=n_ok)


# -- launcher -------------------------------------------------------------------------------

def chunk_rows(p_max: int, cols: int, n: int, block_size: int) -> int:
    """The chunk length S (rows, a multiple of ``block_size``) of a weight gradient of ``[cols,
    n]`` per expert over at most ``p_max`` padded rows: static sizes only (see the module
    docstring); ``SPLIT_ROWS`` when set."""
    if SPLIT_ROWS is not None:
        if SPLIT_ROWS <= 0 or SPLIT_ROWS % block_size:
            raise ValueError(f"expert_wgrad: SPLIT_ROWS must be a positive multiple of the row padding "
                             f"{block_size}, got {SPLIT_ROWS}")
        return SPLIT_ROWS
    tiles = triton.cdiv(cols, 128) * triton.cdiv(n, 128)
    splits = max(1, min(triton.cdiv(TARGET_CTAS, tiles), p_max // MIN_CHUNK_ROWS))
    return max(block_size, triton.cdiv(triton.cdiv(p_max, splits), block_size) * block_size)


def extra_chunks(p_max: int, chunk: int, block_size: int) -> int:
    """X: the most extra chunks (beyond one per expert) any routing can make, the chunk slots
    the grid holds past E. Every expert's rows are a multiple of ``block_size`` and sum to
    at most ``p_max``."""
    return max(p_max - block_size, 0) // chunk


def _strides(t: Optional[torch.Tensor], dims: int):
    return tuple(t.stride()) if t is not None else (0,) * dims


def weight_grad(left: torch.Tensor, src: torch.Tensor, weights: Optional[torch.Tensor], dw: Optional[torch.Tensor],
                db_left: Optional[torch.Tensor], db_src: Optional[torch.Tensor], row_slots: torch.Tensor,
                expert_offsets: torch.Tensor, *, top_k: int, p_max: int, block_size: int, tiles: _common.Tiles,
                poison: bool = False) -> None:
    """Write ``dw[e] = L_e^T R_e``, ``db_left[e]`` (row sums of L_e^T) and ``db_src[e]`` (sums
    of R_e's rows) for every expert e; each output optional (None: not computed).

    ``left [T*k, C]`` by slot, ``src [T, N]`` by token, ``weights [T, k]`` or None (R = w_s *
    src rows), ``dw [E, C, N]``, ``db_left [E, C]``, ``db_src [E, N]``: any strides.
    ``row_slots [P_max]`` and ``expert_offsets [E+1]`` from ``static_route``; ``tiles``: the
    caller's launch plan (BLOCK_M | C, BLOCK_K | block_size). ``poison`` fills the
    workspace with NaN (``experts.POISON_BUFFERS``). No host read of device data: the chunk
    length, the grid and the workspace follow from the shapes.
    """
    num_experts = expert_offsets.numel() - 1
    cols, n = left.shape[1], src.shape[1]
    if tuple(row_slots.shape) != (p_max,) or p_max % block_size:
        raise ValueError(f"expert_wgrad: row_slots must have P_max = {p_max} rows (a multiple of {block_size}), "
                         f"got {tuple(row_slots.shape)}")
    if dw is None and db_left is None and db_src is None:
        return
    chunk = chunk_rows(p_max, cols, n, block_size)
    extra = extra_chunks(p_max, chunk, block_size)
    device = left.device

    def new(shape):
        if poison:
            return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
        return torch.empty(shape, dtype=torch.float32, device=device)

    parts = 2 * extra  # sum over split experts of n_e <= 2 * (their extra chunks) <= 2X
    # [2X, C, N] stored C-fastest (a transposed view): on sm_100 each thread of the 4-warp
    # accumulator holds one c of the tile, so a warp's partial stores coalesce along C; stored
    # N-fastest, the fp32 tile went through a layout conversion first and the 128 x 128 tile
    # spilled 216 bytes.
    ws = new((parts, n, cols)).transpose(1, 2) if extra and dw is not None else None
    wsl = new((parts, cols)) if extra and db_left is not None else None
    wsr = new((parts, n)) if extra and db_src is not None else None
    experts_p2 = triton.next_power_of_2(max(num_experts, 1))
    gw = weights if weights is not None else src  # a valid pointer, never read without HAS_WEIGHTS
    dummy = dw if dw is not None else left  # pointers of outputs not asked for: never written
    outs = (dw, db_left, db_src)
    out_strides = (*_strides(dw, 3), *_strides(db_left, 2), *_strides(db_src, 2))
    ws_strides = (*_strides(ws, 3), *_strides(wsl, 2), *_strides(wsr, 2))
    ptrs = [t if t is not None else dummy for t in outs]
    ws_ptrs = [t if t is not None else dummy for t in (ws, wsl, wsr)]
    flags = dict(STORE_DW=dw is not None, SUM_L=db_left is not None, SUM_R=db_src is not None)
    if extra:
        # The split variant steps 32 rows at a time: its chunk lookup before the loop and its
        # second epilogue (the fp32 partial) leave fewer registers to the pipeline's tiles in
        # flight, and at BLOCK_K = 64 ptxas spilled 16 bytes (sm_100, 128x64x64 on 4 warps,
        # Triton 3.6); at 32 every config compiles without (tests/test_compile_targets.py).
        # Its true-fp32 (CUDA-core) configs take 8 warps: on 4, the sm_90 64x64x16 tile spilled
        # 8 bytes under Triton 3.6 (255 registers with router weights).
        tiles = dataclasses.replace(tiles, caps=(tiles.caps[0], tiles.caps[1], min(tiles.caps[2] or 32, 32)),
                                    fma=(tiles.fma[0], max(tiles.fma[1], 8)))
    _common.launch(
        _wgrad_kernel,
        lambda p: ((num_experts + extra) * (cols // p["BLOCK_M"]), triton.cdiv(n, p["BLOCK_N"])),
        left, src, gw, *ptrs, *ws_ptrs, row_slots, expert_offsets,
        cols, n, top_k, num_experts, chunk,
        left.stride(0), left.stride(1), src.stride(0), src.stride(1), *_strides(weights, 2),
        *out_strides, *ws_strides,
        HAS_WEIGHTS=weights is not None, SPLIT=extra > 0, EXPERTS_P2=experts_p2, **flags,
        device=device, tiles=tiles)
    if extra:  # the split experts' partials, summed in chunk order
        bc, bn = _SUM_TILE
        grid = (extra,  # at most X experts split: each has an extra chunk
                triton.cdiv(cols, bc) if (dw is not None or db_left is not None) else 1,
                triton.cdiv(n, bn) if (dw is not None or db_src is not None) else 1)
        _common.launch(
            _wgrad_sum_kernel, grid,
            *ptrs, *ws_ptrs, expert_offsets,
            cols, n, num_experts, chunk,
            *out_strides, *ws_strides,
            BLOCK_C=bc, BLOCK_N=bn, EXPERTS_P2=experts_p2, **flags,
            device=device, num_warps=4)
