"""``python -m blocksparse_moe``: build a few real MoE layers, check them, time them.

For each named shape (Mixtral-8x7B, Qwen3-MoE-30B-A3B, a DeepSeek-like layer; full size on a
GPU, scaled down on a CPU) this

1. checks the layer against the dense float64 reference (``reference.py``) on this device:
   the output and every gradient (input, router, experts, biases, shared expert), within
   the tolerance table of the layer's dtype (tests/tolerances.py);
2. times forward and forward+backward (medians, warm-up excluded), and what users would
   otherwise run around the same router (``peers.py``);
3. prints a table: tokens/s, useful TFLOP/s (GLU ``18*T*k*H*F`` per forward+backward, plain
   MLP ``12*T*k*H*F``; padding not counted), the layer's speedup over each peer, the
   output's max error, peak memory (CUDA).

Exits 1 if a check fails or a peer's output differs from the layer's. On a CPU it runs the
torch CPU path (never the Triton interpreter, which is for tests), in float32 by default.

    python -m blocksparse_moe [--quick] [--dtype bf16] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import reference
from .moe import DroplessMoE
from .timing import synchronize, time_rounds

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}

# -- the main job's pieces (bench/layer.py builds on them too) -----------------------------------

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


def layer_steps(layer: torch.nn.Module, x: torch.Tensor, forward: Callable) -> Tuple[Callable, Callable]:
    """``(forward, forward+backward)`` of ``forward(x) -> out``, ready to time; the step
    starts from ``grad = None`` as ``zero_grad()`` leaves it."""
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

    return fwd, fwd_bwd


# Timing rounds (timing.time_rounds): the layer and its peers take turns on a CPU.
TIMING = dict(min_runs=5, max_runs=30, budget_s=2.0)  # budget per implementation
QUICK_TIMING = dict(min_runs=3, max_runs=5, budget_s=0.5)


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


# -- the command line -----------------------------------------------------------------------------


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    """The arguments, every one checked before any work starts (argparse errors, exit 2):
    a device torch knows and that is there, a dtype it runs, known shapes, and a --json
    path whose directory exists and is writable."""
    p = argparse.ArgumentParser(prog="python -m blocksparse_moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and timing runs (a smoke test)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="layer dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
    p.add_argument("--shapes", nargs="*", default=None, help="only these shape names")
    args = p.parse_args(argv)
    args.device = check_device(p, args.device)
    if args.dtype == "fp64" and args.device.type == "cuda":
        p.error("--dtype fp64 runs on the CPU path only (use --device cpu)")
    known = [s.name for s in (GPU_SHAPES if args.device.type == "cuda" else CPU_SHAPES)]
    unknown = sorted(set(args.shapes or ()) - set(known))
    if unknown:
        p.error(f"unknown shapes {unknown}; known: {known}")
    if args.json is not None:
        check_output_file(p, "--json", args.json)
    return args


def check_device(parser: argparse.ArgumentParser, name: Optional[str]) -> torch.device:
    """``--device`` as a torch.device that this machine has (default: cuda if available)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        parser.error(f"--device {name!r} is not a device torch knows; use cpu or cuda[:N]")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {name!r} but no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def check_output_file(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
    """Fail now, not after the work, when ``path`` cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"{flag} {path!r} is a directory; give a file name")
    if not os.path.isdir(directory):
        parser.error(f"{flag} {path!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        parser.error(f"{flag} {path!r}: directory {directory!r} is not writable")


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import backend
    from .native import native_status
    from .peers import compare_peers

    device = args.device  # checked by _parse
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s.name in args.shapes]
    if args.quick:
        shapes = [scaled(s, 0.25) for s in shapes]
    tol = tolerance_table()
    # The float64 reference materialises every expert's activations: check on at most 1024
    # tokens of a GPU batch (all of them on a CPU), time on the whole batch.
    check_tokens = 1024 if device.type == "cuda" else None
    timing = QUICK_TIMING if args.quick else TIMING
    label = device_label(device)

    rows: List[Dict] = []
    with backend.prefer_on_cpu("cpu"):
        bar = tqdm(shapes, desc="blocksparse_moe", unit="layer", file=sys.stderr)
        for shape in bar:
            bar.set_postfix_str(f"{shape.name}: check")
            layer = build_layer(shape, dtype, device)
            x = torch.randn(shape.tokens, shape.hidden, generator=torch.Generator().manual_seed(2)).to(device, dtype)
            res = check_layer(layer, x[:check_tokens] if check_tokens else x, tol)
            bar.set_postfix_str(f"{shape.name}: time (and peers)")

            def forward(inp, layer=layer):
                return layer(inp)[0]

            peak = peak_memory(device, lambda: forward(x.detach().requires_grad_(True)).backward(torch.ones_like(x)))
            base = dict(shape=shape.name, config=shape.describe(), device=label, dtype=str(dtype).replace("torch.", ""),
                        tokens=shape.tokens)
            # Peers around the same router: the same output as ours, or a row that says why not.
            peers = dict(compare_peers(layer, x, *tol[("layer", dtype)]))
            impls = {"blocksparse_moe": layer_steps(layer, x, forward)}
            for name, p in ((n, p) for n, p in peers.items() if "forward" in p):
                try:  # its warm-up, alone: a peer that fails (out of memory, say) is a row, not the end
                    impls[name] = layer_steps(layer, x, p["forward"])
                    for f in impls[name]:
                        f()
                except RuntimeError as exc:
                    del impls[name]
                    p["check"] = f"failed: {exc}"[:120]
            for f in impls["blocksparse_moe"]:
                f()
            runs = time_rounds({(n, i): f for n, fs in impls.items() for i, f in enumerate(fs)}, device,
                               warmup=False, **dict(timing, budget_s=timing["budget_s"] * len(impls)))

            def timed(name, **extra):
                f_ms, s_ms = (statistics.median(runs[(name, i)]) for i in (0, 1))
                return dict(base, impl=name, **extra, forward_ms=f_ms, step_ms=s_ms,
                            tokens_per_s=shape.tokens / s_ms * 1e3, tflops=shape.useful_flops(True) / s_ms / 1e9,
                            forward_tflops=shape.useful_flops(False) / f_ms / 1e9)
            rows.append(timed("blocksparse_moe", max_abs_err=res["max_abs_err"], worst_tol_ratio=res["worst_ratio"],
                              worst_tensor=res["worst"], check="ok" if res["ok"] else "FAIL", peak_gib=peak))
            for name, p in peers.items():
                if name not in impls:
                    rows.append(dict(base, impl=name, check=p["check"]))
                    continue
                ratio = statistics.median(a / b for a, b in zip(runs[(name, 1)], runs[("blocksparse_moe", 1)]))
                rows.append(timed(name, ours_speedup=ratio, check=p["check"]))
            del layer

    header = ("shape", "impl", "device", "dtype", "fwd ms", "fwd+bwd ms", "tokens/s", "TFLOP/s", "ours x",
              "max err", "err/tol", "peak GiB", "check")
    table = [header] + [(r["shape"], r["impl"], r["device"], r["dtype"], _fmt(r.get("forward_ms"), ".2f"),
                         _fmt(r.get("step_ms"), ".2f"), _fmt(r.get("tokens_per_s"), ",.0f"),
                         _fmt(r.get("tflops"), ".3f"), _fmt(r.get("ours_speedup"), ".2f"),
                         _fmt(r.get("max_abs_err"), ".2e"), _fmt(r.get("worst_tol_ratio"), ".2f"),
                         _fmt(r.get("peak_gib"), ".2f"), r["check"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    print()
    for i, row in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\nTFLOP/s: useful FLOPs of forward+backward (GLU 18*T*k*H*F, MLP 12*T*k*H*F, + shared expert), "
          "padding not counted. ours x: this row's fwd+bwd time / blocksparse_moe's, the median over the rounds in "
          "which they took turns (> 1: ours is faster). "
          "err/tol: worst |error| / tolerance over the output and every gradient.")
    for r in (r for r in rows if r["check"] in ("FAIL", "DIFFERS")):
        print(f"FAILED: {r['shape']}: " + (f"{r['impl']}'s output differs from the layer's" if r["check"] == "DIFFERS"
              else f"{r['worst_tensor']} off by {r['worst_tol_ratio']:.2f}x the tolerance"), file=sys.stderr)
    if args.json:
        meta = dict(device=label, torch=torch.__version__, native=native_status(), quick=bool(args.quick))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    return 0 if all(r["check"] not in ("FAIL", "DIFFERS") for r in rows) else 1


def main(argv: Optional[List[str]] = None) -> int:
    return run(_parse(argv))


if __name__ == "__main__":
    sys.exit(main())
