"""padded_gather / padded_scatter / gather / scatter against the float64 permute reference.

Every test body runs on the torch CPU path and on the Triton kernels (``path`` fixture:
interpreter on a CPU machine, CUDA on a GPU machine). Forward and backward (x, y and
weights gradients) are compared with ``reference.py`` evaluated in float64 on the
already-rounded inputs; gradients of the reference come from autograd through it.

The permutes compute in fp32 and round once: fp16/bf16 results of the scatter (a weighted
sum of k rows) and of the weighted gather (its backward) must be the float64 reference
rounded once (``assert_rounded_once``), which catches a second rounding, e.g. of each
weighted row before the sum (cpu/permute.py, kernels/permute.py).
"""

import dataclasses

import pytest
import torch

import blocksparse_moe as bm
from blocksparse_moe import reference
from tolerances import assert_close, assert_rounded_once, poisoned

ops = bm  # the public functional API: bm.padded_gather, bm.padded_scatter, bm.gather, bm.scatter
route = bm.route

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def expert_choices(T, k, E, kind, seed=0):
    """``[T, k]`` int64 expert ids: distinct per token (as a top-k router gives) unless noted."""
    g = torch.Generator().manual_seed(seed)
    if kind == "one-expert":  # every slot on expert E-1 (k = 1)
        return torch.full((T, k), E - 1, dtype=torch.int64)
    scores = torch.rand(T, E, generator=g)
    if kind == "empty-expert":  # expert 1 never chosen
        scores[:, 1] = -1.0
    return scores.topk(k, dim=1).indices


# (T, k, E, block_size, H, kind): the cases every op runs on.
CASES = [
    pytest.param(24, 2, 4, 16, 40, "random", id="random-b16"),
    pytest.param(0, 2, 4, 16, 8, "random", id="zero-tokens"),
    pytest.param(20, 2, 4, 16, 24, "empty-expert", id="empty-expert"),
    pytest.param(17, 1, 4, 16, 24, "one-expert", id="one-expert-takes-all"),
    pytest.param(9, 4, 4, 16, 24, "random", id="k-equals-E"),
    pytest.param(13, 3, 5, 16, 24, "random", id="Tk-not-multiple-of-block"),
    pytest.param(1, 1, 3, 16, 24, "random", id="single-token"),
    pytest.param(20, 2, 3, 32, 24, "random", id="block-32"),
    pytest.param(20, 2, 3, 64, 24, "random", id="block-64"),
    pytest.param(40, 2, 3, 128, 24, "random", id="block-128"),
]


def make_routing(T, k, E, b, kind, device):
    return route(expert_choices(T, k, E, kind).to(device), E, b)


def padded(op):
    return op in ("padded_gather", "padded_scatter")


def num_rows(routing, op):
    return routing.padded_tokens if padded(op) else routing.num_tokens * routing.top_k


# ---------------------------------------------------------------------------------------
# The reference itself, on a routing small enough to write out by hand.
# ---------------------------------------------------------------------------------------


def test_reference_by_hand():
    # T=3, k=2, E=2, b=16. Slots s = t*k + j -> experts [1, 0, 0, 1, 1, 1]: expert 0 takes
    # slots 1, 2 (rows 0, 1), expert 1 takes slots 0, 3, 4, 5 (rows 16..19); P = 32.
    r = route(torch.tensor([[1, 0], [0, 1], [1, 1]]), 2, 16)
    assert r.padded_rows.tolist() == [16, 0, 1, 17, 18, 19]
    assert r.rows.tolist() == [2, 0, 1, 3, 4, 5]
    x = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    expected = torch.zeros(32, 1, dtype=torch.float64)
    expected[[0, 1, 16, 17, 18, 19], 0] = torch.tensor([1.0, 2.0, 1.0, 2.0, 3.0, 3.0], dtype=torch.float64)
    assert torch.equal(reference.padded_gather(x, r, 2), expected)
    # Unpadded rows: 0 <- slot 1 (token 0), 1 <- slot 2 (token 1), 2 <- slot 0 (token 0), ...
    assert torch.equal(reference.gather(x, r, 2)[:, 0], torch.tensor([1.0, 2.0, 1.0, 2.0, 3.0, 3.0],
                                                                     dtype=torch.float64))
    w = torch.tensor([[0.5, 2.0], [1.0, 3.0], [4.0, 0.25]], dtype=torch.float64)
    # out[t] = w[t,0] * x[t] + w[t,1] * x[t] after a round trip through the permutation.
    out = reference.padded_scatter(expected, r, w, 2)
    assert torch.equal(out, x * w.sum(1, keepdim=True))


