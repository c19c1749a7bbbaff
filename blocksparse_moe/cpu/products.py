"""The block-sparse products on CPU tensors, in torch (no Triton).

Same signatures, results and errors as the launchers in ``kernels/sdd.py``, ``dsd.py`` and
``dds.py``; float64 too (the kernels stop at fp32), which is what gradcheck runs on.

Two strategies, chosen per call from the metadata (one pass over ``nnz`` int32 entries):

* **Dense rectangles** (every MoE topology): when each block row stores one contiguous range
  of block columns, consecutive rows with the same range form a dense rectangle of blocks
  (in an MoE: one expert's rows x that expert's columns). Each rectangle is one torch
  matmul, i.e. a grouped GEMM with one GEMM per expert, and the blocks of a rectangle are
  consecutive in ``data`` (row-major), so they are its ``[R*b, C*b]`` matrix re-tiled.
* **Any other pattern**: the stored blocks in chunks, each chunk one ``torch.bmm`` over
  gathered operand blocks; DSD sums the chunk's products into their output block rows with
  ``index_add_``, which is sequential (deterministic) on CPU.

Precision: products accumulate in fp32 (fp64 for fp64). fp16/bf16 operands are converted to
fp32 one rectangle or chunk at a time (copies of those slices) and the result is rounded
once. The chunked path copies the gathered operand blocks of one chunk (bounded by
``_CHUNK_ELEMENTS``); the rectangle path copies each rectangle's blocks into one matrix
(``nnz*b*b`` elements in all). DSD/DDS accumulate into a fresh row-major fp32 ``[M, N]``
buffer (fp64 for fp64) that becomes the result, or is copied into ``out=``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Elements of gathered operands one bmm chunk may hold (x 4-8 bytes): ~64-128 MiB.
_CHUNK_ELEMENTS = 1 << 24

Segment = Tuple[int, int, int, int, int]  # (first block row, rows, first block col, cols, first block)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_dtype(op: str, t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def rectangles(row_indices: torch.Tensor, column_indices: torch.Tensor,
               offsets: torch.Tensor) -> Optional[List[Segment]]:
    """The pattern as dense rectangles of blocks, or ``None`` if some row's columns have a gap.

    A rectangle ``(r0, R, c0, C, n0)`` is block rows ``r0 .. r0+R-1`` each storing block
    columns ``c0 .. c0+C-1``, at ``data[n0 : n0 + R*C]`` in row-major order. Empty rows
    belong to no rectangle.
    """
    nnz = row_indices.numel()
    if nnz == 0:
        return []
    rows = row_indices.long()
    cols = column_indices.long()
    offs = offsets.long()
    starts = offs[:-1]
    counts = offs[1:] - starts
    first_col = torch.zeros_like(counts)
    nonempty = counts > 0
    first_col[nonempty] = cols[starts[nonempty]]
    position = torch.arange(nnz, dtype=torch.int64) - starts[rows]
    if not bool(torch.equal(cols - first_col[rows], position)):
        return None
    live = torch.nonzero(nonempty).flatten()
    lc, lf = counts[live], first_col[live]
    # A new rectangle starts where a live row does not continue the previous one.
    new = torch.ones_like(live, dtype=torch.bool)
    new[1:] = (live[1:] != live[:-1] + 1) | (lc[1:] != lc[:-1]) | (lf[1:] != lf[:-1])
    heads = torch.nonzero(new).flatten()
    sizes = torch.diff(heads, append=torch.tensor([live.numel()]))
    r0 = live[heads].tolist()
    return [(r, n, c, k, o) for r, n, c, k, o in
            zip(r0, sizes.tolist(), lf[heads].tolist(), lc[heads].tolist(), starts[live[heads]].tolist())]


def _rect_dense(data: torch.Tensor, seg: Segment, acc: torch.dtype) -> torch.Tensor:
    """The ``[R*b, C*b]`` matrix of one rectangle's blocks (a copy, in ``acc`` dtype)."""
    _, r, _, c, n0 = seg
    bs = data.shape[1]
    blocks = data[n0:n0 + r * c].to(acc).reshape(r, c, bs, bs)
    return blocks.permute(0, 2, 1, 3).reshape(r * bs, c * bs)


def _chunks(nnz: int, per_block: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_block))
    for start in range(0, nnz, step):
        yield slice(start, min(nnz, start + step))


# -- SDD -----------------------------------------------------------------------------------

