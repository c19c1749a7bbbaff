"""The CPU back end's one precision rule: fp64 stays fp64; fp32, fp16 and bf16 compute in fp32.

Half GEMMs and elementwise steps on a CPU without half-precision hardware are ~100x slower
than fp32 ones, and fp32 accumulation is what the GPU kernels do (DESIGN.md): each stored
result is then rounded once, from fp32, to its tensor's dtype.
"""

from __future__ import annotations

import torch

__all__ = ["compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU back end computes and accumulates in for ``dtype`` data."""
    return torch.float64 if dtype == torch.float64 else torch.float32
