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
program, ``g = col0 // C``, and B is addressed ``g*stride_g + k*stride_k + (col0 - g*C + c)*stride_c``.
A 2-D b is the case G = 1 (C = N, stride_g unused): one kernel serves both.

Grid: one program per (stored block, BLOCK_M x BLOCK_N tile of it), tiles of one block
adjacent so their A rows stay in L2; each program loops over K in BLOCK_K steps,
accumulating in fp32, and stores its tile once (no atomics).

``EPILOGUE`` is the hook for the fused activation (DESIGN.md "Where the kernels go next");
only ``None`` (store the product) exists today.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._grouped import grouped_cols
from . import _common


@triton.jit
def _sdd_kernel(a_ptr, b_ptr, out_ptr, row_indices_ptr, column_indices_ptr, a_rows_ptr,
                K, GROUP_COLS,
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
    block_col = tl.load(column_indices_ptr + n).to(tl.int64)
    in_m = tm * BLOCK_M + tl.arange(0, BLOCK_M)  # rows / cols inside the block
    in_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = block_row * BLOCK + in_m
    offs_k = tl.arange(0, BLOCK_K)
    # The block column's group of B (constant over the block: GROUP_COLS is a multiple of
    # BLOCK) and its columns inside that group.
    col0 = block_col * BLOCK
    group = col0 // GROUP_COLS
    offs_c = (col0 - group * GROUP_COLS) + in_n

    if HAS_A_ROWS:
        rows = tl.load(a_rows_ptr + offs_m).to(tl.int64)
        row_ok = rows >= 0
        rows = tl.where(row_ok, rows, 0)
    else:
        rows = offs_m
        row_ok = offs_m >= 0
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + group * stride_bg + offs_k[:, None] * stride_bk + offs_c[None, :] * stride_bn

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
    tiles = _common.Tiles("mn", block_size, a.dtype, key=(
        a_rows is not None, a.stride(1) == 1, b.stride(-1) == 1, _common.bucket(a.shape[1]), _common.bucket(nnz)))

    def grid(p):
        return (nnz * (block_size // p["BLOCK_M"]) * (block_size // p["BLOCK_N"]),)

    _common.launch(
        _sdd_kernel, grid,
        a, b, out, row_indices, column_indices, a_rows,
        a.shape[1], group_cols,
        a.stride(0), a.stride(1), bg, b.stride(-2), b.stride(-1), out.stride(0), out.stride(1), out.stride(2),
        device=a.device, tiles=tiles, BLOCK=block_size, HAS_A_ROWS=a_rows is not None, EPILOGUE=epilogue,
    )
    return out
