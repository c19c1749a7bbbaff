"""SDD: sparse = dense x dense, sampled on a topology.

    data[n] = A[rows of block row row_indices[n]] @ B[:, cols of block column column_indices[n]]

    a    [M, K]       any strides (a.t() views of the backward need no copy)
    b    [K, N]       any strides, or *grouped* [G, K, C] with N = G*C: the 2-D operand is
                      the concatenation of b[0], .., b[G-1] along its columns,
                      B[k, g*C + c] = b[g, k, c] (an expert weight stack read in place)
    out  [nnz, b, b]  any strides; every element is written
    a_rows [M] int32  optional: logical row i of A is a[a_rows[i]], or a zero row where
                      a_rows[i] == -1 (the fused "gather x straight from the tokens" form;
                      then a has any number of rows)

Reads ``row_indices`` and ``column_indices`` (the COO view) only. M and N are multiples of
b (the topology's shape); K is any size (masked). A grouped b needs C to be a multiple of
b, so a block column never straddles two groups: its group is one integer division per
program, 32-bit on the int32 block column, ``g = block_col // (C/b)``, and B is addressed
``g*stride_g + k*stride_k + ((block_col - g*C/b)*b + c)*stride_c`` (products in int64).
A 2-D b is the case G = 1 (C = N, stride_g unused): one kernel serves both.

Grid: one program per (stored block, BLOCK_M x BLOCK_N tile of it), tiles of one block
adjacent so their A rows stay in L2; each program loops over K in BLOCK_K steps,
accumulating in fp32, and stores its tile once (no atomics). Blocks of 16 and 32 run
``_sdd_merged_kernel`` instead: one program per BLOCK_N / b consecutive stored blocks, one
transposed tile for all of them (64-row MMAs; see the kernel).

``EPILOGUE`` is the hook for the fused activation (DESIGN.md "Where the kernels go next");
only ``None`` (store the product) exists today.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..grouped import grouped_cols
from . import _common

# Blocks under 64 rows go to _sdd_merged_kernel: see there.
_MERGE_BELOW = 64


@triton.jit
def _sdd_kernel(a_ptr, b_ptr, out_ptr, row_indices_ptr, column_indices_ptr, a_rows_ptr,
                K, GROUP_BLOCKS,
                stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_on, stride_or, stride_oc,
                BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                HAS_A_ROWS: tl.constexpr, EPILOGUE: tl.constexpr,
                INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    TILES_M: tl.constexpr = BLOCK // BLOCK_M
    TILES_N: tl.constexpr = BLOCK // BLOCK_N
    pid = tl.program_id(0)
    n = (pid // (TILES_M * TILES_N)).to(tl.int64)  # n * stride_on exceeds int32 on big layers
    tile = pid % (TILES_M * TILES_N)
    tm = tile // TILES_N
    tn = tile % TILES_N

    block_row = tl.load(row_indices_ptr + n).to(tl.int64)
    # int32: the block column only enters the 32-bit division by GROUP_BLOCKS (a 64-bit
    # division by a runtime value is a ptxas subroutine that costs registers and stack).
    block_col = tl.load(column_indices_ptr + n)
    in_m = tm * BLOCK_M + tl.arange(0, BLOCK_M)  # rows / cols inside the block
    in_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = block_row * BLOCK + in_m
    offs_k = tl.arange(0, BLOCK_K)
    # The block column's group of B (GROUP_BLOCKS block columns each) and its columns inside
    # that group.
    group = block_col // GROUP_BLOCKS
    offs_c = (block_col - group * GROUP_BLOCKS).to(tl.int64) * BLOCK + in_n

    if HAS_A_ROWS:
        rows = tl.load(a_rows_ptr + offs_m).to(tl.int64)
        row_ok = rows >= 0
        rows = tl.where(row_ok, rows, 0)
    else:
        rows = offs_m
        row_ok = offs_m >= 0
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + group.to(tl.int64) * stride_bg + offs_k[:, None] * stride_bk + offs_c[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = _common.dot(a, b, acc, INTERPRET, INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # EPILOGUE is None: the plain product. A fused activation would transform acc here.
    out_ptrs = out_ptr + n * stride_on + in_m[:, None] * stride_or + in_n[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))


@triton.jit
def _sdd_merged_kernel(a_ptr, b_ptr, out_ptr, row_indices_ptr, column_indices_ptr, a_rows_ptr,
                       K, NNZ, GROUP_BLOCKS,
                       stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_on, stride_or, stride_oc,
                       BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       HAS_A_ROWS: tl.constexpr, EPILOGUE: tl.constexpr,
                       INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # Blocks of 16 or 32: one program computes the stored blocks n0 .. n0+G-1 (G = BLOCK_N / BLOCK)
    # as one transposed tile, out^T [BLOCK_N, BLOCK] = B^T @ A^T, so the MMA's M is
    # BLOCK_N >= 64 (what a Hopper warpgroup MMA needs) rather than the block's 16 or 32
    # rows. That needs the G blocks to share a block row and to have consecutive block
    # columns in one group of B, which holds for every MoE topology (F a multiple of
    # BLOCK_N); otherwise the program takes them one by one with the same code, masking
    # the columns of the other blocks (``trips`` = G instead of 1).
    G: tl.constexpr = BLOCK_N // BLOCK
    n0 = tl.program_id(0).to(tl.int64) * G
    last = tl.minimum(n0 + G - 1, NNZ - 1)
    # Block columns stay int32: they only enter 32-bit divisions by GROUP_BLOCKS (see _sdd_kernel).
    col_first = tl.load(column_indices_ptr + n0)
    col_last = tl.load(column_indices_ptr + last)
    fused = ((tl.load(row_indices_ptr + n0) == tl.load(row_indices_ptr + last))
             & (col_last - col_first == last - n0)
             & (col_first // GROUP_BLOCKS == col_last // GROUP_BLOCKS))
    count = last - n0 + 1
    trips = tl.where(fused, 1, count)
    c = tl.arange(0, BLOCK_N)  # tile column: block n0 + c // BLOCK, column c % BLOCK inside it
    sub = c // BLOCK
    in_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    for t in range(0, trips):
        lo = tl.where(fused, 0, t)  # the blocks this trip computes: lo .. hi
        hi = tl.where(fused, count - 1, t)
        c_ok = (sub >= lo) & (sub <= hi)
        block_row = tl.load(row_indices_ptr + n0 + lo).to(tl.int64)
        block_col = tl.load(column_indices_ptr + n0 + lo)
        group = block_col // GROUP_BLOCKS
        # Tile column c is B's column (block_col - lo) * BLOCK + c: one arange, so loads of a
        # column-contiguous B stay vectorized.
        offs_c = (block_col - lo - group * GROUP_BLOCKS).to(tl.int64) * BLOCK + c
        offs_m = block_row * BLOCK + in_m
        if HAS_A_ROWS:
            rows = tl.load(a_rows_ptr + offs_m).to(tl.int64)
            row_ok = rows >= 0
            rows = tl.where(row_ok, rows, 0)
        else:
            rows = offs_m
            row_ok = offs_m >= 0
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + group.to(tl.int64) * stride_bg + offs_k[:, None] * stride_bk + offs_c[None, :] * stride_bn
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
            acc = _common.dot(tl.trans(b), tl.trans(a), acc, INTERPRET, INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        out_ptrs = (out_ptr + (n0 + sub)[:, None] * stride_on + in_m[None, :] * stride_or
                    + (c % BLOCK)[:, None] * stride_oc)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=c_ok[:, None])


def sdd(a: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
        offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
        block_offsets_t: torch.Tensor, block_size: int, out: Optional[torch.Tensor] = None,
        a_rows: Optional[torch.Tensor] = None, epilogue: Optional[str] = None) -> torch.Tensor:
    """Launch SDD; returns ``out [nnz, block_size, block_size]`` in ``a``'s dtype.

    Takes the topology's six metadata tensors (the signature every product launcher and
    its CPU twin share); reads only ``row_indices`` and ``column_indices``. Operands are
    read through their strides, never copied; ``b`` is ``[K, N]`` or grouped ``[G, K, C]``
    (``N = G*C``, ``C`` a multiple of ``block_size``). ``ops.sdd`` has checked the arguments;
    this re-checks only what would make the kernel touch memory out of bounds.
    """
    if epilogue is not None:
        raise NotImplementedError(f"sdd: epilogue {epilogue!r} is not implemented (only None)")
    _common.check_launch_dtype("sdd", a, "a")
    nnz = row_indices.numel()
    m = (offsets.numel() - 1) * block_size
    n = (offsets_t.numel() - 1) * block_size
    bg, group_cols = grouped_cols("sdd", b, n, block_size)
    group_blocks = max(group_cols // block_size, 1)  # GROUP_BLOCKS, < 2^31 (int32 block indices)
    if a.dim() != 2 or b.shape[-2] != a.shape[1] or b.dtype != a.dtype:
        raise ValueError(f"sdd: expected a [*, K] and b [K, {n}] (or [G, K, {n}/G]) of one dtype, got a {a.dtype} "
                         f"{tuple(a.shape)} and b {b.dtype} {tuple(b.shape)}")
    if a_rows is None and a.shape[0] != m:
        raise ValueError(f"sdd: a has {a.shape[0]} rows but the topology has {m}")
    if a_rows is not None and (a_rows.dtype != torch.int32 or a_rows.shape != (m,)):
        raise ValueError(f"sdd: a_rows must be int32 of shape ({m},), got {a_rows.dtype} {tuple(a_rows.shape)}")
    if out is None:
        out = torch.empty((nnz, block_size, block_size), dtype=a.dtype, device=a.device)
    elif out.shape != (nnz, block_size, block_size) or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(f"sdd: out must be {a.dtype} of shape ({nnz}, {block_size}, {block_size}) on "
                         f"{a.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    if nnz == 0:
        return out
    # Autotune key: what changes the best tiles. The row gather and which operand is
    # transposed (the backward's a.t() / b.t() views) change the loads; K is the loop length
    # and nnz the number of blocks to spread over the SMs (both bucketed: next power of two).
    key = (a_rows is not None, a.stride(1) == 1, b.stride(-1) == 1, _common.bucket(a.shape[1]), _common.bucket(nnz))
    args = (a, b, out, row_indices, column_indices, a_rows, a.shape[1])
    strides = (a.stride(0), a.stride(1), bg, b.stride(-2), b.stride(-1), out.stride(0), out.stride(1), out.stride(2))
    constexprs = dict(BLOCK=block_size, HAS_A_ROWS=a_rows is not None, EPILOGUE=epilogue)
    if block_size < _MERGE_BELOW:
        # BLOCK_N is not clipped to the block: it spans BLOCK_N / block_size stored blocks.
        def grid(p):
            return (triton.cdiv(nnz, p["BLOCK_N"] // block_size),)

        _common.launch(_sdd_merged_kernel, grid, *args, nnz, group_blocks, *strides, device=a.device,
                       tiles=_common.Tiles("m", block_size, a.dtype, key), **constexprs)
        return out

    # True fp32 (CUDA-core FMAs): K steps of 32 on 8 warps at least. The table's 64x64x16 on
    # 4 warps kept 96 registers by spilling 8 bytes (sm_90, Triton 3.9), and each bound
    # alone left a spill on sm_90 or sm_100; both together compile clean on sm_80/90/100.
    def grid(p):
        return (nnz * (block_size // p["BLOCK_M"]) * (block_size // p["BLOCK_N"]),)

    _common.launch(_sdd_kernel, grid, *args, group_blocks, *strides, device=a.device,
                   tiles=_common.Tiles("mn", block_size, a.dtype, key, fma=(32, 8)), **constexprs)
    return out
