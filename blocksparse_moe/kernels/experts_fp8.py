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

Kernels (routing from ``static_routing.static_route``: ``row_slots``, ``block_expert``; block
rows past the real P read ``block_expert == E`` and exit):
    _up_fp8_kernel    grid (P_max/BLOCK_M, F/BLOCK_N). Gather of x's rows fused with their
                      quantization, fp8 dot with the gate AND the up tile of W1 (two
                      accumulators, one pass over H); epilogue adds b1, stores [g | u] in
                      x's dtype.
    _down_fp8_kernel  grid (P_max/BLOCK_M, cdiv(H, BLOCK_N)). Loads h's gate and up tiles,
                      forms a = act(g) * u in fp32, quantizes it per row, fp8 dot with W2;
                      epilogue adds b2, multiplies by w_s and stores each real row at its
                      slot (padding rows store nothing).
Entry point: :func:`experts_forward_fp8` (forward only: inference). Allocates hidden
[P_max, G*F] (x's dtype), y [T*k, H] (none when k == 1), out [T, H]. No host read of device
data.

Configs: ``BLOCK_K`` is fixed at 128 (the group), so ``_common``'s tables (whose BLOCK_K is a
tile choice) do not apply: :data:`CONFIGS` holds this family's own (BLOCK_M, BLOCK_N, warps,
stages) per target, launched through ``_common.launch`` with an explicit config (autotuned
here on a GPU with more than one candidate). Every entry compiles without spills for its
target (tests/test_experts_fp8_compile.py, which also checks the PTX: fp8 wgmma on sm_90,
fp8 mma.sync on sm_89, tcgen05 f8f6f4 on sm_100). Row tiles under 64 rows (b = 16 or 32) are
too short for wgmma/tcgen05: Triton 3.9 then uses mma.sync with the fp8 operands converted
to f16 (exact; the weights are still read as fp8). A swapped product (W^T x^T, the tokens as
the N dimension) would keep fp8 wgmma there.

