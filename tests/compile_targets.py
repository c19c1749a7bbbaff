"""Ahead-of-time compilation of every Triton kernel variant the package launches, for real
GPU targets, on a machine without a GPU. Shared by tests/test_compile_targets.py and
bench/compile_report.py (which writes bench/results/compile-sm*.md/json).

Why: Triton's interpreter, which runs the kernels in CI, accepts code a GPU compiler rejects
(Python globals inside ``@triton.jit`` code, for one) and says nothing about registers,
spills or shared memory. ``triton.compile`` with a ``GPUTarget`` runs the real pipeline down
to Triton's bundled ptxas without a device.

1. :func:`record` runs the package's own launchers, through the public ops and
   ``DroplessMoE`` forward + backward, on small CPU tensors under the interpreter, and
   intercepts every Triton launch at the Triton level (``InterpretedFunction.run``): the
   kernel, the type of every argument, its constexprs and num_warps. Nothing is listed by
   hand, so a kernel in a file added later (``kernels/experts.py``) is recorded as soon as
   an op or the layer launches it. What that launch would compile on a GPU comes from
   ``kernels._common``: a launch made through ``_common.launch(..., tiles=Tiles(...))``
   compiles every config of ``Tiles.variants(capability)`` (the target's autotune
   candidates, fp32 with and without TF32); a launch through ``_common.launch`` without
   tiles compiles as recorded; a launch that bypassed ``_common.launch`` (no device guard)
   is compiled as recorded too, and :func:`unguarded` names it so the test fails.
2. :func:`jobs` turns launches into compile jobs per target. Integer arguments are
   specialized as on a GPU at production sizes: a value 1 (unit strides) becomes the
   constexpr 1, as Triton does at run time, every other one and every pointer is taken as
   16-divisible (``full=True`` adds the unaligned specialization of each launch too).
3. :func:`compile_jobs` compiles in worker processes without ``TRITON_INTERPRET`` (there
   ``triton.jit`` gives real ``JITFunction``\\ s) with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", cap, 32))``, and reads registers and local-memory (spill) bytes
   from the cubin (``cuobjdump -res-usage``, bundled with Triton: the same numbers Triton's
   ``n_regs`` / ``n_spills`` report on a GPU), shared bytes from the kernel's metadata plus
   the cubin's static shared memory, and the MMA instruction kind from the PTX.
4. :func:`problems`: compile errors, spills, shared memory over the target's per-block limit.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]

# Per-block shared memory a kernel may use (opt-in maximum, bytes), by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
# The targets of the sweep; those this Triton cannot compile for are skipped (see targets()).
TARGETS = (80, 90, 100)

_TORCH_TO_TRITON = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16",
                    "torch.float64": "fp64", "torch.int32": "i32", "torch.int64": "i64", "torch.int16": "i16",
                    "torch.int8": "i8", "torch.uint8": "u8", "torch.bool": "i1", "torch.float8_e4m3fn": "fp8e4nv"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# -- 1. recording ---------------------------------------------------------------------------

@dataclass
class Launch:
    """One recorded launch: enough to compile the kernel again for any target."""

    module: str
    qualname: str
    # (name, kind, value), kind one of "ptr" (value: the dtype), "int", "u1", "fp32", "constexpr"
    args: List[Tuple[str, str, object]]
    options: Dict[str, int]
    plan: object = None  # a _common.Tiles, "fixed" (launch() without tiles) or None (bypassed launch())
    aligned: Dict[str, bool] = field(default_factory=dict)  # pointers / ints as recorded: 16-divisible?

    @property
    def kernel(self) -> str:
        return f"{self.module}.{self.qualname}"

    def key(self):
        return (self.module, self.qualname, repr(self.args), repr(sorted(self.options.items())), repr(self.plan),
                repr(sorted(self.aligned.items())))


def _arg(name: str, value, is_constexpr: bool) -> Tuple[Tuple[str, str, object], Optional[bool]]:
    if is_constexpr or value is None:
        return (name, "constexpr", value), None
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return (name, "ptr", str(value.dtype)), value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return (name, "u1", value), None
    if isinstance(value, int):
        return (name, "int", value), value % 16 == 0
    if isinstance(value, float):
        return (name, "fp32", value), None
    raise TypeError(f"compile_targets: cannot record argument {name}={value!r} ({type(value).__name__})")


def record(workload=None, execute: bool = False) -> List[Launch]:
    """Distinct launches made while ``workload()`` (default :func:`default_workload`) runs.

    With ``execute=False`` the intercepted launches are recorded but not run (the outputs
    keep whatever ``torch.empty`` gave them): the recording then takes seconds instead of
    minutes, and nothing on the host reads a kernel's output (the layer makes no host
    reads of device data; routing and topology are not Triton kernels). Needs
    ``TRITON_INTERPRET=1`` set before ``blocksparse_moe`` was imported (tests/conftest.py and
    bench/compile_report.py do that).
    """
    from triton.runtime.interpreter import InterpretedFunction

    from blocksparse_moe import backend
    from blocksparse_moe.kernels import _common

    if not backend.interpreter_enabled():
        raise RuntimeError("compile_targets.record needs TRITON_INTERPRET=1 before blocksparse_moe is imported")
    seen: Dict[tuple, Launch] = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        params = {p.name: p for p in inspect.signature(fn).parameters.values()}
        constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        options = {k: v for k, v in kwargs.items() if k in _OPTIONS and v is not None}
        recorded, aligned = [], {}
        for name in self.arg_names:
            if name not in bound:  # a parameter with a default
                bound[name] = params[name].default
            entry, al = _arg(name, bound[name], name in constexprs)
            recorded.append(entry)
            if al is not None:
                aligned[name] = al
        launch = Launch(fn.__module__, fn.__qualname__, recorded, options, _common._LAUNCHING.get(), aligned)
        seen.setdefault(launch.key(), launch)
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        with backend.prefer_on_cpu("interpreter"):
            (workload or default_workload)()
    finally:
        InterpretedFunction.run = original
    return list(seen.values())


def default_workload(dtypes=None, block_sizes=(16, 32, 64, 128)) -> None:
    """What the recorder watches: ``DroplessMoE`` forward + backward (GLU, every block size
    and dtype; plain MLP), the public products with both transposes, the activations (every
    activation, GLU and plain, forward + backward), the permutes, the sdd's row gather
    (reached through its launcher: the layer's fused gather is not wired yet), and the weight
    gradient's split launch (:func:`_wgrad_split_workload`)."""
    import torch

    from blocksparse_moe import ops
    from blocksparse_moe import kernels
    from blocksparse_moe.ops import permute as permute_ops
    from blocksparse_moe.ops import products
    from blocksparse_moe.moe import DroplessMoE
    from blocksparse_moe.routing import route

    dtypes = dtypes or (torch.float32, torch.float16, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    H, T, E, K = 32, 6, 2, 2

    def randn(*shape, dtype, grad=False):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    for dtype in dtypes:
        for b in block_sizes:
            # The layer's fused expert kernels: each activation on the load and in backward, at
            # every row padding b. F = 128 whatever b is: the column tiles are bounded by F
            # (col_tile), not by b, so a small b runs with wide column tiles.
            layer_cases = ((True, "silu"), (False, "gelu"), (True, "gelu_tanh"), (False, "relu"))
            for glu, act in layer_cases:
                layer = DroplessMoE(H, 128, E, K, glu=glu, activation=act, block_size=b, dtype=dtype)
                out, aux = layer(randn(T, H, dtype=dtype, grad=True))
                (out.float().square().sum() + aux.aux_loss).backward()
            r = route(torch.randint(0, E, (T, K), generator=g), E, b, ffn_hidden_size=b)
            topo = r.topology
            p, n = topo.shape
            s = ops.sdd(randn(p, H, dtype=dtype, grad=True), randn(H, n, dtype=dtype, grad=True), topo)
            for y in (ops.dsd(s, randn(n, H, dtype=dtype)), ops.dsd(s.t(), randn(p, H, dtype=dtype)),
                      ops.dds(randn(H, p, dtype=dtype, grad=True), s), ops.dds(randn(H, n, dtype=dtype), s.t())):
                y.float().sum().backward(retain_graph=True)
            rows = permute_ops._permute_invert_rows(r.padded_rows, p)  # row gather: a_rows from the routing
            kernels.sdd(randn(T, H, dtype=dtype), randn(H, n, dtype=dtype), *products._meta(topo), b,
                           a_rows=rows // K)
        for act in ("silu", "gelu", "gelu_tanh", "relu"):
            h = randn(3, 2 * 64, dtype=dtype, grad=True)
            ops.sparse_glu_packed(h, act).float().sum().backward()
            gate, up = randn(3, 64, dtype=dtype, grad=True), randn(3, 64, dtype=dtype, grad=True)
            ops.sparse_glu(gate, up, act).float().sum().backward()
            ops.sparse_activation(gate, act).float().sum().backward()
        x = randn(T, H, dtype=dtype, grad=True)
        r = route(torch.randint(0, E, (T, K), generator=g), E, 16)
        w = torch.rand(T, K, generator=g).to(dtype).requires_grad_(True)
        ops.scatter(ops.gather(x, r, K), r, w, K).float().sum().backward()
        ops.padded_scatter(ops.padded_gather(x, r, K), r, None, K).float().sum().backward()
    _wgrad_split_workload(g, dtypes, (block_sizes[0], block_sizes[-1]))
    if torch.bfloat16 in dtypes:
        _fp8_workload(g, block_sizes)


def _wgrad_split_workload(g, dtypes, block_sizes) -> None:
    """The weight gradient's split variant and its second pass (kernels/expert_wgrad.py): a
    layer with biases, forward + backward, with the chunk length forced to one row padding b
    (the rule would not split a problem this small), so the grid holds an extra chunk slot."""
    import torch

    from blocksparse_moe.kernels import expert_wgrad
    from blocksparse_moe.moe import DroplessMoE

    H, T, E, K = 32, 6, 2, 2
    saved = expert_wgrad.SPLIT_ROWS
    try:
        for dtype in dtypes:
            for b in block_sizes:
                expert_wgrad.SPLIT_ROWS = b
                layer = DroplessMoE(H, 128, E, K, glu=True, bias=True, block_size=b, dtype=dtype)
                out, aux = layer(torch.randn(T, H, generator=g).to(dtype).requires_grad_(True))
                (out.float().square().sum() + aux.aux_loss).backward()
    finally:
        expert_wgrad.SPLIT_ROWS = saved


def _fp8_workload(g, block_sizes) -> None:
    """The fp8 expert path (forward only), as served: bf16 x, w2 the transposed view of a
    checkpoint's down_proj [E, H, F] (F-contiguous, K-major), GLU with biases and weights and
    plain without, at every row padding b. H = 160: a short last 128-group and scale strides
    other than 1, as at real sizes."""
    import torch

    from blocksparse_moe import expert_mlp
    from blocksparse_moe.fp8 import quantize_weight_blockwise

    H, F, T, E, K = 160, 128, 6, 2, 2
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, E, (T, K), generator=g)
    for b in block_sizes:
        for glu, act in ((True, "gelu_tanh"), (False, "silu")):
            w1, s1 = quantize_weight_blockwise(torch.randn(E, (2 if glu else 1) * F, H, generator=g))
            w2t, s2t = quantize_weight_blockwise(torch.randn(E, H, F, generator=g))  # down_proj [E, H, F]
            bias = dict(b1=torch.randn(E, 2 * F, generator=g).to(torch.bfloat16),
                        b2=torch.randn(E, H, generator=g).to(torch.bfloat16)) if glu else {}
            weights = torch.rand(T, K, generator=g) if glu else None
            expert_mlp(x, ids, weights, w1, w2t.transpose(1, 2), **bias, activation=act, glu=glu, block_size=b,
                       w1_scale=s1, w2_scale=s2t.transpose(1, 2))


def unguarded(launches: Sequence[Launch]) -> List[str]:
    """Kernels launched without ``_common.launch`` (so without a device guard)."""
    return sorted({l.kernel for l in launches if l.plan is None})


# -- 2. compile jobs ------------------------------------------------------------------------

def targets() -> List[int]:
    """The capabilities of :data:`TARGETS` this Triton can compile for."""
    from triton.backends.nvidia.compiler import CUDABackend

    out = []
    for cap in TARGETS:
        try:
            from triton.backends.compiler import GPUTarget

            if CUDABackend.supports_target(GPUTarget("cuda", cap, 32)):
                out.append(cap)
        except Exception:  # an older Triton without the target's enum values
            continue
    return out


def _variants(launch: Launch, cap: int) -> List[Dict[str, object]]:
    """Constexpr overrides + options this launch compiles with on ``cap``."""
    if launch.plan is None or launch.plan == "fixed":
        base: Dict[str, object] = dict(launch.options)
        if launch.plan is None and any(name == "INTERPRET" for name, _, _ in launch.args):
            base["INTERPRET"] = False  # the GPU branch of _common.dot
        return [base]
    return launch.plan.variants((cap // 10, cap % 10), kernel=launch.qualname)


def _fp8_target(launch: Launch, cap: int) -> int:
    """The target a launch compiles for in place of ``cap``: sm_80 has no fp8 tensor cores,
    so an fp8 launch (an e4m3 pointer) compiles for sm_89 (Ada), the sm80 family of the fp8
    config tables (kernels/_common.py)."""
    fp8 = any(kind == "ptr" and value == "torch.float8_e4m3fn" for _, kind, value in launch.args)
    return 89 if fp8 and cap < 89 else cap


def is_fp8(result: dict) -> bool:
    """Whether a job or result is an fp8 product (an e4m3 operand pointer)."""
    return "*fp8e4nv" in result["signature"].values()


def jobs(launches: Sequence[Launch], caps: Sequence[int], full: bool = False) -> List[dict]:
    """One compile job per (launch, target, variant), deduplicated; fp8 launches compile for
    sm_89 in place of sm_80 (:func:`_fp8_target`)."""
    out: Dict[str, dict] = {}
    for launch in launches:
        for cap in (_fp8_target(launch, c) for c in caps):
            for variant in _variants(launch, cap):
                for spec in (("aligned", "recorded") if full else ("aligned",)):
                    signature, constexprs, divisible = {}, {}, []
                    for name, kind, value in launch.args:
                        if name in variant:
                            kind, value = "constexpr", variant[name]
                        if kind == "constexpr":
                            signature[name] = "constexpr"
                            constexprs[name] = value
                        elif kind == "int" and value == 1:  # Triton specializes 1 at run time
                            signature[name] = "constexpr"
                            constexprs[name] = 1
                        else:
                            signature[name] = ("*" + _TORCH_TO_TRITON[value] if kind == "ptr" else
                                               "i32" if kind == "int" and abs(value) < 2**31 else
                                               "i64" if kind == "int" else kind)
                            if kind in ("ptr", "int") and (spec == "aligned" or launch.aligned.get(name)):
                                divisible.append(name)
                    options = {k: variant.get(k, launch.options.get(k)) for k in ("num_warps", "num_stages")}
                    options = {k: v for k, v in options.items() if v is not None}
                    job = dict(module=launch.module, qualname=launch.qualname, capability=cap, signature=signature,
                               constexprs=constexprs, divisible=divisible, options=options, spec=spec,
                               guarded=launch.plan is not None)
                    out.setdefault(json.dumps(job, sort_keys=True, default=str), job)
    return list(out.values())


def _config_of(job: dict) -> tuple:
    c = job["constexprs"]
    return tuple(c.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + tuple(sorted(job["options"].items()))


def covering(all_jobs: Sequence[dict], per_block_size: bool = True) -> List[dict]:
    """A subset of ``all_jobs`` (one target's worth or more) in which every autotune config
    of every (kernel, target, dtype, input precision[, block size]) compiles at least once,
    and so does every recorded launch of it (its flags and operand layout): configs and
    launches are paired round-robin, ``max(#configs, #launches)`` jobs per group instead of
    their product. The CI sweep; :func:`jobs` alone is the full one."""
    groups: Dict[tuple, Dict[str, Dict[tuple, List[dict]]]] = {}
    for job in all_jobs:
        c = job["constexprs"]
        block = c.get("BLOCK") if per_block_size else 0
        key = (job["module"], job["qualname"], job["capability"], dtype_of(job), block)
        rest = {k: v for k, v in c.items() if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        layout = (json.dumps(rest, sort_keys=True, default=str), json.dumps(job["signature"], sort_keys=True),
                  json.dumps(job["divisible"]), job["spec"])
        g = groups.setdefault(key, {"by_layout": {}, "configs": {}})
        g["by_layout"].setdefault(layout, {})[_config_of(job)] = job
        g["configs"].setdefault(_config_of(job), None)
    out = []
    for g in groups.values():
        layouts, configs = list(g["by_layout"]), list(g["configs"])
        for i in range(max(len(layouts), len(configs))):
            by_config = g["by_layout"][layouts[i % len(layouts)]]
            # Every launch of a group has the same config list unless its flags change the clipping.
            want = configs[i % len(configs)]
            out.append(by_config.get(want) or next(iter(by_config.values())))
    unique = {json.dumps(j, sort_keys=True, default=str): j for j in out}
    return list(unique.values())


def ci_jobs(launches: Sequence[Launch]) -> List[dict]:
    """The sweep that runs in CI (about a minute on 2 cores; one compile takes ~1 s, mostly
    LLVM). sm_90: every recorded launch in bf16 and fp32 (true fp32 and TF32) at block sizes
    16 and 128 (the smallest tiles and the unclipped configs), every config of each at
    least once (:func:`covering`), and every elementwise launch in bf16. sm_80 and
    sm_100: every config of the bf16 products at block size 128. fp16 (bf16's twin in
    registers and shared memory) and block sizes 32 and 64 (tiles between the two swept)
    are in the full sweep (:func:`jobs` of every launch). The fp8 forward (bf16 x): sm_90
    at every block size, sm_89 (for sm_80) and sm_100 at block sizes 16 and 128."""
    caps = targets()
    keep = {"bf16", "fp32", "fp32 (tf32)", "-", "i32"}
    out = []
    for cap in caps:
        selected = []
        for job in jobs(launches, [cap]):
            c = job["constexprs"]
            product = "BLOCK_M" in c
            # A product's block size (the weight-gradient kernel has none: its row tile stands in).
            block = c.get("BLOCK", c.get("BLOCK_M"))
            if dtype_of(job) not in keep:
                continue
            if cap == 90 and is_fp8(job):  # the fp8 forward: every block size (wgmma at each)
                selected.append(job)
            elif cap == 90 and (block in (16, 128) if product else dtype_of(job) in ("bf16", "-")):
                selected.append(job)
            elif cap != 90 and product and block in ((16, 128) if is_fp8(job) else (128,)) \
                    and dtype_of(job) == "bf16":
                selected.append(job)
        out += covering(selected)
    return out


# -- 3. compiling ---------------------------------------------------------------------------

def _mma_kind(ptx: str) -> str:
    for kind, pattern in (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"),
                          ("mma.sync", "\tmma.")):
        if pattern in ptx:
            return kind
    return "none"


def _mma_instruction(ptx: str) -> str:
    """The first MMA instruction of the PTX with its shape and types (e.g.
    ``wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3``), "" if none: says whether an
    fp8 product really multiplies e4m3 operands."""
    m = re.search(r"(?:tcgen05\.mma|wgmma\.mma_async|mma\.sync)\S*", ptx)
    return m.group(0) if m else ""


def _resources(cubin: bytes) -> Dict[str, int]:
    """REG / STACK / LOCAL / SHARED of the cubin's one kernel, read by Triton's cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{text}")
    return dict(zip(("regs", "stack", "static_shared", "local"), map(int, m.groups())))


def _compile_one(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = dict(job)
    try:
        fn = getattr(importlib.import_module(job["module"]), job["qualname"])
        names = fn.arg_names
        constexprs = {(names.index(n),): v for n, v in job["constexprs"].items()}
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in job["divisible"]}
        src = ASTSource(fn, dict(job["signature"]), constexprs, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", job["capability"], 32), options=job["options"])
        res = _resources(kernel.asm["cubin"])
        ttgir = kernel.asm.get("ttgir", "")
        # Pipeline depth: the leading dimension of the multi-buffered shared tiles.
        buffers = [int(x) for x in re.findall(r"!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
        result.update(ok=True, regs=res["regs"], spill_bytes=res["stack"] + res["local"],
                      shared=kernel.metadata.shared + res["static_shared"], mma=_mma_kind(kernel.asm["ptx"]),
                      mma_instruction=_mma_instruction(kernel.asm["ptx"]),
                      buffers=max(buffers) if buffers else 0)
        if job.get("keep_ttir"):
            result["ttir"] = kernel.asm["ttir"]
    except Exception as exc:  # the compile error is the result
        # Triton wraps the cause (e.g. "Cannot access global variable") in a CompilationError
        # that shows the source line: keep the head and tail of every exception in the chain.
        parts, e = [], exc
        while e is not None and len(parts) < 4:
            lines = [l for l in str(e).splitlines() if l.strip()]
            parts.append("\n".join([f"{type(e).__name__}: {lines[0] if lines else ''}"] + lines[1:][-4:]))
            e = e.__cause__ or e.__context__
        result.update(ok=False, error="\n  caused by ".join(parts))
    return result


def _worker() -> None:
    """A compile worker: one job per line on stdin, one result per line on the original
    stdout. Everything else printed (Triton prints ptxas failures, C code writes to fd 1)
    goes to stderr, so it cannot garble the results."""
    import warnings

    warnings.filterwarnings("ignore")
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        results.write(json.dumps(_compile_one(json.loads(line))) + "\n")
        results.flush()


def compile_jobs(jobs: Sequence[dict], workers: Optional[int] = None, progress=None) -> List[dict]:
    """Compile ``jobs`` in ``workers`` processes (default: one per CPU) with the interpreter
    off, handing out one job at a time; ``progress(done, total)`` is called after each."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    pending = list(enumerate(jobs))
    results: List[Optional[dict]] = [None] * len(jobs)
    lock = threading.Lock()

    def run():
        with tempfile.TemporaryFile(mode="w+") as log:
            proc = subprocess.Popen([sys.executable, "-c", "import compile_targets; compile_targets._worker()"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                    cwd=str(REPO))
            try:
                while True:
                    with lock:
                        if not pending:
                            break
                        i, job = pending.pop(0)
                    proc.stdin.write(json.dumps(job) + "\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                    if not line:
                        log.seek(0)
                        raise RuntimeError(f"compile worker died ({proc.poll()}):\n{log.read()[-4000:]}")
                    results[i] = json.loads(line)
                    if progress is not None:
                        with lock:
                            progress(sum(r is not None for r in results), len(results))
            finally:
                proc.stdin.close()
                proc.wait()

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run) for _ in range(workers)]:
            future.result()
    return results


# -- 4. checks and the report ---------------------------------------------------------------

def label(result: dict) -> str:
    kernel = result["qualname"].strip("_").replace("_kernel", "")
    flags = ", ".join(f"{k}={v}" for k, v in sorted(result["constexprs"].items())
                      if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "INTERPRET") and not k.startswith("stride"))
    return f"{kernel} sm_{result['capability']} [{flags}] {result['options']}"


def problems(results: Sequence[dict]) -> List[str]:
    """Compile errors, register spills and shared memory over the per-block limit."""
    out = []
    for r in results:
        if not r["ok"]:
            out.append(f"{label(r)}: compile error: {r['error']}")
            continue
        if r["spill_bytes"]:
            out.append(f"{label(r)}: spills {r['spill_bytes']} bytes to local memory ({r['regs']} registers)")
        limit = SHARED_LIMIT[r["capability"]]
        if r["shared"] > limit:
            out.append(f"{label(r)}: {r['shared']} bytes of shared memory, over sm_{r['capability']}'s {limit}")
    return out


def dtype_of(result: dict) -> str:
    ptrs = [t[1:] for t in result["signature"].values() if t.startswith("*") and t[1:] in ("fp32", "fp16", "bf16")]
    dtype = ptrs[0] if ptrs else "-"
    if dtype == "fp32" and result["constexprs"].get("INPUT_PRECISION") == "tf32":
        return "fp32 (tf32)"
    return dtype


def _layout(result: dict) -> str:
    """Which stride arguments are the constexpr 1 (the unit-stride layout of the launch)."""
    unit = [n.replace("stride_", "") for n, v in result["constexprs"].items() if n.startswith("stride") and v == 1]
    return ",".join(unit) or "-"


def rows(results: Sequence[dict]) -> List[dict]:
    out = []
    for r in sorted(results, key=lambda r: (r["capability"], r["module"], r["qualname"], dtype_of(r),
                                            r["constexprs"].get("BLOCK", 0), json.dumps(r["constexprs"], default=str),
                                            json.dumps(r["options"]))):
        c = r["constexprs"]
        tiles = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c)
        config = " ".join(filter(None, [tiles, f"w{r['options'].get('num_warps', 4)}",
                                        f"s{r['options']['num_stages']}" if "num_stages" in r["options"] else ""]))
        flags = " ".join(f"{k}={v}" for k, v in sorted(c.items())
                         if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK", "INTERPRET", "INPUT_PRECISION")
                         and not k.startswith("stride") and v is not None)
        out.append(dict(kernel=r["qualname"].strip("_").replace("_kernel", ""), target=f"sm_{r['capability']}",
                        dtype=dtype_of(r), block_size=c.get("BLOCK") if "BLOCK_M" in c else None, flags=flags,
                        unit_strides=_layout(r), config=config, spec=r["spec"], ok=r["ok"],
                        regs=r.get("regs"), spill_bytes=r.get("spill_bytes"), shared=r.get("shared"),
                        mma=r.get("mma"), buffers=r.get("buffers"), error=r.get("error")))
    return out


def summary(results: Sequence[dict]) -> Dict[str, object]:
    ok = [r for r in results if r["ok"]]
    return dict(variants=len(results), compiled=len(ok), errors=len(results) - len(ok),
                max_regs=max((r["regs"] for r in ok), default=0),
                spilling=sum(1 for r in ok if r["spill_bytes"]),
                max_shared=max((r["shared"] for r in ok), default=0))


