"""Expert-path benchmark: every token's k expert MLPs, forward and forward+backward, against
what users would otherwise pick, in the same run on the same weights, routing and inputs.

    blocksparse_moe        the package's expert path (``expert_path`` below: the one adapter)
    hf-grouped_mm          transformers' "grouped_mm" experts implementation (torch._grouped_mm)
    hf-batched_mm          transformers' "batched_mm" (gathers a weight matrix per slot: skipped,
                           with the memory it would need, when that does not fit)
    hf-eager (loop)        transformers' own per-expert loop (MixtralExperts.forward)
    dense ceiling          T*k rows through ONE H->2F->H GLU MLP, plain torch autograd: the same
                           useful FLOPs with no routing at all
    gemm floor             the six per-expert GEMMs alone (rows gathered and sorted beforehand,
                           untimed; no activation, weighting or scatter): what any one-GEMM-per-
                           expert implementation spends on this BLAS before doing anything else
    torch._grouped_mm      (GPU) a minimal sort -> grouped_mm -> GLU -> grouped_mm -> unsort
    liger / megablocks / scattermoe   (GPU) when installed; otherwise a row that says why

Experts only: the router is not timed (its top-k ids and fp32 weights are inputs). Weights
are a transformers ``MixtralExperts`` module's (``gate_up_proj [E, 2F, H]``, ``down_proj
[E, H, F]``); blocksparse_moe reads the same tensors in place (``w2 = down_proj^T`` view).

Per shape and implementation: medians of forward and forward+backward (warm-up excluded;
CUDA: ``triton.testing.do_bench``; CPU: the implementations take turns, one run each per
round, so a machine that speeds up or slows down during the run shifts them all alike), useful TFLOP/s (GLU ``18*T*k*H*F`` per forward+backward,
padding not counted), the ratios against transformers' grouped_mm and the dense ceiling,
and the costs of one step (``blocksparse_moe.costs.measure_step``): bytes kept for backward
per token (x and weights excluded), host syncs, fresh bytes; on a GPU the peak memory.

An fp16/bf16 implementation whose step would take longer than ``--budget`` seconds (half
GEMMs on a CPU without half-precision hardware run ~100x slower than fp32) is timed on an
eighth of the tokens and its time scaled to the full batch (GEMM time is linear in the
tokens); its status says so.

Writes ``layer-<device>[-<dtype>].json``, ``.md`` and ``.png`` under ``--out-dir`` (bench/results).

    python bench/layer.py [--quick] [--dtype bf16] [--shapes mixtral ...] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

try:  # the installed package (with its built _C) if there is one, else this checkout
    import blocksparse_moe  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import check_out_dir, machine_name, write_results  # noqa: E402

from blocksparse_moe import backend  # noqa: E402
from blocksparse_moe.__main__ import LayerShape, check_device, device_label, peak_memory  # noqa: E402
from blocksparse_moe.costs import measure_step  # noqa: E402
from blocksparse_moe.timing import synchronize, time_ms, time_rounds  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The two CPU shapes (Mixtral-style and fine-grained); full-size layers on a GPU.
CPU_SHAPES = [
    LayerShape("mixtral", 2048, 1024, 1024, 8, 2, 128),
    LayerShape("fine-grained", 2048, 1024, 256, 64, 8, 64),
]
GPU_SHAPES = [
    LayerShape("mixtral-8x7b", 8192, 4096, 14336, 8, 2, 128),
    LayerShape("qwen3-moe-30b-a3b", 8192, 2048, 768, 128, 8, 64),
]


# -- THE call timed for blocksparse_moe ---------------------------------------------------------

def expert_path(x: torch.Tensor, expert_indices: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                w2: torch.Tensor, *, block_size: int, act: str = "silu", glu: bool = True) -> torch.Tensor:
    """blocksparse_moe's expert path (the public fused ``expert_mlp``), the only place this
    script calls the package for it. The benchmark's ids are made in range: no check."""
    from blocksparse_moe import expert_mlp

    return expert_mlp(x, expert_indices, weights, w1, w2, activation=act, glu=glu, block_size=block_size,
                      check_indices=False)


# -- one case: the same module, routing and inputs for every implementation ---------------------

