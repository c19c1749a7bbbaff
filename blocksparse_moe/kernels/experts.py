"""The fused, sync-free dropless expert path (issue 11): gather, GLU and weighted scatter
inside the two products, no host read of device data.

    forward   h_r  = x[tok(r)] @ W1[e(r)]^T + b1[e(r)]           h = [g | u]  (pre-activation, kept)
              a_r  = act(g_r) * u_r            (GLU)   or  act(h_r)   (plain MLP; made once per
                                                 element by the up product's epilogue, not kept)
              y_s  = w_s * (a_r @ W2[e(r)] + b2[e(r)])           written by slot s = slot(r)
              out_t = sum_j y_{t*k+j}                            (fixed order, no atomics)
    backward  P_r  = dout[tok(r)] @ W2[e(r)]^T                   (unweighted)
              dw_s = a_r . P_r + dout_t . b2[e(r)]               (= dout_t . y_s / w_s: y not kept)
              da_r = w_s * P_r;  dg = da * u * act'(g),  du = da * act(g)   (or dh = da * act'(h))
              dW2[e] = sum_{r of e} a_r^T (w_s dout_t),   db2[e] = sum_{r of e} w_s dout_t
              dW1[e] = sum_{r of e} dh_r^T x[tok(r)],     db1[e] = sum_{r of e} dh_r
              dx_t = sum_j (dh_r @ W1[e(r)])_{r = row(t*k+j)}     (by slot, fixed-order sum)

with ``r`` a padded row, ``slot(r) = row_slots[r]`` (``-1``: padding, a zero row of x/dout),
``tok(r) = slot(r) // k``, ``e(r)`` the expert whose row range holds r and ``w_s`` the top-k weight (1
without weights). Nothing of shape ``[P, H]`` is made: x and dout rows are read from the
tokens through ``row_slots``.

Why no blocked CSR-COO topology: in the dropless MoE every block row of the hidden matrix
holds *all* ``F/b`` blocks of its one expert, and each expert owns one contiguous range of
block rows. So the SDD is a grouped GEMM over row tiles (each CTA finds its expert and row
tile from one vector load of ``expert_offsets``, ``_expert_tiles``), the DSD too, and the transposed products dW1/dW2 walk their expert's
contiguous row range ``[expert_offsets[e], expert_offsets[e+1])``. Two int32 vectors replace
the six topology tensors and their static nnz bound; ``kernels/static_routing.py`` builds
them with static shapes. Grids are sized by ``P_max = round_down(T*k + min(E, T*k)*(b-1), b)``: a
CTA whose row tile is past the real ``P`` finds no expert and exits at once.
The buffers of rows (h, dh, a, y) are indexed by slot, ``[T*k, *]``: a padding row of a tile
reads zeros and stores nothing, so no buffer carries padding.

Entry points (the expert-path protocol shared with ``cpu/experts.py``; the ops layer has
checked the arguments, the launchers guard only what would touch memory out of bounds):
    experts_forward(x, expert_indices, weights, w1, w2, b1, b2, *, num_experts, act, glu,
                    block_size, keep=True) -> (out [T, H], saved)
    experts_forward_fake(...)  the same shapes, empty (for torch.library fakes)
    experts_backward(dout, saved, x, expert_indices, weights, w1, w2, b1, b2, *, ...,
                     needs_input_grad) -> (dx, dweights, dw1, dw2, db1, db2), None where not asked
    saved = [hidden [T*k, G*F] ([0, G*F] with keep=False), row_slots [P_max], block_expert [P_max/b],
             expert_offsets [E+1]]
Every returned shape depends on the input shapes only (torch.compile needs no data-dependent
size), and neither pass reads device data on the host.

Arguments (every tensor read and written through its strides; ``G = 2`` for a GLU, 1 plain):
    x        [T, H]        fp32/fp16/bf16; dout [T, H] likewise (a zero-stride expand too)
    expert_indices [T, k]  int64, ids in [0, E); a token may name one expert twice
    weights  [T, k]        fp32 or x's dtype, or None (weights 1)
    w1       [E, G*F, H]   nn.Linear(H, G*F).weight per expert: rows [0, F) gate, [F, 2F) up
    w2       [E, F, H]     nn.Linear(F, H).weight.T per expert
    b1       [E, G*F], b2 [E, H]  or None
    row_slots [P_max] int32, block_expert [P_max/b] int32, expert_offsets [E+1] int32: see
             static_routing.py (built by experts_forward, saved for backward)
    hidden   [T*k, G*F]    the pre-activation ``[g | u]`` (x's dtype) of each slot, written by
             forward, read by backward

Row padding and tiles. The row padding ``b`` (16..128; a multiple of it divides F) is a
per-call choice (``topology.block_size_for_call``: 16 when experts get a few rows each, at
decode); the tile sizes are separate choices bounded by what they must divide: a row tile
never straddles two experts, so the size along rows divides ``b``; sizes along F divide
``col_tile(F)`` (the largest power of two <= 128 dividing F), whatever ``b`` is; sizes along H
are masked. Autotune keys carry the call's token-count class (``_common.token_class``).

Kernels (grids; BLOCK_M / BLOCK_N / BLOCK_K from ``_common``'s configs; C = col_tile(F)):
    _up_kernel        grid (P_max/BLOCK_M, F/BLOCK_N). Gather-GEMM of x's rows with the gate
                      AND the up tile of W1 (two accumulators, one pass over H); epilogue adds
                      b1, stores [g | u] (rounded) and, in forward, a = act(g) * u made from
                      the rounded values (the a backward recomputes, bitwise). Reads
                      row_slots, expert_offsets.
    _down_kernel      grid (P_max/BLOCK_M, cdiv(H, BLOCK_N)). GEMM of a row tile of a [T*k, K]
                      buffer (rows by slot) with W[e] [K, H]; epilogue adds the bias,
                      multiplies by w_s and stores each row at its slot (padding rows store
                      nothing): forward (a @ W2) and dx (dh @ W1). Reads row_slots,
                      expert_offsets.
    _act_bwd_kernel   grid (P_max/BLOCK_M, F/C). Gather-GEMM of dout's rows with W2[e]^T over
                      one chunk of C columns (BLOCK_N at a time); epilogue recomputes
                      act from the saved h, stores dh = [dg | du] and a (for dW2), and the
                      router-weight partial sum a . P (+ dout . b2 in chunk 0) per slot:
                      part [F/C, T*k] fp32, summed in fixed order after. Reads row_slots,
                      expert_offsets.
    The three row-tiled kernels launch expert by expert, in bands of BAND_BYTES of their
    row operand inside an expert, column tile by column tile (``_expert_tiles``).
    weight gradient   kernels/expert_wgrad.py (``weight_grad``): dW[e] = L^T R over expert
                      e's row range, L by slot (dh or a), R gathered from the tokens (x, or
                      w_s * dout), fused bias gradient (row sums of L: db1, or of R: db2);
                      long row ranges (skewed routing) split into chunks of a static length,
                      their fp32 partials summed by a second pass in a fixed order. Reads
                      expert_offsets, row_slots.
Every store is by exactly one program; sums run in a fixed order; no atomics anywhere, so
two runs are bitwise equal. The up and activation-backward tiles are capped at 64 (see
``_tiles``: their epilogues hold several fp32 tiles at once); the down kernel compiles without
spills at 128 (tests/test_experts_compile.py).

Why the activation is made once, by the up product: made as the down product loads h (as it
was), each element of a costs two MUFU ops (silu) per H tile of the down product, as many
cycles as that tile's MMAs on Hopper, and the load reads 2F columns of h instead of F. Stored
once, a is written once ([T*k, F], a forward temporary) and read F wide; backward still keeps
only h (the floor) and recomputes a from it.

What each pass allocates (in x's dtype unless said) and reads:
    forward   hidden [T*k, G*F] (kept for backward), a [T*k, F] (freed after forward), y
              [T*k, H] (none when k == 1: written straight into out), out [T, H]. Reads x's
              rows, W1, b1 (up), then a, W2, b2 and the weights (down), y (the sum).
    backward  dh [T*k, G*F]; one scratch of T*k*max(F, H) elements that holds a for
              dW2, then (a is dead) the per-slot dx rows; part [F/C, T*k] fp32; the
              gradients dx, dweights, dW1, dW2, db1, db2 (each only if needs_input_grad asks);
              where long row ranges may split, the weight gradient's fp32 workspace of
              chunk partials (expert_wgrad.py: bounded by the shapes, ~35 MB at most).
              Reads dout's rows, W2, b2, the weights and hidden (act_bwd), a and dout (dW2),
              dh and x (dW1), dh and W1 (dx).
Kept for backward (``saved``): hidden and the routing's int32 vectors, besides x, the
weights and the parameters: the floor of DESIGN.md, the pre-activation of each slot.
tests/test_experts_triton.py pins what one step keeps and allocates (unit T*k*H*2 bytes) and
that it reads nothing back.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import _common, expert_wgrad
from ._rowtile import _acc, _act_and_grad, _cols, _grid2, _grouped, _mma, _row_sum, _rows, _tokens
from .static_routing import padded_rows_bound, static_route

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# A debugging switch for tests: fill every buffer these launchers allocate with NaN, so a
# kernel that leaves an element unwritten, or reads one it should not, fails loudly.
POISON_BUFFERS = False


# The row-tiled kernels (up, down, act_bwd) launch expert by expert, in bands inside one
# expert's row range (see _expert_tiles): a band is BAND_BYTES of the row operand (x, dout: H
# wide; a, dh: F or 2F) of one expert, swept column tile by column tile, so the band's rows
# and the column tiles' weights stay in L2 while it is in flight instead of every row being
# re-read once per column tile (bench/results/traffic-before.md). Bands of _rowtile.GROUP
# tiles laid over the whole padded range split an expert at every few band edges, and a
# split expert's weight tiles were read once per band (w2 1.29-1.90x its bytes in the
# activation backward). 8 MiB: a sixth of an H100's 50 MB L2, the rest left to the band's
# weight tiles, the outputs and other lines; at the Mixtral shape one band is one expert's
# 1024 rows (x: 8 MiB), so W1[e] is read once. It orders the tiles, never changes a result.
BAND_BYTES = 8 << 20


def band_rows(row_bytes: int) -> int:
    """Rows of one band for a row operand of ``row_bytes`` per row (at least one)."""
    return max(BAND_BYTES // max(row_bytes, 1), 1)


@triton.jit
def _expert_tiles(expert_offsets_ptr, NUM_EXPERTS, BLOCK_M: tl.constexpr, BAND_ROWS, E_POW2: tl.constexpr):
    """``(expert, row tile, column tile)`` of this CTA in a 2-D (rows, columns) grid of
    BLOCK_M-row tiles over ``P_max`` rows. Launch order: expert by expert (expert e's tiles are
    the CTAs ``[start_e, end_e) * n_cols``, with ``[start_e, end_e)`` its row tiles), and
    inside an expert in bands of ``BAND_ROWS`` rows, column tile by column tile. A CTA past the
    real rows gets expert ``NUM_EXPERTS`` (exit). Needs ``BLOCK_M | b`` (the offsets are
    multiples of b) and ``E_POW2 >= NUM_EXPERTS``: one vector load of the offsets, no loop."""
    n_cols = tl.num_programs(1)
    lin = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    offs = tl.arange(0, E_POW2)
    ends = tl.load(expert_offsets_ptr + 1 + offs, mask=offs < NUM_EXPERTS, other=0)
    # CTAs up to the end of each expert (at most the grid's size: int32); lanes past E never count.
    cta_end = tl.where(offs < NUM_EXPERTS, (ends // BLOCK_M) * n_cols, lin + 1)
    e = tl.sum((cta_end <= lin).to(tl.int32), axis=0)
    ec = tl.minimum(e, NUM_EXPERTS - 1)  # a valid index for the exiting CTAs too
    first = tl.load(expert_offsets_ptr + ec) // BLOCK_M
    # An exiting CTA maps as tile 0 of a one-tile expert: no division by 0 or a negative size.
    n_rows = tl.maximum(tl.load(expert_offsets_ptr + ec + 1) // BLOCK_M - first, 1)
    band = tl.maximum(BAND_ROWS // BLOCK_M, 1)
    row, col = _grouped(tl.where(e < NUM_EXPERTS, lin - first * n_cols, 0), n_rows, n_cols, band)
    return e, first + row, col


@triton.jit
def _up_kernel(x_ptr, w1_ptr, b1_ptr, h_ptr, a_ptr, row_slots_ptr, expert_offsets_ptr,
               H, FFN, TOP_K, NUM_EXPERTS, BAND_ROWS,
               stride_xt, stride_xh, stride_we, stride_wc, stride_wh, stride_be, stride_bc,
               stride_hr, stride_hc, stride_ar, stride_ac,
               BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GLU: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_H: tl.constexpr,
               STORE_A: tl.constexpr, SWAP: tl.constexpr, E_POW2: tl.constexpr,
               INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK % BLOCK_M == 0)  # a row tile never straddles two experts
    e, pid_m, pid_n = _expert_tiles(expert_offsets_ptr, NUM_EXPERTS, BLOCK_M, BAND_ROWS, E_POW2)
    if e < NUM_EXPERTS:  # tiles past the real P: nothing to do
        ex = e.to(tl.int64)  # ex * stride_we exceeds int32 on big layers (a new name: e stays int32)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(row_slots_ptr + rows)
        ok = slots >= 0
        tok = tl.where(ok, slots // TOP_K, 0).to(tl.int64)
        # int64: a column times a weight's row stride passes 2^31 for legal strided views
        # (w1 seen through a [2F, E, H] buffer: stride E*H).
        cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # F is a multiple of BLOCK_N
        offs_k = tl.arange(0, BLOCK_K)
        # The gather: x's rows straight from the tokens, zero rows for padding.
        x_t, x_k = _grid2(tok, offs_k, SWAP)
        x_ptrs = x_ptr + x_t * stride_xt + x_k * stride_xh
        x_ok, _ = _grid2(ok, offs_k, SWAP)
        # W1[e]^T tiles [BLOCK_K, BLOCK_N] (transposed with SWAP): gate rows c, up rows F + c.
        w_k, w_c = _grid2(offs_k, cols, SWAP)
        wg_ptrs = w1_ptr + ex * stride_we + w_c * stride_wc + w_k * stride_wh
        acc_g = _acc(BLOCK_M, BLOCK_N, SWAP)
        acc_u = _acc(BLOCK_M, BLOCK_N, SWAP)
        for k0 in range(0, H, BLOCK_K):
            k_ok = (k0 + offs_k) < H
            xa = tl.load(x_ptrs, mask=x_ok & _cols(k_ok, SWAP), other=0.0)
            wg = tl.load(wg_ptrs, mask=_rows(k_ok, SWAP), other=0.0)
            acc_g = _mma(xa, wg, acc_g, SWAP, INTERPRET, INPUT_PRECISION)
            if GLU:
                wu = tl.load(wg_ptrs + FFN.to(tl.int64) * stride_wc, mask=_rows(k_ok, SWAP), other=0.0)
                acc_u = _mma(xa, wu, acc_u, SWAP, INTERPRET, INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xh
            wg_ptrs += BLOCK_K * stride_wh
        if HAS_BIAS:
            b_ptrs = b1_ptr + ex * stride_be + cols * stride_bc
            acc_g += _cols(tl.load(b_ptrs).to(tl.float32), SWAP)
            if GLU:
                acc_u += _cols(tl.load(b_ptrs + FFN * stride_bc).to(tl.float32), SWAP)
        # By slot, not by padded row: h is [T*k, G*F], what the tokens need, and a padding
        # row stores nothing.
        h_s, h_c = _grid2(tl.where(ok, slots, 0).to(tl.int64), cols, SWAP)
        g = acc_g.to(a_ptr.dtype.element_ty)
        if GLU:
            u = acc_u.to(a_ptr.dtype.element_ty)
        if STORE_H:  # not in inference: only backward reads h
            tl.store(h_ptr + h_s * stride_hr + h_c * stride_hc, g, mask=x_ok)
            if GLU:
                tl.store(h_ptr + h_s * stride_hr + (h_c + FFN) * stride_hc, u, mask=x_ok)
        if STORE_A:
            # The activation once per element, here, not once per H tile of the down product
            # (two MUFU ops per element per tile for silu: as many cycles as the tile's MMAs).
            # From the rounded h, so it is bitwise the a that backward recomputes from h.
            a, _ = _act_and_grad(g.to(tl.float32), ACT)
            if GLU:
                a = a * u.to(tl.float32)
            tl.store(a_ptr + h_s * stride_ar + h_c * stride_ac, a.to(a_ptr.dtype.element_ty), mask=x_ok)


@triton.jit
def _down_kernel(a_ptr, w_ptr, bias_ptr, gw_ptr, y_ptr, row_slots_ptr, expert_offsets_ptr,
                 N, KDIM, TOP_K, NUM_EXPERTS, BAND_ROWS,
                 stride_ar, stride_ac, stride_we, stride_wk, stride_wn, stride_be, stride_bn,
                 stride_gt, stride_gj, stride_ys, stride_yn,
                 BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, SWAP: tl.constexpr, E_POW2: tl.constexpr,
                 INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK % BLOCK_M == 0)  # a row tile never straddles two experts
    e, pid_m, pid_n = _expert_tiles(expert_offsets_ptr, NUM_EXPERTS, BLOCK_M, BAND_ROWS, E_POW2)
    if e < NUM_EXPERTS:
        ex = e.to(tl.int64)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(row_slots_ptr + rows)
        ok = slots >= 0
        slot = tl.where(ok, slots, 0).to(tl.int64)  # slot * stride exceeds int32 on big layers
        cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # times W's column stride: int64
        n_ok = cols < N
        offs_k = tl.arange(0, BLOCK_K)
        # The left operand ([T*k, K], by slot) of a padding row is a zero row.
        a_s, a_k = _grid2(slot, offs_k, SWAP)
        a_ok, _ = _grid2(ok, offs_k, SWAP)
        a_ptrs = a_ptr + a_s * stride_ar + a_k * stride_ac
        w_k, w_n = _grid2(offs_k, cols, SWAP)
        w_ptrs = w_ptr + ex * stride_we + w_k * stride_wk + w_n * stride_wn
        w_ok = _cols(n_ok, SWAP)
        acc = _acc(BLOCK_M, BLOCK_N, SWAP)
        for k0 in range(0, KDIM, BLOCK_K):  # KDIM (F or 2F) is a multiple of BLOCK_K
            a = tl.load(a_ptrs, mask=a_ok, other=0.0)
            w = tl.load(w_ptrs, mask=w_ok, other=0.0)
            acc = _mma(a, w, acc, SWAP, INTERPRET, INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ac
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            bias = tl.load(bias_ptr + ex * stride_be + cols * stride_bn, mask=n_ok, other=0.0).to(tl.float32)
            acc += _cols(bias, SWAP)
        if HAS_WEIGHTS:
            t = (tl.where(ok, slots, 0) // TOP_K).to(tl.int64)  # see _tokens: a 32-bit division
            wv = tl.load(gw_ptr + t * stride_gt + (slot - t * TOP_K) * stride_gj, mask=ok, other=0.0)
            acc = acc * _rows(wv.to(tl.float32), SWAP)
        # The scatter: each real row to its slot (each slot has exactly one row).
        y_s, y_n = _grid2(slot, cols, SWAP)
        ok_s, ok_n = _grid2(ok, n_ok, SWAP)
        tl.store(y_ptr + y_s * stride_ys + y_n * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=ok_s & ok_n)


@triton.jit
def _act_bwd_kernel(dout_ptr, w2_ptr, b2_ptr, gw_ptr, h_ptr, dh_ptr, a_ptr, part_ptr, row_slots_ptr,
                    expert_offsets_ptr,
                    H, FFN, TOP_K, NUM_EXPERTS, BAND_ROWS,
                    stride_dt, stride_dh, stride_we, stride_wf, stride_wh, stride_be, stride_bh,
                    stride_gt, stride_gj, stride_hr, stride_hc, stride_dhr, stride_dhc, stride_ar, stride_ac,
                    stride_pn, stride_ps,
                    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    ACT: tl.constexpr, GLU: tl.constexpr, HAS_B2: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                    DWEIGHTS: tl.constexpr, STORE_A: tl.constexpr, STORE_DH: tl.constexpr, PART: tl.constexpr,
                    SWAP: tl.constexpr, E_POW2: tl.constexpr, INTERPRET: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK % BLOCK_M == 0)  # a row tile never straddles two experts
    # pid_n: the column chunk [pid_n * PART, (pid_n + 1) * PART) of F
    e, pid_m, pid_n = _expert_tiles(expert_offsets_ptr, NUM_EXPERTS, BLOCK_M, BAND_ROWS, E_POW2)
    if e < NUM_EXPERTS:
        ex = e.to(tl.int64)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(row_slots_ptr + rows)
        ok = slots >= 0
        slot, tok = _tokens(slots, ok, TOP_K)
        if HAS_WEIGHTS:
            wv = tl.load(gw_ptr + tok * stride_gt + (slot - tok * TOP_K) * stride_gj, mask=ok, other=0.0)
            wv = _rows(wv.to(tl.float32), SWAP)
        offs_k = tl.arange(0, BLOCK_K)
        d_t, d_k = _grid2(tok, offs_k, SWAP)
        d_ok, _ = _grid2(ok, offs_k, SWAP)
        part = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # A whole PART-wide chunk per program (not one BLOCK_N tile) so that the router-weight
        # partial sums have a fixed count, F/PART, whatever tile size the autotuner picks.
        for n0 in range(0, PART, BLOCK_N):
            cols = (pid_n * PART + n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # times W2's F stride: int64
            d_ptrs = dout_ptr + d_t * stride_dt + d_k * stride_dh
            w_k, w_c = _grid2(offs_k, cols, SWAP)
            w_ptrs = w2_ptr + ex * stride_we + w_c * stride_wf + w_k * stride_wh
            acc = _acc(BLOCK_M, BLOCK_N, SWAP)
            for k0 in range(0, H, BLOCK_K):
                k_ok = (k0 + offs_k) < H
                d = tl.load(d_ptrs, mask=d_ok & _cols(k_ok, SWAP), other=0.0)
                w = tl.load(w_ptrs, mask=_rows(k_ok, SWAP), other=0.0)
                acc = _mma(d, w, acc, SWAP, INTERPRET, INPUT_PRECISION)
                d_ptrs += BLOCK_K * stride_dh
                w_ptrs += BLOCK_K * stride_wh
            # acc = dout_t W2_e^T (unweighted). Epilogue: the activation's backward, reading
            # h and writing a and dh by slot ([T*k, *]); padding rows read and store nothing.
            t_s, t_c = _grid2(slot, cols, SWAP)
            h_ptrs = h_ptr + t_s * stride_hr + t_c * stride_hc
            g = tl.load(h_ptrs, mask=d_ok, other=0.0).to(tl.float32)
            act, dact = _act_and_grad(g, ACT)
            if GLU:
                u = tl.load(h_ptrs + FFN * stride_hc, mask=d_ok, other=0.0).to(tl.float32)
                a = act * u
            else:
                a = act
            a = a.to(dh_ptr.dtype.element_ty)  # exactly forward's a (same rounded inputs, same ops)
            if STORE_A:
                tl.store(a_ptr + t_s * stride_ar + t_c * stride_ac, a, mask=d_ok)
            if DWEIGHTS:
                part += _row_sum(a.to(tl.float32) * acc, SWAP)
            if HAS_WEIGHTS:
                da = acc * wv
            else:
                da = acc
            if STORE_DH:
                dh_ptrs = dh_ptr + t_s * stride_dhr + t_c * stride_dhc
                if GLU:
                    tl.store(dh_ptrs, (da * u * dact).to(dh_ptr.dtype.element_ty), mask=d_ok)
                    tl.store(dh_ptrs + FFN * stride_dhc, (da * act).to(dh_ptr.dtype.element_ty), mask=d_ok)
                else:
                    tl.store(dh_ptrs, (da * dact).to(dh_ptr.dtype.element_ty), mask=d_ok)
        if DWEIGHTS:
            if HAS_B2:
                if pid_n == 0:  # b2's share of y_s . dout_t, added once per slot
                    d_ptrs = dout_ptr + tok[:, None] * stride_dt + offs_k[None, :] * stride_dh
                    b_ptrs = b2_ptr + ex * stride_be + offs_k * stride_bh
                    for k0 in range(0, H, BLOCK_K):
                        k_ok = (k0 + offs_k) < H
                        d = tl.load(d_ptrs, mask=ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                        bb = tl.load(b_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                        part += tl.sum(d * bb[None, :], axis=1)
                        d_ptrs += BLOCK_K * stride_dh
                        b_ptrs += BLOCK_K * stride_bh
            tl.store(part_ptr + pid_n.to(tl.int64) * stride_pn + slot * stride_ps, part, mask=ok)


# -- launchers ------------------------------------------------------------------------------

# Column tiles of the up and activation-backward kernels, whose epilogues hold several fp32
# tiles at once (two accumulators and a; or acc, g, u, act and act'): in true fp32, where
# tl.dot runs on the CUDA cores with its operand tiles in registers too, a 64x64 tile spilled
# 8-16 bytes on sm_90 (8 warps) or reached 254 registers (4 warps), so fp32 takes 32 columns.
_EPILOGUE_COLS = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}


def swap_rows(block_size: int) -> bool:
    """Whether the row-tiled kernels compute their product transposed (tokens on the MMA's N
    side): below 64 rows of padding, a row tile cannot fill wgmma's M side (64 per warpgroup),
    and mma.sync would run instead; transposed, the 64- or 128-wide column tile is M and the
    16 or 32 rows are N, which wgmma takes from 8. At 64 and 128 rows the plain orientation is
    already wgmma."""
    return block_size < 64


def col_tile(ffn: int) -> int:
    """The largest power of two <= 128 dividing ``F``: the bound of every tile size that runs
    along F (and the width of the activation backward's partial-sum chunks). It depends on F
    only, so column tiles do not shrink when a call pads rows to a small ``b``."""
    return min(128, ffn & -ffn)


def _tiles(name: str, dtype: torch.dtype, block_size: int, caps: Tuple[int, int, int], slots: int, *sizes: int,
           min_warps: int = 1, fma: Tuple[int, int] = (0, 0)) -> _common.Tiles:
    """The launch plan of one kernel use. ``caps`` bounds ``(BLOCK_M, BLOCK_N, BLOCK_K)``: a row
    tile never straddles two experts, so the size along rows divides the row padding ``b``;
    sizes along F divide :func:`col_tile`; sizes along H are masked and free.

    The up and activation-backward kernels cap their tiles at 64: their epilogues hold four to
    five fp32 tiles at once (two accumulators, or acc, g, u, act, act'), which spill past 255
    registers on sm_90 with 64 fp32 elements per thread per tile (128x128 on 8 warps, 128x64
    on 4). ``min_warps=8`` for both: at 4 warps they spill on sm_80/sm_100 and in fp32 (the
    up kernel's fp32 64x32 tile by 8 bytes under Triton 3.6, its epilogue making a), and in
    fp32 both take 32 columns (``_EPILOGUE_COLS``). ``fma`` bounds the true-fp32 (CUDA-core)
    configs from below: both take K steps of 32 (``fma=(32, 0)``), as with 16 ptxas kept
    some sm_90 variants of each at 64-80 registers by spilling 8 bytes (Triton 3.6 and 3.9).

    The autotune key is the use's name, the token-count class of the call
    (:func:`_common.token_class`) and the size buckets, so decode and prefill tune apart.
    """
    key = (name, _common.token_class(slots), *(_common.bucket(n) for n in sizes))
    return _common.Tiles("", block_size, dtype, key=key, min_warps=min_warps, caps=caps, fma=fma)


def _new(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _new_like(t: torch.Tensor) -> torch.Tensor:
    # empty_like keeps a dense t's strides: AccumulateGrad then takes a parameter's gradient
    # over without copying it into the parameter's layout.
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if POISON_BUFFERS else out


def _strides2(t: Optional[torch.Tensor]) -> Tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _layout(x: torch.Tensor, expert_indices: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
            weights: Optional[torch.Tensor], b1: Optional[torch.Tensor], b2: Optional[torch.Tensor],
            num_experts: int, act: str, glu: bool, block_size: int, op: str):
    """Sizes, after the guards that keep the kernels in bounds (the ops layer has checked the
    rest): ``(T, k, H, F, G, P_max, act code)``."""
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: act must be one of {ACTIVATIONS}, got {act!r}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: the Triton kernels take float32, float16 or bfloat16, got x {x.dtype}")
    tokens, hidden = x.shape
    top_k = expert_indices.shape[1]
    groups = 2 if glu else 1
    ffn = w2.shape[1]
    shapes = {"expert_indices": (expert_indices, (tokens, top_k)), "w1": (w1, (num_experts, groups * ffn, hidden)),
              "w2": (w2, (num_experts, ffn, hidden)), "weights": (weights, (tokens, top_k)),
              "b1": (b1, (num_experts, groups * ffn)), "b2": (b2, (num_experts, hidden))}
    for name, (t, shape) in shapes.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must be {list(shape)}, got {list(t.shape)}")
    if ffn % block_size:
        raise ValueError(f"{op}: F = {ffn} must be a multiple of block_size {block_size}")
    p_max = padded_rows_bound(tokens, top_k, num_experts, block_size)
    return tokens, top_k, hidden, ffn, groups, p_max, ACTIVATIONS.index(act)


def experts_forward_fake(x: torch.Tensor, expert_indices: torch.Tensor, weights: Optional[torch.Tensor],
                         w1: torch.Tensor, w2: torch.Tensor, b1: Optional[torch.Tensor], b2: Optional[torch.Tensor],
                         *, num_experts: int, act: str, glu: bool, block_size: int, keep: bool = True
                         ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """:func:`experts_forward`'s outputs, empty: shapes from the input shapes only."""
    tokens, top_k, hidden, ffn, groups, p_max, _ = _layout(x, expert_indices, w1, w2, weights, b1, b2, num_experts,
                                                           act, glu, block_size, "experts_forward")
    i32 = torch.int32
    saved = [x.new_empty((tokens * top_k if keep else 0, groups * ffn)), x.new_empty((p_max,), dtype=i32),
             x.new_empty((p_max // block_size,), dtype=i32), x.new_empty((num_experts + 1,), dtype=i32)]
    return x.new_empty((tokens, hidden)), saved


def experts_forward(x: torch.Tensor, expert_indices: torch.Tensor, weights: Optional[torch.Tensor],
                    w1: torch.Tensor, w2: torch.Tensor, b1: Optional[torch.Tensor], b2: Optional[torch.Tensor],
                    *, num_experts: int, act: str, glu: bool, block_size: int, keep: bool = True
                    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(out [T, H], saved)``: every token's k expert MLPs, weighted and summed.

    ``saved = [hidden [T*k, G*F], row_slots [P_max], block_expert [P_max/b], expert_offsets
    [E+1]]``: the pre-activation of each slot and the routing (int32); what
    :func:`experts_backward` reads. ``keep=False`` (no backward will run): hidden has no rows
    and the up product stores none. No host read of device data.
    """
    tokens, top_k, hidden_size, ffn, groups, p_max, code = _layout(
        x, expert_indices, w1, w2, weights, b1, b2, num_experts, act, glu, block_size, "experts_forward")
    row_slots, block_expert, expert_offsets, _ = static_route(expert_indices, num_experts, block_size)
    dtype, device = x.dtype, x.device
    out = _new((tokens, hidden_size), dtype, device)
    # By slot (no padding row), and only for a backward: inference keeps no pre-activation.
    hidden = _new((tokens * top_k if keep else 0, groups * ffn), dtype, device)
    saved = [hidden, row_slots, block_expert, expert_offsets]
    if tokens == 0 or hidden_size == 0:
        return out.zero_(), saved
    # k == 1: each token has one slot, so the down product writes the output itself.
    y = out if top_k == 1 else _new((tokens * top_k, hidden_size), dtype, device)
    gw = weights if weights is not None else x  # a valid pointer, never read without HAS_WEIGHTS
    cols, slots = col_tile(ffn), tokens * top_k
    a = _new((slots, ffn), dtype, device)  # forward's temporary: backward recomputes a from h
    _common.launch(
        _up_kernel, lambda p: (p_max // p["BLOCK_M"], ffn // p["BLOCK_N"]),
        x, w1, b1 if b1 is not None else w1, hidden if keep else a, a, row_slots, expert_offsets,
        hidden_size, ffn, top_k, num_experts, band_rows(hidden_size * x.element_size()),
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), *_strides2(b1),
        *(hidden.stride() if keep else a.stride()), a.stride(0), a.stride(1),
        device=device, tiles=_tiles("up", dtype, block_size,
                                    (min(block_size, 64), min(cols, _EPILOGUE_COLS[dtype]), 0), slots,
                                    hidden_size, ffn, min_warps=8, fma=(32, 0)),
        BLOCK=block_size, GLU=glu, HAS_BIAS=b1 is not None, ACT=code, STORE_H=keep, STORE_A=True,
        SWAP=swap_rows(block_size), E_POW2=triton.next_power_of_2(num_experts))
    # y = w * (a @ W2 + b2), each row to its slot.
    _common.launch(
        _down_kernel, lambda p: (p_max // p["BLOCK_M"], triton.cdiv(hidden_size, p["BLOCK_N"])),
        a, w2, b2 if b2 is not None else w2, gw, y, row_slots, expert_offsets,
        hidden_size, ffn, top_k, num_experts, band_rows(ffn * a.element_size()),
        a.stride(0), a.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), *_strides2(b2),
        *_strides2(weights), y.stride(0), y.stride(1),
        device=device, tiles=_tiles("down", dtype, block_size, (block_size, 0, cols), slots, hidden_size, ffn),
        BLOCK=block_size, HAS_BIAS=b2 is not None, HAS_WEIGHTS=weights is not None, SWAP=swap_rows(block_size),
        E_POW2=triton.next_power_of_2(num_experts))
    if top_k > 1:
        # A token's k slots are adjacent rows of y: a fixed-order sum, no atomics.
        torch.sum(y.view(tokens, top_k, hidden_size), dim=1, out=out)
    return out, saved


def experts_backward(dout: torch.Tensor, saved: List[torch.Tensor], x: torch.Tensor, expert_indices: torch.Tensor,
                     weights: Optional[torch.Tensor], w1: torch.Tensor, w2: torch.Tensor,
                     b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], *, num_experts: int, act: str,
                     glu: bool, block_size: int, needs_input_grad: Sequence[bool]
                     ) -> Tuple[Optional[torch.Tensor], ...]:
    """``(dx, dweights, dw1, dw2, db1, db2)`` of :func:`experts_forward` for ``dout [T, H]``
    (any strides); None where ``needs_input_grad`` says no or the input is None.

    Each gradient has its input's shape and dtype (``dw1``/``dw2`` also its strides). No host
    read of device data.
    """
    op = "experts_backward"
    tokens, top_k, hidden_size, ffn, groups, p_max, code = _layout(
        x, expert_indices, w1, w2, weights, b1, b2, num_experts, act, glu, block_size, op)
    hidden, row_slots, block_expert, expert_offsets = saved
    expected = ((hidden, (tokens * top_k, groups * ffn), x.dtype), (row_slots, (p_max,), torch.int32),
                (block_expert, (p_max // block_size,), torch.int32), (expert_offsets, (num_experts + 1,), torch.int32))
    for i, (t, shape, dt) in enumerate(expected):
        if tuple(t.shape) != shape or t.dtype != dt or (t.dim() == 1 and t.numel() and t.stride(0) != 1):
            raise ValueError(f"{op}: saved[{i}] must be {dt} of shape {shape} (from experts_forward), got "
                             f"{t.dtype} {tuple(t.shape)}")
    if tuple(dout.shape) != (tokens, hidden_size) or dout.dtype != x.dtype:
        raise ValueError(f"{op}: dout must be {x.dtype} [{tokens}, {hidden_size}], got {dout.dtype} "
                         f"{list(dout.shape)}")
    need_dx, need_dwt, need_dw1, need_dw2, need_db1, need_db2 = (bool(v) for v in needs_input_grad)
    need_dwt &= weights is not None
    need_db1 &= b1 is not None
    need_db2 &= b2 is not None
    dtype, device = x.dtype, x.device
    dx = _new((tokens, hidden_size), dtype, device) if need_dx else None
    dweights = _new((tokens, top_k), weights.dtype, device) if need_dwt else None
    dw1 = _new_like(w1) if need_dw1 else None
    dw2 = _new_like(w2) if need_dw2 else None
    db1 = _new_like(b1) if need_db1 else None
    db2 = _new_like(b2) if need_db2 else None
    grads = (dx, dweights, dw1, dw2, db1, db2)
    if tokens == 0 or hidden_size == 0:  # no rows: every sum is empty
        return tuple(g.zero_() if g is not None else None for g in grads)

    cols, slots = col_tile(ffn), tokens * top_k
    need_dh = need_dx or need_dw1 or need_db1
    need_a = need_dw2 or need_db2
    dh = _new((slots, groups * ffn), dtype, device) if need_dh else hidden  # hidden: never written then
    # One scratch for two tensors never alive together: a (read by dW2) and then the
    # per-slot rows of dx (written after dW2 ran; stream order keeps them apart).
    slot_rows = tokens * top_k if (need_dx and top_k > 1) else 0
    scratch = _new((max(slots * ffn if need_a else 0, slot_rows * hidden_size),), dtype, device)
    a = scratch[:slots * ffn].view(slots, ffn) if need_a else hidden
    col_chunks = ffn // cols
    part = _new((col_chunks, slots), torch.float32, device) if need_dwt else None
    part_arg = part if part is not None else hidden
    gw = weights if weights is not None else x
    if need_dh or need_a or need_dwt:
        _common.launch(
            _act_bwd_kernel, lambda p: (p_max // p["BLOCK_M"], col_chunks),
            dout, w2, b2 if b2 is not None else w2, gw, hidden, dh, a, part_arg, row_slots, expert_offsets,
            hidden_size, ffn, top_k, num_experts, band_rows(hidden_size * dout.element_size()),
            dout.stride(0), dout.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), *_strides2(b2),
            *_strides2(weights), hidden.stride(0), hidden.stride(1), dh.stride(0), dh.stride(1),
            a.stride(0), a.stride(1), *_strides2(part_arg),
            BLOCK=block_size, ACT=code, GLU=glu, HAS_B2=b2 is not None, HAS_WEIGHTS=weights is not None,
            SWAP=swap_rows(block_size), E_POW2=triton.next_power_of_2(num_experts),
            DWEIGHTS=need_dwt, STORE_A=need_a, STORE_DH=need_dh, PART=cols,
            device=device, tiles=_tiles("act-bwd", dtype, block_size,
                                        (min(block_size, 64), min(cols, _EPILOGUE_COLS[dtype]), 0), slots,
                                        hidden_size, ffn, min_warps=8, fma=(32, 0)))
    if need_a:  # dW2 = a^T (w * dout) per expert; db2 = column sums of w * dout
        expert_wgrad.weight_grad(
            a, dout, weights, dw2, None, db2, row_slots, expert_offsets, top_k=top_k, p_max=p_max,
            block_size=block_size, poison=POISON_BUFFERS,
            tiles=_tiles("wgrad", dtype, block_size, (cols, 0, block_size), slots, ffn, hidden_size))
    if need_dw1 or need_db1:  # dW1 = dh^T x per expert; db1 = column sums of dh
        expert_wgrad.weight_grad(
            dh, x, None, dw1, db1, None, row_slots, expert_offsets, top_k=top_k, p_max=p_max,
            block_size=block_size, poison=POISON_BUFFERS,
            tiles=_tiles("wgrad", dtype, block_size, (cols, 0, block_size), slots, groups * ffn, hidden_size))
    if need_dx:  # dx rows by slot = dh @ W1[e]; a is dead by now, its scratch takes them
        rows = dx if top_k == 1 else scratch[:slot_rows * hidden_size].view(slot_rows, hidden_size)
        _common.launch(
            _down_kernel, lambda p: (p_max // p["BLOCK_M"], triton.cdiv(hidden_size, p["BLOCK_N"])),
            dh, w1, w1, x, rows, row_slots, expert_offsets,
            hidden_size, groups * ffn, top_k, num_experts, band_rows(groups * ffn * dh.element_size()),
            dh.stride(0), dh.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), 0, 0, 0, 0,
            rows.stride(0), rows.stride(1),
            BLOCK=block_size, HAS_BIAS=False, HAS_WEIGHTS=False,
            SWAP=swap_rows(block_size), E_POW2=triton.next_power_of_2(num_experts),
            device=device, tiles=_tiles("down", dtype, block_size, (block_size, 0, cols), slots, hidden_size,
                                        groups * ffn))
        if top_k > 1:
            torch.sum(rows.view(tokens, top_k, hidden_size), dim=1, out=dx)
    if need_dwt:  # the F/C partials of each slot, summed in a fixed order
        if weights.dtype == torch.float32:
            torch.sum(part, dim=0, out=dweights.view(-1))
        else:
            dweights.copy_(part.sum(0).view(tokens, top_k))
    return grads
