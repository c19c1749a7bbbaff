"""The FP8 format of the expert path (DeepSeek-V3 / Qwen3-FP8): block-scaled e4m3 weights,
per-token-group e4m3 activations.

Weights (``w [E, N, K]`` float8_e4m3fn, any strides, with ``scale [E, ceil(N/128),
ceil(K/128)]`` float32): element ``(n, k)`` of expert ``e`` is

    w[e, n, k] * scale[e, n // 128, k // 128]

``w1`` is ``[E, G*F, H]`` (``N = G*F``, ``K = H``); ``w2`` is seen as ``[E, F, H]`` (often the
``transpose(1, 2)`` view of a checkpoint's ``[E, H, F]`` ``down_proj``) and its scale is in
that ``[F, H]`` orientation, ``[E, ceil(F/128), ceil(H/128)]`` (the transposed view of the
checkpoint's ``[E, ceil(H/128), ceil(F/128)]`` ``down_proj_scale_inv``). The last block of a
dimension that is not a multiple of 128 is shorter. This is what checkpoints call
``weight_scale_inv``: the factor that *dequantizes*.

Activations (``x`` for the first product, ``a = act(g) * u`` for the second), ``v [T, K]``:
one scale per token and 1x128 group along the reduction dimension ``K`` (the last group
possibly shorter),

    s[t, j] = max(amax(|v[t, 128j : 128j + 128]|), 1e-4) / 448        (float32)
    q[t, k] = e4m3(v[t, k] / s[t, k // 128])                          (round to nearest even)

and ``v ~ q * s``. The floor 1e-4 is the DeepSeek-V3 / vLLM / DeepGEMM recipe's: an all-zero
group gets a finite scale. ``|v / s| <= 448`` up to one fp32 rounding of the division, and
torch's conversion maps ``(448, 464)`` to 448, so no value overflows.

These functions are the format's definition in code, used by the CPU back end and by
``DroplessMoE.to_fp8``; tests check them (and everything built on them) against references
written from the formulas above.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["FP8_DTYPE", "FP8_MAX", "GROUP", "ACTIVATION_SCALE_FLOOR", "WEIGHT_AMAX_FLOOR", "scale_shape",
           "quantize_weight_blockwise", "dequantize_weight_blockwise", "quantize_activation_groups",
           "dequantize_activation_groups", "fake_quantize_activation_groups"]

#: The storage dtype of weights and activations.
FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite e4m3fn value.
FP8_MAX = 448.0
#: Block edge of the weight scales and group length of the activation scales.
GROUP = 128
#: Activation groups: ``s = max(amax, 1e-4) / 448`` (the DeepSeek-V3 recipe).
ACTIVATION_SCALE_FLOOR = 1e-4
#: Weight blocks: ``scale = max(amax, 448 * 2**-126) / 448``. The floor only keeps an
#: all-zero block's scale positive and a *normal* float32 (>= 2**-126): such a block then
#: quantizes to zeros and dequantizes to zeros (no 0/0), and a subnormal scale, whose few
#: significant bits could push ``w / scale`` past 448, never occurs. Every non-zero block
#: keeps its full relative precision; a larger floor (the activations' 1e-4) would flush
#: blocks of tiny weights towards zero.
WEIGHT_AMAX_FLOOR = FP8_MAX * torch.finfo(torch.float32).tiny


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(num_experts: int, rows: int, cols: int) -> Tuple[int, int, int]:
    """``[E, ceil(N/128), ceil(K/128)]``: the block-scale shape of an ``[E, N, K]`` weight."""
    return num_experts, _cdiv(rows, GROUP), _cdiv(cols, GROUP)


def _blocked(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[E, N, K]`` zero-padded to multiples of 128 and viewed ``[E, N/128, 128, K/128, 128]``."""
    e = t.shape[0]
    nb, kb = _cdiv(rows, GROUP), _cdiv(cols, GROUP)
    if rows % GROUP or cols % GROUP:
        t = torch.nn.functional.pad(t, (0, kb * GROUP - cols, 0, nb * GROUP - rows))
    return t.reshape(e, nb, GROUP, kb, GROUP)


def _expand_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[E, N, K]`` with ``scale[e, n // 128, k // 128]`` at ``(e, n, k)`` (a fresh tensor)."""
    return scale.repeat_interleave(GROUP, dim=1)[:, :rows].repeat_interleave(GROUP, dim=2)[:, :, :cols]


def quantize_weight_blockwise(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(w_fp8 [E, N, K] float8_e4m3fn, scale [E, ceil(N/128), ceil(K/128)] float32)``.

    ``scale = max(amax of the 128x128 block, WEIGHT_AMAX_FLOOR) / 448`` and
    ``w_fp8 = e4m3(w / scale)`` (round to nearest even), so each block's largest magnitude
    maps to 448. ``w``: any float dtype and strides; computed in float32; ``w_fp8`` is
    contiguous. Memory: a few float32 copies of ``w`` (quantize on the CPU expert by expert
    for very large stacks).
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 3:
        raise TypeError(f"quantize_weight_blockwise: w must be a float [E, N, K] tensor, got "
                        f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    if w.dtype == FP8_DTYPE:
        raise TypeError("quantize_weight_blockwise: w is already float8_e4m3fn")
    e, rows, cols = w.shape
    wf = w.to(torch.float32)
    blocks = _blocked(wf, rows, cols)
    amax = blocks.abs().amax(dim=(2, 4)) if wf.numel() else wf.new_zeros(scale_shape(e, rows, cols))
    scale = amax.clamp(min=WEIGHT_AMAX_FLOOR) / FP8_MAX
    q = (wf / _expand_scale(scale, rows, cols)).to(FP8_DTYPE)
    return q.contiguous(), scale.contiguous()


def dequantize_weight_blockwise(w: torch.Tensor, scale: torch.Tensor,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w[e, n, k] * scale[e, n // 128, k // 128]`` as a fresh ``[E, N, K]`` tensor of ``dtype``
    (computed in float32, rounded once). ``w``: float8_e4m3fn, any strides (a transposed view
    of the storage included); ``scale`` in ``w``'s orientation."""
    _, rows, cols = w.shape
    return (w.to(torch.float32) * _expand_scale(scale.to(torch.float32), rows, cols)).to(dtype)


def quantize_activation_groups(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(q [T, K] float8_e4m3fn, s [T, ceil(K/128)] float32)``: per-token 1x128 groups along
    the last dimension, ``s = max(amax, 1e-4) / 448``, ``q = e4m3(v / s)``, computed in
    float32 from ``v`` of any float dtype and strides."""
    t, k = v.shape
    groups = _cdiv(k, GROUP)
    vf = v.to(torch.float32)
    padded = torch.nn.functional.pad(vf, (0, groups * GROUP - k)) if k % GROUP else vf
    amax = padded.reshape(t, groups, GROUP).abs().amax(dim=2) if padded.numel() else vf.new_zeros(t, groups)
    s = amax.clamp(min=ACTIVATION_SCALE_FLOOR) / FP8_MAX
    q = (vf / s.repeat_interleave(GROUP, dim=1)[:, :k]).to(FP8_DTYPE)
    return q, s


def dequantize_activation_groups(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``q[t, k] * s[t, k // 128]`` in float32 (``[T, K]``)."""
    k = q.shape[1]
    return q.to(torch.float32) * s.repeat_interleave(GROUP, dim=1)[:, :k]


def fake_quantize_activation_groups(v: torch.Tensor) -> torch.Tensor:
    """``dequantize(quantize(v))`` in float32: the values the fp8 products see for ``v``."""
    return dequantize_activation_groups(*quantize_activation_groups(v))
