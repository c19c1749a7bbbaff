"""Run every CUDA op once on small, ragged inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/sanitize_ops.py
    compute-sanitizer --tool racecheck python bench/sanitize_ops.py

Covers the native CUDA routing ops (histogram, sort, bins, topology) and every Triton
kernel (sdd, dsd, dds and their transposed forms, permutes, activations) forward and
backward, in bf16 and fp32, at a shape where T*k is not a multiple of the block and one
expert is empty, so the edge masks are exercised. It also checks every result (CUDA and,
as a control, the CPU path) against the float64 reference (``reference.moe_reference``)
within the one tolerance table's "layer" entry (``blocksparse_moe.tolerances.TOL``, where
the arithmetic behind each bound is written down), so a run that "passes" the sanitizer
but computes garbage still fails.
"""

import copy
import sys

import torch

import blocksparse_moe as bm
from blocksparse_moe import backend, reference
from blocksparse_moe.tolerances import TOL

NAMES = ("out", "dx", "dw1", "dw2")


def _reference(layer: bm.DroplessMoE, x: torch.Tensor, ids: torch.Tensor, gout: torch.Tensor):
    """``NAMES`` from the float64 reference on copies of the (rounded) parameters and input."""
    layer64 = copy.deepcopy(layer).to("cpu", torch.float64)
    x64 = x.detach().to("cpu", torch.float64).requires_grad_(True)
    ref = reference.moe_reference(x64, **layer64.reference_weights(), expert_indices=ids.cpu().long())
    (ref["out"] * gout.double()).sum().backward()
    return [ref["out"].detach(), x64.grad, layer64.w1.grad, layer64.w2.grad]


def _worst(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    """max |got - want| / (atol + rtol |want|) with the table's "layer" entry: <= 1 passes, NaN fails."""
    rtol, atol = TOL[("layer", dtype)]
    got, want = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
    ratio = (got - want).abs() / (atol + rtol * want.abs())
    return float("nan") if not torch.isfinite(got).all() else float(ratio.max()) if ratio.numel() else 0.0


def check(devices=("cpu", "cuda")) -> list:
    """Run the layer forward and backward on each device; the failures against the reference."""
    torch.manual_seed(0)
    tokens, hidden, ffn, experts, top_k, block = 77, 96, 64, 6, 2, 32
    failures = []
    for dtype in (torch.bfloat16, torch.float32):
        ids = torch.randint(0, experts - 1, (tokens, top_k), dtype=torch.int32)  # expert 5 stays empty
        layer = bm.DroplessMoE(hidden, ffn, experts, top_k, block_size=block, bias=True, dtype=dtype)
        x = torch.randn(tokens, hidden, dtype=dtype)
        gout = torch.randn(tokens, hidden).to(dtype)
        want = _reference(layer, x, ids, gout)
        for device in devices:
            with backend.prefer_on_cpu("cpu"):
                m = layer.to(device)
                xi = x.to(device).requires_grad_(True)
                out, _ = m(xi, ids.to(device))
                (out.float() * gout.to(device).float()).sum().backward()
                got = [out, xi.grad, m.w1.grad, m.w2.grad]
                m.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            for name, a, b in zip(NAMES, got, want):
                worst = _worst(a, b, dtype)
                print(f"{device:5} {str(dtype):16} {name:4} worst |err| / tolerance {worst:.2f}")
                if not worst <= 1.0:
                    failures.append(f"{device} {dtype} {name}: {worst:.2f} x the table's layer tolerance")
    return failures


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    failures = check()
    print("FAILED: " + "; ".join(failures) if failures else "all ops ran and matched the float64 reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
