"""HBM traffic model without a GPU: what each Triton kernel would read from and write to HBM on
an H100, from the addresses its programs touch under Triton's interpreter.

    1. record   every Triton launch inside :func:`record_traffic` runs in the interpreter
                (``TRITON_INTERPRET=1``, CPU tensors) with the tile config the GPU would use
                (:func:`gpu_configs`: one entry of ``_common``'s sm_90 table); each
                ``tl.load`` / ``tl.store`` (masked lanes dropped) is logged as the set of
                32-byte sectors it touches, keyed by program id, and each ``tl.dot`` as
                ``2*M*N*K`` executed FLOPs. CPU tensors are disjoint address ranges, so the
                L2 sees different tensors as different lines, as on the GPU.
    2. replay   the programs of one launch in the GPU's dispatch order (linear block id
                ``x + gx*(y + gy*z)``: blockIdx.x fastest) through ``slots = SMs x CTAs per
                SM`` resident programs (:func:`replay`): the first ``slots`` programs start
                together; the resident ones issue their accesses round-robin, one
                ``tl.load``/``tl.store`` each per turn (a K-step of a GEMM is a few accesses,
                so the resident CTAs advance through K in step, as equal CTAs on equal SMs
                do); a program that finishes frees its slot for the next one in dispatch
                order, which joins the next turn (so early-exit programs, e.g. row tiles past
                the real padded rows, take their slot only briefly, and there are no wave
                boundaries). CTAs per SM come from the compile report
                (bench/results/compile-sm90.json: registers and shared memory of the same
                kernel, flags and config; H100 limits: 64K registers, 228 KB shared memory,
                64 warps, 32 CTAs per SM), or ``--default-ctas`` (1) when it lists none
                (``--ctas`` forces one value for every kernel).
    3. L2       a fully associative LRU over 32-byte sectors of the target's size, write-back
                and write-allocate: a load that misses reads its sector from HBM; a store
                never reads (full-sector stores) and marks the sector dirty; a dirty sector
                is written to HBM once when evicted or at the end of the launch. The L2 is
                cold at every launch (the numbers are per kernel; what a kernel leaves in L2
                for the next one is not credited).
    4. report   per launch: HBM bytes read / written, unique bytes (every sector touched once,
                per operand), HBM / unique, useful FLOPs, arithmetic intensity (useful FLOPs
                per HBM byte), and the roofline time (HBM bytes / 3.35 TB/s) beside the
                compute time (useful FLOPs / 800 TFLOP/s bf16 dense) on an H100.

What the model leaves out: L1/shared-memory reuse is a given (each load counts its sectors
once per program access, as a TMA/cp.async tile load does); the H100's L2 is two partitions
with a hashed, 16-way set associative layout (modelled as one fully associative LRU); real
CTAs drift apart, so programs far apart in dispatch order overlap a little more than here.

Validation (tests/test_traffic.py): a plain GEMM (:func:`matmul_kernel`) with row tiles along
the fast grid axis reads A once per column tile once a sweep outgrows L2, and with the
tutorial's GROUP_M swizzle reads B once per group of GROUP_M row tiles instead; the model
matches those analytic counts, and a GEMM that fits in L2 reads each operand once.

The fused expert path (``experts_forward`` / ``experts_backward``, bf16, GLU silu) is measured
at scaled versions of three layers (see :data:`SHAPES` for the scaling and why): ``--label``
names the result files, e.g. ``before`` for the kernels before their tile-order rewrite.

    python bench/traffic.py [--shape qwen3|mixtral|deepseek-v3|all] [--out-dir bench/results] [--label before]
                            [--config 0] [--ctas N] [--default-ctas 1] [--render results.json]

Run time: ~2 min (qwen3), ~10 min each (mixtral, deepseek-v3) on 2 busy CPU cores, two shapes at a time.
The "before" results measured a ``git archive`` of HEAD (the working tree was mid-edit):
``PYTHONPATH=<archive> python bench/traffic.py --label before --source "..."``.

Writes ``traffic-<label>.json`` and ``.md`` under ``--out-dir``. :func:`experts_rows` returns
the rows of one shape, for later runs and tests.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

# The interpreter must be on before triton decorates any kernel (this file's and the package's).
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

try:  # the installed package (with its built _C) if there is one, else this checkout
    import blocksparse_moe  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SECTOR = 32  # bytes: the L2's and HBM's access granularity on NVIDIA GPUs
_HERE = os.path.dirname(os.path.abspath(__file__))
COMPILE_REPORT = os.path.join(_HERE, "results", "compile-sm90.json")


# -- the target ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """What the model needs of a GPU. ``sms`` may be fractional in a scaled target (the slots
    are ``round(sms * ctas_per_sm)``)."""

    name: str
    sms: float
    l2_bytes: int
    hbm_bytes_per_s: float
    flops_per_s: float
    # Per-SM limits for the residency (CTAs per SM) of a kernel.
    regs_per_sm: int = 65536
    shared_per_sm: int = 228 * 1024
    shared_reserved_per_cta: int = 1024
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32

    def scaled(self, factor: float, name: Optional[str] = None) -> "Target":
        """The same GPU with ``factor`` times the SMs and the L2 (bandwidth and FLOP/s kept): the
        target of a layer whose every per-sweep footprint was scaled by ``factor``."""
        return replace(self, name=name or f"{self.name} x{factor:g}", sms=self.sms * factor,
                       l2_bytes=int(round(self.l2_bytes * factor / SECTOR)) * SECTOR)

    def slots(self, ctas_per_sm: int) -> int:
        return max(1, int(round(self.sms * ctas_per_sm)))


# H100 SXM: 132 SMs, 50 MB L2 (taken as 50 MiB), 3.35 TB/s HBM3, ~800 TFLOP/s bf16 dense as
# reached by good GEMMs (989 on paper).
H100 = Target("H100", 132, 50 * 2**20, 3.35e12, 800e12)


def ctas_per_sm(regs: int, shared: int, num_warps: int, target: Target = H100) -> int:
    """CTAs of one kernel resident per SM: the least of the register, shared-memory, warp and
    CTA limits (registers are allocated per warp in 256-register units, shared memory in
    128-byte units plus 1 KB the driver reserves per CTA)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (target.regs_per_sm // regs_per_warp) // num_warps
    by_warps = target.max_warps_per_sm // num_warps
    limit = min(by_regs, by_warps, target.max_ctas_per_sm)
    if shared:
        per_cta = math.ceil((shared + target.shared_reserved_per_cta) / 128) * 128
        limit = min(limit, target.shared_per_sm // per_cta)
    return max(limit, 1)


_REPORT_CACHE: Dict[str, List[Dict]] = {}
_EXPERT_COUNT_FLAGS = ("E_POW2", "EXPERTS_P2")


def _report_variants(path: str) -> List[Dict]:
    if path not in _REPORT_CACHE:
        try:
            with open(path) as f:
                _REPORT_CACHE[path] = json.load(f).get("variants", [])
        except (OSError, ValueError):
            _REPORT_CACHE[path] = []
    return _REPORT_CACHE[path]


def compiled_resources(kernel: str, meta: Dict[str, object], dtype: str = "bf16",
                       report: str = COMPILE_REPORT) -> Optional[Tuple[int, int]]:
    """``(registers, shared bytes)`` of ``kernel`` (a function name, ``_up_kernel``) compiled
    with the launch's config, from the compile report: the largest over the report's variants
    of that config whose flags agree with the launch's in the most places (all of them where
    the compile workload made this very variant; fewer where the layer modelled has, say,
    another F and with it another ``PART``), None when the report has that config nowhere."""
    # Flags that hold the expert count (rounded up to a power of two: the width of one vector
    # load of the expert offsets) differ between the compile workload (E = 2) and the layer
    # modelled; they cost a register or two, so they do not count as disagreeing.
    short = kernel.lstrip("_")
    short = short[:-len("_kernel")] if short.endswith("_kernel") else short
    try:
        config = (f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']} "
                  f"w{meta['num_warps']} s{meta['num_stages']}")
    except KeyError:
        return None
    found: Dict[int, List[Tuple[int, int]]] = {}
    for v in _report_variants(report):
        if v.get("kernel") != short or v.get("config") != config or v.get("dtype") != dtype or not v.get("ok"):
            continue
        if v.get("block_size") is not None and "BLOCK" in meta and v["block_size"] != meta["BLOCK"]:
            continue
        flags = dict(f.split("=", 1) for f in (v.get("flags") or "").split() if "=" in f)
        disagree = sum(1 for k, val in flags.items()
                       if k in meta and k not in _EXPERT_COUNT_FLAGS and str(meta[k]) != val)
        found.setdefault(disagree, []).append((v["regs"], v["shared"]))
    if not found:
        return None
    best = found[min(found)]
    return max(r for r, _ in best), max(s for _, s in best)


# -- recording -----------------------------------------------------------------------------

@dataclass
class Operand:
    """A tensor argument of a launch: its storage's byte range ``[lo, hi)``."""

    name: str
    lo: int
    hi: int
    dtype: str
    shape: Tuple[int, ...]


@dataclass
class Launch:
    """One recorded Triton launch: per program id ``(x, y, z)`` the accesses in program order,
    each ``(is_store, operand index or -1, sector ids)``."""

    kernel: str
    meta: Dict[str, object]
    operands: List[Operand]
    grid: Tuple[int, int, int] = (1, 1, 1)
    programs: Dict[Tuple[int, int, int], List[Tuple[bool, int, np.ndarray]]] = field(default_factory=dict)
    dot_flops: int = 0
    seconds: float = 0.0
    label: str = ""
    _starts: Optional[np.ndarray] = None
    _ends: Optional[np.ndarray] = None

    def operand_of(self, address: int) -> int:
        i = int(np.searchsorted(self._starts, address, side="right")) - 1
        return i if i >= 0 and address < self._ends[i] else -1

    def order(self) -> List[Tuple[int, int, int]]:
        """Program ids in the GPU's dispatch order: blockIdx.x fastest, then y, then z."""
        return sorted(self.programs, key=lambda p: (p[2], p[1], p[0]))

    def num_accesses(self) -> int:
        return sum(len(v) for v in self.programs.values())


class Recorder:
    """What :func:`record_traffic` yields: ``launches`` in launch order."""

    def __init__(self) -> None:
        self.launches: List[Launch] = []
        self.current: Optional[Launch] = None


def _operands(fn, args, kwargs) -> Tuple[List[Operand], Dict[str, object]]:
    """Tensor arguments (by parameter name, storages merged when two share one) and the
    scalar/constexpr arguments of a launch."""
    try:
        bound = inspect.signature(fn).bind_partial(*args, **{k: v for k, v in kwargs.items()
                                                               if k in inspect.signature(fn).parameters})
        named = dict(bound.arguments)
    except TypeError:
        named = {f"arg{i}": a for i, a in enumerate(args)}
    meta = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, bool, str))}
    ranges: Dict[Tuple[int, int], Operand] = {}
    for name, value in named.items():
        t = getattr(value, "base", value) if not isinstance(value, torch.Tensor) else value
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
            if (lo, hi) in ranges:
                ranges[(lo, hi)].name += "=" + name
            else:
                ranges[(lo, hi)] = Operand(name, lo, hi, str(t.dtype).replace("torch.", ""), tuple(t.shape))
        elif isinstance(value, (int, float, bool, str)):
            meta.setdefault(name, value)
    ops = sorted(ranges.values(), key=lambda o: o.lo)
    return ops, meta


