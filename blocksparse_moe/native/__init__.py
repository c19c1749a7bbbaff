"""The only door to the native extension ``blocksparse_moe._C`` (routing and topology).

This package loads ``_C``, reports what it provides (:func:`native_status`), and runs its
routing and topology ops, or their torch fallbacks (``native/fallback.py``). It returns plain
dicts of int32 tensors; ``routing.py`` and ``topology.py`` wrap them in ``Routing`` and
``Topology``. It imports only ``backend`` from the package, so nothing imports in a circle.

The extension does not link libtorch: Python allocates every output with torch and passes
raw addresses (``data_ptr()``), sizes and, on CUDA, ``torch.cuda.current_stream().cuda_stream``.
``_C`` is imported lazily on the first call (no import-time work, no device probing).

Dispatch is by device only (``backend.native_device``): CPU tensors run the C++ CPU ops,
CUDA tensors the CUDA ops. Routing has no Triton kernels, so ``TRITON_INTERPRET`` plays no
part here.

When ``_C`` is missing (or, for a CUDA tensor, was built without CUDA ops, or the driver is
too old for them, or the GPU's architecture is not among those built) the same function runs
the torch build in ``native/fallback.py`` after ONE ``RuntimeWarning`` per cause;
results are identical. With the environment variable
``BLOCKSPARSE_MOE_REQUIRE_NATIVE=1`` (CI sets it) a missing native op raises instead.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

from .. import backend
from .fallback import ROUTE_FIELDS, route_torch, topology_torch

_INT32_MAX = 2**31 - 1
# Oldest Linux driver of each CUDA major version (NVIDIA's CUDA toolkit release notes).
_MIN_DRIVER = {12: "525.60.13", 13: "580"}

# Lazily loaded state (tests reset it to simulate a missing extension).
_C: Optional[ModuleType] = None
_load_attempted = False
_load_error: Optional[str] = None
_cuda_unusable: Optional[str] = None  # why the built CUDA ops cannot run here; "" once checked OK
_arch_problem: Dict[int, str] = {}  # per device index: why its compute capability has no kernels
_warned: set = set()


def _load() -> Optional[ModuleType]:
    """The extension module, imported on first use; None (with ``_load_error``) if missing."""
    global _C, _load_attempted, _load_error
    if not _load_attempted:
        _load_attempted = True
        try:
            from .. import _C as mod
        except ImportError as exc:
            _load_error = f"blocksparse_moe._C could not be imported ({type(exc).__name__}: {exc})"
        else:
            _C = mod
    return _C


def _require_native() -> bool:
    return os.environ.get("BLOCKSPARSE_MOE_REQUIRE_NATIVE", "0").strip().lower() not in ("", "0", "false", "no")


def _fallback(cause: str, reason: str, what: str) -> None:
    """Warn once per cause that ``what`` runs in torch (or raise when native is required)."""
    message = f"{reason}; {what} runs in torch (same results, slower)"
    if _require_native():
        raise RuntimeError(f"{message}, but BLOCKSPARSE_MOE_REQUIRE_NATIVE is set")
    if cause not in _warned:
        _warned.add(cause)
        # stacklevel: the caller of route()/make_topology() (through their custom-op wrappers).
        warnings.warn(message, RuntimeWarning, stacklevel=7)


def _cuda_problem(mod: ModuleType) -> str:
    """Why the CUDA ops of ``mod`` cannot run on this machine ("" if they can). Checked once."""
    global _cuda_unusable
    if _cuda_unusable is None:
        if not hasattr(mod, "route_cuda"):
            _cuda_unusable = f"blocksparse_moe._C was built without CUDA ops ({mod.build_info()['cuda_reason']})"
        else:
            # Both versions are read without creating a CUDA context: this check is cheap.
            runtime, driver = mod.cuda_versions()
            if driver == 0:
                _cuda_unusable = "no usable NVIDIA driver was found (cudaDriverGetVersion failed)"
            # CUDA's minor-version compatibility: a driver of the same major version runs it.
            elif driver // 1000 < runtime // 1000:
                need = _MIN_DRIVER.get(runtime // 1000)
                _cuda_unusable = (f"the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10} but "
                                  f"blocksparse_moe._C was built with CUDA {runtime // 1000}.{runtime % 1000 // 10}"
                                  + (f", which needs driver >= {need}" if need else "")
                                  + f" (update the driver, or rebuild with a CUDA {driver // 1000}.x toolkit)")
            else:
                _cuda_unusable = ""
    return _cuda_unusable


def _arch_runs_on(arch: str, capability: int, has_ptx: bool) -> bool:
    """Whether code built for ``arch`` ("90", "90a", "100f") runs on a device of ``capability``
    (major*10 + minor): SASS runs on the same major with an equal or newer minor ("a": that
    exact chip only), PTX is JIT-compiled for any newer device."""
    num = int(arch.rstrip("af"))
    if arch.endswith("a"):
        return capability == num
    if has_ptx and not arch.endswith("f") and capability >= num:
        return True
    return capability // 10 == num // 10 and capability >= num


def _device_arch_problem(mod: ModuleType, device: torch.device) -> str:
    """Why ``device`` cannot run the built kernels ("" if it can). Checked once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _arch_problem:
        major, minor = torch.cuda.get_device_capability(index)
        archs = [a for a in mod.build_info()["cuda_archs"].split(";") if a]
        ok = any(_arch_runs_on(a, major * 10 + minor, i == len(archs) - 1) for i, a in enumerate(archs))
        _arch_problem[index] = "" if ok else (
            f"blocksparse_moe._C has CUDA kernels for sm_{', sm_'.join(archs)} only, and cuda:{index} is "
            f"sm_{major}{minor} (rebuild with BLOCKSPARSE_MOE_CUDA_ARCHS={major}{minor})")
    return _arch_problem[index]


