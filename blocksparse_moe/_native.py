"""Thin wrappers over the native extension ``blocksparse_moe._C`` (routing and topology).

The extension does not link libtorch: Python allocates every output with torch and passes
raw pointers, sizes and (on CUDA) the current stream. When the extension is missing the
same functions run in torch, after one warning, with identical results.

STUB: the native calls are wired in by the core-routing work; for now everything runs in torch.
"""

from __future__ import annotations

import warnings

import torch

from .routing import route_torch
from .topology import Topology, make_topology_torch

_warned = False


def _fallback(what: str) -> None:
    global _warned
    if not _warned:
        warnings.warn(f"blocksparse_moe._C is not available; {what} runs in torch", RuntimeWarning, stacklevel=3)
        _warned = True


def native_status() -> dict:
    return {"extension": False, "cpu_ops": False, "cuda_ops": False, "reason": "not built"}


def route(expert_indices: torch.Tensor, num_experts: int, block_size: int) -> dict:
    _fallback("routing")
    return route_torch(expert_indices, num_experts, block_size)


def make_topology(padded_bins: torch.Tensor, num_experts: int, ffn_hidden_size: int, block_size: int) -> Topology:
    _fallback("make_topology")
    return make_topology_torch(padded_bins, num_experts, ffn_hidden_size, block_size)