class Case:
    def __init__(self, shape: LayerShape, dtype: torch.dtype, device: torch.device, seed: int = 0):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        g = torch.Generator().manual_seed(seed)
        t, h, f, e, k = shape.tokens, shape.hidden, shape.ffn, shape.experts, shape.top_k
        self.shape, self.dtype, self.device = shape, dtype, device
        config = MixtralConfig(hidden_size=h, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k,
                               hidden_act="silu")
        self.module = MixtralExperts(config)
        with torch.no_grad():
            self.module.gate_up_proj.copy_(torch.randn(e, 2 * f, h, generator=g) / math.sqrt(h))
            self.module.down_proj.copy_(torch.randn(e, h, f, generator=g) / math.sqrt(f))
        self.module.to(device, dtype)
        self.x = torch.randn(t, h, generator=g).to(device, dtype)
        # k distinct experts per token, uniformly at random (a router's top-k of random
        # logits), and softmax weights over them in float32 (what routers return).
        self.expert_indices = torch.rand(t, e, generator=g).topk(k, dim=-1).indices.to(device)
        self.weights = torch.softmax(torch.randn(t, k, generator=g), -1).to(device)
        self.gout = torch.randn(t, h, generator=g).to(device, dtype)

    @property
    def params(self) -> List[torch.Tensor]:
        return list(self.module.parameters())

    def smaller(self, tokens: int) -> "Case":
        return Case(replace(self.shape, tokens=tokens), self.dtype, self.device)


def _hf(name: str) -> Callable[[Case], Callable]:
    def make(case: Case) -> Callable:
        from blocksparse_moe.peers import transformers_experts

        if name == "batched_mm":
            s, f, h = case.shape.tokens * case.shape.top_k, case.shape.ffn, case.shape.hidden
            need = 3 * s * f * h * case.x.element_size() * 2  # gathered weights, and their gradients
            have = _memory_bytes(case.device)
            if need > 0.5 * have:
                raise MemoryError(f"needs ~{need / 2**30:.0f} GiB for per-slot weight copies, "
                                  f"{have / 2**30:.0f} GiB here")
        fn = transformers_experts(case.module, impl=name)  # the module's own parameters and layout
        return lambda x, w: fn(x, case.expert_indices, w)
    return make


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _blocksparse(case: Case) -> Callable:
    w1 = case.module.gate_up_proj
    w2 = case.module.down_proj.transpose(1, 2)  # [E, F, H], a view: read in place
    return lambda x, w: expert_path(x, case.expert_indices, w, w1, w2, block_size=case.shape.block_size)


def _dense(case: Case) -> Callable:
    """The ceiling: T*k rows (each token repeated k times, not timed) through one GLU MLP."""
    g = torch.Generator().manual_seed(1)
    s = case.shape
    w1 = torch.nn.Parameter((torch.randn(2 * s.ffn, s.hidden, generator=g) / math.sqrt(s.hidden)).to(
        case.device, case.dtype))
    w2 = torch.nn.Parameter((torch.randn(s.hidden, s.ffn, generator=g) / math.sqrt(s.ffn)).to(
        case.device, case.dtype))
    rows = case.x.repeat_interleave(s.top_k, 0)
    case.dense_params = [w1, w2]

    def forward(x, w):
        h = F.linear(rows if x is case.x else rows.detach().requires_grad_(x.requires_grad), w1)
        gate, up = h.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)
    forward.gout = torch.randn(rows.shape, generator=g).to(case.device, case.dtype)
    return forward


class _GemmFloor(torch.autograd.Function):
    """The six GEMMs per expert of a GLU expert MLP and nothing else: h = x w1^T, y =
    h[:, :F] w2 (h's first half stands in for the activation), dA = dy w2^T, dW2 = a^T dy,
    dW1 = dh^T x, dx = dh w1 (h stands in for dh). Fresh gradient buffers, as autograd's."""

    @staticmethod
    def forward(ctx, xs, w1, w2, sizes):
        ffn = w2.shape[1]
        h = xs.new_empty(xs.shape[0], w1.shape[1])
        y = xs.new_empty(xs.shape[0], w2.shape[2])
        r0 = 0
        for e, n in enumerate(sizes):
            torch.mm(xs[r0:r0 + n], w1[e].t(), out=h[r0:r0 + n])
            torch.mm(h[r0:r0 + n, :ffn], w2[e], out=y[r0:r0 + n])
            r0 += n
        ctx.save_for_backward(xs, w1, w2, h)
        ctx.sizes = sizes
        return y

    @staticmethod
    def backward(ctx, dy):
        xs, w1, w2, h = ctx.saved_tensors
        ffn = w2.shape[1]
        dx, dw1, dw2 = torch.empty_like(xs), torch.empty_like(w1), torch.empty_like(w2)
        r0 = 0
        for e, n in enumerate(ctx.sizes):
            rows = slice(r0, r0 + n)
            torch.mm(dy[rows], w2[e].t())
            torch.mm(h[rows, :ffn].t(), dy[rows], out=dw2[e])
            torch.mm(h[rows].t(), xs[rows], out=dw1[e])
            torch.mm(h[rows], w1[e], out=dx[rows])
            r0 += n
        return dx, dw1, dw2, None