def _ops_for(device: torch.device, what: str) -> Optional[ModuleType]:
    """The extension if it can run ``what`` on ``device``, else None after the fallback warning."""
    kind = backend.native_device(device)
    mod = _load()
    if mod is None:
        _fallback("extension", _load_error or "blocksparse_moe._C is not available", what)
        return None
    if kind == "cuda":
        problem = _cuda_problem(mod)
        if problem:
            _fallback("cuda", problem, what)
            return None
        problem = _device_arch_problem(mod, device)
        if problem:
            _fallback("cuda-arch", problem, what)
            return None
    return mod


def native_status() -> Dict[str, object]:
    """What the native extension provides, loading it if needed (no device is touched).

    Keys: ``extension`` (``_C`` imports), ``cpu_ops``, ``cuda_ops`` (built in), ``cuda_archs``
    (list of SM versions, e.g. ``["90"]``), ``cuda_version`` and ``cccl_version`` the CUDA ops
    were built with, ``cudart`` ("static"), ``pybind11_version``, and ``reason``: why the
    extension or its CUDA ops are missing, ``None`` when everything was built.
    """
    mod = _load()
    if mod is None:
        return {"extension": False, "cpu_ops": False, "cuda_ops": False, "cuda_archs": [], "cuda_version": None,
                "cccl_version": None, "cudart": None, "pybind11_version": None, "reason": _load_error}
    info = mod.build_info()
    cuda = bool(info["cuda_ops"])
    return {
        "extension": True,
        "cpu_ops": bool(info["cpu_ops"]),
        "cuda_ops": cuda,
        "cuda_archs": [a for a in info["cuda_archs"].split(";") if a] if cuda else [],
        "cuda_version": info["cuda_version"] or None,
        "cccl_version": info["cccl_version"] or None,
        "cudart": info["cudart"] if cuda else None,
        "pybind11_version": info["pybind11_version"],
        "reason": None if cuda else f"CUDA ops not built: {info['cuda_reason']}",
    }


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def route(expert_indices: torch.Tensor, num_experts: int, block_size: int) -> Dict[str, torch.Tensor]:
    """The routing fields (``ROUTE_FIELDS``) of :func:`blocksparse_moe.route` (arguments checked there).

    Returns the int32 fields of ``Routing`` as a dict. On CUDA everything is enqueued on the
    current stream; nothing is read back.
    """
    device = expert_indices.device
    mod = _ops_for(device, "route")
    if mod is None:
        return route_torch(expert_indices, num_experts, block_size)
    if not expert_indices.is_contiguous():
        raise ValueError("route: expert_indices must be contiguous")
    n = expert_indices.numel()
    e = num_experts
    i32 = torch.int32
    out = {name: torch.empty(e if name in ("tokens_per_expert", "bins", "padded_bins") else n, dtype=i32,
                             device=device) for name in ROUTE_FIELDS}
    ptrs = [out[name].data_ptr() for name in ROUTE_FIELDS]
    ids, id_bytes = expert_indices.data_ptr(), expert_indices.element_size()
    if backend.native_device(device) == "cpu":
        mod.route_cpu(ids, id_bytes, n, e, block_size, *ptrs)
        return out
    with torch.cuda.device(device):
        temp_bytes = mod.route_cuda_temp_bytes(n, e)
        keys = torch.empty(n, dtype=i32, device=device)
        values = torch.empty(n, dtype=i32, device=device)
        temp = torch.empty(max(temp_bytes, 1), dtype=torch.uint8, device=device)
        mod.route_cuda(ids, id_bytes, n, e, block_size, keys.data_ptr(), values.data_ptr(), temp.data_ptr(),
                       temp_bytes, *ptrs, _stream(device))
    # keys, values and temp are freed here; the caching allocator hands them out again only
    # to work queued after route_cuda on this same stream.
    return out


