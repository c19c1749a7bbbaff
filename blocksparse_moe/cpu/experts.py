"""The fused expert path on CPU tensors: every token's ``k`` expert MLPs, weighted and summed.

    h_e(x)   = x @ w1[e].T + b1[e]                                   [G*F]
    a_e(x)   = act(h[:F]) * h[F:]   (glu, G = 2)   or   act(h)   (G = 1)
    out[t]   = sum_j weights[t, j] * (a_{e}(x[t]) @ w2[e] + b2[e]),   e = expert_indices[t, j]

The CPU back end of the expert-path protocol (``experts_forward``, ``experts_forward_fake``,
``experts_backward``; the Triton back end is ``kernels/experts.py``). The ops layer checks
every argument first and owns autograd; nothing here re-validates user arguments.

The block-sparse layout is the GPU's. A CPU runs one GEMM per expert on a contiguous range
of rows best, so the ``S = T*k`` slots are sorted by expert once (a stable sort: slot
``s = t*k + j`` keeps its place among its expert's slots) and the sizes read on the host
(``counts.tolist()``: free on a CPU, where there is no queue to stall). The work then runs
in phases, each cut into one part per thread (see "the GEMM phases" below), and every
elementwise step runs inside them on the rows of one expert at a time:

    forward   1: gather x rows, h = x w1^T (+b1) (kept), a = act(g) * u * weight
              2: y = a w2 (+ weight b2), rows put back in slot order; out = sum over k
    backward  1: gather dout rows, dA = dout w2^T, a recomputed from h, dweights,
                 weight * a, dh = [act'(g) u wdA | act(g) wdA]
              2: dW2 = (w a)^T dout, db2, dW1 = dh^T x, db1, dx rows = dh w1 (slot order);
                 dx = sum over k

That is the GEMMs of a dense MLP (6 + 12 units of ``T*k*H*F`` FLOPs for a GLU) and nothing
more: ``dweights[t, j] = <dout[t], y_tj>`` is computed as ``<a_tj, dout[t] @ w2^T> +
<dout[t], b2>`` from products backward needs anyway, so the expert outputs ``y`` are
neither kept nor recomputed. Elementwise work is fused where ATen has the kernel
(``silu``/``gelu`` and their backward, in place, into ``out=`` slices). Kept for backward:
the pre-activation ``h`` in sorted order (in x's dtype, the floor of DESIGN.md), the sort
permutation and the expert sizes; ``a`` is recomputed from ``h``. No ``[S, H]`` buffer is
made that is not needed: on Linux a fresh buffer that large is new pages (faults on first
touch), which costs more than gathering rows a second time into a small one.

Precision: the GEMMs and every elementwise step run in fp32 (fp64 for fp64): fp16/bf16
weights are converted once per call (on CPUs without fp16/bf16 hardware, torch's half GEMM
is ~100x slower than MKL's sgemm; with it, a half GEMM would round each expert's output
before the weighted sum: a second rounding). Stored results are rounded once: ``h``
(kept), ``out``, and each gradient. The ``k`` slots of a token are summed in fp32 in slot
order ``j = 0..k-1``, no atomics: two runs are bitwise equal.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Tuple

import torch

from .activation import _act_backward_into, _act_into

__all__ = ["ACTIVATIONS", "experts_forward", "experts_forward_fake", "experts_backward"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}  # cpu/activation.py's codes

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _saved_shapes(x: Tensor, expert_indices: Tensor, w1: Tensor, num_experts: int):
    slots = expert_indices.shape[0] * expert_indices.shape[1]
    return (slots, w1.shape[1]), (slots,), (num_experts,)


def experts_forward_fake(x: Tensor, expert_indices: Tensor, weights: Optional[Tensor], w1: Tensor, w2: Tensor,
                         b1: Optional[Tensor], b2: Optional[Tensor], *, num_experts: int, act: str, glu: bool,
                         block_size: int) -> Tuple[Tensor, List[Tensor]]:
    """Shapes and dtypes of :func:`experts_forward`'s results, computing nothing."""
    h_shape, order_shape, counts_shape = _saved_shapes(x, expert_indices, w1, num_experts)
    saved = [x.new_empty(h_shape), expert_indices.new_empty(order_shape, dtype=torch.int64),
             expert_indices.new_empty(counts_shape, dtype=torch.int64)]
    return x.new_empty(x.shape), saved


def _sort_slots(expert_indices: Tensor, num_experts: int) -> Tuple[Tensor, Tensor]:
    """``(order [S], counts [E])``: slot ids sorted by expert (stable), slots per expert."""
    flat = expert_indices.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def _ranges(sizes: List[int]):
    """``(e, r0, r1)`` for every expert with rows: its range of sorted slots."""
    start = 0
    for e, n in enumerate(sizes):
        if n:
            yield e, start, start + n
        start += n


