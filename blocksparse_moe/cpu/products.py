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

import functools
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..grouped import grouped_cols, grouped_rows
from .precision import compute_dtype

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Elements of gathered operands one bmm chunk may hold (x 4-8 bytes): ~64-128 MiB.
_CHUNK_ELEMENTS = 1 << 24
# Elements one staging run may hold (1 MiB in fp32): small enough to stay in a core's L2
# between the copy and the GEMMs; a single larger rectangle is staged on its own.
_STAGE_ELEMENTS = 1 << 18

Segment = Tuple[int, int, int, int, int]  # (first block row, rows, first block col, cols, first block)
Run = Tuple[int, int, int, List[Segment]]  # (first block, block rows, block cols, rectangles)


def _check_dtype(op: str, t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


@functools.lru_cache(maxsize=None)
def _half_gemm_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN has hardware fp16/bf16 GEMMs here (AVX512-BF16/FP16, AMX). Asked once,
    on first use (never at import)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the GEMMs take their operands in. fp16/bf16 stay as they are where torch's
    CPU matmul runs them on oneDNN's hardware kernels, which accumulate in fp32 and round
    once (the contract of the upcast path, at 4-6x its speed with AMX); elsewhere they are
    upcast to fp32 (a software fp16/bf16 GEMM would be far slower than MKL's sgemm)."""
    if (dtype in (torch.float16, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and _half_gemm_supported(dtype)):
        return dtype
    return compute_dtype(dtype)


def rectangles(row_indices: torch.Tensor, column_indices: torch.Tensor,
               offsets: torch.Tensor) -> Optional[List[Segment]]:
    """The pattern as dense rectangles of blocks, or ``None`` if some row's columns have a gap.

    A rectangle ``(r0, R, c0, C, n0)`` is block rows ``r0 .. r0+R-1`` each storing block
    columns ``c0 .. c0+C-1``, at ``data[n0 : n0 + R*C]`` in row-major order. Empty rows
    belong to no rectangle. Computed in numpy on views of the (CPU) metadata: a dozen
    vector ops on a few hundred entries, where torch's per-op overhead would dominate.
    """
    nnz = row_indices.numel()
    if nnz == 0:
        return []
    rows = row_indices.numpy().astype(np.int64)
    cols = column_indices.numpy().astype(np.int64)
    offs = offsets.numpy().astype(np.int64)
    starts = offs[:-1]
    counts = offs[1:] - starts
    nonempty = counts > 0
    first_col = np.zeros_like(counts)
    first_col[nonempty] = cols[starts[nonempty]]
    if not np.array_equal(cols - first_col[rows], np.arange(nnz) - starts[rows]):
        return None
    live = np.flatnonzero(nonempty)
    lc, lf = counts[live], first_col[live]
    # A new rectangle starts where a live row does not continue the previous one.
    new = np.ones(live.size, dtype=bool)
    new[1:] = (live[1:] != live[:-1] + 1) | (lc[1:] != lc[:-1]) | (lf[1:] != lf[:-1])
    heads = np.flatnonzero(new)
    sizes = np.diff(heads, append=live.size)
    return list(zip(live[heads].tolist(), sizes.tolist(), lf[heads].tolist(), lc[heads].tolist(),
                    starts[live[heads]].tolist()))


class Operand:
    """A dense operand read in slices along one dimension: ``"cols"`` (SDD's ``b [K, N]``,
    DDS's ``a [M, K]``) or ``"rows"`` (DSD's ``b [K, N]``), as a 2-D matrix or a grouped
    3-D stack (``[G, K, C]`` along its columns, ``[G, R, N]`` along its rows; see
    ``grouped.py``) that stands for the groups side by side. Only views are made."""

    def __init__(self, t: torch.Tensor, along: str):
        self.t, self.cols = t, along == "cols"
        self.group = (t.shape[2] if self.cols else t.shape[1]) if t.dim() == 3 else 0

    def _slice(self, t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return t[..., lo:hi] if self.cols else t[..., lo:hi, :]

    def pieces(self, lo: int, hi: int) -> Sequence[Tuple[int, int, torch.Tensor]]:
        """The range ``[lo, hi)`` as ``(start, stop, slice)`` pieces, offsets relative to
        ``lo``: one for a 2-D operand, one per group crossed for a grouped one."""
        group = self.group
        if not group:
            return ((0, hi - lo, self._slice(self.t, lo, hi)),)
        if lo % group == 0 and hi - lo == group:  # exactly one group (an MoE expert)
            return ((0, group, self.t[lo // group]),)
        pieces, pos = [], lo
        while pos < hi:
            g = pos // group
            end = min(hi, (g + 1) * group)
            pieces.append((pos - lo, end - lo, self._slice(self.t[g], pos - g * group, end - g * group)))
            pos = end
        return pieces

    def whole(self, lo: int, hi: int) -> bool:
        """Whether ``[lo, hi)`` is one piece (lies in one group)."""
        return not self.group or lo // self.group == (hi - 1) // self.group

    def batch(self, lo: int, n: int, width: int) -> Optional[torch.Tensor]:
        """The ``n`` ranges ``[lo + i*width, lo + (i+1)*width)`` as one strided 3-D view
        (``[n, K, width]`` along columns, ``[n, width, N]`` along rows), or None."""
        t, group = self.t, self.group
        if group:
            return t[lo // group:lo // group + n] if lo % group == 0 and width == group else None
        if self.cols:
            return t[:, lo:lo + n * width].view(t.shape[0], n, width).transpose(0, 1)
        return t[lo:lo + n * width].view(n, width, t.shape[1])


def _operand(b: torch.Tensor, along: str) -> Operand:
    """``b`` as an ``Operand``; one group ``[1, K, N]`` reads as the 2-D matrix ``b[0]``, so
    neighbouring experts inside it can share one bmm (groups never span two)."""
    return Operand(b[0] if b.dim() == 3 and b.shape[0] == 1 else b, along)


def _runs(segs: List[Segment], bs: int) -> List[Run]:
    """The rectangles grouped into staging runs ``(n0, R, C, segments)``: consecutive
    rectangles of one width ``C`` whose blocks follow each other in ``data``
    (``data[n0 : n0 + R*C]``, ``R`` block rows in all), at most ``_STAGE_ELEMENTS`` staged
    unless a single rectangle is larger."""
    runs: List[Run] = []
    for seg in segs:
        _, r, _, c, n0 = seg
        if runs:
            m0, rows, width, group = runs[-1]
            if width == c and m0 + rows * c == n0 and (rows + r) * c * bs * bs <= _STAGE_ELEMENTS:
                group.append(seg)
                runs[-1] = (m0, rows + r, c, group)
                continue
        runs.append((n0, r, c, [seg]))
    return runs


def _batches(group: List[Segment], fresh: Optional[Sequence[bool]] = None, first: int = 0,
             dtype: torch.dtype = torch.float32) -> Iterator[Tuple[int, int, int]]:
    """``(k, n, rows_before)``: ``group[k:k+n]`` is one GEMM (``n == 1``) or one bmm batch of
    rectangles of one size that follow each other in block rows and block columns (so each
    operand of theirs is one evenly strided 3-D view), all first writes (``fresh[first + i]``)
    when ``fresh`` is given; ``rows_before`` block rows of the run precede it.

    A batch holds a multiple of the intra-op thread count: torch's CPU bmm hands each thread
    whole GEMMs, so 3 GEMMs on 2 threads take as long as 4, and the odd one out runs as a
    plain (multi-threaded) matmul instead. GEMMs in fp16/bf16 (``dtype``) are never batched:
    oneDNN's bmm copies strided operands first (measured slower than one mm each)."""
    threads = max(1, torch.get_num_threads())
    batching = dtype in (torch.float32, torch.float64)
    k, before = 0, 0
    while k < len(group):
        r0, r, c0, c, _ = group[k]
        n = 1
        while (k + n < len(group) and group[k + n][1] == r and group[k + n][0] == r0 + n * r
               and group[k + n][2] == c0 + n * c
               and (fresh is None or (fresh[first + k] and fresh[first + k + n]))):
            n += 1
        batched = n - n % threads if batching else 0
        if batched > 1:
            yield k, batched, before
            k, before = k + batched, before + batched * r
            n -= batched
        for _ in range(n):
            yield k, 1, before
            k, before = k + 1, before + r


def _staging(runs: List[Run], bs: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One flat buffer for the largest run, reused by every run of a call."""
    most = max(rows * c for _, rows, c, _ in runs)
    return torch.empty(most * bs * bs, dtype=dtype, device=device)


def _untile(data: torch.Tensor, run: Run, staging: torch.Tensor) -> torch.Tensor:
    """The run's blocks as one ``[R*b, C*b]`` matrix (its rectangles' matrices stacked): one
    copy into ``staging``, converting fp16/bf16 to the staging dtype."""
    n0, rows, c, _ = run
    bs = data.shape[1]
    dense = staging[:rows * c * bs * bs].view(rows * bs, c * bs)
    dense.view(rows, bs, c, bs).copy_(data[n0:n0 + rows * c].view(rows, c, bs, bs).permute(0, 2, 1, 3))
    return dense


def _cover(ranges: List[Tuple[int, int]], size: int) -> Tuple[List[bool], List[Tuple[int, int]]]:
    """How rectangles landing on block ranges ``[lo, hi)`` of a dense result (in this order)
    write it without zero-filling it first: ``fresh[i]`` says range ``i`` is written with
    ``out=`` (nothing there yet), else it is added with ``addmm_``; ``zero`` lists the ranges
    to zero beforehand (never covered, or first covered by a partly-written range, which
    does not happen in an MoE). A fixed order, so sums are the same run to run."""
    written = bytearray(size)
    fresh: List[bool] = []
    zero_first = bytearray(size)
    for lo, hi in ranges:
        seen = written[lo:hi]
        fresh.append(not any(seen))
        if not fresh[-1] and not all(seen):
            for i in range(lo, hi):
                if not written[i]:
                    zero_first[i] = 1
        written[lo:hi] = b"\x01" * (hi - lo)
    zero, i = [], 0
    while i < size:
        if written[i] and not zero_first[i]:
            i += 1
            continue
        j = i + 1
        while j < size and (not written[j] or zero_first[j]):
            j += 1
        zero.append((i, j))
        i = j
    return fresh, zero


def _mm(lhs: torch.Tensor, rhs: torch.Tensor, out: torch.Tensor, fresh: bool) -> None:
    """``out = lhs @ rhs`` (``fresh``) or ``out += lhs @ rhs``, 2-D or batched 3-D."""
    if lhs.dim() == 3:
        torch.bmm(lhs, rhs, out=out)  # batches are fresh (``_batches``)
    elif fresh:
        torch.mm(lhs, rhs, out=out)
    else:
        out.addmm_(lhs, rhs)


def dense_result(out: Optional[torch.Tensor], shape, acc: torch.dtype, device: torch.device) -> torch.Tensor:
    """Where a DSD/DDS writes: ``out`` itself when it is contiguous in the accumulation dtype,
    else a fresh row-major buffer (returned, or converted/copied into ``out`` at the end)."""
    if out is not None and out.dtype == acc and out.is_contiguous():
        return out
    return torch.empty(shape, dtype=acc, device=device)


def deliver(acc: torch.Tensor, dtype: torch.dtype, out: Optional[torch.Tensor]) -> torch.Tensor:
    """The DSD/DDS result from ``dense_result``'s buffer: itself, converted once, or copied to ``out``."""
    if out is None:
        return acc if acc.dtype == dtype else acc.to(dtype)
    return out if acc is out else out.copy_(acc)


def _chunks(nnz: int, per_block: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_block))
    for start in range(0, nnz, step):
        yield slice(start, min(nnz, start + step))


# -- the rectangle paths ---------------------------------------------------------------------

def sdd_on_rectangles(a: torch.Tensor, b: Operand, segs: List[Segment], bs: int, out: torch.Tensor) -> None:
    """SDD on rectangles: writes every block of ``out`` (``[nnz, b, b]``, any strides).

    Per staging run: each batch's (rectangle's) product into its rows of the staging
    matrix, then one copy re-tiles the run into its blocks (with ``C = 1`` the staging
    matrix is the blocks themselves)."""
    acc = _gemm_dtype(a.dtype)  # every block is written once, by one GEMM: half GEMMs are exact here
    convert = a.dtype != acc
    k = a.shape[1]
    runs = _runs(segs, bs)
    in_place = out.dtype == acc and out.is_contiguous()
    staging = None if in_place and all(c == 1 for _, _, c, _ in runs) else _staging(runs, bs, acc, a.device)
    for n0, rows, c, group in runs:
        direct = c == 1 and in_place
        dense = (out[n0:n0 + rows] if direct else staging[:rows * c * bs * bs]).view(rows * bs, c * bs)
        w = c * bs
        for i, n, before in _batches(group, dtype=acc):
            r0, r, c0, _, _ = group[i]
            h = r * bs
            rhs = b.batch(c0 * bs, n, w) if n > 1 else None
            if rhs is not None:  # one bmm for the batch
                lhs = a[r0 * bs:(r0 + n * r) * bs].view(n, h, k)
                if convert:
                    lhs, rhs = lhs.to(acc), rhs.to(acc)
                torch.bmm(lhs, rhs, out=dense[before * bs:(before + n * r) * bs].view(n, h, w))
                continue
            for j in range(n):
                lhs = a[(r0 + j * r) * bs:(r0 + (j + 1) * r) * bs]
                lhs = lhs.to(acc) if convert else lhs
                part = dense[(before + j * r) * bs:(before + (j + 1) * r) * bs]
                for lo, hi, rhs in b.pieces((c0 + j * c) * bs, (c0 + (j + 1) * c) * bs):
                    torch.mm(lhs, rhs.to(acc) if convert else rhs, out=part if hi - lo == w else part[:, lo:hi])
        if not direct:
            out[n0:n0 + rows * c].view(rows, c, bs, bs).copy_(dense.view(rows, bs, c, bs).permute(0, 2, 1, 3))


def _rect_result(out: Optional[torch.Tensor], shape, dtype: torch.dtype, device: torch.device,
                 ranges: List[Tuple[int, int]], fresh: List[bool], whole: bool) -> torch.Tensor:
    """The result buffer of a DSD/DDS on rectangles: in fp16/bf16 itself when its GEMMs run
    in that dtype and every element is the output of exactly one GEMM (no second rectangle
    or group piece adds to it: that sum would be rounded twice), else in fp32."""
    gemm = _gemm_dtype(dtype)
    native = gemm != compute_dtype(dtype) and whole and all(fresh)
    return dense_result(out, shape, gemm if native else compute_dtype(dtype), device)


def dsd_on_rectangles(out: Optional[torch.Tensor], shape, data: torch.Tensor, b: Operand, segs: List[Segment],
                      transposed: bool) -> torch.Tensor:
    """DSD on rectangles: ``S @ B`` (``S^T @ B``) as a row-major buffer (``dense_result``;
    pass it to ``deliver``), every element written."""
    bs = data.shape[1]
    # Output block rows of each rectangle: its rows of S (columns of S^T); the block range
    # of B's rows it reads: its columns of S (rows of S^T).
    ranges = [(c0, c0 + c) if transposed else (r0, r0 + r) for r0, r, c0, c, _ in segs]
    fresh, zero = _cover(ranges, shape[0] // bs)
    reads = [(r0, r0 + r) if transposed else (c0, c0 + c) for r0, r, c0, c, _ in segs]
    acc = _rect_result(out, shape, data.dtype, data.device, ranges, fresh,
                       all(b.whole(lo * bs, hi * bs) for lo, hi in reads))
    n_cols = acc.shape[1]
    for lo, hi in zero:
        acc[lo * bs:hi * bs].zero_()
    runs = _runs(segs, bs)
    staging = _staging(runs, bs, acc.dtype, data.device)
    first = 0
    for run in runs:
        dense, group = _untile(data, run, staging), run[3]
        w = run[2] * bs
        for i, n, before in _batches(group, fresh, first, acc.dtype):
            r0, r, c0, c, _ = group[i]
            h = r * bs
            s = dense[before * bs:(before + n * r) * bs]
            if n > 1:
                rhs = b.batch(r0 * bs, n, h) if transposed else b.batch(c0 * bs, n, w)
                if rhs is not None:
                    s = s.view(n, h, w)
                    lo, hi, rows = (c0, c0 + n * c, w) if transposed else (r0, r0 + n * r, h)
                    _mm(s.transpose(1, 2) if transposed else s, rhs.to(acc.dtype),
                        acc[lo * bs:hi * bs].view(n, rows, n_cols), True)
                    continue
            for j in range(n):
                sj = s[j * h:(j + 1) * h]
                start = (r0 + j * r) * bs if transposed else (c0 + j * c) * bs
                lo, hi = ranges[first + i + j]
                target, is_fresh = acc[lo * bs:hi * bs], fresh[first + i + j]
                for plo, phi, rhs in b.pieces(start, start + (h if transposed else w)):
                    lhs = sj.t() if transposed else sj
                    if phi - plo != lhs.shape[1]:
                        lhs = lhs[:, plo:phi]
                    _mm(lhs, rhs.to(acc.dtype), target, is_fresh)
                    is_fresh = False
        first += len(group)
    return acc


def dds_on_rectangles(out: Optional[torch.Tensor], shape, a: Operand, data: torch.Tensor, segs: List[Segment],
                      transposed: bool) -> torch.Tensor:
    """DDS on rectangles: ``A @ S`` (``A @ S^T``) as a row-major buffer (``dense_result``; pass
    it to ``deliver``), every element written; each product lands on a column range of the
    result (BLAS writes it in place).

    No batches here: a batch's output would be a strided 3-D view of the result, which
    torch's bmm fills through a temporary and a copy (measured slower than one mm each)."""
    bs = data.shape[1]
    # Output block columns of each rectangle: its columns of S (rows of S^T).
    ranges = [(r0, r0 + r) if transposed else (c0, c0 + c) for r0, r, c0, c, _ in segs]
    fresh, zero = _cover(ranges, shape[1] // bs)
    acc = _rect_result(out, shape, data.dtype, data.device, ranges, fresh, True)
    for lo, hi in zero:
        acc[:, lo * bs:hi * bs].zero_()
    runs = _runs(segs, bs)
    staging = _staging(runs, bs, acc.dtype, data.device)
    i = 0
    for run in runs:
        dense = _untile(data, run, staging)
        before = 0
        for r0, r, c0, c, _ in run[3]:
            s = dense[before * bs:(before + r) * bs]
            before += r
            start, size = (c0 * bs, c * bs) if transposed else (r0 * bs, r * bs)
            lo, hi = ranges[i]
            target, is_fresh = acc[:, lo * bs:hi * bs], fresh[i]
            i += 1
            for plo, phi, lhs in a.pieces(start, start + size):
                rhs = s.t() if transposed else s
                if phi - plo != size:
                    rhs = rhs[plo:phi]
                _mm(lhs.to(acc.dtype), rhs, target, is_fresh)
                is_fresh = False
    return acc


# -- SDD -----------------------------------------------------------------------------------

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
    acc = compute_dtype(a.dtype)
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
    acc_dtype = compute_dtype(data.dtype)
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
    acc_dtype = compute_dtype(data.dtype)
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
