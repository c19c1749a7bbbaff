"""Jit helpers of the fused expert kernels (``experts.py``, ``experts_fp8.py``, ``expert_wgrad.py``):
the activations with their derivatives, the orientation of a row tile, and the grouped launch
order of a 2-D grid (:data:`GROUP`, :func:`_grouped`).

A row-tiled kernel multiplies a tile of rows (tokens, padded per expert to ``b``) by a tile of
columns. With ``SWAP`` it computes the transposed product instead, so that the rows sit on the
MMA's N side: wgmma needs 64 rows per warpgroup on M but takes N from 8, so a row padding of 16
or 32 still runs on wgmma with the 64- or 128-wide column tile on M (``experts.swap_rows``).
:func:`_grid2`, :func:`_rows`, :func:`_cols`, :func:`_acc`, :func:`_mma`, :func:`_row_sum` and
:func:`_row_max` write every load, mask, product and reduction once for both orientations.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _common


# Consecutive CTAs (the GPU starts them blockIdx.x fastest) walk GROUP row tiles for every
# column tile before the next band of rows: the band's rows (gathered x, dout, a or dh) and the
# column tiles' weights stay in L2 while a band is in flight, instead of every row being
# re-read once per column tile when a sweep of all rows outgrows L2 (the "before" table of
# bench/results/traffic-before.md: 1.2-2x the unique bytes at the scaled shapes, more at
# full size). The grids keep their 2-D shape (rows on axis 0), each CTA remaps its id.
# (A tl.constexpr: the GPU compiler takes no other Python global inside jitted code.)
GROUP = tl.constexpr(8)


@triton.jit
def _grouped(lin, n_rows, n_cols, GROUP):  # GROUP: a constexpr or a runtime value
    """``(row tile, column tile)`` of the ``lin``-th CTA in launch order, in bands of GROUP
    row tiles (the last band shorter), each band column-tile by column-tile."""
    per_band = GROUP * n_cols
    first = (lin // per_band) * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    return first + (lin % per_band) % size, (lin % per_band) // size


@triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    """``(act(x), act'(x))`` in fp32; ACT indexes ``ACTIVATIONS``. Constants are literals:
    the GPU compiler rejects Python globals inside jitted code."""
    if ACT == 0:  # silu
        s = tl.sigmoid(x)
        y = x * s
        dy = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:  # gelu (erf): x * Phi(x)
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        y = x * cdf
        dy = cdf + x * (tl.exp(-0.5 * x * x) * 0.3989422804014327)
    elif ACT == 2:  # gelu_tanh; tanh(z) = 2 sigmoid(2z) - 1 (no libdevice, runs interpreted)
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        y = 0.5 * x * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    else:  # relu
        pos = x > 0.0
        y = tl.where(pos, x, 0.0)
        dy = tl.where(pos, 1.0, 0.0)
    return y, dy


@triton.jit
def _grid2(r, c, SWAP: tl.constexpr):
    """``(r, c)`` as broadcastable 2-D indices of a rows-by-columns tile: ``r`` down dim 0 and
    ``c`` along dim 1, or the transposed tile (SWAP: ``c`` down dim 0, ``r`` along dim 1).
    Every load, mask and store of a row-tiled kernel goes through it, so one body computes
    either orientation."""
    if SWAP:
        return r[None, :], c[:, None]
    else:
        return r[:, None], c[None, :]


@triton.jit
def _cols(v, SWAP: tl.constexpr):
    """A per-column vector broadcast over a tile of :func:`_grid2`'s orientation."""
    if SWAP:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _rows(v, SWAP: tl.constexpr):
    """A per-row vector broadcast over a tile of :func:`_grid2`'s orientation."""
    if SWAP:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _mma(a, b, acc, SWAP: tl.constexpr, INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` for a rows-by-K tile ``a`` and a K-by-columns tile ``b`` loaded through
    :func:`_grid2`. With SWAP the tiles are ``a^T`` and ``b^T`` and the product is computed
    transposed, ``acc^T + b^T @ a^T``: the rows (tokens) sit on the MMA's N side, which wgmma
    allows from 8, while its M side needs 64. A row padding of 16 or 32 rows then still runs
    on wgmma with 64- or 128-wide column tiles on M."""
    if SWAP:
        return _common.dot(b, a, acc, INTERPRET, INPUT_PRECISION)
    else:
        return _common.dot(a, b, acc, INTERPRET, INPUT_PRECISION)


@triton.jit
def _acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    if SWAP:
        return tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


@triton.jit
def _row_sum(v, SWAP: tl.constexpr):
    """Sum over the columns of a tile of :func:`_grid2`'s orientation: one value per row."""
    if SWAP:
        return tl.sum(v, axis=0)
    else:
        return tl.sum(v, axis=1)


@triton.jit
def _row_max(v, SWAP: tl.constexpr):
    """The maximum over the columns of a tile of :func:`_grid2`'s orientation: one value per row
    (the fp8 path's per-row amax of a quantization group)."""
    if SWAP:
        return tl.max(v, axis=0)
    else:
        return tl.max(v, axis=1)


@triton.jit
def _tokens(slots, ok, TOP_K):
    """``(slot, token)`` of a tile's rows, int64 for the address products (0 on padding rows).
    The division runs on the int32 slots (< T*k <= int32 max): a 64-bit division by a runtime
    value is a ptxas subroutine that costs registers (spills under Triton 3.6)."""
    s = tl.where(ok, slots, 0)
    return s.to(tl.int64), (s // TOP_K).to(tl.int64)
