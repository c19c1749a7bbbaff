"""The fused expert path forward with FP8 experts (issue 19): DeepSeek-style block-scaled
e4m3 weights, activations quantized per 1x128 group on the fly, inside the two products.

    forward   q_x, s_x = quant(x[tok(r)])            per row and 128-wide group of H
              h_r  = sum_kg (q_x . Q1[e]^T)_kg * s_x[r, kg] * S1[e][n // 128, kg] + b1[e(r)]
                                                      h = [g | u], rounded to x's dtype (kept)
              a_r  = act(g_r) * u_r  (GLU) or act(h_r)   in fp32 from the rounded h, never stored
              q_a, s_a = quant(a_r)                   per row and 128-wide group of F
              y_s  = w_s * (sum_fg (q_a . Q2[e])_fg * s_a[r, fg] * S2[e][fg, n // 128] + b2[e(r)])
              out_t = sum_j y_{t*k+j}                 (fixed order, no atomics)

    quant(v): s = max(amax(|v|), 1e-4) / 448, q = e4m3(v / s) (round to nearest even), one
    (q, s) per row and group; the last group of a row may be shorter (H or F not a multiple of
    128), its missing elements count as zeros.

Each K step of both products is exactly one 128-wide quantization group (BLOCK_K = 128): the
fp8 x fp8 dot of the step starts from zero, and its fp32 result is scaled by the activation
row's scale and the weight block's scale before it joins the fp32 accumulator (DeepGEMM's
promotion; Hopper's fp8 wgmma accumulates with fewer mantissa bits, so no partial sum spans
more than one group). A tile's BLOCK_N columns (a power of two <= 128, at a multiple of
BLOCK_N) lie in one 128-row block of the weights: one weight scale per tile and K step.

Arguments (every tensor read through its strides; ``G = 2`` for a GLU, 1 plain):
    x         [T, H]           fp32/fp16/bf16: the gathered rows are quantized as they load
                               (no quantized copy of x in memory)
    expert_indices [T, k]      int64, ids in [0, E)
    weights   [T, k]           fp32 or x's dtype, or None (weights 1)
    w1        [E, G*F, H]      float8_e4m3fn: rows [0, F) gate, [F, 2F) up; H-contiguous is
                               K-major for the first product (what fp8 wgmma wants)
    w1_scale  [E, ceil(G*F/128), ceil(H/128)]  fp32
    w2        [E, F, H]        float8_e4m3fn; checkpoints store down_proj [E, H, F], so w2 is
                               usually that tensor's transposed view: F-contiguous, K-major
    w2_scale  [E, ceil(F/128), ceil(H/128)]    fp32, in w2's [F, H] orientation
    b1 [E, G*F], b2 [E, H]     or None (x's dtype or fp32)
Element (n, k) of expert e's weight is ``w[e, n, k] * scale[e, n // 128, k // 128]``.

Kernels (routing from ``static_routing.static_route``: ``row_slots``, ``expert_offsets``; a
CTA past the real P finds no expert and exits):
    _up_fp8_kernel    grid (P_max/BLOCK_M, F/BLOCK_N). Gather of x's rows fused with their
                      quantization, fp8 dot with the gate AND the up tile of W1 (two
                      accumulators, one pass over H); epilogue adds b1, stores [g | u] in
                      x's dtype by slot (padding rows store nothing).
    _down_fp8_kernel  grid (P_max/BLOCK_M, cdiv(H, BLOCK_N)). Loads h's gate and up tiles by
                      slot (a padding row: slot 0's, never stored), forms a = act(g) * u in
                      fp32, quantizes it per row, fp8 dot with W2; epilogue adds b2,
                      multiplies by w_s and stores each real row at its slot.
Entry point: :func:`experts_forward_fp8` (forward only: inference). Allocates hidden
[T*k, G*F] (x's dtype, by slot: no buffer carries padding rows), y [T*k, H] (none when
k == 1), out [T, H]. No host read of device data.

Tile order: experts.py's (``experts._expert_tiles``): expert by expert, in bands of
``experts.BAND_BYTES`` of the row operand inside an expert, column tile by column tile.

Orientation: below 64 rows of padding (b = 16, 32; ``experts.swap_rows``) both kernels compute
the transposed product, as experts.py does (``SWAP``, kernels/_rowtile.py): the weight tile
[BLOCK_N, 128] is wgmma's A and the quantized activation tile [128, BLOCK_M] its B, so the
16 or 32 rows sit on N and sm_90 still runs fp8 wgmma. fp8 wgmma takes both operands K-major
from shared memory, and both are: W1 [E, G*F, H] is H-contiguous (K-major for A or for B^T),
w2 is usually the transpose view of a checkpoint's [E, H, F] (F = K contiguous), and the
quantized activations are formed in registers and stored K-major by Triton. (A w2 that is
N-major, a contiguous [E, F, H], still runs fp8 wgmma: Triton transposes the tile in
registers on its way to shared memory.) The per-row activation scales then broadcast along
the tile's dim 1 (``_rows``); the weight scale is one per tile and K step.

Configs: ``_common``'s "fp8" operand class (``Tiles`` with dtype float8_e4m3fn): per-target
tables with ``BLOCK_K = 128`` (the group), autotuned on a GPU with the token-count class in
the key (``experts._tiles``), the table's first entry in deterministic mode, one small config
under the interpreter; below sm_89 a ValueError. Row tiles divide ``b``; the up kernel's
column tiles divide ``col_tile(F)`` (a gate tile must not reach into the up rows, and each
tile must lie in one 128-row block of W1), the down kernel's are at most 128 wide (one
128-column block of W2). Every variant the compile sweep records compiles without spills,
with fp8 wgmma on sm_90 at every b (tests/test_compile_targets.py).

Interpreter: ``INTERPRET`` (as in ``_common.dot``) upcasts the fp8 operands to fp32 before
``tl.dot``, and replaces two casts the interpreter gets wrong (fp32 -> e4m3, fp32 -> bf16)
by the same roundings done on the bits (:func:`_e4m3_round`, :func:`_round`); on a GPU the
branches compile away and the hardware conversions run.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._rowtile import _acc, _act_and_grad, _cols, _grid2, _mma, _row_max, _rows, _tokens
from .experts import ACTIVATIONS, _expert_tiles, _strides2, _tiles, band_rows, col_tile, swap_rows
from .static_routing import padded_rows_bound, static_route

# The format's constants, for host code (the kernels spell them as literals: the GPU
# compiler rejects Python globals inside jitted code).
GROUP = 128  # the quantization group along the reduction dimension, = BLOCK_K
FP8_MAX = 448.0  # largest finite e4m3 (float8_e4m3fn) value
SCALE_FLOOR = 1e-4  # amax floor: an all-zero group gets scale 1e-4/448, not 0
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# A debugging switch for tests: fill every buffer the launcher allocates with NaN.
POISON_BUFFERS = False


# -- quantization and the fp8 dot ----------------------------------------------------------

@triton.jit
def _e4m3_round(y):
    """``y`` (fp32, |y| <= 448 give or take an ulp) rounded to the nearest e4m3 value, ties
    to even, as fp32. Only for the interpreter: its fp32 -> fp8 cast drops the carry of a
    rounding into the exponent (31.3 -> 16) and rounds ties away, so the quantized values
    are made here in fp32 arithmetic instead (exact: scaling by powers of two, and the
    1.5 * 2^23 trick rounds to an integer, ties to even, in IEEE fp32)."""
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127  # the binade of |y|; e4m3's smallest normal is 2^-6,
    e = tl.maximum(e, -6)            # below it the subnormal spacing 2^-9 holds
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
    inv = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
    r = (y * inv + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(r * ulp, -448.0), 448.0)


@triton.jit
def _quantize(v, SWAP: tl.constexpr, INTERPRET: tl.constexpr):
    """``(q, s)``: each row of ``v`` (a rows-by-128 tile of :func:`_grid2`'s orientation, fp32,
    zeros where a short group ends) is one group, ``s = max(amax, 1e-4) / 448`` per row,
    ``q = e4m3(v / s)``. Correctly rounded divisions (div_rn): the scale and the quantized
    values are the definition's bits exactly. On a GPU ``q`` is float8e4nv
    (cvt.rn.satfinite), under the interpreter fp32 holding e4m3 values (see
    :func:`_e4m3_round`)."""
    s = tl.div_rn(tl.maximum(_row_max(tl.abs(v), SWAP), 1e-4), 448.0)
    y = tl.div_rn(v, _rows(s, SWAP))
    if INTERPRET:
        q = _e4m3_round(y)
    else:
        q = y.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return q, s


@triton.jit
def _round(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """``v`` (fp32) rounded to ``dtype``, to nearest even as on a GPU. The interpreter's fp32 ->
    bf16 cast truncates, and h feeds a quantization: a bias of half a bf16 ulp in h moves ~5%
    of a's fp8 roundings and the output by ~2% (rms), so under the interpreter the rounding
    is done on the bits first (the cast then truncates exact values)."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
            v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _up_fp8_kernel(x_ptr, w1_ptr, w1s_ptr, b1_ptr, h_ptr, row_slots_ptr, expert_offsets_ptr,
                   H, FFN, TOP_K, NUM_EXPERTS, BAND_ROWS,
                   stride_xt, stride_xh, stride_we, stride_wc, stride_wh, stride_se, stride_sc, stride_sh,
                   stride_be, stride_bc, stride_hr, stride_hc,
                   BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GLU: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr, E_POW2: tl.constexpr,
                   INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_K == 128)  # one quantization group per K step
    tl.static_assert(BLOCK % BLOCK_M == 0)  # a row tile never straddles two experts
    e, pid_m, pid_n = _expert_tiles(expert_offsets_ptr, NUM_EXPERTS, BLOCK_M, BAND_ROWS, E_POW2)
    if e < NUM_EXPERTS:  # tiles past the real P: nothing to do
        ex = e.to(tl.int64)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(row_slots_ptr + rows)
        ok = slots >= 0
        slot, tok = _tokens(slots, ok, TOP_K)
        n0 = pid_n * BLOCK_N  # BLOCK_N (a power of two <= 128) divides F
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # times W1's row stride: int64
        offs_k = tl.arange(0, BLOCK_K)
        # The gather, quantized as it loads: x's rows straight from the tokens, zero rows for padding.
        x_t, x_k = _grid2(tok, offs_k, SWAP)
        x_ptrs = x_ptr + x_t * stride_xt + x_k * stride_xh
        x_ok, _ = _grid2(ok, offs_k, SWAP)
        # W1[e]^T tiles [BLOCK_K, BLOCK_N] (transposed with SWAP), K-major when W1 is
        # H-contiguous: gate rows c, up rows F + c.
        w_k, w_c = _grid2(offs_k, cols, SWAP)
        wg_ptrs = w1_ptr + ex * stride_we + w_c * stride_wc + w_k * stride_wh
        # The tile's weight-scale row: one 128-row block of W1 for the gate, one for the up.
        sg_ptr = w1s_ptr + ex * stride_se + (n0 // 128) * stride_sc
        su_ptr = w1s_ptr + ex * stride_se + ((FFN + n0) // 128) * stride_sc
        acc_g = _acc(BLOCK_M, BLOCK_N, SWAP)
        acc_u = _acc(BLOCK_M, BLOCK_N, SWAP)
        zero = _acc(BLOCK_M, BLOCK_N, SWAP)
        for k0 in range(0, H, BLOCK_K):
            kg = k0 // BLOCK_K
            k_ok = (k0 + offs_k) < H  # the last group of H may be short: zeros beyond
            xa = tl.load(x_ptrs, mask=x_ok & _cols(k_ok, SWAP), other=0.0).to(tl.float32)
            q, sx = _quantize(xa, SWAP, INTERPRET)
            wg = tl.load(wg_ptrs, mask=_rows(k_ok, SWAP), other=0.0)
            part = _mma(q, wg, zero, SWAP, INTERPRET, INPUT_PRECISION)
            acc_g += part * _rows(sx * tl.load(sg_ptr + kg * stride_sh), SWAP)
            if GLU:
                wu = tl.load(wg_ptrs + FFN.to(tl.int64) * stride_wc, mask=_rows(k_ok, SWAP), other=0.0)
                part = _mma(q, wu, zero, SWAP, INTERPRET, INPUT_PRECISION)
                acc_u += part * _rows(sx * tl.load(su_ptr + kg * stride_sh), SWAP)
            x_ptrs += BLOCK_K * stride_xh
            wg_ptrs += BLOCK_K * stride_wh
        if HAS_BIAS:
            b_ptrs = b1_ptr + ex * stride_be + cols * stride_bc
            acc_g += _cols(tl.load(b_ptrs).to(tl.float32), SWAP)
            if GLU:
                acc_u += _cols(tl.load(b_ptrs + FFN * stride_bc).to(tl.float32), SWAP)
        # By slot, not by padded row: h is [T*k, G*F] and a padding row stores nothing.
        h_s, h_c = _grid2(slot, cols, SWAP)
        h_ptrs = h_ptr + h_s * stride_hr + h_c * stride_hc
        tl.store(h_ptrs, _round(acc_g, h_ptr.dtype.element_ty, INTERPRET), mask=x_ok)
        if GLU:
            tl.store(h_ptrs + FFN * stride_hc, _round(acc_u, h_ptr.dtype.element_ty, INTERPRET), mask=x_ok)


@triton.jit
def _down_fp8_kernel(h_ptr, w2_ptr, w2s_ptr, b2_ptr, gw_ptr, y_ptr, row_slots_ptr, expert_offsets_ptr,
                     N, FFN, TOP_K, NUM_EXPERTS, BAND_ROWS,
                     stride_hr, stride_hc, stride_we, stride_wf, stride_wn, stride_se, stride_sf, stride_sn,
                     stride_be, stride_bn, stride_gt, stride_gj, stride_ys, stride_yn,
                     BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr,
                     SWAP: tl.constexpr, E_POW2: tl.constexpr, INTERPRET: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_K == 128)  # one quantization group of F per K step
    tl.static_assert(BLOCK % BLOCK_M == 0)  # a row tile never straddles two experts
    e, pid_m, pid_n = _expert_tiles(expert_offsets_ptr, NUM_EXPERTS, BLOCK_M, BAND_ROWS, E_POW2)
    if e < NUM_EXPERTS:
        ex = e.to(tl.int64)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(row_slots_ptr + rows)
        ok = slots >= 0
        slot = tl.where(ok, slots, 0).to(tl.int64)  # slot * stride exceeds int32 on big layers
        n0 = pid_n * BLOCK_N  # BLOCK_N divides 128: the tile lies in one 128-column block of W2
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = cols < N
        offs_k = tl.arange(0, BLOCK_K)
        # h is [T*k, G*F] by slot. A padding row reads slot 0's row (a real row, written by
        # the up kernel: T*k >= 1 here) rather than a masked zero row: its result is never
        # stored and quantization is per row, so it touches no real row; and the row mask
        # spilled the 128-row tiles on sm_90 (24-40 bytes; the loads are [BLOCK_M, 128] twice).
        a_s, a_k = _grid2(slot, offs_k, SWAP)
        h_ptrs = h_ptr + a_s * stride_hr + a_k * stride_hc
        # W2[e] tiles [BLOCK_K, BLOCK_N] (transposed with SWAP); K-major (stride_wf == 1) for
        # the transposed view of a checkpoint's down_proj, what fp8 wgmma reads as it is.
        w_k, w_n = _grid2(offs_k, cols, SWAP)
        w_ptrs = w2_ptr + ex * stride_we + w_k * stride_wf + w_n * stride_wn
        s_ptr = w2s_ptr + ex * stride_se + (n0 // 128) * stride_sn
        acc = _acc(BLOCK_M, BLOCK_N, SWAP)
        zero = _acc(BLOCK_M, BLOCK_N, SWAP)
        for k0 in range(0, FFN, BLOCK_K):
            kg = k0 // BLOCK_K
            k_ok = (k0 + offs_k) < FFN  # F need not be a multiple of 128: a short last group
            # a = act(g) * u (or act(h)) in fp32 from the rounded h; masked columns give
            # act(0) * 0 = 0 (every activation here maps 0 to 0), so they add nothing to amax.
            h_ok = _cols(k_ok, SWAP)
            g = tl.load(h_ptrs, mask=h_ok, other=0.0).to(tl.float32)
            a = _act_and_grad(g, ACT)[0]
            if GLU:
                a = a * tl.load(h_ptrs + FFN * stride_hc, mask=h_ok, other=0.0).to(tl.float32)
            q, sa = _quantize(a, SWAP, INTERPRET)
            w = tl.load(w_ptrs, mask=_rows(k_ok, SWAP) & _cols(n_ok, SWAP), other=0.0)
            part = _mma(q, w, zero, SWAP, INTERPRET, INPUT_PRECISION)
            acc += part * _rows(sa * tl.load(s_ptr + kg * stride_sf), SWAP)
            h_ptrs += BLOCK_K * stride_hc
            w_ptrs += BLOCK_K * stride_wf
        if HAS_BIAS:
            bias = tl.load(b2_ptr + ex * stride_be + cols * stride_bn, mask=n_ok, other=0.0).to(tl.float32)
            acc += _cols(bias, SWAP)
        if HAS_WEIGHTS:
            t = slot // TOP_K
            wv = tl.load(gw_ptr + t * stride_gt + (slot - t * TOP_K) * stride_gj, mask=ok, other=0.0)
            acc = acc * _rows(wv.to(tl.float32), SWAP)
        # The scatter: each real row to its slot (each slot has exactly one row).
        y_s, y_n = _grid2(slot, cols, SWAP)
        ok_s, ok_n = _grid2(ok, n_ok, SWAP)
        tl.store(y_ptr + y_s * stride_ys + y_n * stride_yn, _round(acc, y_ptr.dtype.element_ty, INTERPRET),
                 mask=ok_s & ok_n)


# -- the launcher ----------------------------------------------------------------------------

def _new(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _strides3(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check(x, expert_indices, weights, w1, w1_scale, w2, w2_scale, b1, b2, num_experts, act, glu, block_size):
    """The guards that keep the kernels in bounds and on fp8 tensor cores (the ops layer checks
    the rest): ``(T, k, H, F, G, P_max, act code)``."""
    op = "experts_forward_fp8"
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: act must be one of {ACTIVATIONS}, got {act!r}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in (("w1", w1), ("w2", w2)):
        if t.dtype != torch.float8_e4m3fn:
            raise TypeError(f"{op}: {name} must be torch.float8_e4m3fn, got {t.dtype}")
    tokens, hidden = x.shape
    top_k = expert_indices.shape[1]
    groups = 2 if glu else 1
    ffn = w2.shape[1]

    def blocks(n: int) -> int:
        return -(-n // GROUP)

    shapes = {"expert_indices": (expert_indices, (tokens, top_k)), "w1": (w1, (num_experts, groups * ffn, hidden)),
              "w2": (w2, (num_experts, ffn, hidden)), "weights": (weights, (tokens, top_k)),
              "b1": (b1, (num_experts, groups * ffn)), "b2": (b2, (num_experts, hidden)),
              "w1_scale": (w1_scale, (num_experts, blocks(groups * ffn), blocks(hidden))),
              "w2_scale": (w2_scale, (num_experts, blocks(ffn), blocks(hidden)))}
    for name, (t, shape) in shapes.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must be {list(shape)}, got {list(t.shape)}")
    for name, t in (("w1_scale", w1_scale), ("w2_scale", w2_scale)):
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be float32, got {t.dtype}")
    if ffn % block_size:
        raise ValueError(f"{op}: F = {ffn} must be a multiple of block_size {block_size}")
    if not _common.interpret_flag():  # on a GPU: a ValueError below sm_89 (no fp8 tensor cores)
        _common.config_family(torch.cuda.get_device_capability(x.device), "fp8")
    p_max = padded_rows_bound(tokens, top_k, num_experts, block_size)
    return tokens, top_k, hidden, ffn, groups, p_max, ACTIVATIONS.index(act)


def experts_forward_fp8(x: torch.Tensor, expert_indices: torch.Tensor, weights: Optional[torch.Tensor],
                        w1: torch.Tensor, w1_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                        b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], *, num_experts: int, act: str,
                        glu: bool, block_size: int) -> torch.Tensor:
    """``out [T, H]`` in x's dtype: every token's k fp8 expert MLPs, weighted and summed.

    See the module docstring for the format and the arithmetic. Forward only (nothing is
    kept for a backward). No host read of device data; raises ValueError on a CUDA device
    below sm_89 (no fp8 tensor cores).
    """
    tokens, top_k, hidden_size, ffn, groups, p_max, code = _check(
        x, expert_indices, weights, w1, w1_scale, w2, w2_scale, b1, b2, num_experts, act, glu, block_size)
    dtype, device = x.dtype, x.device
    out = _new((tokens, hidden_size), dtype, device)
    if tokens == 0 or hidden_size == 0:
        return out.zero_()
    row_slots, _, expert_offsets, _ = static_route(expert_indices, num_experts, block_size)
    hidden = _new((tokens * top_k, groups * ffn), dtype, device)  # by slot: no padding row
    y = out if top_k == 1 else _new((tokens * top_k, hidden_size), dtype, device)
    gw = weights if weights is not None else x  # a valid pointer, never read without HAS_WEIGHTS
    slots, swap, fp8 = tokens * top_k, swap_rows(block_size), torch.float8_e4m3fn
    form = "glu" if glu else "plain"
    e_pow2 = triton.next_power_of_2(num_experts)
    if ffn > 0:
        # Row tiles divide b; column tiles divide col_tile(F) (see the module docstring).
        _common.launch(
            _up_fp8_kernel, lambda p: (p_max // p["BLOCK_M"], ffn // p["BLOCK_N"]),
            x, w1, w1_scale, b1 if b1 is not None else w1_scale, hidden, row_slots, expert_offsets,
            hidden_size, ffn, top_k, num_experts, band_rows(hidden_size * x.element_size()),
            x.stride(0), x.stride(1), *_strides3(w1), *_strides3(w1_scale), *_strides2(b1),
            hidden.stride(0), hidden.stride(1),
            device=device, tiles=_tiles(f"up-fp8-{form}", fp8, block_size, (block_size, col_tile(ffn), GROUP),
                                        slots, hidden_size, ffn),
            BLOCK=block_size, GLU=glu, HAS_BIAS=b1 is not None, SWAP=swap, E_POW2=e_pow2)
    _common.launch(
        _down_fp8_kernel, lambda p: (p_max // p["BLOCK_M"], triton.cdiv(hidden_size, p["BLOCK_N"])),
        hidden, w2, w2_scale, b2 if b2 is not None else w2_scale, gw, y, row_slots, expert_offsets,
        hidden_size, ffn, top_k, num_experts, band_rows(groups * ffn * hidden.element_size()),
        hidden.stride(0), hidden.stride(1), *_strides3(w2), *_strides3(w2_scale), *_strides2(b2),
        *_strides2(weights), y.stride(0), y.stride(1),
        # 8 warps at least: each K step forms a = act(g) * u from h, its row maxima and its
        # quantization, several fp32 tiles at once; the sm_90 64x64 tile on 4 warps reached
        # 255 registers and spilled 8 bytes under Triton 3.6.
        device=device, tiles=_tiles(f"down-fp8-{form}", fp8, block_size, (block_size, GROUP, GROUP), slots,
                                    hidden_size, ffn, min_warps=8),
        BLOCK=block_size, HAS_BIAS=b2 is not None, HAS_WEIGHTS=weights is not None, ACT=code, GLU=glu, SWAP=swap,
        E_POW2=e_pow2)
    if top_k > 1:
        # A token's k slots are adjacent rows of y: a fixed-order sum, no atomics.
        torch.sum(y.view(tokens, top_k, hidden_size), dim=1, out=out)
    return out
