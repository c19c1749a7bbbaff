"""The one vocabulary of argument checks: ops, kernel launchers and the CPU path all call it.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape,
device, range, layout) naming the operation and the argument as the *caller* passed it, e.g.
``sdd: a has 96 columns but b has 128 rows``. None of them reads tensor data: a check that
did would synchronise a GPU. Public ops check everything; launchers re-check only what
would make a kernel touch memory out of bounds (shapes, strides, dtypes of buffers).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

import torch

from . import backend

#: dtypes the Triton kernels take; the CPU back end also runs float64 (gradcheck).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = KERNEL_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int32, torch.int64)


def float_dtypes(t: torch.Tensor) -> Tuple[torch.dtype, ...]:
    """The float dtypes the back end that runs ``t`` supports."""
    return CPU_DTYPES if backend.select(t) == "cpu" else KERNEL_DTYPES


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(op: str, name: str, t, *, optional: bool = False) -> None:
    """``t`` is a tensor on a supported device (or None when ``optional``)."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} is on unsupported device '{t.device}' (cpu or cuda)")


def float_tensor(op: str, name: str, t, *, optional: bool = False) -> None:
    """``t`` is a float tensor of a dtype that the back end running it supports."""
    tensor(op, name, t, optional=optional)
    if t is None:
        return
    allowed = float_dtypes(t)
    if t.dtype not in allowed:
        where = "" if backend.select(t) == "cpu" else " (float64 runs on the CPU path only)"
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported here: {_names(allowed)}{where}")


def kernel_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """Launcher guard: the Triton kernels take fp32/fp16/bf16 only."""
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: {name} must be {_names(KERNEL_DTYPES)} for the Triton kernels, got {t.dtype}")


def same_dtype(op: str, named: Sequence[Tuple[str, Optional[torch.Tensor]]]) -> None:
    """Every (name, tensor) pair has the first one's dtype (None entries are skipped)."""
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {first_name} is {first.dtype} but {name} is {t.dtype}")


def same_device(op: str, named: Sequence[Tuple[str, Optional[torch.Tensor]]]) -> None:
    """Every (name, tensor) pair is on the first one's device (None entries are skipped)."""
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {first_name} is on {first.device} but {name} is on {t.device}")


def dims(op: str, name: str, t: torch.Tensor, allowed: Sequence[int], shape_doc: str) -> None:
    """``t.dim()`` is one of ``allowed``; ``shape_doc`` says what was expected, e.g. "[T, H]"."""
    if t.dim() not in allowed:
        raise ValueError(f"{op}: {name} must be {shape_doc}, got shape {tuple(t.shape)}")


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], doc: str = "") -> None:
    """``t`` has exactly the shape ``expected`` (``doc`` names its symbols, e.g. "[T, k]")."""
    if tuple(t.shape) != tuple(expected):
        what = f"{doc} = " if doc else ""
        raise ValueError(f"{op}: {name} must be {what}{list(expected)}, got {list(t.shape)}")


def unit_last_stride(op: str, name: str, t: torch.Tensor) -> None:
    """Launcher guard: the kernels address the last dimension with stride 1."""
    if t.dim() >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have unit stride along its last dimension, got shape "
                         f"{tuple(t.shape)} strides {t.stride()}")


def index_vector(op: str, name: str, t: torch.Tensor, n: int) -> None:
    """Launcher guard: a contiguous int32 vector of ``n`` entries."""
    if t.dtype != torch.int32 or t.dim() != 1 or t.numel() != n or not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be a contiguous int32 vector of {n} entries, "
                         f"got {t.dtype} shape {tuple(t.shape)}")


def ids_in_range(op: str, name: str, ids: torch.Tensor, n: int) -> None:
    """Every value of ``ids`` (on the host: CPU tensors) lies in ``[0, n)``, else a ``ValueError``
    with the range found. One read of the data: GPU callers check on the device instead
    (``routing.checked_expert_ids``)."""
    if ids.numel():
        lo, hi = torch.stack(list(torch.aminmax(ids))).tolist()
        if lo < 0 or hi >= n:
            raise ValueError(f"{op}: {name} must lie in [0, {n}), got values in [{lo}, {hi}]")


def out_buffer(op: str, out: Optional[torch.Tensor], shape_: Sequence[int], dtype: torch.dtype,
               device: torch.device, *, contiguous: bool = False) -> torch.Tensor:
    """``out`` if it fits (shape, dtype, device, and contiguity when asked), else a new one if None."""
    if out is None:
        return torch.empty(tuple(shape_), dtype=dtype, device=device)
    if (tuple(out.shape) != tuple(shape_) or out.dtype != dtype or out.device != device
            or (contiguous and not out.is_contiguous())):
        kind = "a contiguous " if contiguous else ""
        raise ValueError(f"{op}: out must be {kind}{dtype} of shape {tuple(shape_)} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def int_arg(op: str, name: str, v, *, minimum: Optional[int] = None) -> None:
    """``v`` is an int (not a bool), at least ``minimum``."""
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v}")


