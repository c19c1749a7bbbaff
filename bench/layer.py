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

FP8 rows (issue 19; inference: fp8 expert weights serve forward only, so these rows have a
forward time and no forward+backward):

    blocksparse_moe fp8    ``expert_mlp(..., w1_scale=, w2_scale=)`` on the same module's weights
                           quantized to the package's format (e4m3, one fp32 scale per 128x128
                           block, ``bench/common.quantize_experts_fp8``; activations quantized per
                           1x128 group inside the path). On a CPU: the CPU path (quantize,
                           dequantize, fp32 GEMMs), not fp8 hardware.
    torch._scaled_grouped_mm   (GPU, sm_90+) torch's fp8 grouped GEMM with fp32 RowWise scales (a
                           coarser format, the same bytes: a speed reference), sort -> pad each
                           expert to 16 rows -> quantize -> 2 grouped GEMMs -> unsort
    torch scaled_grouped_mm 128x128   torch asked for THIS format (BlockWise1x128 activations,
                           BlockWise128x128 weights); a row that says why when torch rejects it

Their forward is compared with our bf16 (or fp32) forward in the same run (``fwd x ours``:
our unquantized forward time / theirs, >1 = faster). Device-free columns for our two rows:
``weights MB``, the expert weights the forward reads once (every expert the routing hits:
2 bytes per element in bf16, 1 byte plus a 4-byte scale per 128x128 block in fp8), and
``alloc MB / floor``, the bytes a forward of the GPU (Triton) path allocates, counted with
``blocksparse_moe.serving.serving_costs`` (kernels interpreted on CPU tensors, products
counted not run, x in bf16, a uniform top-k routing of the same shape) against the floor
``(T*k*(2F+H) + T*H) * 2`` bytes; by default on a CPU run (a subprocess with
``TRITON_INTERPRET=1``, ``--triton-costs``), off on a GPU, where the rows' ``fresh MB`` of a
forward is the Triton path's own.

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

    python bench/layer.py [--quick] [--dtype bf16] [--shapes mixtral ...] [--out-dir DIR] [--no-triton-costs]
"""

from __future__ import annotations

import argparse
import json
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
_HERE = os.path.dirname(os.path.abspath(__file__))


def _import_transformers_off_this_folder() -> None:
    """This folder's kernels.py shadows the ``kernels`` package transformers probes for (its hub
    kernels then fail to import, and every transformers MoE model with them): import the
    transformers modules this script uses with this folder off ``sys.path``; later imports
    reuse them. ``sys.path`` is restored as it was (a test that put this folder first pops it)."""
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    try:
        import transformers.models.mixtral.modeling_mixtral  # noqa: F401
    except ImportError:  # no transformers: its rows say so
        pass
    finally:
        sys.path[:] = saved


_import_transformers_off_this_folder()
sys.path.insert(0, _HERE)

from common import (SCALED_GROUPED_MM_FORMAT, check_out_dir, expert_weight_bytes, interpreted_rows,  # noqa: E402
                    machine_name, quantize_experts_fp8, scaled_grouped_mm_peer, write_results)

from blocksparse_moe import backend  # noqa: E402
from blocksparse_moe.__main__ import LayerShape, check_device, device_label, peak_memory  # noqa: E402
from blocksparse_moe.costs import count_host_reads, measure_step  # noqa: E402
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

    def fp8_weights(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w1, w1_scale, w2, w2_scale)``: the module's experts in the fp8 format (made once)."""
        if getattr(self, "_fp8", None) is None:
            with torch.no_grad():
                self._fp8 = quantize_experts_fp8(self.module.gate_up_proj, self.module.down_proj)
        return self._fp8

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


def _forward_only(fn: Callable) -> Callable:
    """Mark an implementation as inference only (fp8 expert weights): timed forward, no step."""
    fn.forward_only = True
    return fn


