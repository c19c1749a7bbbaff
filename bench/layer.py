"""Layer-level benchmark: DroplessMoE forward and forward+backward against baselines.

Shapes: those of ``python -m blocksparse_moe`` (Mixtral-8x7B, Qwen3-MoE-30B-A3B, a
DeepSeek-like layer; full size on a GPU, scaled down on a CPU). Implementations, measured
in the same run on the same weights and inputs:

    blocksparse   blocksparse_moe.DroplessMoE (router + routing + block-sparse products)
    loop          the per-expert torch loop of ``reference.moe_reference`` in the layer's
                  dtype (what Hugging Face's eager experts do: mask, gather, two matmuls,
                  index_add per expert)
    megablocks    megablocks.layers.dmoe.dMoE (sparse GLU/MLP), when it imports (GPU)
    scattermoe    scattermoe.mlp.GLUMLP / MLP, when it imports (GPU)

Useful TFLOP/s: GLU ``6*T*k*H*F`` forward / ``18*T*k*H*F`` forward+backward, plain MLP
``4`` / ``12`` (plus the shared expert's, padding not counted). GPU: ``triton.testing.do_bench``
medians; CPU: the torch CPU path (never the interpreter), medians of wall-clock runs.

Writes ``layer-<device>.json`` and ``.md`` under ``--out-dir`` (default bench/results).

    python bench/layer.py [--quick] [--dtype bf16] [--shapes NAME ...] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

try:  # the installed package (with its built _C) if there is one, else this checkout
    import blocksparse_moe  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from blocksparse_moe import backend, reference
from blocksparse_moe._layer_bench import (CPU_SHAPES, GPU_SHAPES, LayerShape, build_layer,
                                          device_label, scaled, time_layer, write_results)
from blocksparse_moe.moe import DroplessMoE

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# -- implementations: each returns forward(x) -> out, or raises to say it is unavailable ------

def _blocksparse(layer: DroplessMoE, shape: LayerShape) -> Callable:
    return lambda x: layer(x)[0]


def _loop(layer: DroplessMoE, shape: LayerShape) -> Callable:
    weights = layer.reference_weights()  # views of the layer's parameters (same dtype)

    def forward(x):
        return reference.moe_reference(x, **weights)["out"]
    return forward


def _megablocks(layer: DroplessMoE, shape: LayerShape) -> Callable:
    import torch.nn.functional as F
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    if shape.shared or layer.router.score != "softmax" or layer.activation != "silu":
        raise RuntimeError("only softmax routing, silu and no shared expert are mapped")
    dtype = layer.w1.dtype
    args = Arguments(hidden_size=shape.hidden, ffn_hidden_size=shape.ffn, moe_num_experts=shape.experts,
                     moe_top_k=shape.top_k, mlp_type="glu" if shape.glu else "mlp", mlp_impl="sparse",
                     activation_fn=F.silu, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                     device=layer.w1.device, moe_normalize_expert_weights=1 if layer.router.renormalize else None,
                     return_bias=False)
    moe = dMoE(args)

    def forward(x):
        return moe(x.unsqueeze(1)).squeeze(1)
    forward.module = moe  # so the timer frees its gradients
    return forward


def _scattermoe(layer: DroplessMoE, shape: LayerShape) -> Callable:
    from scattermoe.mlp import MLP, GLUMLP

    if shape.shared:
        raise RuntimeError("no shared expert mapping")
    cls = GLUMLP if shape.glu else MLP
    mlp = cls(input_size=shape.hidden, hidden_size=shape.ffn, num_experts=shape.experts, top_k=shape.top_k,
              activation=torch.nn.SiLU()).to(layer.w1.device, layer.w1.dtype)

    def forward(x):
        r = layer.router(x)
        return mlp(x, r.weights.to(x.dtype), r.indices)
    forward.module = mlp
    return forward


IMPLEMENTATIONS: Dict[str, Callable] = {
    "blocksparse": _blocksparse, "loop": _loop, "megablocks": _megablocks, "scattermoe": _scattermoe,
}


def bench_shape(shape: LayerShape, dtype: torch.dtype, device: torch.device, timing: Dict) -> List[Dict]:
    layer = build_layer(shape, dtype, device)
    x = torch.randn(shape.tokens, shape.hidden, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    rows = []
    for name, make in IMPLEMENTATIONS.items():
        row = dict(shape=shape.name, config=shape.describe(), dtype=str(dtype).replace("torch.", ""), impl=name)
        try:
            forward = make(layer, shape)
        except Exception as exc:  # noqa: BLE001 - an optional baseline that is not installed or not mapped
            row.update(status=f"unavailable: {type(exc).__name__}: {exc}"[:160])
            rows.append(row)
            continue
        module = getattr(forward, "module", layer)
        fwd_ms, step_ms = time_layer(module, x, forward, device, **timing)
        row.update(status="ok", forward_ms=fwd_ms, step_ms=step_ms, tokens_per_s=shape.tokens / (step_ms * 1e-3),
                   forward_tflops=shape.useful_flops(False) / (fwd_ms * 1e-3) / 1e12,
                   step_tflops=shape.useful_flops(True) / (step_ms * 1e-3) / 1e12)
        rows.append(row)
    base = next((r for r in rows if r["impl"] == "loop" and r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok":
            r["forward_speedup_vs_loop"] = base["forward_ms"] / r["forward_ms"]
            r["step_speedup_vs_loop"] = base["step_ms"] / r["step_ms"]
    return rows


def _cells(r: Dict) -> Tuple[str, ...]:
    if r["status"] != "ok":
        return (r["shape"], r["dtype"], r["impl"], "-", "-", "-", "-", "-", r["status"])
    return (r["shape"], r["dtype"], r["impl"], f"{r['forward_ms']:.2f}", f"{r['step_ms']:.2f}",
            f"{r['step_tflops']:.3f}", f"{r.get('forward_speedup_vs_loop', float('nan')):.2f}x",
            f"{r.get('step_speedup_vs_loop', float('nan')):.2f}x", "ok")


HEADER = ("shape", "dtype", "impl", "fwd ms", "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd vs loop", "fwd+bwd vs loop",
          "status")


def _markdown(rows: List[Dict], meta: Dict) -> str:
    lines = [f"# DroplessMoE layer benchmark: {meta['device']}", "",
             f"torch {meta['torch']}, {'quick run, ' if meta['quick'] else ''}medians, warm-up excluded. "
             "TFLOP/s counts useful work only (GLU 18*T*k*H*F per forward+backward, MLP 12*T*k*H*F).", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    configs = {}
    for r in rows:
        lines.append("| " + " | ".join(_cells(r)) + " |")
        configs[r["shape"]] = r["config"]
    lines += ["", "Shapes:"] + [f"- `{k}`: {v}" for k, v in configs.items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="DroplessMoE layer benchmark")
    p.add_argument("--quick", action="store_true", help="a quarter of the tokens, few timing runs")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--shapes", nargs="*", default=None)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s.name in args.shapes]
    if args.quick:
        shapes = [scaled(s, 0.25) for s in shapes]
    timing = dict(min_runs=3, max_runs=5, budget_s=0.5) if args.quick else {}
    label = device_label(device)

    rows: List[Dict] = []
    with backend.prefer_on_cpu("cpu"):
        for shape in shapes:
            print(f"{shape.name}: {shape.describe()} ...", file=sys.stderr, flush=True)
            rows += bench_shape(shape, dtype, device, timing)

    widths = [max(len(HEADER[i]), *(len(_cells(r)[i]) for r in rows)) for i in range(len(HEADER))]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(_cells(r), widths)))

    from blocksparse_moe._native import native_status

    meta = dict(device=label, torch=torch.__version__, native=native_status(), quick=bool(args.quick),
                dtype=str(dtype).replace("torch.", ""))
    write_results(args.out_dir, f"layer-{label}", meta, rows, _markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
