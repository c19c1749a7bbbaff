"""The fused expert path on CPU tensors: every token's ``k`` expert MLPs, weighted and summed.

    h_e(x)   = x @ w1[e].T + b1[e]                                   [G*F]
    a_e(x)   = act(h[:F]) * h[F:]   (glu, G = 2)   or   act(h)   (G = 1)
    out[t]   = sum_j weights[t, j] * (a_{e}(x[t]) @ w2[e] + b2[e]),   e = expert_indices[t, j]

The CPU back end of the expert-path protocol (``experts_forward``, ``experts_forward_fake``,
``experts_backward``; the Triton back end is ``kernels/experts.py``). The ops layer checks
every argument first and owns autograd; nothing here re-validates user arguments.

The block-sparse layout is the GPU's. A CPU runs GEMMs on contiguous row ranges best, so
the ``S = T*k`` slots are sorted by expert once (a stable sort: slot ``s = t*k + j`` keeps
its place among its expert's slots) and the sizes read on the host (``counts.tolist()``:
free on a CPU, where there is no queue to stall). The experts are then taken in chunks of
a few MiB of rows (one large expert alone, many small ones together), and each chunk does
all of its experts' work while its rows are in cache:

    forward   gather x rows, h = x w1^T (+b1) (kept), a = act(g) * u * weight,
              y = a w2 (+ weight b2), out[token] += y
    backward  gather dout rows, dA = dout w2^T, a recomputed from h, dweights,
              dh = [act'(g) u wdA | act(g) wdA], dx[token] += dh w1, and per expert
              dW2 = (w a)^T dout, db2, dW1 = dh^T x (x rows gathered again), db1

The row-side GEMMs of a chunk are one ``torch._grouped_mm`` (one ``torch.mm`` per expert
where torch lacks it or the strides do not suit it) and each elementwise step is one ATen
call over the chunk (``silu``/``gelu`` and their backward are fused kernels), so a layer of
128 small experts costs a few dozen calls, not a few thousand. That is the GEMMs of a dense
MLP (6 + 12 units of ``T*k*H*F`` FLOPs for a GLU) and nothing more: ``dweights[t, j] =
<dout[t], y_tj>`` is computed as ``<a_tj, dout[t] @ w2^T> + <dout[t], b2>`` from products
backward needs anyway, so the expert outputs ``y`` are neither kept nor recomputed. The
GEMMs use torch's threads (BLAS's own threading was as fast as one Python thread per part
of the experts here, and needs no pool), except in small calls (see ``_threads``). Kept for
backward: the pre-activation ``h`` in sorted order (in x's dtype, the floor of DESIGN.md),
the sort permutation and the expert sizes. Other buffers hold one chunk's rows; results go
straight into ``out`` and ``dx`` (``[T, H]``) with ``index_add_``: a fresh ``[S, H]``
buffer would be new pages, faulted in on first touch.

Precision: the GEMMs and every elementwise step run in fp32 (fp64 for fp64): fp16/bf16
weights are converted once per call (on CPUs without fp16/bf16 hardware, torch's half GEMM
is ~100x slower than MKL's sgemm; with it, a half GEMM would round each expert's output
before the weighted sum: a second rounding). Stored results are rounded once: ``h``
(kept), ``out``, and each gradient. A token's ``k`` contributions are summed in fp32 in
expert order by ``index_add_``, which on the CPU adds its rows one after another (no
atomics), and the chunks depend only on the sizes: two runs are bitwise equal.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch

from .. import checks
from .activation import _act_backward_into, _act_into
from .precision import compute_dtype

__all__ = ["ACTIVATIONS", "experts_forward", "experts_forward_fake", "experts_backward", "experts_forward_fp8"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}  # cpu/activation.py's codes

Tensor = torch.Tensor


def _saved_shapes(x: Tensor, expert_indices: Tensor, w1: Tensor, num_experts: int, keep: bool = True):
    slots = expert_indices.shape[0] * expert_indices.shape[1]
    return (slots if keep else 0, w1.shape[1]), (slots,), (num_experts,)


def experts_forward_fake(x: Tensor, expert_indices: Tensor, weights: Optional[Tensor], w1: Tensor, w2: Tensor,
                         b1: Optional[Tensor], b2: Optional[Tensor], *, num_experts: int, act: str, glu: bool,
                         block_size: int, keep: bool = True) -> Tuple[Tensor, List[Tensor]]:
    """Shapes and dtypes of :func:`experts_forward`'s results, computing nothing."""
    h_shape, order_shape, counts_shape = _saved_shapes(x, expert_indices, w1, num_experts, keep)
    saved = [x.new_empty(h_shape), expert_indices.new_empty(order_shape, dtype=torch.int64),
             expert_indices.new_empty(counts_shape, dtype=torch.int64)]
    return x.new_empty(x.shape), saved