def sdd(a: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
        offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
        block_offsets_t: torch.Tensor, block_size: int, out: Optional[torch.Tensor] = None,
        a_rows: Optional[torch.Tensor] = None, epilogue: Optional[str] = None) -> torch.Tensor:
    """``data[n] = A[block row row_indices[n]] @ B[:, block column column_indices[n]]``.

    ``a_rows`` (int32 ``[M]``, -1 = zero row) reads A's rows through an index, like the
    kernel; here that gathers the rows into an ``[M, K]`` copy first.
    """
    if epilogue is not None:
        raise NotImplementedError(f"sdd: epilogue {epilogue!r} is not implemented (only None)")
    _check_dtype("sdd", a, "a")
    bs = block_size
    nnz = row_indices.numel()
    m = (offsets.numel() - 1) * bs
    n = (offsets_t.numel() - 1) * bs
    if b.dim() != 2 or a.dim() != 2 or b.shape != (a.shape[1], n) or b.dtype != a.dtype:
        raise ValueError(f"sdd: expected a [*, K] and b [K, {n}] of one dtype, got a {a.dtype} {tuple(a.shape)} "
                         f"and b {b.dtype} {tuple(b.shape)}")
    if a_rows is None and a.shape[0] != m:
        raise ValueError(f"sdd: a has {a.shape[0]} rows but the topology has {m}")
    if a_rows is not None:
        if a_rows.dtype != torch.int32 or a_rows.shape != (m,):
            raise ValueError(f"sdd: a_rows must be int32 of shape ({m},), got {a_rows.dtype} {tuple(a_rows.shape)}")
        keep = (a_rows >= 0)[:, None]
        a = torch.where(keep, a.index_select(0, a_rows.clamp(min=0).long()), a.new_zeros(()))
    if out is None:
        out = torch.empty((nnz, bs, bs), dtype=a.dtype, device=a.device)
    elif out.shape != (nnz, bs, bs) or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(f"sdd: out must be {a.dtype} of shape ({nnz}, {bs}, {bs}) on "
                         f"{a.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    if nnz == 0:
        return out
    acc = _acc_dtype(a.dtype)
    segs = rectangles(row_indices, column_indices, offsets)
    if segs is not None:
        for r0, r, c0, c, n0 in segs:
            prod = a[r0 * bs:(r0 + r) * bs].to(acc) @ b[:, c0 * bs:(c0 + c) * bs].to(acc)
            out[n0:n0 + r * c].view(r, c, bs, bs).copy_(prod.reshape(r, bs, c, bs).permute(0, 2, 1, 3))
        return out
    k = a.shape[1]
    a_blocks = a.reshape(m // bs, bs, k)                       # views: splitting one dimension
    b_blocks = b.reshape(k, n // bs, bs).permute(1, 0, 2)
    rows, cols = row_indices.long(), column_indices.long()
    for ch in _chunks(nnz, 2 * bs * k):
        out[ch].copy_(torch.bmm(a_blocks[rows[ch]].to(acc), b_blocks[cols[ch]].to(acc)))
    return out


# -- DSD / DDS -------------------------------------------------------------------------------

def _dsd_acc(data: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
             offsets: torch.Tensor, offsets_t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``S @ b`` (``S^T @ b``) as a fresh contiguous tensor in the accumulation dtype."""
    bs = data.shape[1]
    acc_dtype = _acc_dtype(data.dtype)
    rows_of_s = (offsets.numel() - 1) * bs
    cols_of_s = (offsets_t.numel() - 1) * bs
    m = cols_of_s if transposed else rows_of_s
    n = b.shape[1]
    acc = torch.zeros((m, n), dtype=acc_dtype, device=data.device)
    if row_indices.numel() == 0 or n == 0:
        return acc
    segs = rectangles(row_indices, column_indices, offsets)
    if segs is not None:
        for seg in segs:
            r0, r, c0, c, _ = seg
            s = _rect_dense(data, seg, acc_dtype)
            if transposed:
                acc[c0 * bs:(c0 + c) * bs].addmm_(s.t(), b[r0 * bs:(r0 + r) * bs].to(acc_dtype))
            else:
                acc[r0 * bs:(r0 + r) * bs].addmm_(s, b[c0 * bs:(c0 + c) * bs].to(acc_dtype))
        return acc
    # Block i of the product's left operand: data[i] (or data[i]^T) at (out_rows[i], b_rows[i]).
    if transposed:
        out_rows, b_rows, blocks = column_indices.long(), row_indices.long(), data.transpose(1, 2)
    else:
        out_rows, b_rows, blocks = row_indices.long(), column_indices.long(), data
    b_blocks = b.reshape(b.shape[0] // bs, bs, n)
    acc_blocks = acc.view(m // bs, bs, n)
    for ch in _chunks(row_indices.numel(), 2 * bs * n):
        contrib = torch.bmm(blocks[ch].to(acc_dtype), b_blocks[b_rows[ch]].to(acc_dtype))
        acc_blocks.index_add_(0, out_rows[ch], contrib)
    return acc


def dsd(data: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
        offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
        block_offsets_t: torch.Tensor, transposed: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out = S @ b`` (``S^T @ b`` when ``transposed``), ``S`` given by ``data`` + metadata.

    The transposed form needs no ``*_t`` metadata here: it swaps the roles of
    ``row_indices`` and ``column_indices`` and transposes each block.
    """
    _check_dtype("dsd", data, "s.data")
    bs = data.shape[1]
    k = ((offsets if transposed else offsets_t).numel() - 1) * bs
    m = ((offsets_t if transposed else offsets).numel() - 1) * bs
    if data.shape != (row_indices.numel(), bs, bs):
        raise ValueError(f"dsd: data has shape {tuple(data.shape)}, expected ({row_indices.numel()}, {bs}, {bs})")
    if b.dim() != 2 or b.shape[0] != k or b.dtype != data.dtype:
        raise ValueError(f"dsd: b must be {data.dtype} with {k} rows, got {b.dtype} {tuple(b.shape)}")
    n = b.shape[1]
    if out is not None and (out.shape != (m, n) or out.dtype != data.dtype or out.device != data.device):
        raise ValueError(f"dsd: out must be {data.dtype} of shape ({m}, {n}) on {data.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    acc = _dsd_acc(data, b, row_indices, column_indices, offsets, offsets_t, transposed)
    if out is None:
        return acc if acc.dtype == data.dtype else acc.to(data.dtype)
    return out.copy_(acc)


def dds(a: torch.Tensor, data: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
        offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
        block_offsets_t: torch.Tensor, transposed: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out = a @ S`` (``a @ S^T`` when ``transposed``), ``S`` given by ``data`` + metadata."""
    if a.dim() != 2:
        raise ValueError(f"dds: a must be 2-D, got shape {tuple(a.shape)}")
    _check_dtype("dds", data, "s.data")
    bs = data.shape[1]
    k = ((offsets_t if transposed else offsets).numel() - 1) * bs
    n = ((offsets if transposed else offsets_t).numel() - 1) * bs
    if a.shape[1] != k or a.dtype != data.dtype:
        raise ValueError(f"dds: a must be {data.dtype} with {k} columns, got {a.dtype} {tuple(a.shape)}")
    m = a.shape[0]
    if out is not None and (out.shape != (m, n) or out.dtype != data.dtype or out.device != data.device):
        raise ValueError(f"dds: out must be {data.dtype} of shape ({m}, {n}) on {data.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    acc_dtype = _acc_dtype(data.dtype)
    acc = torch.zeros((m, n), dtype=acc_dtype, device=data.device)
    if row_indices.numel() and m:
        segs = rectangles(row_indices, column_indices, offsets)
        if segs is not None:
            for seg in segs:
                r0, r, c0, c, _ = seg
                s = _rect_dense(data, seg, acc_dtype)
                # Column slices of the row-major accumulator: BLAS writes them in place.
                if transposed:
                    acc[:, r0 * bs:(r0 + r) * bs].addmm_(a[:, c0 * bs:(c0 + c) * bs].to(acc_dtype), s.t())
                else:
                    acc[:, c0 * bs:(c0 + c) * bs].addmm_(a[:, r0 * bs:(r0 + r) * bs].to(acc_dtype), s)
        else:
            # Block i of the right operand: data[i] (or data[i]^T) at (a_cols[i], out_cols[i]).
            if transposed:
                a_cols, out_cols, blocks = column_indices.long(), row_indices.long(), data.transpose(1, 2)
            else:
                a_cols, out_cols, blocks = row_indices.long(), column_indices.long(), data
            a_blocks = a.reshape(m, k // bs, bs).permute(1, 0, 2)  # [K/b, M, b], a view
            acc_blocks = acc.view(m, n // bs, bs)
            for ch in _chunks(row_indices.numel(), 2 * bs * m):
                contrib = torch.bmm(a_blocks[a_cols[ch]].to(acc_dtype), blocks[ch].to(acc_dtype))  # [C, M, b]
                acc_blocks.index_add_(1, out_cols[ch], contrib.permute(1, 0, 2))
    if out is None:
        return acc if acc.dtype == data.dtype else acc.to(data.dtype)
    return out.copy_(acc)
