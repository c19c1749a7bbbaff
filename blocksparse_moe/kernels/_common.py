"""What every Triton kernel here shares: the dot helper, dot precision, launch configs.

* :func:`dot` is THE workaround for Triton's interpreter multiplying bf16 bit patterns in
  ``tl.dot`` (triton-lang/triton issue 11584): when the ``INTERPRET`` constexpr is set it
  upcasts bf16 (and fp16, harmless: the interpreter's matmul is numpy anyway) operands to
  fp32 first. Launchers pass ``INTERPRET=interpret_flag()``. On a GPU the branch is compiled
  away and the operands reach the tensor cores in their own dtype.
* :func:`input_precision` picks ``tl.dot``'s fp32 mode: ``"ieee"`` (true fp32) unless the user
  allowed TF32 for CUDA matmuls (``torch.backends.cuda.matmul.fp32_precision`` or the legacy
  ``allow_tf32``), the same switch that governs ``torch.matmul``. Only fp32 operands care.
* :func:`tile_configs` / :func:`launch_plan`: under the interpreter one small config (no
  autotune: the interpreter has no timer worth the name); on sm_90 (H100/H200) a few
  autotuned configs; elsewhere one sane default. Nothing here probes the device at import:
  autotuners are built on first launch and cached per (kernel, block size, device kind).

Tile sizes: ``BLOCK_M`` and ``BLOCK_N``/``BLOCK_K`` split the ``b x b`` blocks; a tile never
straddles two blocks, so every tile size that touches a block dimension divides ``b``
(all are powers of two and clipped to ``b``).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
import triton
import triton.language as tl

from .. import backend


@triton.jit
def dot(a, b, acc, INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in ``acc``'s dtype (fp32 here); see module docstring."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


def interpret_flag() -> bool:
    """The ``INTERPRET`` constexpr launchers pass to kernels that call :func:`dot`."""
    return backend.interpreter_enabled()


def tf32_allowed() -> bool:
    """Whether torch lets CUDA fp32 matmuls use TF32, through either of torch's two APIs.

    ``fp32_precision`` ("tf32" / "ieee", or "none" = defer to the legacy flag) is the newer
    one; reading the legacy ``allow_tf32`` raises once the newer API has been used.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: TF32 only for fp32 operands when torch allows TF32."""
    if dtype == torch.float32 and not interpret_flag() and tf32_allowed():
        return "tf32"
    return "ieee"


def check_launch_dtype(op: str, t: torch.Tensor, name: str) -> None:
    """The Triton kernels take fp32/fp16/bf16 (fp64 runs on the CPU path only)."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16 for the Triton kernels, got {t.dtype}")


# -- launch configurations ----------------------------------------------------------------
# A config is (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Which of the three tile
# sizes split a b x b block depends on the kernel, hence ``split``: the names clipped to b.

_SM90 = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 5),
]
_DEFAULT = (64, 64, 32, 4, 3)
_INTERPRETED = (32, 32, 32, 1, 1)  # small, but b >= 64 is split so the tiling is exercised


def _clip(cfg: Tuple[int, int, int, int, int], block_size: int, split: str) -> Dict[str, int]:
    bm, bn, bk, warps, stages = cfg
    sizes = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    for name in split:
        key = {"m": "BLOCK_M", "n": "BLOCK_N", "k": "BLOCK_K"}[name]
        sizes[key] = min(sizes[key], block_size)
    return {**sizes, "num_warps": warps, "num_stages": stages}


def tile_configs(block_size: int, split: str, device: torch.device) -> List[Dict[str, int]]:
    """Candidate configs for a kernel whose ``split`` tile sizes (subset of "mnk") divide b."""
    if interpret_flag() or device.type != "cuda":
        return [_clip(_INTERPRETED, block_size, split)]
    if torch.cuda.get_device_capability(device) == (9, 0):
        out: List[Dict[str, int]] = []
        for cfg in _SM90:
            c = _clip(cfg, block_size, split)
            if c not in out:
                out.append(c)
        return out
    return [_clip(_DEFAULT, block_size, split)]


_TUNED: Dict[tuple, object] = {}


def launch_plan(kernel, block_size: int, split: str, device: torch.device,
                key: List[str]) -> Tuple[Callable, Dict[str, int]]:
    """``(runner, meta)`` to launch ``kernel``: ``runner[grid](*args, **meta, **constexprs)``.

    With one candidate config the raw kernel runs with it; with several an autotuner over
    them (keyed on ``key`` plus the argument dtypes) is built once and reused. The grid
    must then be a function of the meta-parameters (``lambda meta: ...``).
    """
    configs = tile_configs(block_size, split, device)
    if len(configs) == 1:
        return kernel, dict(configs[0])
    cache_key = (kernel, block_size, split, torch.cuda.get_device_capability(device))
    tuned = _TUNED.get(cache_key)
    if tuned is None:
        tuned = triton.autotune(
            configs=[triton.Config({k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")},
                                   num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs],
            key=key,
        )(kernel)
        _TUNED[cache_key] = tuned
    return tuned, {}
