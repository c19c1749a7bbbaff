"""Run every CUDA op once on small, ragged inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/sanitize_ops.py
    compute-sanitizer --tool racecheck python bench/sanitize_ops.py

Covers the native CUDA routing ops (histogram, sort, bins, topology) and every Triton
kernel (sdd, dsd, dds and their transposed forms, permutes, activations) forward and
backward, in bf16, at a shape where T*k is not a multiple of the block and one expert is
empty, so the edge masks are exercised. It also checks each result against the CPU path,
so a run that "passes" the sanitizer but computes garbage still fails.
"""

import sys

import torch

import blocksparse_moe as bm
from blocksparse_moe import backend


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    tokens, hidden, ffn, experts, top_k, block = 77, 96, 64, 6, 2, 32
    failures = []
    for dtype in (torch.bfloat16, torch.float32):
        ids = torch.randint(0, experts - 1, (tokens, top_k), dtype=torch.int32)  # expert 5 stays empty
        layer = bm.DroplessMoE(hidden, ffn, experts, top_k, block_size=block, bias=True, dtype=dtype)
        x = torch.randn(tokens, hidden, dtype=dtype)
        results = {}
        for device in ("cpu", "cuda"):
            with backend.prefer_on_cpu("cpu"):
                m = layer.to(device)
                xi = x.to(device).requires_grad_(True)
                out, _ = m(xi, ids.to(device))
                out.float().square().sum().backward()
                results[device] = [out.detach().float().cpu(), xi.grad.float().cpu(),
                                   m.w1.grad.float().cpu(), m.w2.grad.float().cpu()]
                m.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        for name, a, b in zip(("out", "dx", "dw1", "dw2"), results["cuda"], results["cpu"]):
            err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            print(f"{str(dtype):16} {name:4} rel err {err:.2e}")
            if not err <= tol:
                failures.append(f"{dtype} {name}: {err:.2e} > {tol}")
    print("FAILED: " + "; ".join(failures) if failures else "all ops ran and matched the CPU path")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