def _sectors(ptrs: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    addresses = ptrs.astype(np.uint64, copy=False).ravel()
    if mask is not None:
        m = np.broadcast_to(mask, ptrs.shape).ravel()
        if not m.all():
            addresses = addresses[m]
    return np.unique(addresses >> np.uint64(5)).astype(np.int64)


@contextlib.contextmanager
def record_traffic() -> Iterator[Recorder]:
    """Record every Triton launch run by the interpreter inside the block: per program its
    loads and stores as 32-byte sector ids (masked-off lanes dropped) and its ``tl.dot``
    FLOPs. Needs ``TRITON_INTERPRET=1`` (set by this module before triton is imported) and
    CPU tensors. The kernels run as usual: their results are the real ones."""
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    executor_cls = interpreter.GridExecutor
    recorder = Recorder()
    saved = {name: getattr(builder_cls, name) for name in
             ("create_masked_load", "create_masked_store", "create_dot", "create_atomic_rmw", "create_atomic_cas")}
    saved_call = executor_cls.__call__

    def log(builder, ptrs, mask, is_store):
        launch = recorder.current
        if launch is None:
            return
        sectors = _sectors(ptrs.data, None if mask is None else mask.data)
        if not sectors.size:
            return
        op = launch.operand_of(int(sectors[0]) * SECTOR)
        launch.programs.setdefault(tuple(builder.grid_idx), []).append((is_store, op, sectors))

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        log(self, ptrs, mask, False)
        return saved["create_masked_load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        log(self, ptrs, mask, True)
        return saved["create_masked_store"](self, ptrs, value, mask, cache_policy)

    def dot(self, a, b, d, *rest):
        if recorder.current is not None:
            m, k = a.data.shape[-2:]
            recorder.current.dot_flops += 2 * m * k * b.data.shape[-1] * int(np.prod(a.data.shape[:-2], dtype=np.int64))
        return saved["create_dot"](self, a, b, d, *rest)

    def atomic_rmw(self, rmw_op, ptr, val, mask, *rest):
        log(self, ptr, mask, False)
        log(self, ptr, mask, True)
        return saved["create_atomic_rmw"](self, rmw_op, ptr, val, mask, *rest)

    def atomic_cas(self, ptr, cmp, val, *rest):
        log(self, ptr, None, False)
        log(self, ptr, None, True)
        return saved["create_atomic_cas"](self, ptr, cmp, val, *rest)

    def call(self, *args, **kwargs):
        ops, meta = _operands(self.fn, args, kwargs)
        launch = Launch(getattr(self.fn, "__name__", "kernel"), meta, ops)
        launch._starts = np.array([o.lo for o in ops], dtype=np.int64)
        launch._ends = np.array([o.hi for o in ops], dtype=np.int64)
        outer, recorder.current = recorder.current, launch
        start = time.perf_counter()
        try:
            saved_call(self, *args, **kwargs)
        finally:
            recorder.current = outer
        launch.seconds = time.perf_counter() - start
        launch.grid = tuple(interpreter.interpreter_builder.grid_dim)
        recorder.launches.append(launch)

    builder_cls.create_masked_load = masked_load
    builder_cls.create_masked_store = masked_store
    builder_cls.create_dot = dot
    builder_cls.create_atomic_rmw = atomic_rmw
    builder_cls.create_atomic_cas = atomic_cas
    executor_cls.__call__ = call
    try:
        yield recorder
    finally:
        for name, fn in saved.items():
            setattr(builder_cls, name, fn)
        executor_cls.__call__ = saved_call


@contextlib.contextmanager
def gpu_configs(capability: Tuple[int, int] = (9, 0), select: int = 0) -> Iterator[None]:
    """Make the package's tiled launchers run the config a GPU of ``capability`` would use
    instead of the interpreter's small one: ``_common.tile_configs`` answers with entry
    ``select`` of that target's table (clipped to the launch's block size as usual). The
    autotuner on a GPU picks among the table; entry 0, the largest tile, is the default."""
    from blocksparse_moe.kernels import _common

    original = _common.tile_configs

    def patched(*args, **kwargs):
        if kwargs.get("capability") is not None:
            return original(*args, **kwargs)
        kwargs["capability"] = capability
        configs = original(*args, **kwargs)
        return [configs[min(select, len(configs) - 1)]]

    _common.tile_configs = patched
    try:
        yield
    finally:
        _common.tile_configs = original


# -- replay through the L2 -------------------------------------------------------------------

@dataclass
class Traffic:
    """HBM and unique bytes of one launch, in total and per operand (index as in ``Launch``;
    -1: addresses outside every tensor argument)."""

    hbm_read: int
    hbm_write: int
    unique: int
    unique_read: int
    unique_write: int
    slots: int
    ctas_per_sm: int
    l2_bytes: int
    per_operand: Dict[int, Dict[str, int]]
    seconds: float

    @property
    def hbm(self) -> int:
        return self.hbm_read + self.hbm_write


def replay(launch: Launch, l2_bytes: int, slots: int) -> Traffic:
    """Replay ``launch`` through a cold LRU L2 of ``l2_bytes`` with ``slots`` resident
    programs (see the module docstring for the order and the L2)."""
    start = time.perf_counter()
    capacity = max(1, l2_bytes // SECTOR)
    clean = -2  # operand indices of dirty sectors are >= -1 (-1: outside every operand)
    lines: "OrderedDict[int, int]" = OrderedDict()  # sector -> operand of a dirty sector, or clean
    move, popitem = lines.move_to_end, lines.popitem
    n_ops = len(launch.operands)
    read_miss = [0] * (n_ops + 1)  # index -1 is the last
    write_back = [0] * (n_ops + 1)

    pending = iter(launch.order())
    active: List[List] = []
    for _ in range(slots):
        pid = next(pending, None)
        if pid is None:
            break
        active.append([launch.programs[pid], 0])
    while active:
        still: List[List] = []
        for prog in active:
            accesses, pos = prog
            is_store, op, sectors = accesses[pos]
            if is_store:
                for s in sectors.tolist():
                    if s in lines:
                        move(s)
                    lines[s] = op
            else:
                miss = 0
                for s in sectors.tolist():
                    if s in lines:
                        move(s)
                    else:
                        lines[s] = clean
                        miss += 1
                read_miss[op] += miss
            over = len(lines) - capacity
            while over > 0:
                _, dirty = popitem(last=False)
                if dirty != clean:
                    write_back[dirty] += 1
                over -= 1
            prog[1] = pos + 1
            if pos + 1 < len(accesses):
                still.append(prog)
            else:
                pid = next(pending, None)
                if pid is not None:
                    still.append([launch.programs[pid], 0])
        active = still
    for dirty in lines.values():
        if dirty != clean:
            write_back[dirty] += 1

    per_operand: Dict[int, Dict[str, int]] = {}
    unique_r: Dict[int, List[np.ndarray]] = {}
    unique_w: Dict[int, List[np.ndarray]] = {}
    for accesses in launch.programs.values():
        for is_store, op, sectors in accesses:
            (unique_w if is_store else unique_r).setdefault(op, []).append(sectors)
    all_r, all_w = [], []
    for op in sorted(set(unique_r) | set(unique_w)):
        r = np.unique(np.concatenate(unique_r[op])) if op in unique_r else np.empty(0, np.int64)
        w = np.unique(np.concatenate(unique_w[op])) if op in unique_w else np.empty(0, np.int64)
        all_r.append(r)
        all_w.append(w)
        per_operand[op] = {"unique_read": r.size * SECTOR, "unique_write": w.size * SECTOR,
                           "unique": np.union1d(r, w).size * SECTOR,
                           "hbm_read": read_miss[op] * SECTOR, "hbm_write": write_back[op] * SECTOR}
    r = np.unique(np.concatenate(all_r)) if all_r else np.empty(0, np.int64)
    w = np.unique(np.concatenate(all_w)) if all_w else np.empty(0, np.int64)
    return Traffic(hbm_read=sum(read_miss) * SECTOR, hbm_write=sum(write_back) * SECTOR,
                   unique=np.union1d(r, w).size * SECTOR, unique_read=r.size * SECTOR, unique_write=w.size * SECTOR,
                   slots=slots, ctas_per_sm=0, l2_bytes=capacity * SECTOR, per_operand=per_operand,
                   seconds=time.perf_counter() - start)


# -- validation: a plain GEMM with and without GROUP_M swizzling ------------------------------

@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``C = A @ B`` (fp32 accumulation). ``GROUP_M == 0``: 2-D grid (M/BLOCK_M, N/BLOCK_N),
    row tiles along the fast axis x. ``GROUP_M > 0``: 1-D grid in the Triton tutorial's
    grouped order (GROUP_M row tiles, row tile fastest, then the next column tile)."""
    if GROUP_M == 0:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    else:
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_pid_n
        first_m = (pid // per_group) * GROUP_M
        group_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k + rk)[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & ((k + rk)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k + rk)[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=((k + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul(a: torch.Tensor, b: torch.Tensor, *, block: Tuple[int, int, int] = (32, 32, 32),
           group_m: int = 0) -> torch.Tensor:
    """Launch :func:`matmul_kernel` (``group_m`` 0: unswizzled 2-D grid)."""
    m, k = a.shape
    n = b.shape[1]
    c = torch.full((m, n), float("nan"), dtype=a.dtype)
    bm, bn, bk = block
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn)) if group_m == 0 else (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    matmul_kernel[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
                        c.stride(1), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m)
    return c


# -- the fused expert path -------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertShape:
    """A layer run through ``experts_forward`` / ``experts_backward`` (bf16, GLU silu), and the
    full-size layer it stands for: ``scale`` multiplies the SMs (``sms_scale``) and the L2
    (``l2_scale``) of the target; ``l2_scale_alt`` is a second L2 size replayed for
    comparison (see :data:`SHAPES`)."""

    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    block_size: int
    full: str
    sms_scale: float
    l2_scale: float
    l2_scale_alt: float
    scaling: str
    # Factor of H and F, hence of every grid axis over columns (N tiles, K-steps over H or F):
    # an operand re-read once per grid column is re-read 1/column_scale times as often at
    # full size.
    column_scale: float = 1.0
    # Factor of T and E (rows per expert kept).
    row_scale: float = 1.0

    def full_size(self) -> Tuple[int, int, int, int]:
        """``(T, H, F, E)`` of the full-size layer."""
        return (round(self.tokens / self.row_scale), round(self.hidden / self.column_scale),
                round(self.ffn / self.column_scale), round(self.experts / self.row_scale))


# Why these scalings. Reuse in L2 is decided per *sweep*: the programs of one column of the
# grid (blockIdx.x fastest), which together read every row tile once (up, down, act_bwd) or
# every expert's row range once (wgrad), and the resident programs of one wave. The model
# stays honest when every footprint of a sweep, the wave's footprint and the L2 shrink by
# the same factor. Tokens and experts scale every tensor and every grid axis over rows or
# experts alike (k, rows per expert, tiles and K-steps kept): SMs and L2 shrink with them.
# H and F (by s) scale x, the weight slices, the hidden rows of a sweep and each program's
# operand footprint by s: the L2 shrinks by s, the SMs stay; what does not scale with s is
# each program's output tile (BLOCK_M x BLOCK_N), whose share of the L2 grows 1/s, and the
# number of N tiles per row (the first, cold sweep weighs 1/s more). The weights, the bulk
# of the working set, shrink by s^2: the second L2 (``l2_scale_alt``) keeps the working set /
# L2 ratio instead, so the two columns bracket the full-size answer. The interpreter runs at
# roughly 10 ms per K-step of a 64x64x64 tile on this machine, which sets the budget.
#  * Qwen3-30B-A3B (T=4096, H=2048, F=768, E=128, k=8, b=64; 256 rows per expert): T and E
#    / 8 (E = 16 is the smallest E that keeps k/E < 1), H and F / 4: T=512 H=512 F=192 E=16
#    k=8. SMs / 8, L2 / 32 (alt / 128).
#  * Mixtral-like (T=4096, H=4096, F=14336, E=8, k=2, b=128; 1024 rows per expert): E and k
#    leave H and F; / 16: T=4096 H=256 F=896 E=8 k=2. SMs kept, L2 / 16 (alt / 256).
#  * DeepSeek-V3 at T=16384 (H=7168, F=2048, E=256, k=8, b=128 as block_size_for_call picks;
#    512 rows per expert), the prefill the 1.5-3x estimate was made at: T and E / 16
#    (E = 16 again), H and F / 8: T=1024 H=896 F=256 E=16 k=8. Scaled for the expert-major
#    order (experts._expert_tiles): there the resident CTAs work inside one expert's band, so
#    what decides reuse is per expert (rows kept, H and F / c): the band's row operand / L2
#    and the resident CTAs / CTAs per expert. Both stay when SMs and L2 shrink by c, whatever
#    T and E do: SMs / 8, L2 / 8. The alternative L2 is the other shapes' rule, / (r c) = / 128,
#    right for the old row-fast order (a grid column spans every expert) and pessimistic for
#    the new one. (At r = 1/16 that rule leaves the scaled L2 smaller than one band of x.)
SHAPES: Dict[str, ExpertShape] = {
    "qwen3": ExpertShape("qwen3", 512, 512, 192, 16, 8, 64,
                         "Qwen3-30B-A3B: T=4096 H=2048 F=768 E=128 k=8 b=64", 1 / 8, 1 / 32, 1 / 128,
                         "T, E / 8 and H, F / 4; SMs / 8, L2 / 32 (alt: / 128, the working set's factor)", 1 / 4,
                         1 / 8),
    "mixtral": ExpertShape("mixtral", 4096, 256, 896, 8, 2, 128,
                           "Mixtral-like: T=4096 H=4096 F=14336 E=8 k=2 b=128", 1.0, 1 / 16, 1 / 256,
                           "H, F / 16; SMs kept, L2 / 16 (alt: / 256, the working set's factor)", 1 / 16),
    "deepseek-v3": ExpertShape("deepseek-v3", 1024, 896, 256, 16, 8, 128,
                               "DeepSeek-V3: T=16384 H=7168 F=2048 E=256 k=8 b=128", 1 / 8, 1 / 8, 1 / 128,
                               "T, E / 16 and H, F / 8; SMs / 8, L2 / 8, as the expert-major order's reuse "
                               "scales (alt: / 128, the other shapes' rule, right for a row-fast order)",
                               1 / 8, 1 / 16),
}


def _storage_key(t: torch.Tensor) -> Tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


def _name_operands(launches: Sequence[Launch], known: Dict[str, Optional[torch.Tensor]]) -> None:
    """Call each operand by the caller's name of its tensor where it is one of ``known``
    (``w1 (w1_ptr)``), and each launch by its kernel and the known tensors it writes."""
    by_range = {_storage_key(t): name for name, t in known.items() if isinstance(t, torch.Tensor) and t.numel()}
    for launch in launches:
        for op in launch.operands:
            name = by_range.get((op.lo, op.hi))
            if name is not None and not op.name.startswith(name + " ("):
                op.name = f"{name} ({op.name})"
        written = sorted({launch.operands[op].name.split(" (")[0] for accesses in launch.programs.values()
                          for is_store, op, _ in accesses if is_store and op >= 0
                          and " (" in launch.operands[op].name})
        launch.label = launch.kernel + (f" -> {', '.join(written)}" if written else "")


@contextlib.contextmanager
def _full_size_schedule(shape: ExpertShape) -> Iterator[None]:
    """Tile schedules as at full size: the fused kernels' row bands (``experts.BAND_BYTES`` of
    a row operand H or F wide) hold as many rows as at full size (their bytes scale with H
    and F), and the weight gradient cuts an expert's rows into chunks only where the
    full-size layer would (``expert_wgrad.SPLIT_ROWS``: the full-size chunk length, in rows,
    which a scaled layer's rows per expert compare with directly). A package from before
    both (a "before" measurement of an older commit) runs as it is."""
    from blocksparse_moe.kernels import experts as fused

    try:
        from blocksparse_moe.kernels import expert_wgrad
        from blocksparse_moe.kernels.static_routing import padded_rows_bound
    except ImportError:
        expert_wgrad = None
    if expert_wgrad is None or not hasattr(fused, "BAND_BYTES"):
        yield
        return

    t, h, f, e = shape.full_size()
    b = shape.block_size
    p_full = padded_rows_bound(t, shape.top_k, e, b)
    chunk = min(expert_wgrad.chunk_rows(p_full, c, h, b) for c in (f, 2 * f))
    saved = fused.BAND_BYTES, expert_wgrad.SPLIT_ROWS
    fused.BAND_BYTES = int(saved[0] * shape.column_scale)
    expert_wgrad.SPLIT_ROWS = chunk
    try:
        yield
    finally:
        fused.BAND_BYTES, expert_wgrad.SPLIT_ROWS = saved


def run_experts(shape: ExpertShape, *, select: int = 0, seed: int = 0) -> Dict[str, List[Launch]]:
    """Record one forward and one backward of the fused expert path at ``shape`` (bf16, GLU
    silu, fp32 router weights, gradients for x, the router weights, W1 and W2), with entry
    ``select`` of the sm_90 config table: ``{"fwd": launches, "bwd": launches}``."""
    from blocksparse_moe.kernels.experts import experts_backward, experts_forward

    gen = torch.Generator().manual_seed(seed)
    t, h, f, e, k = shape.tokens, shape.hidden, shape.ffn, shape.experts, shape.top_k
    dt = torch.bfloat16
    x = torch.randn(t, h, generator=gen).to(dt)
    # k distinct experts per token, uniformly at random (a balanced router's load).
    expert_indices = torch.rand(t, e, generator=gen).topk(k, dim=1).indices
    weights = torch.rand(t, k, generator=gen).softmax(dim=1)
    w1 = (torch.randn(e, 2 * f, h, generator=gen) * h ** -0.5).to(dt)
    w2 = (torch.randn(e, f, h, generator=gen) * f ** -0.5).to(dt)
    dout = torch.randn(t, h, generator=gen).to(dt)
    common = dict(num_experts=e, act="silu", glu=True, block_size=shape.block_size)
    with gpu_configs((9, 0), select), _full_size_schedule(shape):
        with record_traffic() as fwd:
            out, saved = experts_forward(x, expert_indices, weights, w1, w2, None, None, **common)
        known = dict(x=x, expert_indices=expert_indices, weights=weights, w1=w1, w2=w2, out=out, hidden=saved[0],
                     row_slots=saved[1], block_expert=saved[2], expert_offsets=saved[3])
        _name_operands(fwd.launches, known)
        with record_traffic() as bwd:
            grads = experts_backward(dout, saved, x, expert_indices, weights, w1, w2, None, None, **common,
                                     needs_input_grad=(True, True, True, True, False, False))
        known.update(dout=dout, dx=grads[0], dweights=grads[1], dw1=grads[2], dw2=grads[3])
        del known["out"]
        _name_operands(bwd.launches, known)
    return {"fwd": fwd.launches, "bwd": bwd.launches}


# -- rows -------------------------------------------------------------------------------------

def _config(meta: Dict[str, object]) -> str:
    if all(k in meta for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")):
        return (f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']} w{meta.get('num_warps', '?')} "
                f"s{meta.get('num_stages', '?')}")
    return "-"


def launch_rows(launches: Sequence[Launch], target: Target = H100, *, useful_flops: Optional[float] = None,
                ctas: Optional[int] = None, default_ctas: int = 1, alt_l2_bytes: Optional[int] = None,
                report: str = COMPILE_REPORT, extra: Optional[Dict[str, object]] = None) -> List[Dict[str, object]]:
    """One row per launch: HBM bytes through ``target``'s L2, unique bytes, FLOPs, roofline.

    ``useful_flops``: the useful FLOPs of all ``launches`` together (e.g. a GLU forward's
    ``6*T*k*H*F``), split over the launches in proportion to their executed ``tl.dot`` FLOPs
    (the padding rows every dot of the expert path runs over is the same share in each);
    None: useful = executed. ``ctas``: CTAs per SM for every launch; None: from the compile
    report, ``default_ctas`` where it lists the kernel's config nowhere. ``alt_l2_bytes``:
    also replay through an L2 of that size (``ratio_alt_l2``)."""
    executed_total = sum(l.dot_flops for l in launches)
    rows = []
    for index, launch in enumerate(launches):
        resources = compiled_resources(launch.kernel, launch.meta, report=report)
        if ctas is not None:
            n_ctas, source = ctas, "given"
        elif resources is not None and "num_warps" in launch.meta:
            n_ctas = ctas_per_sm(resources[0], resources[1], int(launch.meta["num_warps"]), target)
            source = f"report: {resources[0]} regs, {resources[1]} B shared"
        else:
            n_ctas, source = default_ctas, "default"
        slots = target.slots(n_ctas)
        traffic = replay(launch, target.l2_bytes, slots)
        alt = replay(launch, alt_l2_bytes, slots) if alt_l2_bytes else None
        executed = launch.dot_flops
        useful = executed if useful_flops is None or not executed_total else useful_flops * executed / executed_total
        t_hbm = traffic.hbm / target.hbm_bytes_per_s
        t_compute = executed / target.flops_per_s
        operands = []
        for op, d in sorted(traffic.per_operand.items()):
            name = launch.operands[op].name if op >= 0 else "(outside the arguments)"
            hbm = d["hbm_read"] + d["hbm_write"]
            operands.append({"operand": name, **d, "ratio": hbm / d["unique"] if d["unique"] else None})
        rows.append({
            **(extra or {}), "index": index, "kernel": launch.kernel, "label": launch.label or launch.kernel,
            "grid": list(launch.grid), "programs": len(launch.programs), "config": _config(launch.meta),
            "ctas_per_sm": n_ctas, "ctas_source": source, "slots": slots, "l2_bytes": traffic.l2_bytes,
            "hbm_read": traffic.hbm_read, "hbm_write": traffic.hbm_write, "hbm": traffic.hbm,
            "unique": traffic.unique, "unique_read": traffic.unique_read, "unique_write": traffic.unique_write,
            "ratio": traffic.hbm / traffic.unique if traffic.unique else None,
            "alt_l2_bytes": alt.l2_bytes if alt else None,
            "hbm_alt_l2": alt.hbm if alt else None,
            "ratio_alt_l2": alt.hbm / alt.unique if alt and alt.unique else None,
            "executed_flops": executed, "useful_flops": useful,
            "ai": useful / traffic.hbm if traffic.hbm else None,
            "t_hbm_us": t_hbm * 1e6, "t_compute_us": t_compute * 1e6, "roofline_us": max(t_hbm, t_compute) * 1e6,
            "bound": "memory" if t_hbm > t_compute else "compute",
            "operands": operands, "interpret_s": round(launch.seconds, 2), "replay_s": round(traffic.seconds, 2),
        })
    return rows


def experts_rows(shape: "str | ExpertShape", *, target: Target = H100, select: int = 0,
                 ctas: Optional[int] = None, default_ctas: int = 1, seed: int = 0,
                 report: str = COMPILE_REPORT) -> List[Dict[str, object]]:
    """The per-kernel rows of one forward + backward of the fused expert path at ``shape`` (a
    :data:`SHAPES` key or an :class:`ExpertShape`), on ``target`` scaled as the shape says;
    CTAs per SM from the sm_90 compile ``report`` (:func:`compiled_resources`)."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    start = time.perf_counter()
    launches = run_experts(shape, select=select, seed=seed)
    scaled = replace(target.scaled(shape.l2_scale), sms=target.sms * shape.sms_scale)
    alt_l2 = target.scaled(shape.l2_scale_alt).l2_bytes if shape.l2_scale_alt != shape.l2_scale else None
    unit = shape.tokens * shape.top_k * shape.hidden * shape.ffn
    rows = []
    for name, useful in (("fwd", 6 * unit), ("bwd", 12 * unit)):
        rows += launch_rows(launches[name], scaled, useful_flops=useful, ctas=ctas, default_ctas=default_ctas,
                            alt_l2_bytes=alt_l2, report=report, extra={"shape": shape.name, "pass": name})
    print(f"{shape.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows


# -- the GEMM validation, as a function the test and the CLI share ------------------------------

# The validation GEMM: fp16 A [M, K] @ B [K, N], 32x32x32 tiles, 4 resident programs; the
# L2 (64 KiB) holds a GROUP_M panel of A plus a few B tiles but not A or B (128 KiB each).
GEMM_CASE = dict(m=512, n=512, k=128, block=(32, 32, 32), group_m=4, slots=4, l2_small=64 * 1024,
                 l2_large=2 * 2**20)


def gemm_expected(m: int, n: int, k: int, block: Tuple[int, int, int], group_m: int, elem: int = 2
                  ) -> Dict[str, int]:
    """Analytic HBM reads of the validation GEMM once a sweep outgrows L2: unswizzled (row
    tiles fastest) A is read once per column tile and B once (its column panel stays hot
    while the sweep runs down the rows); GROUP_M-swizzled, A once (a group's row panel stays
    hot) and B once per group of GROUP_M row tiles. Fitting in L2: each operand once."""
    a, b = m * k * elem, k * n * elem
    tiles_m, tiles_n = math.ceil(m / block[0]), math.ceil(n / block[1])
    return {"unswizzled": a * tiles_n + b, "swizzled": a + b * math.ceil(tiles_m / group_m), "fits": a + b,
            "writes": m * n * elem}


def gemm_traffic(case: Optional[Dict] = None) -> Dict[str, object]:
    """Record the validation GEMM unswizzled and swizzled, replay both through the small L2
    and the unswizzled one through the large L2: HBM bytes beside :func:`gemm_expected`."""
    c = dict(GEMM_CASE, **(case or {}))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(c["m"], c["k"], generator=gen).half()
    b = torch.randn(c["k"], c["n"], generator=gen).half()
    out: Dict[str, object] = {"case": {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()},
                              "expected": gemm_expected(c["m"], c["n"], c["k"], c["block"], c["group_m"])}
    for name, group_m in (("unswizzled", 0), ("swizzled", c["group_m"])):
        with record_traffic() as rec:
            result = matmul(a, b, block=c["block"], group_m=group_m)
        (launch,) = rec.launches
        small = replay(launch, c["l2_small"], c["slots"])
        out[name] = {"hbm_read": small.hbm_read, "hbm_write": small.hbm_write, "unique": small.unique,
                     "grid": list(launch.grid), "dot_flops": launch.dot_flops,
                     "max_abs_err": float((result.double() - a.double() @ b.double()).abs().max())}
        if group_m == 0:
            large = replay(launch, c["l2_large"], c["slots"])
            out["fits"] = {"hbm_read": large.hbm_read, "hbm_write": large.hbm_write, "unique": large.unique}
    return out


# -- output -----------------------------------------------------------------------------------

def _mb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _f(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _written(row: Dict) -> str:
    """``kernel -> what it writes`` (the caller's names where known, else the kernel's)."""
    written = [o["operand"].split(" (")[0] for o in row["operands"] if o["unique_write"]]
    return row["kernel"] + (f" -> {', '.join(written)}" if written else "")


def _report_name(meta: Dict[str, object]) -> str:
    report = str(meta.get("report") or COMPILE_REPORT)
    if os.path.abspath(report) == os.path.abspath(COMPILE_REPORT):
        return "bench/results/compile-sm90.json"
    return report


def markdown(rows: List[Dict], meta: Dict) -> str:
    """The result page: how the model works, the validation, and per shape one row per launch
    plus its operands."""
    lines = [f"# HBM traffic model: fused expert path ({meta['label']})", "",
             "Device-free model (bench/traffic.py): every program's loads and stores recorded at 32-byte "
             "sectors under Triton's interpreter with the sm_90 config the GPU would run (entry "
             f"{meta['config_index']} of `_common`'s table), replayed in the GPU's dispatch order "
             "(blockIdx.x fastest; `slots = SMs x CTAs/SM` resident programs issuing their loads/stores "
             "round-robin, a finished program's slot taken by the next) through a cold, fully associative, "
             "write-back LRU L2. HBM = read misses + dirty evictions (+ dirty lines at the end). Unique = "
             "every touched sector once. AI = useful FLOPs / HBM bytes (useful: the GLU's 6TkHF forward and "
             "12TkHF backward split over the launches by their executed `tl.dot` FLOPs). t_hbm = HBM / "
             "3.35 TB/s, t_mma = executed FLOPs / 800 TFLOP/s (H100 bf16 dense); times are at the scaled "
             f"shape. CTAs/SM from {_report_name(meta)} (registers, shared memory) where it lists "
             f"the kernel's config and flags, else {meta['default_ctas']}.", "",
             f"Source measured: {meta['source']}. Interpreter + replay: {meta['seconds']:.0f} s.", ""]
    v = meta.get("validation")
    if v:
        e = v["expected"]
        lines += ["## Validation: plain GEMM (fp16, M=N=%d, K=%d, 32x32x32 tiles, %d slots, L2 %d KiB)" % (
            v["case"]["m"], v["case"]["k"], v["case"]["slots"], v["case"]["l2_small"] // 1024), "",
            "| ordering | HBM read (model) | analytic | HBM write | analytic |", "|---|---:|---:|---:|---:|"]
        for name, label in (("unswizzled", "row tiles fastest, 2-D grid"),
                            ("swizzled", f"GROUP_M={v['case']['group_m']}, 1-D grid")):
            lines.append(f"| {label} | {v[name]['hbm_read']} | {e[name]} | {v[name]['hbm_write']} | {e['writes']} |")
        lines += [f"| fits in L2 ({v['case']['l2_large'] // 1024} KiB), unswizzled | {v['fits']['hbm_read']} | "
                  f"{e['fits']} | {v['fits']['hbm_write']} | {e['writes']} |", ""]
    for shape_name in dict.fromkeys(r["shape"] for r in rows):
        shape = SHAPES.get(shape_name)
        srows = [r for r in rows if r["shape"] == shape_name]
        lines += [f"## {shape_name}", ""]
        if shape is not None:
            lines += [f"Full layer: {shape.full}. Measured at T={shape.tokens} H={shape.hidden} F={shape.ffn} "
                      f"E={shape.experts} k={shape.top_k} b={shape.block_size}: {shape.scaling}. L2 "
                      f"{srows[0]['l2_bytes'] / 2**20:.3f} MiB (alt {_f((srows[0]['alt_l2_bytes'] or 0) / 2**20, 3)} "
                      f"MiB), {H100.sms * shape.sms_scale:g} SMs.", ""]
        lines += ["| pass | kernel -> writes | grid | config | CTAs/SM | slots | HBM read MB | HBM write MB | "
                  "unique MB | HBM/unique | (alt L2) | AI FLOP/B | t_hbm us | t_mma us | bound |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in srows:
            lines.append(f"| {r['pass']} | {_written(r)} | {'x'.join(map(str, r['grid']))} | {r['config']} | "
                         f"{r['ctas_per_sm']} | {r['slots']} | {_mb(r['hbm_read'])} | {_mb(r['hbm_write'])} | "
                         f"{_mb(r['unique'])} | {_f(r['ratio'])} | {_f(r['ratio_alt_l2'])} | {_f(r['ai'], 1)} | "
                         f"{_f(r['t_hbm_us'], 1)} | {_f(r['t_compute_us'], 1)} | {r['bound']} |")
        total = {k: sum(r[k] for r in srows) for k in ("hbm", "unique", "useful_flops")}
        lines += ["", f"All launches: HBM {_mb(total['hbm'])} MB vs unique {_mb(total['unique'])} MB "
                  f"(x{total['hbm'] / max(total['unique'], 1):.2f}), AI {total['useful_flops'] / max(total['hbm'], 1):.1f}"
                  " FLOP/B. Not modelled: the torch reductions between launches (the k-slot sums of y and of dx "
                  "rows, the router-weight partials).", "",
                  "Per operand (MB unique -> MB HBM read / written, ratio):", ""]
        if shape is not None and shape.column_scale != 1:
            n = 1 / shape.column_scale
            lines[-2:-2] = [
                f"H and F are / {n:g} here, so every grid axis over columns (and every K loop over H or F) "
                f"has {n:g}x fewer steps than at full size. Weights and outputs are touched once either way; "
                "an operand re-read once per grid column (ratio ~ columns here) is re-read about "
                f"{n:g}x as often at full size. Projection for the re-read operands (ratio >= 1.5, small index "
                "vectors left out; ratio x " f"{n:g}: an upper bound, since part of the re-reads may be within a "
                "column, and the output tiles, which do not scale, take a larger share of the scaled L2; read "
                "it as 'grows with the columns unless the full-size L2 holds the operand across a column'): "
                + "; ".join(f"{_written(r).split(' -> ')[0]} ({r['pass']}, grid {'x'.join(map(str, r['grid'][:2]))}) "
                            f"{o['operand'].split(' (')[0]} x{o['ratio']:.1f} -> ~x{o['ratio'] * n:.0f}"
                            for r in srows for o in r["operands"]
                            if o["ratio"] and o["ratio"] >= 1.5 and o["unique"] >= 2**18 and not o["unique_write"])
                + ".", ""]
        for r in srows:
            ops = "; ".join(f"{o['operand']}: {_mb(o['unique'])} -> {_mb(o['hbm_read'])}/{_mb(o['hbm_write'])} "
                            f"(x{_f(o['ratio'])})" for o in r["operands"] if o["unique"] >= 4096)
            lines.append(f"- {r['pass']} {_written(r)}: {ops}")
        lines.append("")
    return "\n".join(lines)


def _shape_worker(args: Tuple[str, Dict]) -> List[Dict]:
    name, kwargs = args
    torch.set_num_threads(1)
    return experts_rows(name, **kwargs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--out-dir", default=os.path.join(_HERE, "results"))
    parser.add_argument("--label", default="before")
    parser.add_argument("--config", type=int, default=0, help="entry of the sm_90 config table (0: largest)")
    parser.add_argument("--ctas", type=int, default=None, help="CTAs per SM for every kernel (default: report)")
    parser.add_argument("--default-ctas", type=int, default=1, help="CTAs per SM where the report has none")
    parser.add_argument("--report", default=COMPILE_REPORT,
                        help="the sm_90 compile report the CTAs per SM come from (an older commit's for "
                             "a 'before' run of that commit's package)")
    parser.add_argument("--jobs", type=int, default=2, help="shapes recorded in parallel processes")
    parser.add_argument("--no-validation", action="store_true")
    parser.add_argument("--source", default=None, help="what the measured package is, for the notes")
    parser.add_argument("--render", default=None, metavar="JSON", help="only rewrite the .md of a results json")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
            f.write(markdown(saved["rows"], saved["meta"]))
        return 0
    start = time.perf_counter()
    names = list(SHAPES) if args.shape == "all" else [args.shape]
    kwargs = dict(select=args.config, ctas=args.ctas, default_ctas=args.default_ctas, report=args.report)
    if args.jobs > 1 and len(names) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(args.jobs, len(names))) as pool:
            results = pool.map(_shape_worker, [(n, kwargs) for n in names])
    else:
        results = [_shape_worker((n, kwargs)) for n in names]
    rows = [r for rs in results for r in rs]
    import subprocess

    try:
        commit = subprocess.run(["git", "-C", os.path.dirname(blocksparse_moe.__file__), "rev-parse", "--short",
                                 "HEAD"], capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        commit = "?"
    meta = {"label": args.label, "config_index": args.config, "default_ctas": args.default_ctas, "report": args.report,
            "ctas": args.ctas, "target": H100.__dict__, "triton": triton.__version__,
            "source": f"{os.path.dirname(blocksparse_moe.__file__)} (git {commit})"
                      + (f", {args.source}" if args.source else ""),
            "shapes": {n: SHAPES[n].__dict__ for n in names}}
    if not args.no_validation:
        meta["validation"] = gemm_traffic()
    meta["seconds"] = time.perf_counter() - start
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"traffic-{args.label}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(rows, meta))
    print(markdown(rows, meta))
    print(f"wrote {base}.json, {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