def _blocksparse_fp8(case: Case) -> Callable:
    from blocksparse_moe import expert_mlp

    w1, s1, w2, s2 = case.fp8_weights()
    return _forward_only(lambda x, w: expert_mlp(x, case.expert_indices, w, w1, w2, block_size=case.shape.block_size,
                                                 check_indices=False, w1_scale=s1, w2_scale=s2))


def _scaled_grouped(recipe: str) -> Callable[[Case], Callable]:
    def make(case: Case) -> Callable:
        if not case.shape.glu or case.shape.activation != "silu":
            raise RuntimeError("the torch fp8 peer is written for SiLU GLU experts")
        fn = scaled_grouped_mm_peer(case.module.gate_up_proj.detach(), case.module.down_proj.detach(),
                                    case.shape.top_k, recipe, case.fp8_weights() if recipe == "128x128" else None)
        return _forward_only(lambda x, w: fn(x, case.expert_indices, w))
    return make


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
    "blocksparse_moe fp8": _blocksparse_fp8,
    "torch._scaled_grouped_mm": _scaled_grouped("rowwise"),
    "torch scaled_grouped_mm 128x128": _scaled_grouped("128x128"),
}
#: The inference-only (fp8) rows and the format each reads its weights in (for ``weights MB``).
FP8_IMPLS = {"blocksparse_moe fp8": "128x128", "torch._scaled_grouped_mm": "rowwise",
             "torch scaled_grouped_mm 128x128": "128x128"}


# -- measuring ----------------------------------------------------------------------------------

def _steps(case: Case, forward: Callable) -> Tuple[Callable, Callable]:
    params = case.params + getattr(case, "dense_params", []) + getattr(case, "peer_params", [])

    def fwd():
        with torch.no_grad():
            forward(case.x, case.weights)

    if getattr(forward, "forward_only", False):
        return fwd, None

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
        self.kinds = ("fwd",) if self.step is None else ("fwd", "step")  # forward only: fp8 inference
        self.times: Dict[str, List[float]] = {k: [] for k in self.kinds}
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
            probe_fwd, probe_step = _steps(probe, probe_forward)
            one = time_ms(probe_step or probe_fwd, case.device, min_runs=1, max_runs=1, budget_s=0.0)
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
            t.times = {k: [time_ms(getattr(t, k), device)] for k in t.kinds}
        return
    warm = {}  # one step's time on the full batch (a scaled one: its probe's, scaled)
    for t in timed:
        if t.scale != 1.0:
            warm[id(t)] = t.probe_ms * t.scale
            t.times = {k: [_once(getattr(t, k))] for k in t.kinds}
            continue
        t.fwd()
        # A forward-only row stands in with 3 forwards (a step is ~3x a forward's FLOPs), so it
        # is grouped with the steps it would take as long as.
        warm[id(t)] = _once(t.step) if t.step is not None else 3 * _once(t.fwd)
    fastest = min(warm.values(), default=0.0)
    rest = [t for t in timed if t.scale == 1.0]
    together = [t for t in rest if warm[id(t)] <= 3 * fastest]
    for i, group in enumerate([together] + [[t] for t in rest if t not in together]):
        for t in group:
            t.group = i
        # A step over 5 s (half-precision GEMMs in software): 3 runs say enough.
        least = min(timing["min_runs"], 3) if min(warm[id(t)] for t in group) > 5e3 else timing["min_runs"]
        runs = time_rounds({(j, k): getattr(t, k) for j, t in enumerate(group) for k in t.kinds}, device,
                           min_runs=least, max_runs=max(timing["max_runs"], least),
                           budget_s=timing["budget_s"] * len(group), warmup=False)
        for j, t in enumerate(group):
            t.times = {k: runs[(j, k)] for k in t.kinds}