def _gemm_floor(case: Case) -> Callable:
    """Per-expert GEMMs on rows sorted by expert beforehand (not timed, like the ceiling's)."""
    s = case.shape
    ids = case.expert_indices.reshape(-1)
    order = torch.sort(ids, stable=True).indices
    sizes = torch.bincount(ids, minlength=s.experts).tolist()
    xs = case.x.index_select(0, order // s.top_k)
    w1 = case.module.gate_up_proj
    w2 = case.module.down_proj.transpose(1, 2)

    def forward(x, w):
        return _GemmFloor.apply(xs if x is case.x else xs.detach().requires_grad_(x.requires_grad), w1, w2, sizes)
    forward.gout = torch.randn(xs.shape, generator=torch.Generator().manual_seed(2)).to(case.device, case.dtype)
    return forward


def _torch_grouped_mm(case: Case) -> Callable:
    if case.device.type != "cuda":
        raise RuntimeError("needs CUDA (on CPU, transformers' grouped_mm row is this)")
    s = case.shape
    w1 = case.module.gate_up_proj.transpose(1, 2)  # [E, H, 2F]
    w2 = case.module.down_proj.transpose(1, 2)  # [E, F, H]

    def forward(x, w):
        ids = case.expert_indices.reshape(-1)
        order = torch.argsort(ids, stable=True)
        offs = torch.cumsum(torch.bincount(ids, minlength=s.experts), 0).to(torch.int32)
        h = torch._grouped_mm(x[order // s.top_k], w1, offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, w2, offs=offs) * w.reshape(-1)[order, None].to(x.dtype)
        out = torch.empty_like(y).index_copy_(0, order, y)
        return out.view(s.tokens, s.top_k, -1).sum(1)
    return forward


def _gpu_peer(module: str) -> Callable[[Case], Callable]:
    def make(case: Case) -> Callable:
        import importlib

        try:
            importlib.import_module(module)
        except ImportError:
            raise RuntimeError(f"not installed ({module})") from None
        if case.device.type != "cuda":
            raise RuntimeError("needs CUDA")
        if module == "scattermoe":
            from scattermoe.mlp import GLUMLP

            s = case.shape
            mlp = GLUMLP(input_size=s.hidden, hidden_size=s.ffn, num_experts=s.experts, top_k=s.top_k,
                         activation=torch.nn.SiLU()).to(case.device, case.dtype)
            case.peer_params = list(mlp.parameters())
            return lambda x, w: mlp(x, w.to(x.dtype), case.expert_indices)
        raise RuntimeError("installed, but its experts-only entry point is not mapped here yet")
    return make


IMPLEMENTATIONS: Dict[str, Callable[[Case], Callable]] = {
    "blocksparse_moe": _blocksparse,
    "hf-grouped_mm": _hf("grouped_mm"),
    "hf-batched_mm": _hf("batched_mm"),
    "hf-eager (loop)": _hf("eager"),
    "dense ceiling": _dense,
    "gemm floor": _gemm_floor,
    "torch._grouped_mm": _torch_grouped_mm,
    "liger": _gpu_peer("liger_kernel"),
    "megablocks": _gpu_peer("megablocks"),
    "scattermoe": _gpu_peer("scattermoe"),
}


# -- measuring ----------------------------------------------------------------------------------

def _steps(case: Case, forward: Callable) -> Tuple[Callable, Callable]:
    params = case.params + getattr(case, "dense_params", []) + getattr(case, "peer_params", [])

    def fwd():
        with torch.no_grad():
            forward(case.x, case.weights)

    def step():
        for p in params:
            p.grad = None
        x = case.x.detach().requires_grad_(True)
        w = case.weights.detach().requires_grad_(True)
        out = forward(x, w)
        out.backward(getattr(forward, "gout", case.gout))
    return fwd, step


def _costs(case: Case, forward: Callable) -> Dict:
    x = case.x.detach().requires_grad_(True)
    w = case.weights.detach().requires_grad_(True)
    exclude = [x, w, case.x, *case.params, *getattr(case, "dense_params", []), *getattr(case, "peer_params", [])]
    c = measure_step(lambda: forward(x, w), exclude=exclude)
    t = case.shape.tokens
    return dict(kept_bytes_per_token=c.kept_bytes / t, fresh_bytes_per_token=c.fresh_bytes / t,
                host_syncs=c.host_reads)


class _Timed:
    """One implementation ready to time: its row, its two step functions and how its time
    scales to the full batch (``scale`` > 1: timed on a smaller case, once)."""

    def __init__(self, row: Dict, case: Case, forward: Callable, scale: float):
        self.row, self.case, self.forward, self.scale = row, case, forward, scale
        self.fwd, self.step = _steps(case, forward)
        self.times: Dict[str, List[float]] = {"fwd": [], "step": []}
        self.group = -1  # implementations timed in the same rounds share a group
        self.probe_ms = 0.0


def prepare(name: str, case: Case, budget_s: float) -> Tuple[Dict, Optional[_Timed]]:
    s = case.shape
    row = dict(shape=s.name, config=s.describe(), dtype=str(case.dtype).replace("torch.", ""), impl=name)
    try:
        forward = IMPLEMENTATIONS[name](case)
        if case.device.type == "cpu" and case.dtype in (torch.float16, torch.bfloat16):
            # Half-precision GEMMs may run in software here: a probe step on 1/8 of the tokens
            # says whether the full batch fits the budget.
            probe_tokens = max(s.tokens // 8, 1)
            probe = case.smaller(probe_tokens)
            probe_forward = IMPLEMENTATIONS[name](probe)
            one = time_ms(_steps(probe, probe_forward)[1], case.device, min_runs=1, max_runs=1, budget_s=0.0)
            if one * 8 > budget_s * 1e3:  # the probe was its warm-up
                timed = _Timed(row, probe, probe_forward, s.tokens / probe_tokens)
                timed.probe_ms = one
                return row, timed
        return row, _Timed(row, case, forward, 1.0)
    except Exception as exc:  # noqa: BLE001 - a peer that is missing, needs CUDA or does not fit
        row.update(status=f"skipped: {type(exc).__name__}: {exc}"[:200])
        return row, None


def _time_all(timed: List[_Timed], device: torch.device, timing: Dict) -> None:
    """Fill every ``t.times``. CUDA: each alone (``do_bench``). CPU: in rounds
    (``timing.time_rounds``), one forward and one step of each implementation per round,
    for at least ``min_runs`` rounds. A scaled one runs once (its probe step in ``prepare``
    was its warm-up).
    An implementation whose warm-up step took over 3x the fastest one's is timed on its
    own afterwards: in turn, each of its runs would take as long as a whole round of the
    others and leave the caches and the allocator to them in its state."""
    if device.type == "cuda":
        for t in timed:
            t.times = {k: [time_ms(getattr(t, k), device)] for k in ("fwd", "step")}
        return
    warm = {}  # one step's time on the full batch (a scaled one: its probe's, scaled)
    for t in timed:
        if t.scale != 1.0:
            warm[id(t)] = t.probe_ms * t.scale
            t.times = {"fwd": [_once(t.fwd)], "step": [_once(t.step)]}
            continue
        t.fwd()
        warm[id(t)] = _once(t.step)
    fastest = min(warm.values(), default=0.0)
    rest = [t for t in timed if t.scale == 1.0]
    together = [t for t in rest if warm[id(t)] <= 3 * fastest]
    for i, group in enumerate([together] + [[t] for t in rest if t not in together]):
        for t in group:
            t.group = i
        # A step over 5 s (half-precision GEMMs in software): 3 runs say enough.
        least = min(timing["min_runs"], 3) if min(warm[id(t)] for t in group) > 5e3 else timing["min_runs"]
        runs = time_rounds({(j, k): getattr(t, k) for j, t in enumerate(group) for k in ("fwd", "step")}, device,
                           min_runs=least, max_runs=max(timing["max_runs"], least),
                           budget_s=timing["budget_s"] * len(group), warmup=False)
        for j, t in enumerate(group):
            t.times = {k: runs[(j, k)] for k in ("fwd", "step")}


def _once(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _finish(t: _Timed) -> None:
    s, row = t.case.shape, t.row
    full = replace(s, tokens=round(s.tokens * t.scale))
    fwd_ms = statistics.median(t.times["fwd"]) * t.scale
    step_ms = statistics.median(t.times["step"]) * t.scale
    try:
        row.update(_costs(t.case, t.forward))
        if t.case.device.type == "cuda":
            row["peak_gib"] = peak_memory(t.case.device, t.step)
    except Exception as exc:  # noqa: BLE001
        row.update(status=f"failed: {type(exc).__name__}: {exc}"[:200])
        return
    row.update(status="ok" if t.scale == 1.0 else f"ok, timed on T={s.tokens}, x{t.scale:g}",
               forward_ms=fwd_ms, step_ms=step_ms, runs=len(t.times["step"]),
               forward_tflops=full.useful_flops(False) / fwd_ms / 1e9,
               step_tflops=full.useful_flops(True) / step_ms / 1e9)


def bench_shape(shape: LayerShape, dtype: torch.dtype, device: torch.device, timing: Dict, budget_s: float,
                only: Optional[List[str]] = None) -> List[Dict]:
    case = Case(shape, dtype, device)
    rows, timed = [], []
    for name in IMPLEMENTATIONS:
        if only and name not in only:
            continue
        print(f"  {shape.name} {name} ...", file=sys.stderr, flush=True)
        row, t = prepare(name, case, budget_s)
        rows.append(row)
        if t is not None:
            timed.append(t)
    try:
        _time_all(timed, device, timing)
    except Exception as exc:  # noqa: BLE001 - one failing implementation: time the others alone
        print(f"  interleaved timing failed ({exc}); timing one by one", file=sys.stderr)
        for t in timed:
            try:
                _time_all([t], device, timing)
                t.group = -1  # timed alone: no per-round ratios with the others
            except Exception as e:  # noqa: BLE001
                t.row.update(status=f"failed: {type(e).__name__}: {e}"[:200])
    for t in timed:
        if "status" not in t.row:
            _finish(t)
    synchronize(device)
    for base_name, key in (("hf-grouped_mm", "vs_grouped_mm"), ("dense ceiling", "vs_ceiling")):
        base = next((r for r in rows if r["impl"] == base_name and "step_ms" in r), None)
        base_t = next((t for t in timed if t.row is base), None)
        for r, t in ((t.row, t) for t in timed):
            if base and "step_ms" in r:
                r[key] = base["step_ms"] / r["step_ms"]
                r["fwd_" + key] = base["forward_ms"] / r["forward_ms"]
                if base_t.group == t.group >= 0 and t.scale == 1.0:  # the same rounds: their spread
                    per_round = [b / m for b, m in zip(base_t.times["step"], t.times["step"])]
                    r[key + "_rounds"] = [min(per_round), statistics.median(per_round), max(per_round)]
    return rows


# -- output -------------------------------------------------------------------------------------

HEADER = ("shape", "dtype", "impl", "fwd ms", "fwd+bwd ms", "TFLOP/s", "x grouped_mm", "x ceiling",
          "kept B/token", "syncs", "fresh MB", "peak GiB", "status")


def _cells(r: Dict) -> Tuple[str, ...]:
    def f(key, spec, scale=1.0):
        v = r.get(key)
        return "-" if v is None else format(v * scale, spec)
    fresh = r.get("fresh_bytes_per_token")
    fresh_mb = None if fresh is None else fresh * r.get("tokens", 1)
    return (r["shape"], r["dtype"], r["impl"], f("forward_ms", ".1f"), f("step_ms", ".1f"), f("step_tflops", ".3f"),
            f("vs_grouped_mm", ".2f"), f("vs_ceiling", ".2f"), f("kept_bytes_per_token", ",.0f"),
            f("host_syncs", ".0f"), "-" if fresh_mb is None else f"{fresh_mb / 2**20:,.0f}",
            f("peak_gib", ".2f"), r["status"])


def _markdown(rows: List[Dict], meta: Dict) -> str:
    lines = [f"# Expert-path benchmark: {meta['machine']}", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['dtype']}, "
             f"{'quick run, ' if meta['quick'] else ''}medians, warm-up excluded; load average at start "
             f"{meta['load_start']}, at end {meta['load_end']}. Experts only (routing given). TFLOP/s counts useful "
             "work only (GLU 18*T*k*H*F per forward+backward). `x grouped_mm` / `x ceiling`: forward+backward "
             "speed relative to transformers' grouped_mm experts and to the dense ceiling (>1 = faster). "
             "kept B/token: bytes saved for backward per token (x and weights excluded); syncs: host reads "
             "of device data per step; fresh MB: bytes of new tensors in one step. `gemm floor`: the "
             "per-expert GEMMs alone on pre-sorted rows (what a one-GEMM-per-expert design spends before "
             "any routing work).", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    configs = {}
    for r in rows:
        lines.append("| " + " | ".join(_cells(r)) + " |")
        configs[r["shape"]] = r["config"]
    spread = [r for r in rows if r.get("vs_ceiling_rounds") and r["impl"] != "dense ceiling"]
    if spread:
        lines += ["", "Forward+backward ratios per round (the implementations take turns; min / median / max "
                  "over the rounds):", ""]
        for r in spread:
            parts = [f"{key[3:-7].replace('_', ' ')} {lo:.2f} / {mid:.2f} / {hi:.2f}"
                     for key in ("vs_grouped_mm_rounds", "vs_ceiling_rounds")
                     if r.get(key) and not (key == "vs_grouped_mm_rounds" and r["impl"] == "hf-grouped_mm")
                     for lo, mid, hi in [r[key]]]
            lines.append(f"- {r['shape']} {r['impl']}: " + "; ".join(parts))
    lines += ["", "Shapes:"] + [f"- `{k}`: {v}" for k, v in configs.items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Expert-path benchmark (blocksparse_moe vs transformers and peers)")
    p.add_argument("--quick", action="store_true", help="an eighth of the tokens, few timing runs")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--shapes", nargs="*", default=None)
    p.add_argument("--impls", nargs="*", default=None, help=f"only these of {list(IMPLEMENTATIONS)}")
    p.add_argument("--budget", type=float, default=60.0, help="seconds one step may take before it is "
                   "timed on fewer tokens and scaled (CPU)")
    p.add_argument("--runs", type=int, default=None, help="timing rounds (default: at least 11, up to 30 "
                   "while each implementation has had under 2 s)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    device = check_device(p, args.device)
    check_out_dir(p, args.out_dir)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.shapes:
        unknown = set(args.shapes) - {s.name for s in shapes}
        if unknown:
            p.error(f"unknown shapes {sorted(unknown)}; known: {[s.name for s in shapes]}")
        shapes = [s for s in shapes if s.name in args.shapes]
    if args.impls and set(args.impls) - set(IMPLEMENTATIONS):
        p.error(f"unknown implementations {sorted(set(args.impls) - set(IMPLEMENTATIONS))}")
    if args.quick:
        shapes = [replace(s, tokens=max(1, s.tokens // 8)) for s in shapes]
    timing = dict(min_runs=3, max_runs=5, budget_s=0.5) if args.quick else dict(min_runs=11, max_runs=30,
                                                                                  budget_s=2.0)
    if args.runs:
        timing = dict(min_runs=args.runs, max_runs=args.runs, budget_s=0.0)
    import transformers

    label = device_label(device)
    load_start = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    rows: List[Dict] = []
    with backend.prefer_on_cpu("cpu"):
        for shape in shapes:
            print(f"{shape.name}: {shape.describe()}", file=sys.stderr, flush=True)
            for r in bench_shape(shape, dtype, device, timing, args.budget, args.impls):
                r["tokens"] = shape.tokens
                rows.append(r)

    widths = [max(len(HEADER[i]), *(len(_cells(r)[i]) for r in rows)) for i in range(len(HEADER))]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(_cells(r), widths)))

    dt = str(dtype).replace("torch.", "")
    meta = dict(device=label, machine=machine_name(device), torch=torch.__version__,
                transformers=transformers.__version__, quick=bool(args.quick), dtype=dt,
                threads=torch.get_num_threads(), load_start=load_start,
                load_end=", ".join(f"{v:.1f}" for v in os.getloadavg()))
    plot = dict(value="step_tflops", label="forward+backward useful TFLOP/s", group="shape", series="impl",
                title=f"experts fwd+bwd, {dt}: {meta['machine']} (load average {load_start.split(',')[0]})")
    write_results(args.out_dir, f"layer-{label}-{dt}", meta, rows, _markdown(rows, meta), plot=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