# ---------------------------------------------------------------------------------------
# Forward and backward against the reference.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ["padded_gather", "gather"])
@pytest.mark.parametrize("T,k,E,b,H,kind", CASES)
def test_gather(path, op, dtype, T, k, E, b, H, kind):
    r = make_routing(T, k, E, b, kind, path)
    x = torch.randn(T, H, device=path).to(dtype).requires_grad_()
    out = getattr(ops, op)(x, r, k)
    x64 = x.detach().double().requires_grad_()
    ref = getattr(reference, op)(x64, r, k)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, msg=f"{op} forward")

    dout = torch.randn(out.shape, device=path).to(dtype)
    out.backward(dout)
    ref.backward(dout.double())
    assert_close(x.grad, x64.grad, dtype, msg=f"{op} dx")


WEIGHTS = ["none", "same-dtype", "fp32"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ["padded_scatter", "scatter"])
@pytest.mark.parametrize("T,k,E,b,H,kind", CASES)
def test_scatter(path, op, dtype, T, k, E, b, H, kind):
    r = make_routing(T, k, E, b, kind, path)
    R = num_rows(r, op)
    # Each dtype gets one weight kind on the named cases; test_scatter_weight_kinds does all.
    wkind = WEIGHTS[DTYPES.index(dtype)]
    _check_scatter(path, op, r, R, H, dtype, wkind)


@pytest.mark.parametrize("wkind", WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ["padded_scatter", "scatter"])
def test_scatter_weight_kinds(path, op, dtype, wkind):
    r = make_routing(21, 3, 6, 16, "random", path)
    _check_scatter(path, op, r, num_rows(r, op), 40, dtype, wkind)


def _check_scatter(device, op, r, R, H, dtype, wkind):
    T, k = r.num_tokens, r.top_k
    y = torch.randn(R, H, device=device).to(dtype).requires_grad_()
    w = None
    if wkind != "none":
        w = torch.rand(T, k, device=device).to(dtype if wkind == "same-dtype" else torch.float32).requires_grad_()
    out = getattr(ops, op)(y, r, w, k)
    y64 = y.detach().double().requires_grad_()
    w64 = None if w is None else w.detach().double().requires_grad_()
    ref = getattr(reference, op)(y64, r, w64, k)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, msg=f"{op} forward")
    # k weighted rows summed in fp32, rounded once (kills a rounding of each weighted row).
    assert_rounded_once(out, ref, dtype, terms=k, magnitude=_scatter_magnitude(op, y, r, w, k), msg=f"{op} forward")

    # 1/sqrt(H) keeps the weight gradient (a length-H dot product) O(1).
    dout = (torch.randn(out.shape, device=device) / H ** 0.5).to(dtype)
    out.backward(dout)
    ref.backward(dout.double())
    # Padding rows of y get an exact zero gradient (the reference's index_put leaves them zero).
    assert_close(y.grad, y64.grad, dtype, msg=f"{op} dy")
    # dy[row of slot s] = w[s] * dout[s // k]: one product, rounded once.
    assert_rounded_once(y.grad, y64.grad, dtype, terms=1, magnitude=y64.grad.abs(), msg=f"{op} dy")
    if w is not None:
        assert w.grad.dtype == w.dtype
        # dw is a length-H dot product of already-rounded values done in fp32, rounded once
        # to the weights' dtype: fp32 weights get the fp32 tolerance even for fp16/bf16 data.
        assert_close(w.grad, w64.grad, w.dtype, msg=f"{op} dweights")