def _sort_slots(expert_indices: Tensor, num_experts: int) -> Tuple[Tensor, Tensor]:
    """``(order [S], counts [E])``: slot ids sorted by expert (stable), slots per expert."""
    flat = expert_indices.reshape(-1)
    # Callers may skip the range check for a router's ids (nothing to read back on a GPU);
    # here the counts are read on the host anyway, so an id out of range costs nothing to
    # name clearly, instead of an error from deep inside the GEMMs.
    checks.ids_in_range("expert_mlp", "expert_indices", flat, num_experts)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


# Experts are taken in chunks of about this many bytes of their widest row buffer: each
# chunk's GEMMs go to BLAS together (torch._grouped_mm) and its elementwise steps run once
# over the chunk's rows, so many small experts cost a few calls, not a few per expert,
# while the chunk's buffers stay small enough to be reused (no fresh [S, H] pages).
_CHUNK_BYTES = 4 << 20


def _chunks(sizes: List[int], row_bytes: int) -> Iterator[Tuple[int, int, int, int]]:
    """``(e0, e1, r0, r1)``: consecutive experts ``e0..e1-1`` and their sorted rows; each
    chunk ends at an expert boundary once it holds ``_CHUNK_BYTES`` of rows (an expert with
    more rows than that is a chunk alone). Trailing experts without rows are left out."""
    rows = max(_CHUNK_BYTES // max(row_bytes, 1), 1)
    e0 = r0 = r1 = 0
    for e, n in enumerate(sizes):
        r1 += n
        if r1 - r0 >= rows:
            yield e0, e + 1, r0, r1
            e0, r0 = e + 1, r1
    if r1 > r0:
        yield e0, len(sizes), r0, r1


# Groups of at least this many rows on average are written straight into ``out`` one ``mm``
# each: each GEMM then outweighs a Python call, and the copy out of ``_grouped_mm``'s result
# would be another pass over the rows.
_GROUPED_MM_ROWS = 64


def _gmm(a: Tensor, b: Tensor, sizes: List[int], out: Optional[Tensor] = None) -> Tensor:
    """``[a[rows of group g] @ b[g] for each g]`` stacked: ``a [R, K]`` with its rows in
    groups of ``sizes``, ``b [G, K, N]``; into ``out`` when given. One
    ``torch._grouped_mm`` where torch has it for these tensors (fp32, 16-byte strides) and
    its groups are small (it calls ``mm`` per group itself, so it saves only the Python
    per call, and it has no ``out``), else one ``torch.mm`` per group."""
    if len(sizes) == 1:
        return torch.mm(a, b[0], out=out)
    if _grouped_mm_ok(a, b) and (out is None or a.shape[0] < _GROUPED_MM_ROWS * len(sizes)):
        offs = torch.tensor(sizes, dtype=torch.int32, device=a.device).cumsum(0, dtype=torch.int32)
        r = torch._grouped_mm(a, b, offs=offs)
        return r if out is None else out.copy_(r)
    out = a.new_empty((a.shape[0], b.shape[2])) if out is None else out
    r0 = 0
    for g, n in enumerate(sizes):
        if n:
            torch.mm(a[r0:r0 + n], b[g], out=out[r0:r0 + n])
        r0 += n
    return out


def _grouped_mm_ok(a: Tensor, b: Tensor) -> bool:
    return (hasattr(torch, "_grouped_mm") and a.dtype == b.dtype == torch.float32
            and all(t.data_ptr() % 16 == 0 and all(st % 4 == 0 or sz == 1 for st, sz in zip(t.stride(), t.shape)
                                                   if st != 1) for t in (a, b)))


def _rows_of(t: Optional[Tensor], sizes: List[int]) -> Optional[Tensor]:
    """Row ``i`` of the result is ``t[g]`` for the group ``g`` that sorted row ``i`` is in."""
    if t is None:
        return None
    return t.repeat_interleave(torch.tensor(sizes, device=t.device), dim=0, output_size=sum(sizes))


# A call whose first GEMM (all experts) is under this many FLOPs runs on one thread.
# Measured on the 2-core CI machine while another process kept a core busy: a 12x16x64
# GEMM took 15 ms on two threads (each parallel region waits for the descheduled one) and
# 5 us on one; layers this small (tests, toy models) gain nothing from threads anyway.
_PARALLEL_MIN_FLOPS = 1 << 24


@contextlib.contextmanager
def _threads(slots: int, hidden: int, width: int) -> Iterator[None]:
    """One thread while a small call runs; torch's setting otherwise (restored after)."""
    threads = torch.get_num_threads()
    if threads == 1 or 2.0 * slots * hidden * width >= _PARALLEL_MIN_FLOPS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _activate(h: Tensor, ffn: int, glu: bool, code: int) -> Tensor:
    """``act(h[:, :F]) * h[:, F:]`` (glu) or ``act(h)``: two passes (one plain)."""
    a = _act_into(h[:, :ffn] if glu else h, code, None)
    return a.mul_(h[:, ffn:]) if glu else a


def experts_forward(x: Tensor, expert_indices: Tensor, weights: Optional[Tensor], w1: Tensor, w2: Tensor,
                    b1: Optional[Tensor], b2: Optional[Tensor], *, num_experts: int, act: str, glu: bool,
                    block_size: int, keep: bool = True) -> Tuple[Tensor, List[Tensor]]:
    """``(out [T, H] in x's dtype, saved = [h [S, G*F] in x's dtype, order [S], counts [E]])``.

    ``h`` is the pre-activation (bias included) of slot ``order[i]`` in row ``i``;
    ``block_size`` is not used (no padding on the CPU). Without ``keep`` (no backward) the
    saved ``h`` has no rows (it is still formed here, chunk by chunk, as a work buffer).
    """
    tokens, hidden = x.shape
    k = expert_indices.shape[1]
    width = w1.shape[1]
    ffn = width // 2 if glu else width
    cdt = compute_dtype(x.dtype)
    code = _ACT_CODE[act]
    order, counts = _sort_slots(expert_indices, num_experts)
    h = x.new_empty((order.numel(), width))
    out = torch.zeros((tokens, hidden), dtype=cdt, device=x.device)
    w1c, w2c, b1c, b2c = (None if t is None else t.to(cdt) for t in (w1, w2, b1, b2))  # once per call
    xc = x.to(cdt)  # half inputs converted once, not per expert
    token = order // k
    ws = None if weights is None else weights.reshape(-1).to(cdt)[order].unsqueeze(1)
    sizes = counts.tolist()
    with _threads(order.numel(), hidden, width):
        for e0, e1, r0, r1 in _chunks(sizes, 4 * max(hidden, width)):
            rows, part = token[r0:r1], sizes[e0:e1]
            he = h[r0:r1] if h.dtype == cdt else None
            he = _gmm(xc.index_select(0, rows), w1c[e0:e1].transpose(1, 2), part, out=he)
            if b1c is not None:
                he += _rows_of(b1c[e0:e1], part)
            if h.dtype != cdt:
                h[r0:r1].copy_(he)  # the kept pre-activation, rounded once
            ae = _activate(he, ffn, glu, code)
            if ws is not None:
                ae.mul_(ws[r0:r1])  # the routing weight, on the narrower side of the second GEMM
            ye = _gmm(ae, w2c[e0:e1], part)
            if b2c is not None:
                b2r = _rows_of(b2c[e0:e1], part)
                ye += b2r if ws is None else b2r.mul_(ws[r0:r1])  # the weighted bias
            out.index_add_(0, rows, ye)
    return out.to(x.dtype), [h if keep else h[:0], order, counts]


def experts_backward(dout: Tensor, saved: List[Tensor], x: Tensor, expert_indices: Tensor,
                     weights: Optional[Tensor], w1: Tensor, w2: Tensor, b1: Optional[Tensor],
                     b2: Optional[Tensor], *, num_experts: int, act: str, glu: bool, block_size: int,
                     needs_input_grad: Tuple[bool, bool, bool, bool, bool, bool]):
    """``(dx, dweights, dw1, dw2, db1, db2)``, None where not needed (or the input is None).

    ``dout`` may have any strides (a zero-stride ``expand`` included): it is only read
    through ``index_select``.
    """
    h, order, counts = saved
    k = expert_indices.shape[1]
    width = w1.shape[1]
    ffn = width // 2 if glu else width
    cdt = compute_dtype(x.dtype)
    code = _ACT_CODE[act]
    dev = x.device
    need_x, need_w, need_w1, need_w2, need_b1, need_b2 = needs_input_grad
    need_w = need_w and weights is not None
    need_b1 = need_b1 and b1 is not None
    need_b2 = need_b2 and b2 is not None
    need_dh = need_x or need_w1 or need_b1
    sizes = counts.tolist()

    def result(t: Tensor) -> Tensor:
        # Written expert by expert (in place when in the compute dtype, else rounded once
        # from the fp32 product); experts without rows get zeros. The weight's own strides
        # (as the fake and the Triton back end give): a transposed view's gradient, handed
        # back through the view, is then its base's layout, which autograd keeps without
        # the copy it makes of a gradient whose strides differ from the parameter's.
        r = torch.empty_like(t)
        for e, n in enumerate(sizes):
            if n == 0:
                r[e].zero_()
        return r

    dw1 = result(w1) if need_w1 else None
    dw2 = result(w2) if need_w2 else None
    db1 = result(b1) if need_b1 else None
    db2 = result(b2) if need_b2 else None
    dx = torch.zeros(x.shape, dtype=cdt, device=dev) if need_x else None
    dws = torch.empty((order.numel(),), dtype=cdt, device=dev) if need_w else None
    token = order // k
    w1c, w2c, b2c = (None if t is None else t.to(cdt) for t in (w1, w2, b2))  # once per call
    doc = dout.to(cdt)  # any strides: only read through index_select
    xc = x.to(cdt) if need_w1 else None
    ws = None if weights is None else weights.reshape(-1).to(cdt)[order].unsqueeze(1)
    with _threads(order.numel(), x.shape[1], width):
        for e0, e1, r0, r1 in _chunks(sizes, 4 * max(x.shape[1], width)):
            rows, part = token[r0:r1], sizes[e0:e1]
            dop = doc.index_select(0, rows)
            he = h[r0:r1] if h.dtype == cdt else h[r0:r1].to(cdt)
            g = he[:, :ffn] if glu else he
            # dA = dout w2^T is dL/da before the routing weight; a is recomputed from h. The
            # weight's gradient <dout, a w2 + b2> = <a, dA> + <dout, b2> needs no y.
            da = _gmm(dop, w2c[e0:e1].transpose(1, 2), part)
            act_g = _act_into(g, code, None)
            ae = (act_g * he[:, ffn:] if glu else act_g) if need_w or need_w2 else None
            if need_w:
                torch.linalg.vecdot(ae, da, out=dws[r0:r1])
                if b2c is not None:
                    dws[r0:r1].add_(torch.linalg.vecdot(dop, _rows_of(b2c[e0:e1], part)))
            wse = None if ws is None else ws[r0:r1]
            if need_w2 and wse is not None:
                ae.mul_(wse)
            dh = None
            if need_dh:
                if wse is not None:
                    da.mul_(wse)
                if glu:  # dh = [act'(g) u wdA | act(g) wdA]
                    dh = torch.empty((r1 - r0, width), dtype=cdt, device=dev)
                    torch.mul(da, act_g, out=dh[:, ffn:])
                    _act_backward_into(da.mul_(he[:, ffn:]), g, code, dh[:, :ffn])
                else:
                    dh = _act_backward_into(da, g, code, da)
            xs = xc.index_select(0, rows) if need_w1 else None
            lo = 0
            for e, n in zip(range(e0, e1), part):  # the weight gradients, expert by expert
                if n:
                    seg = slice(lo, lo + n)
                    if need_w2:
                        _mm_into(ae[seg].t(), dop[seg], dw2[e])
                    if need_b2:
                        db2[e].copy_(dop[seg].sum(0) if wse is None else wse[seg, 0] @ dop[seg])
                    if need_w1:
                        _mm_into(dh[seg].t(), xs[seg], dw1[e])
                    if need_b1:
                        db1[e].copy_(dh[seg].sum(0))
                lo += n
            if need_x:
                dx.index_add_(0, rows, _gmm(dh, w1c[e0:e1], part))
    dweights = None
    if need_w:
        dweights = torch.empty(order.numel(), dtype=weights.dtype, device=dev)
        dweights.index_copy_(0, order, dws.to(weights.dtype))
        dweights = dweights.view(weights.shape)
    return None if dx is None else dx.to(x.dtype), dweights, dw1, dw2, db1, db2


def _mm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out = a @ b``: straight into ``out`` when it is a row- or column-major compute-dtype
    matrix, else computed in the compute dtype and rounded once."""
    if out.dtype == a.dtype and out.is_contiguous():
        torch.mm(a, b, out=out)
    elif out.dtype == a.dtype and out.t().is_contiguous():
        torch.mm(b.t(), a.t(), out=out.t())
    else:
        out.copy_(torch.mm(a, b))


# -- FP8 weights (blocksparse_moe/fp8.py's format) -----------------------------------------

def experts_forward_fp8(x: Tensor, expert_indices: Tensor, weights: Optional[Tensor], w1: Tensor, w1_scale: Tensor,
                        w2: Tensor, w2_scale: Tensor, b1: Optional[Tensor], b2: Optional[Tensor], *,
                        num_experts: int, act: str, glu: bool, block_size: int) -> Tensor:
    """``out [T, H]`` in x's dtype of the fused expert path with float8_e4m3fn weights.

    The quantized values of the format, computed the plain way (``fp8.py``): x quantized per
    1x128 group along H and dequantized; each chunk's experts' ``w1``/``w2`` dequantized to
    float32 (``w[e, n, k] * scale[e, n // 128, k // 128]``, any strides); ``h = x w1^T + b1``
    in float32, rounded to x's dtype (the pre-activation the bf16 path keeps); ``a =
    act(g) * u`` in float32 from the rounded ``h``, quantized per 1x128 group along F and
    dequantized; ``y = a w2 + b2``, weighted, summed per token in float32 and rounded once.
    The Triton kernels apply the scales per 128-wide K group to fp32 partial products
    instead: the same sums up to float32 rounding order. ``block_size`` is not used.
    """
    from ..fp8 import dequantize_weight_blockwise, fake_quantize_activation_groups

    tokens, hidden = x.shape
    k = expert_indices.shape[1]
    width = w1.shape[1]
    ffn = width // 2 if glu else width
    code = _ACT_CODE[act]
    order, counts = _sort_slots(expert_indices, num_experts)
    out = torch.zeros((tokens, hidden), dtype=torch.float32, device=x.device)
    xq = fake_quantize_activation_groups(x)  # [T, H] float32: every token once, not per slot
    b1c, b2c = (None if t is None else t.to(torch.float32) for t in (b1, b2))
    token = order // k
    ws = None if weights is None else weights.reshape(-1).to(torch.float32)[order].unsqueeze(1)
    sizes = counts.tolist()
    with _threads(order.numel(), hidden, width):
        for e0, e1, r0, r1 in _chunks(sizes, 4 * max(hidden, width)):
            rows, part = token[r0:r1], sizes[e0:e1]
            # Only this chunk's experts are dequantized: float32 copies of one chunk's weights.
            w1c = dequantize_weight_blockwise(w1[e0:e1], w1_scale[e0:e1])
            w2c = dequantize_weight_blockwise(w2[e0:e1], w2_scale[e0:e1])
            he = _gmm(xq.index_select(0, rows), w1c.transpose(1, 2), part)
            if b1c is not None:
                he += _rows_of(b1c[e0:e1], part)
            if x.dtype != torch.float32:
                he = he.to(x.dtype).to(torch.float32)  # h in x's dtype, as the bf16 path keeps it
            ae = fake_quantize_activation_groups(_activate(he, ffn, glu, code))
            if ws is not None:
                ae.mul_(ws[r0:r1])  # after the quantization: the weight scales the expert's output
            ye = _gmm(ae, w2c, part)
            if b2c is not None:
                b2r = _rows_of(b2c[e0:e1], part)
                ye += b2r if ws is None else b2r.mul_(ws[r0:r1])
            out.index_add_(0, rows, ye)
    return out.to(x.dtype)
