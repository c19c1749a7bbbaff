"""The block-sparse products on CPU tensors, in torch (no Triton).

Same signatures, results and errors as the launchers in ``kernels/sdd.py``, ``dsd.py`` and
``dds.py``; float64 too (the kernels stop at fp32), which is what gradcheck runs on.

Two strategies, chosen per call from the metadata (one pass over ``nnz`` int32 entries):

* **Dense rectangles** (every MoE topology): when each block row stores one contiguous range
  of block columns, consecutive rows with the same range form a dense rectangle of blocks
  (in an MoE: one expert's rows x that expert's columns). Each rectangle is one GEMM, i.e.
  a grouped GEMM with one GEMM per expert, and the blocks of a rectangle are consecutive in
  ``data`` (row-major), so they are its ``[R*b, C*b]`` matrix re-tiled.
* **Any other pattern**: the stored blocks in chunks, each chunk one ``torch.bmm`` over
  gathered operand blocks; DSD sums the chunk's products into their output block rows with
  ``index_add_``, which is sequential (deterministic) on CPU.

Where the CPU time goes besides the GEMMs, and what the rectangle path does about it:

* Block layout. A GEMM reads and writes row-major matrices, not block-major ``[nnz, b, b]``
  data, so each rectangle's blocks pass once through a staging ``[R*b, C*b]`` matrix: SDD's
  product is re-tiled into its blocks, DSD/DDS's sparse operand untiled. Consecutive
  rectangles of one width (all of an MoE's experts) are staged together, up to
  ``_STAGE_ELEMENTS``, so one copy serves many small experts, and the staging buffer
  (reused by every run of a call) stays in cache for the GEMMs that read or just wrote it.
  With one block column (``C = 1``) the layouts coincide and SDD writes in place.
* Small GEMMs. In SDD and DSD, consecutive rectangles of the same size whose operand
  slices are evenly spaced (neighbouring experts with the same number of block rows) run
  as ONE ``torch.bmm`` over strided 3-D views: no copy, fewer calls, and on two cores a
  batch of whole GEMMs per thread ran 15-50% faster than the same GEMMs one ``mm`` at a
  time (``_batches``: batches are multiples of the thread count).
* Writes. DSD/DDS write each product straight into the result (``out=``) and zero only
  what no rectangle covers: the result is written once, not zero-filled then accumulated.
  Where a second rectangle lands on rows (columns) already written (not in an MoE) it is
  added with ``addmm_``, in the rectangles' fixed order: deterministic.

Dense operands are read through an ``Operand``: a 2-D matrix, or a grouped 3-D stack
(``grouped.py``; a 2-D ``b`` is one group) cut at group boundaries, never copied.

Precision: products accumulate in fp32 (fp64 for fp64) and round once. fp16/bf16 GEMMs run
in fp16/bf16 where the CPU has hardware for them (AVX512-BF16/FP16, AMX: torch's matmul then
runs oneDNN kernels that accumulate in fp32 and round once, 4-6x faster than fp32 here),
except where a second product adds to a rounded result; elsewhere fp16/bf16 operands are
converted to fp32 one rectangle (batch, staging run) or chunk at a time (``_gemm_dtype``).
The result of DSD/DDS is a row-major ``[M, N]`` in the GEMMs' output dtype: the returned
tensor (``out=`` itself when it is contiguous), converted once when that is fp32 for
fp16/bf16 data. The chunked path copies the gathered operand blocks of one chunk (bounded
by ``_CHUNK_ELEMENTS``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..grouped import grouped_cols, grouped_rows
from .rectangles import (Operand, _acc_dtype, _check_dtype, _chunks, _operand, dds_on_rectangles, deliver,
                         dense_result, dsd_on_rectangles, rectangles, sdd_on_rectangles)


def sdd(a: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
        offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
        block_offsets_t: torch.Tensor, block_size: int, out: Optional[torch.Tensor] = None,
        a_rows: Optional[torch.Tensor] = None, epilogue: Optional[str] = None) -> torch.Tensor:
    """``data[n] = A[block row row_indices[n]] @ B[:, block column column_indices[n]]``.

    ``b`` is ``B [K, N]``, or grouped ``[G, K, C]`` standing for ``B [K, G*C]`` with
    ``B[k, g*C + c] = b[g, k, c]``; a 2-D ``b`` is one group.

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
    _, group = grouped_cols("sdd", b, n, bs)
    if b.dim() == 2:
        b = b.unsqueeze(0)  # one group: [1, K, N]
    if a.dim() != 2 or b.shape[1] != a.shape[1] or b.dtype != a.dtype:
        raise ValueError(f"sdd: expected a [*, K] and b [K, {n}] (or grouped [G, K, {n}/G]) of one dtype, got "
                         f"a {a.dtype} {tuple(a.shape)} and b {b.dtype} {tuple(b.shape)}")
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
        sdd_on_rectangles(a, _operand(b, "cols"), segs, bs, out)
        return out
    k = a.shape[1]
    a_blocks = a.reshape(m // bs, bs, k)
    # [G, C/b, K, b]: a view (splitting C), indexed by (group, block column inside it).
    b_blocks = b.unflatten(2, (group // bs, bs)).permute(0, 2, 1, 3)
    cols = column_indices.long()
    gs, cs = cols // (group // bs), cols % (group // bs)
    rows_idx = row_indices.long()
    for ch in _chunks(nnz, 2 * bs * k):
        out[ch].copy_(torch.bmm(a_blocks[rows_idx[ch]].to(acc), b_blocks[gs[ch], cs[ch]].to(acc)))
    return out


# -- DSD / DDS -------------------------------------------------------------------------------

def _dsd_acc(data: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
             offsets: torch.Tensor, offsets_t: torch.Tensor, transposed: bool, group: int,
             out: Optional[torch.Tensor]) -> torch.Tensor:
    """``S @ B`` (``S^T @ B``) for grouped ``b [G, R, N]`` (``R = group``) as a row-major buffer
    (``products.dense_result``, possibly ``out`` itself) for ``products.deliver``."""
    bs = data.shape[1]
    acc_dtype = _acc_dtype(data.dtype)
    m = ((offsets_t if transposed else offsets).numel() - 1) * bs
    n = b.shape[2]
    segs = rectangles(row_indices, column_indices, offsets) if row_indices.numel() and n else None
    if segs is not None:
        return dsd_on_rectangles(out, (m, n), data, _operand(b, "rows"), segs, transposed)
    acc = dense_result(out, (m, n), acc_dtype, data.device)
    acc.zero_()
    if row_indices.numel() == 0 or n == 0:
        return acc
    if transposed:
        out_rows, b_rows, blocks = column_indices.long(), row_indices.long(), data.transpose(1, 2)
    else:
        out_rows, b_rows, blocks = row_indices.long(), column_indices.long(), data
    per = group // bs
    b_blocks = b.unflatten(1, (per, bs))  # [G, R/b, b, N]: a view
    acc_blocks = acc.view(m // bs, bs, n)
    for ch in _chunks(row_indices.numel(), 2 * bs * n):
        rb = b_rows[ch]
        contrib = torch.bmm(blocks[ch].to(acc_dtype), b_blocks[rb // per, rb % per].to(acc_dtype))
        acc_blocks.index_add_(0, out_rows[ch], contrib)
    return acc


def dsd(data: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
        offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
        block_offsets_t: torch.Tensor, transposed: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out = S @ B`` (``S^T @ B`` when ``transposed``), ``S`` given by ``data`` + metadata.

    ``b`` is ``B [K, N]``, or grouped ``[G, R, N]`` standing for ``B [G*R, N]`` with
    ``B[g*R + r, n] = b[g, r, n]``. The transposed form needs no ``*_t`` metadata here: it
    swaps the roles of ``row_indices`` and ``column_indices`` and transposes each block.
    """
    _check_dtype("dsd", data, "s.data")
    bs = data.shape[1]
    k = ((offsets if transposed else offsets_t).numel() - 1) * bs
    m = ((offsets_t if transposed else offsets).numel() - 1) * bs
    if data.shape != (row_indices.numel(), bs, bs):
        raise ValueError(f"dsd: data has shape {tuple(data.shape)}, expected ({row_indices.numel()}, {bs}, {bs})")
    _, group = grouped_rows("dsd", b, k, bs)
    if b.dim() == 2:
        b = b.unsqueeze(0)  # one group: [1, K, N]
    if b.dtype != data.dtype:
        raise ValueError(f"dsd: b must be {data.dtype} with {k} rows, got {b.dtype} {tuple(b.shape)}")
    n = b.shape[2]
    if out is not None and (out.shape != (m, n) or out.dtype != data.dtype or out.device != data.device):
        raise ValueError(f"dsd: out must be {data.dtype} of shape ({m}, {n}) on {data.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    acc = _dsd_acc(data, b, row_indices, column_indices, offsets, offsets_t, transposed, group, out)
    return deliver(acc, data.dtype, out)


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
    segs = rectangles(row_indices, column_indices, offsets) if row_indices.numel() and m else None
    if segs is not None:
        return deliver(dds_on_rectangles(out, (m, n), Operand(a, "cols"), data, segs, transposed), data.dtype, out)
    acc_dtype = _acc_dtype(data.dtype)
    acc = dense_result(out, (m, n), acc_dtype, data.device)
    acc.zero_()
    if row_indices.numel() == 0 or m == 0:
        return deliver(acc, data.dtype, out)
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
    return deliver(acc, data.dtype, out)