def make_topology(padded_bins: torch.Tensor, num_experts: int, ffn_hidden_size: int,
                  block_size: int) -> Tuple[Dict[str, torch.Tensor], int]:
    """``(fields, P)``: the six Topology fields of :func:`blocksparse_moe.make_topology` (checked there).

    ``P = padded_bins[-1]`` sizes the outputs, so it is read back to the host: one
    synchronization on CUDA, which also brings back whether ``padded_bins`` is valid
    (non-decreasing multiples of ``block_size``). The CPU op validates it in C++.
    """
    device = padded_bins.device
    mod = _ops_for(device, "make_topology")
    if mod is None:
        return topology_torch(padded_bins, num_experts, ffn_hidden_size, block_size)
    if not padded_bins.is_contiguous():
        raise ValueError("make_topology: padded_bins must be contiguous")
    b = block_size
    fb = ffn_hidden_size // b
    on_cpu = backend.native_device(device) == "cpu"
    if not on_cpu:
        pb = padded_bins.to(torch.int64)
        lengths = pb - torch.cat([pb.new_zeros(1), pb[:-1]])
        bad = ((lengths < 0) | (pb % b != 0)).sum()
        p, n_bad = torch.stack([pb[-1], bad]).tolist()  # the one host read
    else:
        p, n_bad = int(padded_bins[-1]), 0
    if n_bad or p < 0 or p % b:
        raise ValueError(f"make_topology: padded_bins must be non-decreasing multiples of block_size ({b}), "
                         f"got P = padded_bins[-1] = {p}")
    block_rows = p // b
    nnz = block_rows * fb
    if nnz > _INT32_MAX or num_experts * fb >= _INT32_MAX:
        raise ValueError(f"make_topology: {nnz} blocks ({block_rows} block rows x {fb}) or {num_experts * fb} "
                         "block columns exceed the int32 range of the metadata")
    i32 = torch.int32
    fields = dict(
        row_indices=torch.empty(nnz, dtype=i32, device=device),
        column_indices=torch.empty(nnz, dtype=i32, device=device),
        offsets=torch.empty(block_rows + 1, dtype=i32, device=device),
        column_indices_t=torch.empty(nnz, dtype=i32, device=device),
        offsets_t=torch.empty(num_experts * fb + 1, dtype=i32, device=device),
        block_offsets_t=torch.empty(nnz, dtype=i32, device=device),
    )
    ptrs = [t.data_ptr() for t in fields.values()]
    args = (padded_bins.data_ptr(), padded_bins.element_size(), num_experts, ffn_hidden_size, b, p, *ptrs)
    if on_cpu:
        mod.topology_cpu(*args)
    else:
        with torch.cuda.device(device):
            mod.topology_cuda(*args, _stream(device))
    return fields, p