# -- the GEMM phases -------------------------------------------------------------------------------
# Each phase (the forward's two GEMMs, backward's "dA and dW2" and "dW1 and dx") is cut into
# one part per thread, each a run of consecutive sorted rows of (nearly) equal length; an
# expert straddling a cut is split: its token rows for the products that produce rows,
# its weight-gradient rows in the same proportion for dW = A^T B. Each part runs its GEMMs
# single-threaded on its own thread: one hand-off per phase, instead of every small
# per-expert GEMM being split across the threads (on a loaded machine each such split
# waits for a descheduled thread). Every output element is still written by exactly one
# GEMM, with the same cuts on every run: deterministic.

_PARALLEL_MIN_FLOPS = 1 << 25  # a smaller phase runs as one part on the calling thread
_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()

Piece = Tuple[int, int, int, int, int]  # (expert, first row, end row, expert's first row, expert's end row)


def _parts(ranges: List[Tuple[int, int, int]], flops: float) -> List[List[Piece]]:
    """The rows of ``ranges`` cut into one part per thread (one part when small)."""
    threads = torch.get_num_threads()
    if threads <= 1 or flops < _PARALLEL_MIN_FLOPS or not ranges:
        return [[(e, lo, hi, lo, hi) for e, lo, hi in ranges]]
    total = ranges[-1][2]
    bounds = [total * i // threads for i in range(threads + 1)]
    parts: List[List[Piece]] = [[] for _ in range(threads)]
    for e, lo, hi in ranges:
        for p in range(threads):
            a, b = max(lo, bounds[p]), min(hi, bounds[p + 1])
            if a < b:
                parts[p].append((e, a, b, lo, hi))
    return [p for p in parts if p]


def _share(piece: Piece, width: int) -> Tuple[int, int]:
    """The rows ``[c0, c1)`` of an expert's ``[width, .]`` weight gradient that ``piece``
    computes: the same share of ``width`` as its share of the expert's token rows."""
    _, a, b, lo, hi = piece
    n = hi - lo
    return width * (a - lo) // n, width * (b - lo) // n


def _single_threaded(fn: Callable[[List[Piece]], None], part: List[Piece], grad: bool) -> None:
    torch.set_num_threads(1)  # this worker's own OpenMP setting; BLAS is already at 1
    with torch.set_grad_enabled(grad):  # the caller's grad mode (thread-local)
        fn(part)


def _run(fn: Callable[[List[Piece]], None], parts: List[List[Piece]]) -> None:
    """``fn(part)`` for every part: one part on the calling thread as it is, several on
    as many threads with single-threaded BLAS (the thread count is restored after)."""
    global _pool
    if len(parts) == 1:
        fn(parts[0])
        return
    with _pool_lock:
        if _pool is None or _pool._max_workers < len(parts) - 1:
            _pool = ThreadPoolExecutor(max_workers=len(parts) - 1, thread_name_prefix="blocksparse_moe-cpu")
        pool = _pool
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [pool.submit(_single_threaded, fn, part, torch.is_grad_enabled()) for part in parts[1:]]
        fn(parts[0])
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(threads)


def _activate(h: Tensor, ffn: int, glu: bool, code: int, out: Optional[Tensor] = None) -> Tensor:
    """``act(h[:, :F]) * h[:, F:]`` (glu) or ``act(h)``, into ``out`` when given: two passes
    (one plain)."""
    a = _act_into(h[:, :ffn] if glu else h, code, out)
    return a.mul_(h[:, ffn:]) if glu else a


def _slot_sum(rows: Tensor, tokens: int, k: int) -> Tensor:
    """``out[t] = sum_j rows[t*k + j]`` for rows in slot order: the ``k`` rows of a token
    summed in slot order ``j = 0..k-1`` (``sum`` over a fixed dimension: deterministic)."""
    return rows.view(tokens, k, rows.shape[1]).sum(1)


def experts_forward(x: Tensor, expert_indices: Tensor, weights: Optional[Tensor], w1: Tensor, w2: Tensor,
                    b1: Optional[Tensor], b2: Optional[Tensor], *, num_experts: int, act: str, glu: bool,
                    block_size: int) -> Tuple[Tensor, List[Tensor]]:
    """``(out [T, H] in x's dtype, saved = [h [S, G*F] in x's dtype, order [S], counts [E]])``.

    ``h`` is the pre-activation (bias included) of slot ``order[i]`` in row ``i``;
    ``block_size`` is not used (no padding on the CPU).
    """
    tokens, hidden = x.shape
    k = expert_indices.shape[1]
    width = w1.shape[1]
    ffn = width // 2 if glu else width
    cdt = _compute_dtype(x.dtype)
    code = _ACT_CODE[act]
    dev = x.device
    order, counts = _sort_slots(expert_indices, num_experts)
    slots = order.numel()
    h = x.new_empty((slots, width))
    if slots == 0:
        return x.new_zeros((tokens, hidden)), [h, order, counts]
    ranges = list(_ranges(counts.tolist()))
    w1c, w2c, b1c, b2c = (None if t is None else t.to(cdt) for t in (w1, w2, b1, b2))  # once, not per thread
    xc = x.to(cdt)  # half inputs converted once, before the k-fold gather
    token = order // k
    ws = None if weights is None else weights.reshape(-1).to(cdt)[order].unsqueeze(1)
    a = torch.empty((slots, ffn), dtype=cdt, device=dev)

    # Phase 1, row by row: gather x, h = x w1^T (+ b1), keep h, a = act(g) * u * weight.
    def first(part: List[Piece]) -> None:
        for e, r0, r1, _, _ in part:
            xs = xc.index_select(0, token[r0:r1])
            he = h[r0:r1] if h.dtype == cdt else torch.empty((r1 - r0, width), dtype=cdt, device=dev)
            if b1c is None:
                torch.mm(xs, w1c[e].t(), out=he)
            else:
                torch.addmm(b1c[e], xs, w1c[e].t(), out=he)
            if h.dtype != cdt:
                h[r0:r1].copy_(he)  # the kept pre-activation, rounded once
            ae = _activate(he, ffn, glu, code, a[r0:r1])
            if ws is not None:
                ae.mul_(ws[r0:r1])  # the routing weight, on the narrower side of the second GEMM
    _run(first, _parts(ranges, 2.0 * slots * hidden * width))
    del xc
    y = torch.empty((slots, hidden), dtype=cdt, device=dev)  # in slot order: row t*k + j

    # Phase 2: y = (weight a) w2 (+ weight b2), each piece's rows put back in slot order.
    def second(part: List[Piece]) -> None:
        for e, r0, r1, _, _ in part:
            if b2c is None:
                ye = torch.mm(a[r0:r1], w2c[e])
            elif ws is None:
                ye = torch.addmm(b2c[e], a[r0:r1], w2c[e])
            else:
                ye = torch.mm(a[r0:r1], w2c[e]).addr_(ws[r0:r1, 0], b2c[e])  # the weighted bias
            y.index_copy_(0, order[r0:r1], ye)
    _run(second, _parts(ranges, 2.0 * slots * hidden * ffn))
    del a
    return _slot_sum(y, tokens, k).to(x.dtype), [h, order, counts]


def experts_backward(dout: Tensor, saved: List[Tensor], x: Tensor, expert_indices: Tensor,
                     weights: Optional[Tensor], w1: Tensor, w2: Tensor, b1: Optional[Tensor],
                     b2: Optional[Tensor], *, num_experts: int, act: str, glu: bool, block_size: int,
                     needs_input_grad: Tuple[bool, bool, bool, bool, bool, bool]):
    """``(dx, dweights, dw1, dw2, db1, db2)``, None where not needed (or the input is None).

    ``dout`` may have any strides (a zero-stride ``expand`` included): it is only read
    through ``index_select``.
    """
    h, order, counts = saved
    tokens, hidden = x.shape
    k = expert_indices.shape[1]
    width = w1.shape[1]
    ffn = width // 2 if glu else width
    cdt = _compute_dtype(x.dtype)
    code = _ACT_CODE[act]
    dev = x.device
    need_x, need_w, need_w1, need_w2, need_b1, need_b2 = needs_input_grad
    need_w = need_w and weights is not None
    need_b1 = need_b1 and b1 is not None
    need_b2 = need_b2 and b2 is not None
    sizes = counts.tolist()
    ranges = list(_ranges(sizes))
    idle = [e for e, n in enumerate(sizes) if n == 0]

    def result(t: Tensor) -> Tensor:
        # Written expert by expert (in place when in the compute dtype, else rounded once
        # from the fp32 product); experts without rows get zeros.
        r = torch.empty(t.shape, dtype=t.dtype, device=dev)
        for e in idle:
            r[e].zero_()
        return r

    dw1 = result(w1) if need_w1 else None
    dw2 = result(w2) if need_w2 else None
    db1 = result(b1) if need_b1 else None
    db2 = result(b2) if need_b2 else None
    slots = order.numel()
    if slots == 0:
        dx = x.new_zeros(x.shape) if need_x else None
        dweights = weights.new_zeros(weights.shape) if need_w else None
        return dx, dweights, dw1, dw2, db1, db2
    token = order // k
    w1c, w2c, b2c = (None if t is None else t.to(cdt) for t in (w1, w2, b2))  # once, not per thread
    doc = dout.to(cdt)  # any strides: only read through index_select
    xc = x.to(cdt) if need_w1 else None
    ws = None if weights is None else weights.reshape(-1).to(cdt)[order].unsqueeze(1)
    need_dh = need_x or need_w1 or need_b1
    aw = torch.empty((slots, ffn), dtype=cdt, device=dev) if need_w2 else None  # weight * a
    dh = torch.empty((slots, width), dtype=cdt, device=dev) if need_dh else None
    dws = torch.empty((slots,), dtype=cdt, device=dev) if need_w else None

    # Phase 1, row by row: gather dout, dA = dout w2^T (dL/da before the routing
    # weight), a recomputed from h, dweights = <dout, a w2 + b2> = <a, dA> + <dout, b2>
    # (y is never needed), weight * a for dW2, and dh = [act'(g) u wdA | act(g) wdA].
    def first(part: List[Piece]) -> None:
        for e, r0, r1, _, _ in part:
            dop = doc.index_select(0, token[r0:r1])
            he = h[r0:r1] if h.dtype == cdt else h[r0:r1].to(cdt)
            g = he[:, :ffn] if glu else he
            da = torch.mm(dop, w2c[e].t())
            act_g = _act_into(g, code, None)
            ae = act_g
            if glu:
                ae = torch.mul(act_g, he[:, ffn:], out=aw[r0:r1]) if need_w2 else act_g * he[:, ffn:]
            elif need_w2:
                ae = aw[r0:r1].copy_(act_g)
            if need_w:
                torch.linalg.vecdot(ae, da, out=dws[r0:r1])
                if b2c is not None:
                    dws[r0:r1].add_(dop @ b2c[e])
            wse = None if ws is None else ws[r0:r1]
            if need_w2 and wse is not None:
                ae.mul_(wse)
            if need_dh:
                if wse is not None:
                    da.mul_(wse)
                if glu:
                    torch.mul(da, act_g, out=dh[r0:r1, ffn:])  # d up = wdA act(g)
                    da.mul_(he[:, ffn:])
                _act_backward_into(da, g, code, dh[r0:r1, :ffn] if glu else dh[r0:r1])  # d gate
    _run(first, _parts(ranges, 2.0 * slots * hidden * ffn))

    dweights = None
    if need_w:
        dweights = torch.empty(slots, dtype=weights.dtype, device=dev)
        dweights.index_copy_(0, order, dws.to(weights.dtype))
        dweights = dweights.view(weights.shape)
    dxs = torch.empty((slots, hidden), dtype=cdt, device=dev) if need_x else None  # in slot order

    # Phase 2: dW2 = (w a)^T dout, db2 = w^T dout, dW1 = dh^T x, db1 = sum dh, dx rows = dh w1.
    # The weight gradients of an expert split between parts are split by their rows. dout
    # and x rows are gathered again per expert (a small buffer in cache, where [S, H] ones
    # would be fresh memory: page faults cost more than the second gather).
    def second(part: List[Piece]) -> None:
        for piece in part:
            e, r0, r1, lo, hi = piece
            if need_w2 or need_b2:
                do = doc.index_select(0, token[lo:hi])
            if need_w1:
                xs = xc.index_select(0, token[lo:hi])
            if need_w2:
                c0, c1 = _share(piece, ffn)
                if c0 < c1:
                    _mm_into(aw[lo:hi, c0:c1].t(), do, dw2[e, c0:c1])
            if need_b2:
                c0, c1 = _share(piece, hidden)
                if c0 < c1:
                    db2[e, c0:c1].copy_(do[:, c0:c1].sum(0) if ws is None else ws[lo:hi, 0] @ do[:, c0:c1])
            if need_w1 or need_b1:
                c0, c1 = _share(piece, width)
                if c0 < c1 and need_w1:
                    _mm_into(dh[lo:hi, c0:c1].t(), xs, dw1[e, c0:c1])
                if c0 < c1 and need_b1:
                    db1[e, c0:c1].copy_(dh[lo:hi, c0:c1].sum(0))
            if need_x:
                dxs.index_copy_(0, order[r0:r1], torch.mm(dh[r0:r1], w1c[e]))  # back in slot order
    if need_w2 or need_b2 or need_dh:
        _run(second, _parts(ranges, 2.0 * slots * hidden * (ffn * need_w2 + width * (need_w1 + need_x))))
    del aw, dh
    dx = None if dxs is None else _slot_sum(dxs, tokens, k).to(x.dtype)
    return dx, dweights, dw1, dw2, db1, db2


def _mm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out = a @ b``: straight into ``out`` when it is a contiguous compute-dtype matrix,
    else computed in the compute dtype and rounded once."""
    if out.dtype == a.dtype and out.is_contiguous():
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))