def check_float(owner: str, name: str, value, *, low: float = -math.inf, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> float:
    """``float(value)`` once it is a finite real number in the range; else a ``TypeError``
    (not a number) or ``ValueError`` naming ``owner`` and the argument ``name``.

    ``low``/``high`` bound the range, inclusive unless ``low_open``/``high_open``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    v = float(value)
    below = v <= low if low_open else v < low
    above = v >= high if high_open else v > high
    if not math.isfinite(v) or below or above:
        lo = "-inf" if low == -math.inf else f"{low:g}"
        hi = "inf" if high == math.inf else f"{high:g}"
        opening = "(" if low_open or low == -math.inf else "["
        closing = ")" if high_open or high == math.inf else "]"
        span = f"{opening}{lo}, {hi}{closing}"
        raise ValueError(f"{owner}: {name} must be a finite number in {span}, got {value!r}")
    return v


def top_k_weights(op: str, weights, data_name: str, data: torch.Tensor, tokens: int, top_k: int) -> None:
    """Router weights ``[T, k]``, None, or a tensor in the data's dtype or float32 on its device."""
    if weights is None:
        return
    tensor(op, "weights", weights)
    if weights.dtype not in (data.dtype, torch.float32):
        raise TypeError(f"{op}: weights must have {data_name}'s dtype ({data.dtype}) or float32, got {weights.dtype}")
    same_device(op, ((data_name, data), ("weights", weights)))
    shape(op, "weights", weights, (tokens, top_k), "[T, k]")


def choice(op: str, name: str, v, options: Sequence) -> None:
    """``v`` is one of ``options``."""
    if v not in options:
        raise ValueError(f"{op}: {name} must be one of {tuple(options)}, got {v!r}")


# -- FP8 expert weights (blocksparse_moe/fp8.py's format) --------------------------------

#: Compute capability from which a GPU has fp8 tensor cores (sm_89 Ada, sm_90 Hopper, sm_100 ...).
FP8_MIN_CAPABILITY = (8, 9)


def fp8_activation_dtypes(t: torch.Tensor) -> Tuple[torch.dtype, ...]:
    """The dtypes of ``x`` the fp8 expert path takes: bf16/fp16 (the kernels' operands), and
    float32 on the CPU path too (its products are float32 anyway)."""
    halves = (torch.bfloat16, torch.float16)
    return halves + (torch.float32,) if backend.select(t) == "cpu" else halves


def fp8_device(op: str, name: str, t: torch.Tensor) -> None:
    """A GPU that runs fp8 weights must have fp8 tensor cores (no silent bf16 fallback)."""
    if backend.select(t) != "triton":
        return
    cap = tuple(torch.cuda.get_device_capability(t.device))
    if cap < FP8_MIN_CAPABILITY:
        raise ValueError(f"{op}: {name} is float8_e4m3fn but {t.device} is sm_{cap[0]}{cap[1]}, without fp8 tensor "
                         f"cores (compute capability >= 8.9: Ada, Hopper, Blackwell); dequantize the weights "
                         f"(blocksparse_moe.fp8.dequantize_weight_blockwise) to run them in bf16")


def fp8_weight(op: str, name: str, w: torch.Tensor, scale_name: str, scale, expected: Sequence[int],
               doc: str) -> None:
    """``w`` is a float8_e4m3fn weight with its float32 block ``scale`` of shape ``expected``
    (``doc`` names it, e.g. "[E, ceil(G*F/128), ceil(H/128)]"), on ``w``'s device."""
    from .fp8 import FP8_DTYPE

    if w.dtype != FP8_DTYPE:
        raise TypeError(f"{op}: {name} must be float8_e4m3fn (with float32 block scales {scale_name}), got {w.dtype}")
    if scale is None:
        raise ValueError(f"{op}: {name} is float8_e4m3fn and needs its block scales {scale_name} {doc}")
    tensor(op, scale_name, scale)
    if scale.dtype != torch.float32:
        raise TypeError(f"{op}: {scale_name} must be float32, got {scale.dtype}")
    shape(op, scale_name, scale, expected, doc)
    same_device(op, ((name, w), (scale_name, scale)))


def no_fp8_scales(op: str, named_scales: Sequence[Tuple[str, object]], weights: str) -> None:
    """Scales given to a call whose weights are not fp8 are an error, not ignored."""
    for name, s in named_scales:
        if s is not None:
            raise TypeError(f"{op}: {name} is given but {weights} are not float8_e4m3fn; block scales go with "
                            f"float8_e4m3fn weights (blocksparse_moe.fp8.quantize_weight_blockwise)")


def is_fp8(t) -> bool:
    """``t`` is a tensor of an 8-bit float dtype (e4m3fn, e5m2, ...)."""
    return isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.element_size() == 1
