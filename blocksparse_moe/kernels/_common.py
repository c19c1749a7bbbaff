"""What every Triton kernel here shares: the dot helper, dot precision, launch configs.

* :func:`dot` is THE workaround for Triton's interpreter multiplying bf16 bit patterns in
  ``tl.dot`` (triton-lang/triton issue 11584): when the ``INTERPRET`` constexpr is set it
  upcasts bf16 (and fp16, harmless: the interpreter's matmul is numpy anyway) operands to
  fp32 first. :meth:`Tiles.constexprs` passes ``INTERPRET=interpret_flag()``. On a GPU the
  branch is compiled away and the operands reach the tensor cores in their own dtype.
* :func:`input_precision` picks ``tl.dot``'s fp32 mode: ``"ieee"`` (true fp32) unless the user
  allowed TF32 for CUDA matmuls (``torch.backends.cuda.matmul.fp32_precision`` or the legacy
  ``allow_tf32``), the same switch that governs ``torch.matmul``. Only fp32 operands care.
* :func:`launch` is how every launcher starts a kernel: under the device guard of its
  tensors (Triton launches on the *current* device and stream, so a layer on cuda:1 would
  otherwise run on cuda:0), and for the tiled products (:class:`Tiles`) with the configs
  of :func:`tile_configs`: one small config under the interpreter (its timer is worth
  nothing); on a GPU the candidates of the target's table (sm_80, sm_90, sm_100) for the
  operand class (fp16/bf16, TF32, true fp32, fp8 e4m3), autotuned. Nothing here probes the device at
  import: autotuners are built on first launch, one per (kernel, capability, Tiles, input
  precision). ``tile_configs(..., capability=(9, 0))`` answers for a target without a GPU:
  the compile test (tests/compile_targets.py) compiles exactly those.

Tile sizes: ``BLOCK_M`` and ``BLOCK_N``/``BLOCK_K`` split the ``b x b`` blocks; a tile never
straddles two blocks, so every tile size that touches a block dimension divides ``b``
(all are powers of two and clipped to ``b``).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..interpreter import interpreter_enabled


@triton.jit
def dot(a, b, acc, INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in ``acc``'s dtype (fp32 here); see module docstring."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


def interpret_flag() -> bool:
    """The ``INTERPRET`` constexpr launchers pass to kernels that call :func:`dot`."""
    return interpreter_enabled()


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
# Tables per target family and operand class; every entry compiles for its target without
# register spills and within its shared memory (tests/test_compile_targets.py checks it,
# bench/results/compile-sm*.md lists registers and shared bytes per variant).
#
# Operand classes: "half" (fp16/bf16 on the tensor cores), "fp8" (e4m3, last below), "tf32"
# (fp32 operands on the tensor cores: 4-byte tiles, so half the BLOCK_K of "half" for the
# same shared memory) and "fp32" (true fp32, torch's default: tl.dot runs as FMAs on the
# CUDA cores, where the operand tiles live in registers next to the accumulator, hence much
# smaller tiles; the 64x32 / 32x64 tiles spilled 8-16 bytes with 3 stages in some operand
# layouts, and 64x32 clipped to 32x32x16 in the merged small-block sdd still did with 2,
# so it is gone).
# TF32 tiles of 128 columns take 8 warps on sm_90: the merged small-block sdd, which
# transposes both operands, reached 255 registers with 4.
_CONFIGS: Dict[Tuple[str, str], List[Tuple[int, int, int, int, int]]] = {
    ("sm80", "half"): [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
                       (64, 64, 64, 4, 3)],
    ("sm80", "tf32"): [(128, 64, 16, 4, 4), (64, 128, 16, 4, 4), (64, 64, 32, 4, 3), (64, 64, 16, 4, 4)],
    ("sm80", "fp32"): [(64, 64, 16, 4, 3), (32, 64, 16, 4, 2), (32, 32, 32, 4, 2)],
    ("sm90", "half"): [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                       (64, 64, 64, 4, 4), (64, 64, 32, 4, 5)],
    ("sm90", "tf32"): [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 8, 4), (64, 64, 32, 4, 4)],
    ("sm90", "fp32"): [(64, 64, 16, 4, 3), (32, 64, 16, 4, 2), (32, 32, 32, 4, 2)],
    # tcgen05 keeps the accumulator in tensor memory, but a 128x128 fp32 tile with 4 warps
    # still spills on its way out (24 bytes, TF32 dsd): 8 warps there.
    ("sm100", "half"): [(128, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                        (64, 64, 64, 4, 4)],
    ("sm100", "tf32"): [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)],
    ("sm100", "fp32"): [(64, 64, 16, 4, 3), (32, 64, 16, 4, 2), (32, 32, 32, 4, 2)],
    # "fp8": e4m3 x e4m3 (kernels/experts_fp8.py, its up and down kernels share a table).
    # BLOCK_K is fixed at 128, one quantization group. What limits the tiles is what each
    # thread holds beside the accumulators: the [BLOCK_M, 128] fp32 tile of x (up) or of g,
    # u and a (down) that is quantized in registers. sm80 here means sm_89 (Ada) and sm_120:
    # fp8 mma.sync, 99 KiB of shared memory. No 32-row entry on sm_90/sm_100: at b >= 64 the
    # row tile is wgmma's (tcgen05's) M side, which needs 64. Left out because they spill
    # (8 to 488 bytes) under Triton 3.9 or 3.6 in one of the two kernels: 128x128 (sm_90,
    # sm_100), 128x64 (sm_89, sm_100), 64x128 on sm_100 (every warp and stage count), 4 warps
    # on 64x128 (sm_90) and on 64x64 (sm_89, sm_100), 32x64 (sm_89: 8 bytes, 4 or 8 warps).
    ("sm80", "fp8"): [(64, 64, 128, 8, 3), (64, 128, 128, 8, 2)],
    ("sm90", "fp8"): [(128, 64, 128, 8, 3), (64, 128, 128, 8, 3), (64, 128, 128, 8, 4), (64, 64, 128, 4, 4)],
    ("sm100", "fp8"): [(64, 64, 128, 8, 4), (64, 64, 128, 8, 3)],
}
# Configs ptxas spills for one kernel on one target, dropped from that kernel's candidates
# there: (kernel function, family, operand class) -> configs as compiled (after clipping and
# the warp/K bounds). ptxas's choice to spill 8 to 48 bytes is not monotone in the tile (one
# more stage or warp, or one fewer, compiles clean: bench/compile_report.py's full sweep,
# Triton 3.6 or 3.9 or both), so the table entries stay and these variants go; removing a
# candidate never changes how the others compile. Every list keeps at least one config
# (tile_configs raises otherwise; the compile test records every launch).
_SPILLING: Dict[Tuple[str, str, str], Tuple[Tuple[int, int, int, int, int], ...]] = {
    ("_act_bwd_kernel", "sm80", "half"): ((16, 64, 32, 8, 4),),
    ("_act_bwd_kernel", "sm80", "fp32"): ((16, 32, 32, 8, 2), (32, 32, 32, 8, 2)),
    ("_act_bwd_kernel", "sm100", "half"): ((16, 64, 64, 8, 4), (32, 64, 64, 8, 3), (64, 64, 64, 8, 3)),
    ("_act_bwd_kernel", "sm100", "tf32"): ((64, 32, 32, 8, 3),),
    ("_down_kernel", "sm100", "half"): ((128, 128, 64, 4, 3),),
    ("_down_kernel", "sm100", "tf32"): ((64, 128, 32, 8, 3),),
    ("_dsd_kernel", "sm80", "half"): ((32, 64, 32, 4, 3), (32, 128, 32, 8, 3)),
    ("_dsd_kernel", "sm100", "tf32"): ((32, 128, 32, 4, 4), (64, 64, 32, 4, 4), (64, 128, 32, 8, 3)),
    ("_sdd_merged_kernel", "sm80", "half"): ((16, 64, 64, 4, 3), (32, 128, 32, 4, 4)),
    ("_sdd_merged_kernel", "sm80", "fp32"): ((32, 64, 16, 4, 2),),
    ("_sdd_merged_kernel", "sm100", "fp32"): ((32, 64, 16, 4, 2),),
    ("_wgrad_kernel", "sm80", "half"): ((64, 128, 16, 4, 4), (64, 128, 32, 4, 4)),
    ("_wgrad_kernel", "sm80", "fp32"): ((32, 64, 16, 8, 2), (64, 64, 16, 8, 3)),
    ("_wgrad_kernel", "sm100", "half"): ((128, 128, 16, 8, 4), (128, 128, 32, 8, 4)),
    ("_wgrad_kernel", "sm100", "tf32"): ((64, 64, 16, 4, 4), (64, 64, 32, 4, 4), (64, 128, 32, 4, 4)),
}
_INTERPRETED = (32, 32, 32, 1, 1)  # small, but b >= 64 is split so the tiling is exercised
# fp8: BLOCK_K is the 128-wide quantization group; b = 64 still splits into two row tiles.
_INTERPRETED_FP8 = (32, 32, 128, 1, 1)
# From which compute capability a GPU has fp8 tensor cores (sm_89 Ada; the ops layer's
# checks.FP8_MIN_CAPABILITY says the same: kernels/ does not import checks).
FP8_MIN_CAPABILITY = (8, 9)


def target_family(capability: Tuple[int, int]) -> str:
    """The config table of a GPU: sm80 (Ampere, Ada, and consumer Blackwell sm_120, which
    have mma.sync but neither wgmma nor tcgen05), sm90 (Hopper: wgmma), sm100 (datacenter
    Blackwell: tcgen05)."""
    major = capability[0]
    if major == 9:
        return "sm90"
    if major in (10, 11):
        return "sm100"
    return "sm80"


def operand_class(dtype: torch.dtype, tf32: bool) -> str:
    """"half", "tf32", "fp32" or "fp8" (float8_e4m3fn operands): see the config tables above."""
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    if dtype == torch.float8_e4m3fn:
        return "fp8"
    return "half"


def config_family(capability: Tuple[int, int], cls: str) -> str:
    """:func:`target_family` for operand class ``cls``; a ValueError for fp8 below sm_89 (no fp8
    tensor cores: no table, and no silent fallback). For fp8 the sm80 family is sm_89 Ada
    (and sm_120): fp8 mma.sync."""
    if cls == "fp8" and tuple(capability) < FP8_MIN_CAPABILITY:
        raise ValueError(f"fp8 experts need fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell); "
                         f"this GPU is sm_{capability[0]}{capability[1]}")
    return target_family(capability)


def _clip(cfg: Tuple[int, int, int, int, int], block_size: int, split: str,
          caps: Tuple[int, int, int] = (0, 0, 0)) -> Dict[str, int]:
    bm, bn, bk, warps, stages = cfg
    sizes = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    for name in split:
        key = {"m": "BLOCK_M", "n": "BLOCK_N", "k": "BLOCK_K"}[name]
        sizes[key] = min(sizes[key], block_size)
    for key, cap in zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), caps):
        if cap:
            sizes[key] = min(sizes[key], cap)
    return {**sizes, "num_warps": warps, "num_stages": stages}


def tile_configs(block_size: int, split: str, device: Optional[torch.device] = None, *, min_warps: int = 1,
                 dtype: torch.dtype = torch.bfloat16, tf32: bool = False,
                 capability: Optional[Tuple[int, int]] = None,
                 caps: Tuple[int, int, int] = (0, 0, 0), fma: Tuple[int, int] = (0, 0),
                 kernel: str = "") -> List[Dict[str, int]]:
    """Candidate configs for a kernel whose ``split`` tile sizes (subset of "mnk") divide b.

    ``caps`` bounds ``(BLOCK_M, BLOCK_N, BLOCK_K)`` each on its own (0: no bound): for
    kernels whose tile sizes must divide different things (the fused expert path's row tile
    divides the row padding ``b``, its column tiles divide ``F``). ``fma`` raises the true-fp32
    configs (CUDA-core FMAs, operand class "fp32") to at least ``(BLOCK_K, num_warps)``
    (0: no bound), for a kernel whose fp32 variants ptxas otherwise spills. ``kernel`` (its
    function's name, :func:`kernel_name`) drops the configs :data:`_SPILLING` lists for it.

    With ``capability`` (e.g. ``(9, 0)``) the answer is the list for that target, computed
    without a GPU (the compile test asks this for sm_80/sm_90/sm_100). Otherwise it is for
    ``device``: one small config under the interpreter or on a CPU tensor, else the
    autotune candidates of the device's capability.
    """
    cls = operand_class(dtype, tf32)
    if capability is None:
        if interpret_flag() or device is None or device.type != "cuda":
            return [_clip(_INTERPRETED_FP8 if cls == "fp8" else _INTERPRETED, block_size, split, caps)]
        capability = torch.cuda.get_device_capability(device)
    family = config_family(capability, cls)
    spilling = _SPILLING.get((kernel, family, cls), ())
    out: List[Dict[str, int]] = []
    for cfg in _CONFIGS[(family, cls)]:
        c = _clip(cfg, block_size, split, caps)
        c["num_warps"] = max(c["num_warps"], min_warps)
        if cls == "fp32":  # never past what BLOCK_K must divide (b with a "k" split, its cap)
            k_limit = min(block_size if "k" in split else fma[0], caps[2] or fma[0])
            c["BLOCK_K"] = max(c["BLOCK_K"], min(fma[0], k_limit))
            c["num_warps"] = max(c["num_warps"], fma[1])
        if c not in out and _as_tuple(c) not in spilling:  # clipping to a small b makes entries equal
            out.append(c)
    if not out:
        raise RuntimeError(f"tile_configs: every {family} {cls} config of {kernel} for b={block_size}, split "
                           f"{split!r}, caps {caps} is listed in _SPILLING; list fewer or add a table entry")
    return out


def _as_tuple(c: Dict[str, int]) -> Tuple[int, int, int, int, int]:
    return (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"])


def kernel_name(kernel) -> str:
    """The name of a Triton kernel's Python function (``"_dsd_kernel"``), whether ``kernel``
    is a ``JITFunction``, the interpreter's wrapper or the function: the key of :data:`_SPILLING`
    (``""`` for anything else)."""
    return getattr(getattr(kernel, "fn", kernel), "__name__", "")


def bucket(n: int) -> int:
    """An autotune key for a size: the next power of two, so a size seen first (the first
    tiny batch) does not fix the config for every larger one, and sizes within a factor
    of two share one tuning run."""
    return triton.next_power_of_2(max(int(n), 1))


def token_class(slots: int) -> int:
    """An autotune key for the routed rows of an expert-path call (``T*k``): the next power of
    two, clamped to [16, 8192]. Decode steps (a few rows per expert) and prefills (hundreds)
    want different tiles, so a first 1-token call must not fix the tiles of every later
    prefill; past 8192 rows the best tiles no longer change with the count."""
    return min(max(bucket(slots), 16), 8192)


@dataclass(frozen=True)
class Tiles:
    """How a tiled product kernel (one that calls :func:`dot`) is launched.

    ``split``: the tile sizes clipped to ``block_size``; ``dtype``: the operands', which
    with torch's TF32 switch picks the config table; ``key``: what else separates calls that
    want different tiles (the launcher's transposition flags and size buckets). Autotuners
    are built per (kernel, capability, Tiles, input precision): that tuple IS the autotune key.
    """

    split: str
    block_size: int
    dtype: torch.dtype
    key: tuple = ()
    # Kernels whose epilogue holds several fp32 tiles at once (the fused expert path) ask
    # for at least this many warps: the same tile over more threads, fewer registers each.
    min_warps: int = 1
    # Per-size bounds (BLOCK_M, BLOCK_N, BLOCK_K), 0 = none: see tile_configs.
    caps: Tuple[int, int, int] = (0, 0, 0)
    # Lower bounds (BLOCK_K, num_warps) of the true-fp32 configs only, 0 = none: see tile_configs.
    fma: Tuple[int, int] = (0, 0)

    def constexprs(self) -> Dict[str, object]:
        """The constexprs :func:`dot` reads, for the current process (interpreter or GPU)."""
        return {"INTERPRET": interpret_flag(), "INPUT_PRECISION": input_precision(self.dtype)}

    def candidates(self, kernel: str, precision: str, device: Optional[torch.device] = None,
                capability: Optional[Tuple[int, int]] = None) -> List[Dict[str, int]]:
        """:func:`tile_configs` of this plan for ``kernel`` (:func:`kernel_name`) at input
        ``precision`` ("tf32" or "ieee"), on ``device`` or for ``capability``."""
        return tile_configs(self.block_size, self.split, device, dtype=self.dtype, tf32=precision == "tf32",
                            capability=capability, min_warps=self.min_warps, caps=self.caps, fma=self.fma,
                            kernel=kernel)

    def variants(self, capability: Tuple[int, int], kernel: str = "") -> List[Dict[str, object]]:
        """Every (constexprs + num_warps/num_stages) a launch of ``kernel`` (:func:`kernel_name`)
        would compile on a GPU of ``capability``: each config of the target's table, and for
        fp32 both with and without TF32 (torch's switch decides at launch time). For the AOT
        compile test."""
        out = []
        for tf32 in ((False, True) if self.dtype == torch.float32 else (False,)):
            precision = "tf32" if tf32 else "ieee"
            for cfg in self.candidates(kernel, precision, capability=capability):
                out.append({**cfg, "INTERPRET": False, "INPUT_PRECISION": precision})
        return out


_TUNED: Dict[tuple, object] = {}


def _runner(kernel, tiles: Tiles, device: torch.device, precision: str) -> Tuple[Callable, Dict[str, int]]:
    """``(runner, meta)``: the raw kernel with its one config, or the autotuner of this
    launch's key over the target's candidates (built on first use, then reused)."""
    configs = tiles.candidates(kernel_name(kernel), precision, device)
    if len(configs) == 1 or torch.are_deterministic_algorithms_enabled():
        # Deterministic mode: the tiles come from the table (its first entry), not from a
        # timing run, so two processes or two ranks compute with the same tiles and give
        # bitwise-equal results (the autotuner's pick can differ from run to run).
        return kernel, dict(configs[0])
    return _autotuner(kernel, tuple(torch.cuda.get_device_capability(device)), tiles, precision, configs), {}


def _config(c: Dict[str, int]) -> "triton.Config":
    return triton.Config({k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}, num_warps=c["num_warps"],
                         num_stages=c["num_stages"])


def _autotuner(kernel, capability: Tuple[int, int], tiles: Tiles, precision: str, configs: List[Dict[str, int]]):
    cache_key = (kernel, capability, tiles, precision)
    tuned = _TUNED.get(cache_key)
    if tuned is None:
        # key=[]: the autotuner tunes once; which calls share it is decided by cache_key.
        tuned = triton.autotune(configs=[_config(c) for c in configs], key=[])(kernel)
        _TUNED[cache_key] = tuned
    return tuned


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device, a no-op otherwise. Triton launches on
    the current CUDA device and its current stream, so without it a tensor on cuda:1 is
    handed to a kernel running on cuda:0."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# What the launch now in progress would try on other targets (read by the compile test's
# launch recorder, tests/compile_targets.py, which sees every Triton launch; a launch made
# without :func:`launch` is reported there as unguarded).
_LAUNCHING: contextvars.ContextVar = contextvars.ContextVar("blocksparse_moe_launching", default=None)


def launch(kernel, grid, *args, device: torch.device, tiles: Optional[Tiles] = None, **kwargs) -> None:
    """THE way every launcher here starts a Triton kernel: ``kernel[grid](*args, **kwargs)``
    under ``device``'s guard.

    With ``tiles`` (a tiled product) the tile sizes, num_warps/num_stages and the
    constexprs of :func:`dot` come from the plan (autotuned on a GPU, one config under the
    interpreter), and ``grid`` must be a function of the meta-parameters. Without, the
    caller passes its constexprs and ``num_warps`` itself.
    """
    if tiles is not None:
        extra = tiles.constexprs()
        runner, meta = _runner(kernel, tiles, device, extra["INPUT_PRECISION"])
        kwargs = {**kwargs, **extra, **meta}
    else:
        runner = kernel
    token = _LAUNCHING.set(tiles if tiles is not None else "fixed")
    try:
        with device_guard(device):
            runner[grid](*args, **kwargs)
    finally:
        _LAUNCHING.reset(token)


def launch_plan(kernel, block_size: int, split: str, device: torch.device,
                key: List[str]) -> Tuple[Callable, Dict[str, int]]:
    """Deprecated: the pre-``launch`` interface (no device guard, bf16 configs); kept so
    code written against it still runs. Use :func:`launch` with :class:`Tiles`."""
    del key
    return _runner(kernel, Tiles(split, block_size, torch.bfloat16), device, "ieee")
