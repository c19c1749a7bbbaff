"""Shared by ``python -m blocksparse_moe`` and ``bench/layer.py``: named layer shapes, the
reference check of one layer, timing, FLOP counts, device names.

Nothing here runs at import (no device probing); everything is called by the two scripts.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import reference
from .moe import DroplessMoE


@dataclass
class LayerShape:
    """One MoE layer configuration and the batch it is run on."""

    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    block_size: int
    glu: bool = True
    activation: str = "silu"
    shared: int = 0
    options: Dict = field(default_factory=dict)  # router options passed to DroplessMoE

    def layer_kwargs(self) -> Dict:
        return dict(activation=self.activation, glu=self.glu, block_size=self.block_size,
                    shared_expert_size=self.shared, **self.options)

    def useful_flops(self, backward: bool = True) -> float:
        """GLU ``6*T*k*H*F`` forward / ``18*T*k*H*F`` forward+backward, plain MLP ``4`` / ``12``
        (padding rows not counted); a shared expert adds the same per token with ``k*F -> S``.
        The router (``2*T*H*E``) and the permutes are not counted."""
        per = (6 if self.glu else 4) * (3 if backward else 1)
        return float(per) * self.tokens * self.hidden * (self.top_k * self.ffn + self.shared)

    def describe(self) -> str:
        s = f"T={self.tokens} H={self.hidden} F={self.ffn} E={self.experts} k={self.top_k} b={self.block_size}"
        if self.shared:
            s += f" S={self.shared}"
        return s + ("" if self.glu else " mlp")


_DEEPSEEK_ROUTER = dict(score="sigmoid", renormalize=True, expert_bias=True, scaling_factor=2.5)

# Full-size shapes (GPU): the real layers' widths, 8192 tokens.
GPU_SHAPES = [
    LayerShape("mixtral-8x7b", 8192, 4096, 14336, 8, 2, 128),
    LayerShape("qwen3-moe-30b-a3b", 8192, 2048, 768, 128, 8, 64),
    # DeepSeek-V3's router (sigmoid, expert bias, renormalised, x2.5) at DeepSeek-V2-Lite's
    # size (64 experts of 1408, top-6, two shared experts = one of width 2816).
    LayerShape("deepseek-v3-like", 8192, 2048, 1408, 64, 6, 64, shared=2816, options=_DEEPSEEK_ROUTER),
]
# Scaled down for CPUs (same E, k and routing character, narrower): the whole CPU run of
# the main job stays around a minute on two cores.
CPU_SHAPES = [
    LayerShape("mixtral-8x7b", 512, 256, 512, 8, 2, 64),
    LayerShape("qwen3-moe-30b-a3b", 512, 128, 128, 128, 8, 32),
    LayerShape("deepseek-v3-like", 512, 128, 128, 64, 6, 32, shared=256, options=_DEEPSEEK_ROUTER),
]


def scaled(shape: LayerShape, factor: float) -> LayerShape:
    """The same layer on ``factor`` times the tokens (``--quick``)."""
    return LayerShape(**{**asdict(shape), "tokens": max(1, int(shape.tokens * factor))})


# -- devices ----------------------------------------------------------------------------------

def device_label(device: torch.device) -> str:
    """A short file-name-safe device name: ``H100-80GB-HBM3``, ``cpu-Intel-Xeon-Platinum``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).replace("NVIDIA", "")
        return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "cuda"
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1] for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    model = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|@.*$|\d+-Core", " ", model)
    words = [w for w in re.split(r"[^A-Za-z0-9]+", model) if w][:3]
    return "cpu-" + ("-".join(words) or "unknown")


