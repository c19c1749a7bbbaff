"""One forward + backward of the fused expert path, for ncu to measure (GPU only).

bench/traffic.py models the HBM bytes of each fused kernel without a GPU; this script runs
the same kernels on a GPU so that Nsight Compute can count the real DRAM bytes beside the
model's. It warms up (autotuning, compilation) outside the profiled range, then runs one
step between ``cudaProfilerStart``/``Stop``::

    ncu --profile-from-start off --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \\
        --csv python bench/ncu_experts.py --shape qwen3 > ncu-qwen3.csv

Shapes: the two layers of the traffic model at their real sizes (``qwen3``: Qwen3-30B-A3B
H=2048 F=768 E=128 k=8 T=4096; ``mixtral``: H=4096 F=14336 E=8 k=2 T=4096), bf16, random
uniform top-k routing, ``block_size=None`` (chosen per call).
"""

from __future__ import annotations

import argparse
import sys

import torch

SHAPES = {"qwen3": dict(tokens=4096, hidden=2048, ffn=768, experts=128, top_k=8),
          "mixtral": dict(tokens=4096, hidden=4096, ffn=14336, experts=8, top_k=2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3")
    parser.add_argument("--tokens", type=int, default=None, help="override T")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("ncu_experts.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from blocksparse_moe import expert_mlp

    s = dict(SHAPES[args.shape])
    if args.tokens:
        s["tokens"] = args.tokens
    t, h, f, e, k = (s[n] for n in ("tokens", "hidden", "ffn", "experts", "top_k"))
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(t, h, device=dev, dtype=dt, requires_grad=True)
    ids = torch.rand(t, e, device=dev).topk(k, dim=-1).indices
    w = torch.softmax(torch.randn(t, k, device=dev), -1).requires_grad_(True)
    w1 = (torch.randn(e, 2 * f, h, device=dev, dtype=dt) / h ** 0.5).requires_grad_(True)
    w2 = (torch.randn(e, f, h, device=dev, dtype=dt) / f ** 0.5).requires_grad_(True)
    dout = torch.randn(t, h, device=dev, dtype=dt)

    def step():
        out = expert_mlp(x, ids, w, w1, w2, check_indices=False)
        out.backward(dout)

    for _ in range(3):  # compile and autotune outside the profiled range
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"{args.shape}: T={t} H={h} F={f} E={e} k={k} on {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
