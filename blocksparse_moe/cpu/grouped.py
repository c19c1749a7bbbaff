"""SDD and DSD with a *grouped* dense operand on CPU tensors (see ``blocksparse_moe/_grouped.py``).

Same signatures, results and errors as the launchers in ``kernels/sdd.py`` / ``kernels/dsd.py``
for a 3-D ``b``; ``ops`` sends 2-D operands to ``cpu/products.py`` and 3-D ones here. The
grouped operand is never copied whole: each matmul reads one group's slice ``b[g, ...]``,
a 2-D strided view.

* **Dense rectangles** (every MoE topology, found by ``products.rectangles``): the 2-D path's
  ``sdd_on_rectangles`` / ``dsd_on_rectangles`` with ``b`` read as a grouped
  ``products.Operand``: a rectangle's range of B columns (SDD) or B rows (DSD) is cut at
  group boundaries, and each piece is one matmul on ``b[g]``'s slice. In an MoE the groups
  are the experts and a rectangle is one expert, so that is one matmul per expert (and one
  bmm over ``b[g:g+n]`` for neighbouring experts of one size), as in the 2-D path.
* **Any other pattern**: chunks of stored blocks, each one ``torch.bmm`` over operand blocks
  gathered by (group, block inside the group), as the 2-D path does.

Precision as in ``cpu/products.py``: fp32 accumulation (fp64 for fp64), fp16/bf16 slices
converted one matmul at a time, the result rounded once.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._grouped import grouped_cols, grouped_rows
from .products import Operand, deliver, dense_result, dsd_on_rectangles, rectangles, sdd_on_rectangles

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Elements of gathered operand blocks one bmm chunk may hold (the 2-D path's bound).
_CHUNK_ELEMENTS = 1 << 24


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_dtype(op: str, t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _chunks(nnz: int, per_block: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_block))
    for start in range(0, nnz, step):
        yield slice(start, min(nnz, start + step))


def sdd(a: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, column_indices: torch.Tensor,
        offsets: torch.Tensor, column_indices_t: torch.Tensor, offsets_t: torch.Tensor,
        block_offsets_t: torch.Tensor, block_size: int, out: Optional[torch.Tensor] = None,
        a_rows: Optional[torch.Tensor] = None, epilogue: Optional[str] = None) -> torch.Tensor:
    """SDD with ``b [G, K, C]`` standing for ``B [K, G*C]``, ``B[k, g*C + c] = b[g, k, c]``."""
    if epilogue is not None:
        raise NotImplementedError(f"sdd: epilogue {epilogue!r} is not implemented (only None)")
    _check_dtype("sdd", a, "a")
    bs = block_size
    nnz = row_indices.numel()
    m = (offsets.numel() - 1) * bs
    n = (offsets_t.numel() - 1) * bs
    if b.dim() != 3:
        raise ValueError(f"sdd: the grouped CPU path takes b [G, K, C], got shape {tuple(b.shape)}")
    _, group = grouped_cols("sdd", b, n, bs)
    if a.dim() != 2 or b.shape[1] != a.shape[1] or b.dtype != a.dtype:
        raise ValueError(f"sdd: expected a [*, K] and b [G, K, {n}/G] of one dtype, got a {a.dtype} "
                         f"{tuple(a.shape)} and b {b.dtype} {tuple(b.shape)}")
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
        sdd_on_rectangles(a, Operand(b, "cols"), segs, bs, out)
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
        return dsd_on_rectangles(out, (m, n), data, Operand(b, "rows"), segs, transposed)
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
    """DSD with ``b [G, R, N]`` standing for ``B [G*R, N]``, ``B[g*R + r, n] = b[g, r, n]``."""
    _check_dtype("dsd", data, "s.data")
    bs = data.shape[1]
    k = ((offsets if transposed else offsets_t).numel() - 1) * bs
    m = ((offsets_t if transposed else offsets).numel() - 1) * bs
    if data.shape != (row_indices.numel(), bs, bs):
        raise ValueError(f"dsd: data has shape {tuple(data.shape)}, expected ({row_indices.numel()}, {bs}, {bs})")
    if b.dim() != 3:
        raise ValueError(f"dsd: the grouped CPU path takes b [G, R, N], got shape {tuple(b.shape)}")
    _, group = grouped_rows("dsd", b, k, bs)
    if b.dtype != data.dtype:
        raise ValueError(f"dsd: b must be {data.dtype} with {k} rows, got {b.dtype} {tuple(b.shape)}")
    n = b.shape[2]
    if out is not None and (out.shape != (m, n) or out.dtype != data.dtype or out.device != data.device):
        raise ValueError(f"dsd: out must be {data.dtype} of shape ({m}, {n}) on {data.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    acc = _dsd_acc(data, b, row_indices, column_indices, offsets, offsets_t, transposed, group, out)
    return deliver(acc, data.dtype, out)