def write_results(out_dir: str, name: str, meta: Dict, rows: List[Dict], markdown: str) -> str:
    """``<out_dir>/<name>.json`` (meta + rows) and ``.md``; ``name`` carries the device label."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown)
    print(f"wrote {base}.json and {base}.md")
    return base


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, min_runs: int = 5, max_runs: int = 30,
            budget_s: float = 2.0) -> float:
    """Median wall time of ``fn`` in ms, warm-up excluded (CUDA: ``triton.testing.do_bench``)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    runs: List[float] = []
    deadline = time.perf_counter() + budget_s
    while len(runs) < min_runs or (len(runs) < max_runs and time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(runs)


# -- tolerances: THE table lives in blocksparse_moe/tolerances.py ----------------------------

def tolerance_table() -> Dict:
    """``TOL``, the one tolerance table the tests use too."""
    from .tolerances import TOL

    return TOL


def _ratio(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> Tuple[float, float]:
    """``(max |a - e|, max |a - e| / (atol + rtol |e|))``: the second must be <= 1; NaN -> inf."""
    expected = expected.detach()
    a = actual.detach().to(expected.device, torch.float64)
    if a.numel() == 0:
        return 0.0, 0.0
    if not torch.isfinite(a).all():
        return math.inf, math.inf
    diff = (a - expected).abs()
    return float(diff.max()), float((diff / (atol + rtol * expected.abs())).max())


# -- one layer ------------------------------------------------------------------------------

def build_layer(shape: LayerShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> DroplessMoE:
    torch.manual_seed(seed)
    layer = DroplessMoE(shape.hidden, shape.ffn, shape.experts, shape.top_k, dtype=dtype, device=device,
                        load_balancing_coef=0.01, z_loss_coef=0.001, **shape.layer_kwargs())
    if layer.router.expert_bias is not None:  # a trained-looking bias, so it steers something
        with torch.no_grad():
            layer.router.expert_bias.copy_(torch.randn(shape.experts, device=device) * 0.01)
    return layer


def check_layer(layer: DroplessMoE, x: torch.Tensor, tol: Dict) -> Dict:
    """Output and every gradient of ``layer`` vs ``reference.moe_reference`` in float64.

    The reference runs on a float64 copy of the (rounded) parameters and input, on the same
    device, with the layer's own expert choice (a near-tie must not flip between dtypes).
    Returns ``{"ok", "max_abs_err" (output), "worst_ratio" (error / tolerance, <= 1 passes),
    "worst" (which tensor)}``.
    """
    dtype = x.dtype
    layer64 = copy.deepcopy(layer).to(torch.float64)
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out, aux = layer(x)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=x.device, dtype=dtype)
    ((out * gout).sum() + aux.aux_loss).backward()

    x64 = x.detach().double().requires_grad_(True)
    ref = reference.moe_reference(x64, **layer64.reference_weights(), expert_indices=aux.expert_indices)
    lc, zc = layer.router.load_balancing_coef, layer.router.z_loss_coef
    ((ref["out"] * gout.double()).sum() + lc * ref["load_balancing_loss"] + zc * ref["z_loss"]).backward()

    rtol, atol = tol[("layer", dtype)]
    pairs = [("out", out, ref["out"]), ("d x", x.grad, x64.grad)]
    grads64 = dict(layer64.named_parameters())
    for name, p in layer.named_parameters():
        g64 = grads64[name].grad
        pairs.append((f"d {name}", p.grad, torch.zeros_like(grads64[name]) if g64 is None else g64))
    worst, worst_name, out_err = 0.0, "", 0.0
    for name, a, e in pairs:
        if a is None:
            return dict(ok=False, max_abs_err=math.inf, worst_ratio=math.inf, worst=f"{name}: no gradient")
        err, ratio = _ratio(a, e, rtol, atol)
        if name == "out":
            out_err = err
        if ratio > worst or math.isnan(ratio):
            worst, worst_name = ratio, name
    layer.zero_grad(set_to_none=True)
    return dict(ok=bool(worst <= 1.0), max_abs_err=out_err, worst_ratio=worst, worst=worst_name)


def time_layer(layer: torch.nn.Module, x: torch.Tensor, forward: Callable, device: torch.device,
               **timing) -> Tuple[float, float]:
    """``(forward ms, forward+backward ms)`` medians for ``forward(x) -> out``."""
    gout = torch.randn_like(x)
    params = [p for p in layer.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            forward(x)

    def fwd_bwd():
        for p in params:
            p.grad = None
        xg = x.detach().requires_grad_(True)
        out = forward(xg)
        out.backward(gout)

    return time_ms(fwd, device, **timing), time_ms(fwd_bwd, device, **timing)


def peak_memory(device: torch.device, fn: Callable[[], object]) -> Optional[float]:
    """Peak allocated GiB while running ``fn`` (CUDA only; None on CPU: not measurable here)."""
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30
