"""``python -m blocksparse_moe``: build a few real MoE layers, check them, time them.

For each named shape (Mixtral-8x7B, Qwen3-MoE-30B-A3B, a DeepSeek-like layer; full size on a
GPU, scaled down on a CPU) this

1. checks the layer against the dense float64 reference (``reference.py``) on this device:
   the output and every gradient (input, router, experts, biases, shared expert), within
   the tolerance table of the layer's dtype (tests/tolerances.py);
2. times forward and forward+backward (medians, warm-up excluded);
3. prints a table: tokens/s, useful TFLOP/s (GLU ``18*T*k*H*F`` per forward+backward, plain
   MLP ``12*T*k*H*F``; padding not counted), the output's max error, peak memory (CUDA).

Exits 1 if any check fails. On a CPU it runs the torch CPU path (never the Triton
interpreter, which is for tests), in float32 by default.

    python -m blocksparse_moe [--quick] [--dtype bf16] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m blocksparse_moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and timing runs (a smoke test)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="layer dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
    p.add_argument("--shapes", nargs="*", default=None, help="only these shape names")
    return p.parse_args(argv)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import backend
    from ._layer_bench import (CPU_SHAPES, GPU_SHAPES, build_layer, check_layer, device_label, peak_memory,
                               scaled, time_layer, tolerance_table)
    from .native import native_status

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if dtype == torch.float64 and device.type == "cuda":
        print("error: float64 runs on the CPU path only", file=sys.stderr)
        return 2
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.shapes:
        unknown = set(args.shapes) - {s.name for s in shapes}
        if unknown:
            print(f"error: unknown shapes {sorted(unknown)}; known: {[s.name for s in shapes]}", file=sys.stderr)
            return 2
        shapes = [s for s in shapes if s.name in args.shapes]
    if args.quick:
        shapes = [scaled(s, 0.25) for s in shapes]
    tol = tolerance_table()
    # The float64 reference materialises every expert's activations: check on at most 1024
    # tokens of a GPU batch (all of them on a CPU), time on the whole batch.
    check_tokens = 1024 if device.type == "cuda" else None
    timing = dict(min_runs=3, max_runs=5, budget_s=0.5) if args.quick else {}
    label = device_label(device)

    rows: List[Dict] = []
    with backend.prefer_on_cpu("cpu"):
        bar = tqdm(shapes, desc="blocksparse_moe", unit="layer", file=sys.stderr)
        for shape in bar:
            bar.set_postfix_str(f"{shape.name}: check")
            layer = build_layer(shape, dtype, device)
            x = torch.randn(shape.tokens, shape.hidden, generator=torch.Generator().manual_seed(2)).to(device, dtype)
            res = check_layer(layer, x[:check_tokens] if check_tokens else x, tol)
            bar.set_postfix_str(f"{shape.name}: time")

            def forward(inp, layer=layer):
                return layer(inp)[0]

            fwd_ms, step_ms = time_layer(layer, x, forward, device, **timing)
            peak = peak_memory(device, lambda: forward(x.detach().requires_grad_(True)).backward(torch.ones_like(x)))
            rows.append(dict(
                shape=shape.name, config=shape.describe(), device=label, dtype=str(dtype).replace("torch.", ""),
                tokens=shape.tokens, forward_ms=fwd_ms, step_ms=step_ms,
                tokens_per_s=shape.tokens / (step_ms * 1e-3),
                tflops=shape.useful_flops(backward=True) / (step_ms * 1e-3) / 1e12,
                forward_tflops=shape.useful_flops(backward=False) / (fwd_ms * 1e-3) / 1e12,
                max_abs_err=res["max_abs_err"], worst_tol_ratio=res["worst_ratio"], worst_tensor=res["worst"],
                check="ok" if res["ok"] else "FAIL", peak_gib=peak,
            ))
            del layer

    header = ("shape", "device", "dtype", "fwd ms", "fwd+bwd ms", "tokens/s", "TFLOP/s", "max err", "err/tol",
              "peak GiB", "check")
    table = [header] + [(r["shape"], r["device"], r["dtype"], _fmt(r["forward_ms"], ".2f"), _fmt(r["step_ms"], ".2f"),
                         _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["tflops"], ".3f"), _fmt(r["max_abs_err"], ".2e"),
                         _fmt(r["worst_tol_ratio"], ".2f"), _fmt(r["peak_gib"], ".2f"), r["check"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    print()
    for i, row in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\nTFLOP/s: useful FLOPs of forward+backward (GLU 18*T*k*H*F, MLP 12*T*k*H*F, + shared expert), "
          "padding not counted. err/tol: worst |error| / tolerance over the output and every gradient.")
    for r in rows:
        if r["check"] != "ok":
            print(f"FAILED: {r['shape']}: {r['worst_tensor']} off by {r['worst_tol_ratio']:.2f}x the tolerance",
                  file=sys.stderr)
    if args.json:
        meta = dict(device=label, torch=torch.__version__, native=native_status(), quick=bool(args.quick))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    return 0 if all(r["check"] == "ok" for r in rows) else 1


def main(argv: Optional[List[str]] = None) -> int:
    return run(_parse(argv))


if __name__ == "__main__":
    sys.exit(main())
