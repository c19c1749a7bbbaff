"""DSD: dense = sparse x dense, with S or its transpose.

    out[M, N] = S[M, K] @ B[K, N]        S = SparseMatrix(topology, data), M x K = topology.shape
    out[M, N] = S^T[M, K] @ B[K, N]      transposed: M x K = reversed topology.shape

    data [nnz, b, b]   any strides
    b    [K, N]        any strides, or *grouped* [G, R, N] with K = G*R: the 2-D operand is
                       the concatenation of b[0], .., b[G-1] along its rows,
                       B[g*R + r, n] = b[g, r, n] (an expert weight stack read in place)
    out  [M, N]        any strides; every element is written (zeros for empty block rows)

Metadata read: for S, ``offsets`` (CSR row pointers) and ``column_indices``; a stored block
``i`` is ``data[i]``. For S^T, ``offsets_t`` and ``column_indices_t`` (block rows of S listed
column by column: block rows of S^T and their block columns), and the block sits at
``data[block_offsets_t[i]]``, read transposed by swapping its two strides. One kernel serves
both: the launcher passes the metadata and the strides of the form it runs.

A grouped b needs R to be a multiple of b, so the b rows of B that one stored block meets
lie in one group: one 32-bit integer division per block on its int32 block column,
``g = block_col // (R/b)``, then B is addressed ``g*stride_g + ((block_col - g*R/b)*b + r)*stride_k
+ n*stride_n`` (products in int64). A 2-D b is the case G = 1 (R = K, stride_g unused): one
kernel serves both.

Grid: (block rows of out x BLOCK_M tiles, N / BLOCK_N). Each program owns one output tile,
walks the stored blocks of its block row and, inside each, K in BLOCK_K steps (one flat
loop, the next block's metadata loaded one step ahead so the tiles pipeline num_stages
deep), accumulating in fp32; it stores its tile once. No atomics, so the result is
deterministic. Blocks of 16 and 32 rows compute the tile transposed (``SWAP``: out^T =
B^T @ S^T) so the MMA's M is BLOCK_N >= 64, what a Hopper warpgroup MMA needs.

``kernels/dds.py`` runs this same kernel on transposed views (A @ S = (S^T @ A^T)^T).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..grouped import grouped_rows
from . import _common


@triton.jit
def _dsd_kernel(data_ptr, b_ptr, out_ptr, row_offsets_ptr, block_cols_ptr, block_index_ptr,
                N, GROUP_BLOCKS,
                stride_dn, stride_dm, stride_dk, stride_bg, stride_bk, stride_bn, stride_om, stride_on,
                BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                HAS_BLOCK_INDEX: tl.constexpr, SWAP: tl.constexpr,
                INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    TILES_M: tl.constexpr = BLOCK // BLOCK_M
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    block_row = pid_m // TILES_M
    in_m = (pid_m % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows inside the block
    # int64: through dds's transposed views N is a long dimension with a long stride, and
    # offs_n * stride_bn / offs_n * stride_on pass 2^31 on big layers.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    start = tl.load(row_offsets_ptr + block_row)
    end = tl.load(row_offsets_ptr + block_row + 1)
    if SWAP:  # out^T tile = B^T @ S^T: the MMA's M is BLOCK_N (see the launcher)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (stored block, K step) pairs rather than two nested loops: the
    # inner loop would have only b / BLOCK_K trips, too few for Triton to pipeline.
    KT: tl.constexpr = BLOCK // BLOCK_K
    # The metadata of stored block i = j // KT (its block column, and for S^T where its data
    # sits) is loaded one iteration ahead and carried into the next: a tile address that
    # depends on a load of the same iteration keeps Triton's software pipeliner from
    # issuing that tile num_stages - 1 iterations ahead (it ran two buffers deep whatever
    # num_stages said). Reloaded every step (an L1 hit inside a block) to stay branch-free.
    has = start < end
    # int32: the block column only enters the 32-bit division by GROUP_BLOCKS below (a 64-bit
    # division by a runtime value is a ptxas subroutine: it made the transposed 32-row tile
    # spill on sm_80, 16 bytes under Triton 3.6, 8 under 3.9); what multiplies a stride is int64.
    block_col = tl.load(block_cols_ptr + start, mask=has, other=0)
    if HAS_BLOCK_INDEX:
        d = tl.load(block_index_ptr + start, mask=has, other=0).to(tl.int64)
    else:
        d = start.to(tl.int64)  # d * stride_dn exceeds int32 on big layers
    for j in range(start * KT, end * KT):
        kk = (j % KT) * BLOCK_K + offs_k
        s = tl.load(data_ptr + d * stride_dn + in_m[:, None] * stride_dm + kk[None, :] * stride_dk)
        # The group of B holding this block's rows, and the rows inside it.
        group = block_col // GROUP_BLOCKS
        rows_b = (block_col - group * GROUP_BLOCKS).to(tl.int64) * BLOCK + kk
        b = tl.load(b_ptr + group.to(tl.int64) * stride_bg + rows_b[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=n_ok[None, :], other=0.0)
        if SWAP:
            acc = _common.dot(tl.trans(b), tl.trans(s), acc, INTERPRET, INPUT_PRECISION)
        else:
            acc = _common.dot(s, b, acc, INTERPRET, INPUT_PRECISION)
        i_next = (j + 1) // KT
        has = i_next < end
        block_col = tl.load(block_cols_ptr + i_next, mask=has, other=0)
        if HAS_BLOCK_INDEX:
            d = tl.load(block_index_ptr + i_next, mask=has, other=0).to(tl.int64)
        else:
            d = i_next.to(tl.int64)

    offs_m = block_row.to(tl.int64) * BLOCK + in_m
    if SWAP:
        out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])
    else:
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[None, :])


def dsd(data: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
        offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
        block_offsets_t: torch.Tensor, transposed: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch DSD: ``out = S @ b`` (``S^T @ b`` when ``transposed``); returns ``out [M, N]``.

    ``data [nnz, bs, bs]`` and the topology's six metadata tensors describe S. ``b`` and
    ``out`` are read and written through their strides (transposed views cost nothing);
    ``b`` is ``[K, N]`` or grouped ``[G, R, N]`` (``K = G*R``, ``R`` a multiple of ``bs``).
    ``ops.dsd`` has checked the arguments; this re-checks only what would make the kernel
    touch memory out of bounds.
    """
    _common.check_launch_dtype("dsd", data, "s.data")
    bs = data.shape[1]
    if transposed:
        row_offsets, block_cols, block_index = offsets_t, column_indices_t, block_offsets_t
        stride_dm, stride_dk = data.stride(2), data.stride(1)
        k = (offsets.numel() - 1) * bs
    else:
        row_offsets, block_cols, block_index = offsets, column_indices, None
        stride_dm, stride_dk = data.stride(1), data.stride(2)
        k = (offsets_t.numel() - 1) * bs
    m = (row_offsets.numel() - 1) * bs
    if data.shape != (row_indices.numel(), bs, bs):
        raise ValueError(f"dsd: data has shape {tuple(data.shape)}, expected ({row_indices.numel()}, {bs}, {bs})")
    bg, group_rows = grouped_rows("dsd", b, k, bs)
    if b.dtype != data.dtype:
        raise ValueError(f"dsd: b must be {data.dtype} with {k} rows, got {b.dtype} {tuple(b.shape)}")
    n = b.shape[-1]
    if out is None:
        out = torch.empty((m, n), dtype=data.dtype, device=data.device)
    elif out.shape != (m, n) or out.dtype != data.dtype or out.device != data.device:
        raise ValueError(f"dsd: out must be {data.dtype} of shape ({m}, {n}) on {data.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if m == 0 or n == 0:
        return out
    # Autotune key: S or S^T (the backward's dW products walk S^T: long reductions over the
    # tokens of one expert), which operands are transposed views (dds runs here on a.t() and
    # out.t()), and the three sizes, bucketed (next power of two).
    # fma: true fp32 (CUDA-core FMAs) on 8 warps at least; the table's 64x64x16 on 4 spilled 8
    # bytes at b = 64 (sm_90, Triton 3.9).
    tiles = _common.Tiles("mk", bs, data.dtype, key=(
        transposed, b.stride(-1) == 1, out.stride(1) == 1, _common.bucket(m), _common.bucket(n), _common.bucket(k)),
        fma=(0, 8))
    # Blocks under 64 rows give tiles under the 64 rows a Hopper warpgroup MMA (wgmma) needs;
    # computing the tile transposed, out^T = B^T @ S^T, puts BLOCK_N (>= 64) in the MMA's M.
    swap = bs < 64

    def grid(p):
        return (m // p["BLOCK_M"], triton.cdiv(n, p["BLOCK_N"]))

    _common.launch(
        _dsd_kernel, grid,
        data, b, out, row_offsets, block_cols, block_index,
        n, max(group_rows // bs, 1),  # GROUP_BLOCKS: block rows per group, < 2^31 (int32 indices)
        data.stride(0), stride_dm, stride_dk, bg, b.stride(-2), b.stride(-1), out.stride(0), out.stride(1),
        device=data.device, tiles=tiles, BLOCK=bs, HAS_BLOCK_INDEX=block_index is not None, SWAP=swap,
    )
    return out