def _once(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _forward_costs(case: Case, forward: Callable) -> Dict:
    """One inference forward: bytes of new storages and host reads (no backward to count)."""
    with torch.no_grad(), count_host_reads() as c:
        forward(case.x, case.weights)
    return dict(fresh_bytes_per_token=c.fresh_bytes / case.shape.tokens, host_syncs=c.host_reads)


def _finish(t: _Timed) -> None:
    s, row = t.case.shape, t.row
    full = replace(s, tokens=round(s.tokens * t.scale))
    fwd_ms = statistics.median(t.times["fwd"]) * t.scale
    if t.step is None:  # forward only (fp8 inference)
        try:
            row.update(_forward_costs(t.case, t.forward))
            if t.case.device.type == "cuda":
                row["peak_gib"] = peak_memory(t.case.device, t.fwd)
        except Exception as exc:  # noqa: BLE001
            row.update(status=f"failed: {type(exc).__name__}: {exc}"[:200])
            return
        row.update(status="ok, forward only" if t.scale == 1.0 else f"ok, forward only, timed on T={s.tokens}, "
                   f"x{t.scale:g}", forward_ms=fwd_ms, runs=len(t.times["fwd"]),
                   forward_tflops=full.useful_flops(False) / fwd_ms / 1e9)
        return
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
            elif base and "forward_ms" in r:  # a forward-only (fp8) row: forward ratios only
                r["fwd_" + key] = base["forward_ms"] / r["forward_ms"]
    # Every row's forward against our unquantized forward (what fp8 must beat), and the weight
    # bytes our two rows and the fp8 peers read once (device-free: the experts the routing hits).
    ours = next((r for r in rows if r["impl"] == "blocksparse_moe" and "forward_ms" in r), None)
    hit = int(torch.unique(case.expert_indices).numel())
    s = shape
    for r in rows:
        if ours and "forward_ms" in r:
            r["fwd_vs_ours"] = ours["forward_ms"] / r["forward_ms"]
        fmt = FP8_IMPLS.get(r["impl"])
        if fmt == "128x128":
            r["weight_bytes"] = expert_weight_bytes(hit, s.hidden, s.ffn, glu=s.glu, fp8=True)
        elif fmt == "rowwise":  # 1 byte per element and a 4-byte scale per output row of each weight
            r["weight_bytes"] = hit * ((3 if s.glu else 2) * s.ffn * s.hidden + 4 * ((2 if s.glu else 1) * s.ffn
                                                                                    + s.hidden))
        elif r["impl"] == "blocksparse_moe":
            r["weight_bytes"] = expert_weight_bytes(hit, s.hidden, s.ffn, glu=s.glu, dtype_bytes=dtype.itemsize)
        if fmt or r["impl"] == "blocksparse_moe":
            r["experts_hit"] = hit
    return rows


# -- device-free: what a forward of the Triton path allocates (interpreter) --------------------

def triton_costs(shapes: List[LayerShape]) -> List[Dict]:
    """Per shape, one inference forward of the Triton path, bf16 and fp8 weights, counted with
    ``serving_costs`` (needs ``TRITON_INTERPRET=1``): products counted not run, zero-stride
    weights, x in bf16, a uniform top-k routing of the shape. Rows keyed by (shape, impl)."""
    from blocksparse_moe import expert_mlp
    from blocksparse_moe.fp8 import scale_shape
    from blocksparse_moe.serving import floor_bytes, serving_costs

    rows = []
    for s in shapes:
        t, h, f, e, k, g = s.tokens, s.hidden, s.ffn, s.experts, s.top_k, 2 if s.glu else 1
        gen = torch.Generator().manual_seed(0)
        ids = torch.rand(t, e, generator=gen).topk(k, dim=-1).indices
        weights = torch.softmax(torch.randn(t, k, generator=gen), -1)
        x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
        dense = {"w1": torch.empty(1, 1, 1, dtype=torch.bfloat16).expand(e, g * f, h),
                 "w2": torch.empty(1, 1, 1, dtype=torch.bfloat16).expand(e, f, h)}
        fp8 = {"w1": torch.empty(1, 1, 1, dtype=torch.float8_e4m3fn).expand(e, g * f, h),
               "w2": torch.empty(1, 1, 1, dtype=torch.float8_e4m3fn).expand(e, f, h),
               "w1_scale": torch.empty(1, 1, 1).expand(*scale_shape(e, g * f, h)),
               "w2_scale": torch.empty(1, 1, 1).expand(*scale_shape(e, f, h))}
        for impl, kw in (("blocksparse_moe", dense), ("blocksparse_moe fp8", fp8)):
            def fn(kw=kw):
                with torch.no_grad():
                    expert_mlp(x, ids, weights, activation=s.activation, glu=s.glu, block_size=s.block_size,
                               check_indices=False, **kw)
            row = dict(shape=s.name, impl=impl, triton_floor_bytes=floor_bytes(t, k, h, f, g, 2))
            t0 = time.perf_counter()
            try:
                c = serving_costs(fn, (9, 0), run_products=False)
                row.update(triton_fwd_bytes=c.fresh_bytes, triton_launches=c.launches, triton_host_reads=c.host_reads,
                           triton_ctas_launched=c.ctas_launched, triton_ctas_real=c.ctas_real)
            except Exception as exc:  # noqa: BLE001 - a young kernel file: a note, not a lost run
                row["triton_costs_status"] = f"failed: {type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            print(f"  triton costs {s.name} {impl}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return rows


def device_free(shapes: List[LayerShape]) -> Tuple[List[Dict], str]:
    """``(rows, note)``: :func:`triton_costs` here when the interpreter is on, else in a subprocess
    with ``TRITON_INTERPRET=1`` (the shapes travel as JSON: a caller's shapes need not be this
    module's tables)."""
    if backend.interpreter_enabled():
        return triton_costs(shapes), ""
    spec = json.dumps([dict(name=s.name, tokens=s.tokens, hidden=s.hidden, ffn=s.ffn, experts=s.experts,
                            top_k=s.top_k, block_size=s.block_size, glu=s.glu, activation=s.activation)
                       for s in shapes])
    return interpreted_rows(__file__, ["--costs-shapes", spec])


# -- output -------------------------------------------------------------------------------------

HEADER = ("shape", "dtype", "impl", "fwd ms", "fwd+bwd ms", "TFLOP/s", "x grouped_mm", "x ceiling",
          "kept B/token", "syncs", "fresh MB", "peak GiB", "fwd TFLOP/s", "fwd x ours", "weights MB",
          "GPU fwd alloc MB / floor", "status")


def _cells(r: Dict) -> Tuple[str, ...]:
    def f(key, spec, scale=1.0):
        v = r.get(key)
        return "-" if v is None else format(v * scale, spec)
    fresh = r.get("fresh_bytes_per_token")
    fresh_mb = None if fresh is None else fresh * r.get("tokens", 1)
    alloc = (f"{r['triton_fwd_bytes'] / 2**20:,.1f} / {r['triton_floor_bytes'] / 2**20:,.1f}"
             if r.get("triton_fwd_bytes") is not None else "-")
    return (r["shape"], r["dtype"], r["impl"], f("forward_ms", ".1f"), f("step_ms", ".1f"), f("step_tflops", ".3f"),
            f("vs_grouped_mm", ".2f"), f("vs_ceiling", ".2f"), f("kept_bytes_per_token", ",.0f"),
            f("host_syncs", ".0f"), "-" if fresh_mb is None else f"{fresh_mb / 2**20:,.0f}",
            f("peak_gib", ".2f"), f("forward_tflops", ".3f"), f("fwd_vs_ours", ".2f"), f("weight_bytes", ",.1f", 1e-6),
            alloc, r["status"])


CPU_FP8_NOTE = "; on a CPU the CPU path: quantize, dequantize, fp32 GEMMs, not fp8 hardware"


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
             "FP8 rows (issue 19, inference: forward only, so no fwd+bwd, kept bytes or step ratios; syncs and "
             "fresh MB are one forward's): `blocksparse_moe fp8` = our path with the module's experts quantized "
             "to e4m3 with one fp32 scale per 128x128 block (activations per 1x128 group inside the path"
             f"{CPU_FP8_NOTE if meta['device'].startswith('cpu') else ''}); "
             "`torch._scaled_grouped_mm` = torch's fp8 grouped GEMM with fp32 RowWise scales (a coarser "
             "format, the same bytes; GPU sm_90+); `torch scaled_grouped_mm 128x128` = torch asked for this "
             f"format ({SCALED_GROUPED_MM_FORMAT}). `fwd TFLOP/s`: useful forward FLOPs (GLU 6*T*k*H*F); "
             "`fwd x ours`: our unquantized forward's time / this row's (>1 = faster). Device-free: `weights "
             "MB` = the expert weights a forward reads once (the experts the routing hits; fp8: 1 byte per "
             "element + 4 bytes per 128x128 block scale); `GPU fwd alloc MB / floor` = bytes one inference "
             "forward of the Triton path allocates (blocksparse_moe.serving, kernels interpreted on CPU "
             "tensors, products counted not run, x in bf16, a uniform top-k routing) vs the floor "
             "(T*k*(2F+H) + T*H) bf16 elements. "
             f"{meta.get('triton_costs_note', '')}", "",
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
    if meta.get("impls") and set(meta["impls"]) != set(IMPLEMENTATIONS):
        lines += ["", "Implementations run (--impls): " + ", ".join(meta["impls"]) + "."]
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
    p.add_argument("--triton-costs", action=argparse.BooleanOptionalAction, default=None,
                   help="the device-free allocation of a Triton forward (bf16 and fp8), in an interpreter "
                        "subprocess (default: on for a CPU run, off on CUDA)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--costs-json", default=None, help=argparse.SUPPRESS)  # the subprocess of device_free()
    p.add_argument("--costs-shapes", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.costs_json:
        if not backend.interpreter_enabled():
            p.error("--costs-json needs TRITON_INTERPRET=1")
        with open(args.costs_json, "w") as f:
            json.dump(triton_costs([LayerShape(**d) for d in json.loads(args.costs_shapes)]), f)
        return 0
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
    triton_note = "Not counted (--no-triton-costs; off by default on CUDA: a CPU run counts them)."
    if args.triton_costs if args.triton_costs is not None else device.type == "cpu":
        print("device-free columns (Triton forward, interpreter) ...", file=sys.stderr, flush=True)
        free, triton_note = device_free(shapes)
        by_key = {(c["shape"], c["impl"]): c for c in free}
        for r in rows:
            extra = {k: v for k, v in by_key.get((r["shape"], r["impl"]), {}).items() if k not in ("shape", "impl")}
            r.update(extra)
        failed = sorted({c["triton_costs_status"] for c in free if c.get("triton_costs_status")})
        triton_note = triton_note or ("; ".join(failed) if failed else "")

    widths = [max(len(HEADER[i]), *(len(_cells(r)[i]) for r in rows)) for i in range(len(HEADER))]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(_cells(r), widths)))

    dt = str(dtype).replace("torch.", "")
    meta = dict(device=label, machine=machine_name(device), torch=torch.__version__,
                transformers=transformers.__version__, quick=bool(args.quick), dtype=dt,
                threads=torch.get_num_threads(), load_start=load_start,
                load_end=", ".join(f"{v:.1f}" for v in os.getloadavg()), triton_costs_note=triton_note,
                impls=args.impls or list(IMPLEMENTATIONS))
    plot = dict(value="step_tflops", label="forward+backward useful TFLOP/s", group="shape", series="impl",
                title=f"experts fwd+bwd, {dt}: {meta['machine']} (load average {load_start.split(',')[0]})")
    write_results(args.out_dir, f"layer-{label}-{dt}", meta, rows, _markdown(rows, meta), plot=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