Interpreter: ``INTERPRET`` (as in ``_common.dot``) upcasts the fp8 operands to fp32 before
``tl.dot``, and replaces two casts the interpreter gets wrong (fp32 -> e4m3, fp32 -> bf16)
by the same roundings done on the bits (:func:`_e4m3_round`, :func:`_round`); on a GPU the
branches compile away and the hardware conversions run.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._rowtile import _act_and_grad
from .experts import ACTIVATIONS, _strides2
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
def _quantize(v, INTERPRET: tl.constexpr):
    """``(q [M, 128], s [M])``: each row of ``v`` (fp32, zeros where a short group ends) is one
    group, ``s = max(amax, 1e-4) / 448``, ``q = e4m3(v / s)``. Correctly rounded divisions
    (div_rn): the scale and the quantized values are the definition's bits exactly. On a
    GPU ``q`` is float8e4nv (cvt.rn.satfinite), under the interpreter fp32 holding e4m3
    values (see :func:`_e4m3_round`)."""
    amax = tl.max(tl.abs(v), axis=1)
    s = tl.div_rn(tl.maximum(amax, 1e-4), 448.0)
    y = tl.div_rn(v, s[:, None])
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
def _up_fp8_kernel(x_ptr, w1_ptr, w1s_ptr, b1_ptr, h_ptr, row_slots_ptr, block_expert_ptr,
                   H, FFN, TOP_K, NUM_EXPERTS,
                   stride_xt, stride_xh, stride_we, stride_wc, stride_wh, stride_se, stride_sc, stride_sh,
                   stride_be, stride_bc, stride_hr, stride_hc,
                   BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   GLU: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    BLOCK_K: tl.constexpr = 128  # one quantization group per K step
    TILES_M: tl.constexpr = BLOCK // BLOCK_M
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    block_row = pid_m // TILES_M
    e = tl.load(block_expert_ptr + block_row)
    if e < NUM_EXPERTS:  # block rows past the real P hold E: nothing to do
        ex = e.to(tl.int64)
        rows = block_row.to(tl.int64) * BLOCK + (pid_m % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(row_slots_ptr + rows)
        ok = slots >= 0
        tok = tl.where(ok, slots // TOP_K, 0).to(tl.int64)
        n0 = pid_n * BLOCK_N  # BLOCK_N (a power of two <= 128) divides F
        cols = n0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xh
        # W1[e]^T tiles [BLOCK_K, BLOCK_N], K-major when W1 is H-contiguous: gate rows c, up F + c.
        wg_ptrs = w1_ptr + ex * stride_we + cols[None, :] * stride_wc + offs_k[:, None] * stride_wh
        # The tile's weight-scale row: one 128-row block of W1 for the gate, one for the up.
        sg_ptr = w1s_ptr + ex * stride_se + (n0 // 128) * stride_sc
        su_ptr = w1s_ptr + ex * stride_se + ((FFN + n0) // 128) * stride_sc
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kg = k0 // BLOCK_K
            k_ok = (k0 + offs_k) < H  # the last group of H may be short: zeros beyond
            xa = tl.load(x_ptrs, mask=ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            q, sx = _quantize(xa, INTERPRET)
            wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
            part = _common.dot(q, wg, zero, INTERPRET, "ieee")
            acc_g += part * (sx * tl.load(sg_ptr + kg * stride_sh))[:, None]
            if GLU:
                wu = tl.load(wg_ptrs + FFN * stride_wc, mask=k_ok[:, None], other=0.0)
                part = _common.dot(q, wu, zero, INTERPRET, "ieee")
                acc_u += part * (sx * tl.load(su_ptr + kg * stride_sh))[:, None]
            x_ptrs += BLOCK_K * stride_xh
            wg_ptrs += BLOCK_K * stride_wh
        if HAS_BIAS:
            b_ptrs = b1_ptr + ex * stride_be + cols * stride_bc
            acc_g += tl.load(b_ptrs).to(tl.float32)[None, :]
            if GLU:
                acc_u += tl.load(b_ptrs + FFN * stride_bc).to(tl.float32)[None, :]
        h_ptrs = h_ptr + rows[:, None] * stride_hr + cols[None, :] * stride_hc
        tl.store(h_ptrs, _round(acc_g, h_ptr.dtype.element_ty, INTERPRET))
        if GLU:
            tl.store(h_ptrs + FFN * stride_hc, _round(acc_u, h_ptr.dtype.element_ty, INTERPRET))


@triton.jit
def _down_fp8_kernel(h_ptr, w2_ptr, w2s_ptr, b2_ptr, gw_ptr, y_ptr, row_slots_ptr, block_expert_ptr,
                     N, FFN, TOP_K, NUM_EXPERTS,
                     stride_hr, stride_hc, stride_we, stride_wf, stride_wn, stride_se, stride_sf, stride_sn,
                     stride_be, stride_bn, stride_gt, stride_gj, stride_ys, stride_yn,
                     BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr,
                     INTERPRET: tl.constexpr):
    BLOCK_K: tl.constexpr = 128  # one quantization group of F per K step
    TILES_M: tl.constexpr = BLOCK // BLOCK_M
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    block_row = pid_m // TILES_M
    e = tl.load(block_expert_ptr + block_row)
    if e < NUM_EXPERTS:
        ex = e.to(tl.int64)
        rows = block_row.to(tl.int64) * BLOCK + (pid_m % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(row_slots_ptr + rows)
        ok = slots >= 0
        n0 = pid_n * BLOCK_N  # BLOCK_N divides 128: the tile lies in one 128-column block of W2
        cols = n0 + tl.arange(0, BLOCK_N)
        n_ok = cols < N
        offs_k = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows[:, None] * stride_hr + offs_k[None, :] * stride_hc
        # W2[e] tiles [BLOCK_K, BLOCK_N]; K-major (stride_wf == 1) for the transposed view of
        # a checkpoint's down_proj, which is what fp8 wgmma reads without a transpose.
        w_ptrs = w2_ptr + ex * stride_we + offs_k[:, None] * stride_wf + cols[None, :] * stride_wn
        s_ptr = w2s_ptr + ex * stride_se + (n0 // 128) * stride_sn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, FFN, BLOCK_K):
            kg = k0 // BLOCK_K
            k_ok = (k0 + offs_k) < FFN  # F need not be a multiple of 128: a short last group
            # a = act(g) * u (or act(h)) in fp32 from the rounded h; masked columns give
            # act(0) * 0 = 0 (every activation here maps 0 to 0), so they add nothing to amax.
            g = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
            a, _ = _act_and_grad(g, ACT)
            if GLU:
                a = a * tl.load(h_ptrs + FFN * stride_hc, mask=k_ok[None, :], other=0.0).to(tl.float32)
            q, sa = _quantize(a, INTERPRET)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            part = _common.dot(q, w, zero, INTERPRET, "ieee")
            acc += part * (sa * tl.load(s_ptr + kg * stride_sf))[:, None]
            h_ptrs += BLOCK_K * stride_hc
            w_ptrs += BLOCK_K * stride_wf
        if HAS_BIAS:
            acc += tl.load(b2_ptr + ex * stride_be + cols * stride_bn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        slot = tl.where(ok, slots, 0).to(tl.int64)
        if HAS_WEIGHTS:
            t = slot // TOP_K
            wv = tl.load(gw_ptr + t * stride_gt + (slot - t * TOP_K) * stride_gj, mask=ok, other=0.0)
            acc = acc * wv.to(tl.float32)[:, None]
        # The scatter: each real row to its slot (each slot has exactly one row).
        tl.store(y_ptr + slot[:, None] * stride_ys + cols[None, :] * stride_yn,
                 _round(acc, y_ptr.dtype.element_ty, INTERPRET), mask=ok[:, None] & n_ok[None, :])


# -- configs ---------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per target family and kernel; BLOCK_K = 128.
# BLOCK_M is clipped to b (a row tile never straddles two experts); the up kernel's BLOCK_N
# to the largest power of two dividing F (a gate tile must not reach into the up rows, and
# an up tile, at F + a multiple of BLOCK_N, must lie in one 128-row block of W1). Every
# entry compiles for its target without spills and within its shared memory
# (tests/test_experts_fp8_compile.py). What limits the tiles is the operand formed in
# registers: the [BLOCK_M, 128] fp32 tile of x (up) or of g, u and a (down), on top of the
# accumulators; and shared memory, where the software pipeline keeps num_stages copies of
# the x or h tiles (16-bit, [BLOCK_M, 128], twice for a GLU) beside the fp8 weight tiles.
#   sm89: Ada (and consumer Blackwell sm_120): fp8 mma.sync, 99 KiB of shared memory per
#         block, hence 2 stages for the 128-row down tile; 64x64 up needs 8 warps (4: 24 B
#         spill), 128x64 up spills 8 B even with 8.
#   sm90: Hopper: fp8 wgmma (BLOCK_M >= 64; below, Triton 3.9 upcasts the fp8 operands to
#         f16 exactly and uses mma.sync). 64x128 down spills with 4 warps; 128x64 down with
#         4 stages is over the 227 KiB.
#   sm100: datacenter Blackwell: tcgen05 (the accumulator in tensor memory); the 128x128
#         down tile spills 8 B even with 8 warps, 64x64 down 8 B with 4 warps.
CONFIGS: Dict[Tuple[str, str], List[Tuple[int, int, int, int]]] = {
    ("sm89", "up"): [(64, 64, 8, 3), (32, 64, 4, 3)],
    ("sm89", "down"): [(64, 64, 4, 3), (128, 64, 8, 2), (32, 64, 4, 3)],
    ("sm90", "up"): [(128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 4), (32, 64, 4, 4)],
    ("sm90", "down"): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 8, 4), (64, 64, 4, 4)],
    ("sm100", "up"): [(128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 4), (32, 64, 4, 4)],
    ("sm100", "down"): [(128, 64, 8, 3), (64, 128, 8, 4), (64, 64, 8, 4), (32, 128, 4, 3)],
}
# Under the interpreter: one small config; b = 64 still splits into two row tiles, H = 160
# into five column tiles, two of them in H's short last group.
_INTERPRETED = (32, 32, 1, 1)


def fp8_family(capability: Tuple[int, int]) -> str:
    """The config table of a GPU with fp8 tensor cores; ValueError below sm_89."""
    if tuple(capability) < (8, 9):
        raise ValueError(f"fp8 experts need fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell); "
                         f"this GPU is sm_{capability[0]}{capability[1]}")
    family = _common.target_family(capability)
    return "sm89" if family == "sm80" else family


def up_tile_cap(ffn: int) -> int:
    """The largest BLOCK_N of the up kernel for ``F``: the largest power of two <= 128 that
    divides F (F > 0 is a multiple of b >= 16)."""
    return min(128, ffn & -ffn) if ffn > 0 else 128


def fp8_configs(kernel: str, block_size: int, capability: Optional[Tuple[int, int]] = None, *,
                ffn: int = 0) -> List[Dict[str, int]]:
    """Configs of ``kernel`` ("up" or "down") for ``capability`` (None: the interpreter's one),
    clipped to the block size (and, for "up", to :func:`up_tile_cap` of ``ffn``); each
    ``{BLOCK_M, BLOCK_N, num_warps, num_stages}``."""
    table = [_INTERPRETED] if capability is None else CONFIGS[(fp8_family(capability), kernel)]
    out: List[Dict[str, int]] = []
    seen = set()
    for bm, bn, warps, stages in table:
        tile = (min(bm, block_size), min(bn, up_tile_cap(ffn)) if kernel == "up" else bn)
        if tile in seen:  # clipping makes several entries one tile: keep the first
            continue
        seen.add(tile)
        if tile[0] * tile[1] < bm * bn:  # a clipped tile: 4 warps hold it (8 would idle)
            warps = min(warps, 4)
        out.append(dict(BLOCK_M=tile[0], BLOCK_N=tile[1], num_warps=warps, num_stages=stages))
    return out


_TUNED: Dict[tuple, object] = {}


def _runner(kernel, name: str, block_size: int, ffn: int, device: torch.device, key: tuple
            ) -> Tuple[Callable, Dict[str, int]]:
    """``(runner, meta)``: the kernel with the interpreter's config, or on a GPU the autotuner
    over the target's configs, one per (kernel, capability, b, F's tile cap, size buckets),
    built on first use."""
    if _common.interpret_flag():  # the kernels run on a GPU or in the interpreter
        return kernel, fp8_configs(name, block_size, ffn=ffn)[0]
    capability = torch.cuda.get_device_capability(device)
    configs = fp8_configs(name, block_size, capability, ffn=ffn)
    if len(configs) == 1:
        return kernel, configs[0]
    cache_key = (kernel, capability, block_size, up_tile_cap(ffn), key)
    tuned = _TUNED.get(cache_key)
    if tuned is None:
        tuned = triton.autotune(
            configs=[triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                                   num_stages=c["num_stages"]) for c in configs],
            key=[],
        )(kernel)
        _TUNED[cache_key] = tuned
    return tuned, {}


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
    if not _common.interpret_flag():  # on a GPU
        fp8_family(torch.cuda.get_device_capability(x.device))  # ValueError below sm_89
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
    row_slots, block_expert, _, _ = static_route(expert_indices, num_experts, block_size)
    hidden = _new((p_max, groups * ffn), dtype, device)
    y = out if top_k == 1 else _new((tokens * top_k, hidden_size), dtype, device)
    gw = weights if weights is not None else x  # a valid pointer, never read without HAS_WEIGHTS
    key = (_common.bucket(tokens * top_k), _common.bucket(hidden_size), _common.bucket(ffn))
    interpret = _common.interpret_flag()
    if ffn > 0:
        runner, meta = _runner(_up_fp8_kernel, "up", block_size, ffn, device, ("up", glu) + key)
        _common.launch(
            runner, lambda p: (p_max // p["BLOCK_M"], ffn // p["BLOCK_N"]),
            x, w1, w1_scale, b1 if b1 is not None else w1_scale, hidden, row_slots, block_expert,
            hidden_size, ffn, top_k, num_experts,
            x.stride(0), x.stride(1), *_strides3(w1), *_strides3(w1_scale), *_strides2(b1),
            hidden.stride(0), hidden.stride(1),
            device=device, BLOCK=block_size, GLU=glu, HAS_BIAS=b1 is not None, INTERPRET=interpret, **meta)
    runner, meta = _runner(_down_fp8_kernel, "down", block_size, ffn, device, ("down", glu) + key)
    _common.launch(
        runner, lambda p: (p_max // p["BLOCK_M"], triton.cdiv(hidden_size, p["BLOCK_N"])),
        hidden, w2, w2_scale, b2 if b2 is not None else w2_scale, gw, y, row_slots, block_expert,
        hidden_size, ffn, top_k, num_experts,
        hidden.stride(0), hidden.stride(1), *_strides3(w2), *_strides3(w2_scale), *_strides2(b2),
        *_strides2(weights), y.stride(0), y.stride(1),
        device=device, BLOCK=block_size, HAS_BIAS=b2 is not None, HAS_WEIGHTS=weights is not None, ACT=code,
        GLU=glu, INTERPRET=interpret, **meta)
    if top_k > 1:
        # A token's k slots are adjacent rows of y: a fixed-order sum, no atomics.
        torch.sum(y.view(tokens, top_k, hidden_size), dim=1, out=out)
    return out