def test_strided_operands(path):
    """Row-strided x / y and column-strided weights are read in place, not copied wrong."""
    r = make_routing(12, 2, 4, 16, "random", path)
    H = 24
    xbig = torch.randn(12, H + 8, device=path)
    x = xbig[:, 3:3 + H]  # row stride H + 8, unit stride along H
    assert_close(ops.padded_gather(x, r, 2), reference.padded_gather(x.double(), r, 2), torch.float32)
    ybig = torch.randn(r.padded_tokens, 2 * H, device=path)
    y = ybig[:, :H]
    w = torch.rand(2, 12, device=path).t().requires_grad_()  # [T, k], strides (1, T)
    out = ops.padded_scatter(y, r, w, 2)
    w64 = w.detach().double().requires_grad_()
    ref = reference.padded_scatter(y.double(), r, w64, 2)
    assert_close(out, ref, torch.float32)
    dout = torch.randn(12, 1, device=path).expand(12, H)  # stride 0 along H
    out.backward(dout)
    ref.backward(dout.double())
    assert_close(w.grad, w64.grad, torch.float32, msg="dweights")


def test_expanded_gradient(path):
    """A gradient with stride 0 along H (from .sum()) is accepted by the backward."""
    r = make_routing(10, 2, 4, 16, "random", path)
    x = torch.randn(10, 8, device=path, requires_grad=True)
    ops.padded_gather(x, r, 2).sum().backward()
    assert_close(x.grad, torch.full((10, 8), 2.0, dtype=torch.float64), torch.float32)


# ---------------------------------------------------------------------------------------
# Every output element is written: NaN-poisoned buffers, H edge tiles, padding rows.
# ---------------------------------------------------------------------------------------


def _impl(device):
    """The module that runs on this path, so tests can hand it an ``out=`` buffer. PRIVATE
    HOOK, the only one in this file: repoint it if the back ends move (issue 10)."""
    from blocksparse_moe import backend

    if backend.select(torch.empty(0, device=device)) == "cpu":
        from blocksparse_moe.cpu import permute
    else:
        from blocksparse_moe.kernels import permute
    return permute


