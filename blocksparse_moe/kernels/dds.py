"""DDS: dense = dense x sparse, with S or its transpose, on the DSD kernel.

    out[M, N] = A[M, K] @ S[K, N]   =   (S^T[N, K] @ A^T[K, M])^T

    a    [M, K]       any strides
    data [nnz, b, b]  S's blocks (S = SparseMatrix(topology, data), or its transpose)
    out  [M, N]       any strides; every element is written

There is no DDS kernel: the launcher runs ``kernels/dsd.py``'s kernel on S with the
transpose flag flipped, ``a.t()`` as its dense operand and ``out.t()`` as its output. Both
transposes are strides only. Metadata read: whatever DSD reads for the flipped S (for a plain
S: ``offsets_t``, ``column_indices_t``, ``block_offsets_t``). Grid: DSD's, over block columns
of ``out`` and tiles of M.

Coalescing: in this form the contiguous dimension of ``a`` (K) is DSD's reduction axis and
the contiguous dimension of ``out`` (N) is DSD's row axis, i.e. both tiles are loaded/stored
"column-major". Triton specializes unit strides and picks the access order from them, so
the loads stay coalesced; this has not been measured against a dedicated kernel on a GPU
yet (bench/kernels.py's ``dds`` row vs ``dsd`` is where that would show).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _common
from . import dsd as _dsd


def dds(a: torch.Tensor, data: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
        offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
        block_offsets_t: torch.Tensor, transposed: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch DDS: ``out = a @ S`` (``a @ S^T`` when ``transposed``); returns ``out [M, N]``."""
    if a.dim() != 2:
        raise ValueError(f"dds: a must be 2-D, got shape {tuple(a.shape)}")
    _common.check_launch_dtype("dds", data, "s.data")
    bs = data.shape[1]
    k = ((offsets_t if transposed else offsets).numel() - 1) * bs
    n = ((offsets if transposed else offsets_t).numel() - 1) * bs
    if a.shape[1] != k or a.dtype != data.dtype:
        raise ValueError(f"dds: a must be {data.dtype} with {k} columns, got {a.dtype} {tuple(a.shape)}")
    m = a.shape[0]
    if out is None:
        # A row-major [M, N] result, written by the kernel through out.t().
        out = torch.empty((m, n), dtype=data.dtype, device=data.device)
    elif out.shape != (m, n) or out.dtype != data.dtype or out.device != data.device:
        raise ValueError(f"dds: out must be {data.dtype} of shape ({m}, {n}) on {data.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    _dsd.dsd(data, a.t(), row_indices, column_indices, offsets, column_indices_t, offsets_t, block_offsets_t,
             not transposed, out=out.t())
    return out