def _scatter_magnitude(op, y, r, w, k):
    """``sum_j |w_j| |y_j|`` per output element: what bounds the fp32 sum of the k weighted rows."""
    return getattr(reference, op)(y.detach().double().abs(), r, None if w is None else w.detach().double().abs(), k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_h", [None, 16], ids=["one-tile", "H-tiles-with-edge"])
def test_poisoned_outputs(path, dtype, block_h):
    impl = _impl(path)
    kw = {} if block_h is None or not hasattr(impl, "_block_h") else {"block_h": block_h}
    T, k, H = 13, 3, 40  # H = 40 = 2 full 16-wide tiles + an 8-wide edge tile
    r = make_routing(T, k, 5, 16, "random", path)
    P = r.padded_tokens
    x = torch.randn(T, H, device=path).to(dtype)
    w = torch.rand(T, k, device=path)
    row_slots = impl.invert_rows(r.padded_rows, P, out=torch.full((P,), 7, dtype=torch.int32, device=path))
    expected_slots = torch.full((P,), -1, dtype=torch.int64)
    expected_slots[r.padded_rows.long().cpu()] = torch.arange(T * k)
    assert torch.equal(row_slots.cpu().long(), expected_slots)

    out = impl.gather(x, row_slots, k, None, out=poisoned((P, H), dtype, path), **kw)
    assert_close(out, reference.padded_gather(x.double(), r, k), dtype, msg="gather")

    y = torch.randn(P, H, device=path).to(dtype)
    out = impl.scatter(y, r.padded_rows, k, w, out=poisoned((T, H), dtype, path), **kw)
    y64, w64 = y.double().requires_grad_(), w.double().requires_grad_()
    ref = reference.padded_scatter(y64, r, w64, k)
    assert_close(out, ref, dtype, msg="scatter")
    assert_rounded_once(out, ref, dtype, terms=k, magnitude=_scatter_magnitude("padded_scatter", y, r, w, k),
                        msg="scatter")

    # The two halves of scatter's backward, against the reference's vector-Jacobian products:
    # weighted gather dy[padded_rows[s]] = w[s] * dout[s // k], and dw[t, j] = <dout[t], y[row]>.
    dout = (torch.randn(T, H, device=path) / H ** 0.5).to(dtype)
    dy_ref, dw_ref = torch.autograd.grad(ref, (y64, w64), dout.double())
    out = impl.gather(dout, row_slots, k, w, out=poisoned((P, H), dtype, path), **kw)
    assert_close(out, dy_ref, dtype, msg="weighted gather")
    assert_rounded_once(out, dy_ref, dtype, terms=1, magnitude=dy_ref.abs(), msg="weighted gather")
    dw = impl.scatter_wgrad(dout, y, r.padded_rows, k, out=poisoned((T, k), torch.float32, path), **kw)
    assert_close(dw, dw_ref, torch.float32, msg="scatter_wgrad")


def test_padding_rows_are_zero(path):
    """The public op's fresh output has exact zeros on padding rows (not stale memory)."""
    r = make_routing(5, 1, 2, 16, "random", path)
    # On CUDA this leaves NaN in a block the caching allocator hands out next.
    torch.full((4096,), float("nan"), device=path)
    out = ops.padded_gather(torch.randn(5, 16, device=path), r, 1)
    pad = torch.ones(r.padded_tokens, dtype=torch.bool, device=path)
    pad[r.padded_rows.long()] = False
    assert pad.any() and torch.equal(out[pad], torch.zeros_like(out[pad]))

    # Scatter's backward writes dy's padding rows as zeros too, even when a weight is inf
    # (a padding row must not read a weight: 0 * inf would be NaN).
    y = torch.randn(r.padded_tokens, 16, device=path, requires_grad=True)
    w = torch.ones(5, 1, device=path)
    w[0, 0] = float("inf")
    ops.padded_scatter(y, r, w, 1).backward(torch.ones(5, 16, device=path))
    assert torch.equal(y.grad[pad], torch.zeros_like(y.grad[pad]))


def test_deterministic(path):
    """Bitwise-identical results and gradients across runs in deterministic mode."""
    r = make_routing(24, 3, 4, 16, "random", path)
    x = torch.randn(24, 40, device=path).to(torch.bfloat16)
    w = torch.rand(24, 3, device=path)

    def run():
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = ops.padded_gather(xx, r, 3) * 1.5
        out = ops.padded_scatter(y, r, ww, 3)
        out.backward(torch.ones_like(out))
        return out, xx.grad, ww.grad

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = run(), run()
    finally:
        torch.use_deterministic_algorithms(previous)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# ---------------------------------------------------------------------------------------
# float64 gradcheck on the CPU path.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["padded", "unpadded"])
def test_gradcheck_cpu(op):
    from blocksparse_moe import backend

    r = make_routing(5, 2, 3, 16, "random", "cpu")
    R = num_rows(r, "padded_gather" if op == "padded" else "gather")
    g, s = (ops.padded_gather, ops.padded_scatter) if op == "padded" else (ops.gather, ops.scatter)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(R, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    with backend.prefer_on_cpu("cpu"):
        assert torch.autograd.gradcheck(lambda x: g(x, r, 2), (x,))
        assert torch.autograd.gradcheck(lambda y, w: s(y, r, w, 2), (y, w))
        assert torch.autograd.gradcheck(lambda y: s(y, r, None, 2), (y,))


# ---------------------------------------------------------------------------------------
# Bad arguments raise before any launch, naming the op and the argument.
# ---------------------------------------------------------------------------------------


def _bad_cases(r, x, y, w):
    meta_rows = dataclasses.replace(r, padded_rows=r.padded_rows.to("meta"))
    return [
        ("wrong-dtype-x", lambda: ops.padded_gather(x.to(torch.int32), r, 2), TypeError, "padded_gather: x"),
        ("meta-x", lambda: ops.padded_gather(x.to("meta"), r, 2), ValueError, "padded_gather: x"),
        ("1d-x", lambda: ops.gather(x[0], r, 2), ValueError, "gather: x"),
        ("x-rows-not-T", lambda: ops.padded_gather(x[:5], r, 2), ValueError, "padded_gather: x has 5 rows"),
        ("wrong-top_k", lambda: ops.padded_gather(x, r, 3), ValueError, "padded_gather: top_k=3"),
        ("top_k-not-int", lambda: ops.gather(x, r, 2.0), TypeError, "gather: top_k"),
        ("routing-not-Routing", lambda: ops.gather(x, {"rows": r.rows}, 2), TypeError, "gather: routing"),
        ("routing-on-other-device", lambda: ops.padded_gather(x, meta_rows, 2), ValueError,
         "padded_gather: routing.padded_rows"),
        ("x-not-a-tensor", lambda: ops.gather(x.tolist(), r, 2), TypeError, "gather: x"),
        ("y-rows-not-P", lambda: ops.padded_scatter(y[1:], r, w, 2), ValueError, "padded_scatter: y must have"),
        ("y-rows-not-Tk", lambda: ops.scatter(y, r, w, 2), ValueError, "scatter: y must have 16 rows"),
        ("y-wrong-dtype", lambda: ops.padded_scatter(y.to(torch.int64), r, None, 2), TypeError, "padded_scatter: y"),
        ("weights-wrong-shape", lambda: ops.padded_scatter(y, r, w.t(), 2), ValueError, "padded_scatter: weights"),
        ("weights-wrong-dtype", lambda: ops.padded_scatter(y, r, w.half(), 2), TypeError, "padded_scatter: weights"),
        ("weights-not-a-tensor", lambda: ops.padded_scatter(y, r, 1.0, 2), TypeError, "padded_scatter: weights"),
        ("weights-on-meta", lambda: ops.padded_scatter(y, r, w.to("meta"), 2), ValueError,
         "padded_scatter: weights"),
        ("wrong-top_k-scatter", lambda: ops.scatter(y[:16], r, w, 1), ValueError, "scatter: top_k=1"),
    ]


def test_bad_arguments():
    r = make_routing(8, 2, 4, 16, "random", "cpu")
    x = torch.randn(8, 6)
    y = torch.randn(r.padded_tokens, 6)
    w = torch.rand(8, 2)
    for name, call, exc, text in _bad_cases(r, x, y, w):
        with pytest.raises(exc) as info:
            call()
        assert text in str(info.value), f"{name}: {info.value}"
    # Any strides are accepted (a column-strided operand is copied once): same values.
    assert torch.equal(ops.padded_gather(x.t().contiguous().t(), r, 2), ops.padded_gather(x, r, 2))
    assert torch.equal(ops.padded_scatter(y.t().contiguous().t(), r, w, 2), ops.padded_scatter(y, r, w, 2))


def test_float64_rejected_on_triton_path(path):
    from blocksparse_moe import backend

    r = make_routing(4, 1, 2, 16, "random", path)
    x = torch.randn(4, 8, dtype=torch.float64, device=path)
    if backend.select(x) == "cpu":
        out = ops.padded_gather(x, r, 1)
        assert out.dtype == torch.float64
        assert_close(out, reference.padded_gather(x, r, 1), torch.float64)
    else:
        with pytest.raises(TypeError, match="padded_gather: x has dtype torch.float64"):
            ops.padded_gather(x, r, 1)


# ---------------------------------------------------------------------------------------
# GPU: the same checks on CUDA tensors at a realistic size (twins: everything above).
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_layer_sized(dtype):
    dev = torch.device("cuda")
    T, k, E, H = 1000, 8, 64, 2100  # H > 1024: several H tiles with an edge tile
    r = make_routing(T, k, E, 64, "random", dev)
    x = torch.randn(T, H, device=dev).to(dtype).requires_grad_()
    w = torch.rand(T, k, device=dev, requires_grad=True)
    xp = ops.padded_gather(x, r, k)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref_xp = reference.padded_gather(x64, r, k)
    assert_close(xp, ref_xp, dtype, msg="padded_gather")
    y = (xp * 0.5).detach().requires_grad_()
    out = ops.padded_scatter(y, r, w, k)
    y64 = y.detach().double().requires_grad_()
    ref = reference.padded_scatter(y64, r, w64, k)
    assert_close(out, ref, dtype, msg="padded_scatter")
    dout = (torch.randn(T, H, device=dev) / H ** 0.5).to(dtype)
    out.backward(dout)
    ref.backward(dout.double())
    assert_close(y.grad, y64.grad, dtype, msg="dy")
    assert_close(w.grad, w64.grad, dtype, msg="dweights")
    xp.backward(y.grad)
    ref_xp.backward(y.grad.double())
    assert_close(x.grad, x64.grad, dtype, msg="dx")
