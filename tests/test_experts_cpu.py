"""``blocksparse_moe/cpu/experts.py``: the CPU back end of the expert-path protocol.

Every case runs the protocol's ``experts_forward`` / ``experts_backward`` through a test-local
autograd Function (the ops layer's Function does the same around them) and compares the
output and every gradient (x, weights, w1, w2, b1, b2) with ``reference.experts_reference``
in float64 on the already-rounded inputs, within THE tolerance table (kind "layer": the
pre-activation and the activation feed a second product). Inputs are fresh random tensors
scaled so every intermediate is O(1).
"""

from __future__ import annotations

import math

import pytest
import torch

from blocksparse_moe import reference
from blocksparse_moe.cpu import experts as cpu_experts
from tolerances import assert_close

GRADS = ("x", "weights", "w1", "w2", "b1", "b2")


class _Experts(torch.autograd.Function):
    """What the ops layer does around the protocol (validation left out: inputs are valid)."""

    @staticmethod
    def forward(ctx, x, expert_indices, weights, w1, w2, b1, b2, cfg):
        out, saved = cpu_experts.experts_forward(x, expert_indices, weights, w1, w2, b1, b2, **cfg)
        ctx.save_for_backward(x, expert_indices, weights, w1, w2, b1, b2, *saved)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        x, expert_indices, weights, w1, w2, b1, b2, *saved = ctx.saved_tensors
        n = ctx.needs_input_grad
        grads = cpu_experts.experts_backward(dout, saved, x, expert_indices, weights, w1, w2, b1, b2, **ctx.cfg,
                                             needs_input_grad=(n[0], n[2], n[3], n[4], n[5], n[6]))
        dx, dweights, dw1, dw2, db1, db2 = grads
        return dx, None, dweights, dw1, dw2, db1, db2, None


def experts(x, expert_indices, weights, w1, w2, b1=None, b2=None, *, act="silu", glu=True, block_size=16):
    cfg = dict(num_experts=w1.shape[0], act=act, glu=glu, block_size=block_size)
    return _Experts.apply(x, expert_indices, weights, w1, w2, b1, b2, cfg)


def _routing(kind: str, tokens: int, experts_: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``[T, k]`` int64 expert ids; each kind is a case the sort and the sizes must survive."""
    if kind == "uniform":  # k distinct experts per token
        return torch.stack([torch.randperm(experts_, generator=gen)[:k] for _ in range(tokens)]) if tokens else \
            torch.empty(0, k, dtype=torch.int64)
    if kind == "skewed":  # most slots on expert 1, a few elsewhere, experts 0 and E-1 empty
        ids = torch.ones(tokens, k, dtype=torch.int64)
        other = torch.randint(2, max(experts_ - 1, 3), (tokens, k), generator=gen)
        pick = torch.rand(tokens, k, generator=gen) < 0.2
        return torch.where(pick, other, ids).clamp(max=experts_ - 1)
    if kind == "one-expert":  # every slot on the last expert, the others empty
        return torch.full((tokens, k), experts_ - 1, dtype=torch.int64)
    if kind == "duplicates":  # ids repeat within a row: each slot counts on its own
        return torch.randint(0, 2, (tokens, k), generator=gen)
    raise ValueError(kind)


def _inputs(dtype, *, tokens=40, hidden=32, ffn=32, experts_=6, k=2, glu=True, bias=True, weighted=True,
            routing="uniform", weights_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = 2 if glu else 1

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    d = dict(
        x=randn(tokens, hidden),
        expert_indices=_routing(routing, tokens, experts_, k, gen),
        weights=(torch.rand(tokens, k, generator=gen, dtype=torch.float64) + 0.1).to(weights_dtype or dtype)
        if weighted else None,
        w1=randn(experts_, groups * ffn, hidden, scale=1 / math.sqrt(hidden)),
        w2=randn(experts_, ffn, hidden, scale=1 / math.sqrt(ffn)),
        b1=randn(experts_, groups * ffn, scale=0.1) if bias else None,
        b2=randn(experts_, hidden, scale=0.1) if bias else None,
    )
    return d


def _reference(d, act, glu, dout):
    """float64 output and gradients of ``reference.experts_reference`` on the same (rounded) inputs."""
    leaves = {n: (None if d[n] is None else d[n].detach().double().requires_grad_(True)) for n in GRADS}
    w1, b1 = leaves["w1"], leaves["b1"]
    ffn = leaves["w2"].shape[1]
    kw = dict(w1=w1[:, :ffn], w3=w1[:, ffn:]) if glu else dict(w1=w1, w3=None)
    if b1 is not None:
        kw.update(b1=b1[:, :ffn], b3=b1[:, ffn:]) if glu else kw.update(b1=b1)
    t, k = d["expert_indices"].shape
    weights = leaves["weights"] if leaves["weights"] is not None else torch.ones(t, k, dtype=torch.float64)
    out = reference.experts_reference(leaves["x"], d["expert_indices"], weights, w2=leaves["w2"], b2=leaves["b2"],
                                      activation=act, **kw)
    live = [n for n in GRADS if leaves[n] is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in live], dout.double(), allow_unused=True)
    return out, {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(live, grads)}


def _run(d, act, glu, dout=None):
    leaves = {n: (None if d[n] is None else d[n].detach().clone().requires_grad_(True)) for n in GRADS}
    out = experts(leaves["x"], d["expert_indices"], leaves["weights"], leaves["w1"], leaves["w2"], leaves["b1"],
                  leaves["b2"], act=act, glu=glu)
    if dout is None:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    live = [n for n in GRADS if leaves[n] is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in live], dout, allow_unused=True)
    return out, dict(zip(live, grads)), dout


def _check(d, act="silu", glu=True, dout=None):
    dtype = d["x"].dtype
    out, grads, dout = _run(d, act, glu, dout)
    ref, ref_grads = _reference(d, act, glu, dout)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "layer", "out")
    for name, g in grads.items():
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == d[name].dtype and g.shape == d[name].shape, name
        assert_close(g, ref_grads[name], dtype, "layer", f"d{name}")


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("routing", ["uniform", "skewed", "one-expert", "duplicates"])
def test_parity_routings(dtype, routing):
    _check(_inputs(dtype, routing=routing))


@pytest.mark.parametrize("gemms", ["grouped_mm", "mm-into-out", "mm-per-expert"])
@pytest.mark.parametrize("routing", ["uniform", "skewed", "duplicates"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parity_in_chunks(monkeypatch, gemms, routing, dtype):
    """Experts taken a few at a time (chunks of ~3 experts' rows here, some without rows
    inside or at the ends of a chunk), their GEMMs through torch._grouped_mm, one torch.mm
    per expert where a result has its buffer (large groups), or one torch.mm per expert."""
    row_bytes = 4 * 2 * 32  # max(H, G*F) fp32 values per row in _inputs
    monkeypatch.setattr(cpu_experts, "_CHUNK_BYTES", 3 * 40 * 2 // 6 * row_bytes)
    if gemms == "mm-into-out":
        monkeypatch.setattr(cpu_experts, "_GROUPED_MM_ROWS", 1)
    if gemms == "mm-per-expert":
        monkeypatch.setattr(cpu_experts, "_grouped_mm_ok", lambda a, b: False)
    calls = []
    real = cpu_experts._gmm
    monkeypatch.setattr(cpu_experts, "_gmm", lambda a, b, sizes, out=None: calls.append(len(sizes)) or
                        real(a, b, sizes, out))
    _check(_inputs(dtype, routing=routing, experts_=8, seed=21))
    assert max(calls) > 1, calls  # several experts in a chunk
    assert routing == "duplicates" or len(calls) > 4, calls  # and several chunks (not for 2 experts)


def test_chunks_cover_every_row_once():
    sizes = [0, 5, 0, 0, 7, 1, 0, 30, 0, 2, 0]
    chunks = list(cpu_experts._chunks(sizes, row_bytes=cpu_experts._CHUNK_BYTES // 6))
    assert [c[2] for c in chunks][0] == 0 and chunks[-1][3] == sum(sizes)
    for (e0, e1, r0, r1), nxt in zip(chunks, chunks[1:] + [None]):
        assert r1 - r0 == sum(sizes[e0:e1]) and (nxt is None or (nxt[0], nxt[2]) == (e1, r1))
    assert all(r1 - r0 >= 6 for _, _, r0, r1 in chunks[:-1])


@pytest.mark.parametrize("act", cpu_experts.ACTIVATIONS)
@pytest.mark.parametrize("glu", [True, False], ids=["glu", "plain"])
def test_parity_activations(act, glu):
    _check(_inputs(torch.float32, glu=glu, seed=3), act=act, glu=glu)


@pytest.mark.parametrize("k,experts_", [(1, 6), (3, 5), (8, 8), (8, 12)], ids=["k1", "k3", "k-equals-E", "k8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parity_top_k(k, experts_, dtype):
    _check(_inputs(dtype, k=k, experts_=experts_, tokens=24))


@pytest.mark.parametrize("bias,weighted", [(False, False), (True, False), (False, True)],
                         ids=["no-bias-no-weights", "bias-no-weights", "no-bias-weights"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_bias_and_weights(bias, weighted, dtype):
    _check(_inputs(dtype, bias=bias, weighted=weighted, seed=4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_parity_float32_weights_with_half_x(dtype):
    # The router's fp32 weights with half activations: dweights comes back in fp32.
    _check(_inputs(dtype, weights_dtype=torch.float32, seed=5))


def test_parity_strided_inputs():
    d = _inputs(torch.float32, seed=6)
    # x[:, ::2] of a wider tensor, a transposed x, weight stacks stored transposed.
    wide = torch.randn(40, 64, dtype=torch.float32)
    d["x"] = wide[:, ::2]
    _check(d)
    d["x"] = d["x"].t().contiguous().t()
    d["w1"] = d["w1"].transpose(1, 2).contiguous().transpose(1, 2)
    d["w2"] = d["w2"].transpose(0, 1).contiguous().transpose(0, 1)
    d["b1"] = d["b1"].t().contiguous().t()
    assert not d["x"].is_contiguous() and not d["w1"].is_contiguous() and not d["w2"].is_contiguous()
    _check(d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_grads_keep_weight_strides(dtype):
    # transformers' stacks arrive as transpose(1, 2) views; their gradients must have the
    # view's strides (as the op's fake says), so the view's backward hands the base a
    # gradient in its own layout, which autograd keeps without a copy.
    d = _inputs(dtype, seed=11)
    d["w1"] = d["w1"].transpose(1, 2).contiguous().transpose(1, 2)
    d["w2"] = d["w2"].transpose(1, 2).contiguous().transpose(1, 2)
    cfg = dict(num_experts=6, act="silu", glu=True, block_size=16)
    args = (d["x"], d["expert_indices"], d["weights"], d["w1"], d["w2"], d["b1"], d["b2"])
    out, saved = cpu_experts.experts_forward(*args, **cfg)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    _, _, dw1, dw2, _, _ = cpu_experts.experts_backward(dout, saved, *args, **cfg, needs_input_grad=(True,) * 6)
    assert dw1.stride() == d["w1"].stride() and dw2.stride() == d["w2"].stride()
    _, ref_grads = _reference(d, "silu", True, dout)
    assert_close(dw1, ref_grads["w1"], dtype, "layer", "dw1 of a transposed stack")
    assert_close(dw2, ref_grads["w2"], dtype, "layer", "dw2 of a transposed stack")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zero_stride_dout(dtype):
    # out.sum().backward() hands backward a zero-stride expand of a scalar.
    d = _inputs(dtype, seed=8)
    dout = torch.ones((), dtype=dtype).expand(40, 32)
    assert dout.stride() == (0, 0)
    _check(d, dout=dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_tokens(dtype):
    d = _inputs(dtype, tokens=0)
    out, grads, _ = _run(d, "silu", True)
    assert out.shape == (0, 32)
    for name, g in grads.items():
        assert g.shape == d[name].shape and g.dtype == d[name].dtype
        assert torch.equal(g, torch.zeros_like(g)), f"d{name} must be zero without tokens"
    # and through .sum(): the zero-stride gradient of an empty output
    x = d["x"].clone().requires_grad_(True)
    experts(x, d["expert_indices"], d["weights"], d["w1"], d["w2"]).sum().backward()
    assert x.grad.shape == (0, 32)


def test_needs_input_grad_and_none_inputs():
    d = _inputs(torch.float32, bias=False, weighted=False, seed=9)
    out, saved = cpu_experts.experts_forward(d["x"], d["expert_indices"], None, d["w1"], d["w2"], None, None,
                                             num_experts=6, act="silu", glu=True, block_size=16)
    dout = torch.randn_like(out)
    grads = cpu_experts.experts_backward(dout, saved, d["x"], d["expert_indices"], None, d["w1"], d["w2"], None,
                                         None, num_experts=6, act="silu", glu=True, block_size=16,
                                         needs_input_grad=(False, True, False, True, True, True))
    dx, dweights, dw1, dw2, db1, db2 = grads
    assert dx is None and dw1 is None  # not asked for
    assert dweights is None and db1 is None and db2 is None  # inputs are None
    _, ref_grads = _reference(d, "silu", True, dout)
    assert_close(dw2, ref_grads["w2"], torch.float32, "layer", "dw2 alone")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fake_matches_real(dtype):
    d = _inputs(dtype, routing="skewed")
    args = (d["x"], d["expert_indices"], d["weights"], d["w1"], d["w2"], d["b1"], d["b2"])
    cfg = dict(num_experts=6, act="silu", glu=True, block_size=16)
    out, saved = cpu_experts.experts_forward(*args, **cfg)
    fout, fsaved = cpu_experts.experts_forward_fake(*args, **cfg)
    assert (fout.shape, fout.dtype) == (out.shape, out.dtype)
    assert [(t.shape, t.dtype) for t in fsaved] == [(t.shape, t.dtype) for t in saved]
    # What is kept: the pre-activation [T*k, 2F] in x's dtype, and two integer vectors.
    assert saved[0].shape == (40 * 2, 64) and saved[0].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic(dtype):
    d = _inputs(dtype, routing="duplicates", k=4, seed=10)
    out1, g1, dout = _run(d, "gelu", True)
    out2, g2, _ = _run(d, "gelu", True, dout)
    assert torch.equal(out1, out2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"d{name} differs between two runs"


def test_gradcheck_float64():
    d = _inputs(torch.float64, tokens=6, hidden=8, ffn=16, experts_=3, k=2, routing="duplicates", seed=11)
    leaves = [d[n].clone().requires_grad_(True) for n in GRADS]
    x, weights, w1, w2, b1, b2 = leaves
    for act in ("silu", "gelu_tanh"):
        assert torch.autograd.gradcheck(
            lambda *a: experts(a[0], d["expert_indices"], *a[1:], act=act), tuple(leaves), eps=1e-6, atol=1e-7,
            fast_mode=True)


# -- "accumulate in fp32, round once" ----------------------------------------------------------

def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of a.dtype lie between a and b (same dtype, finite)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    ia, ib = a.view(bits).to(torch.int32), b.view(bits).to(torch.int32)
    # Map sign-magnitude bit patterns onto a monotone integer line.
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return (ia - ib).abs()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rounded_once(dtype):
    """Where every intermediate is exact, the output is the float64 result rounded ONCE.

    Small-integer x and w1 make ``h`` exact integers, relu keeps them exact, so ``out`` is a
    single product ``sum_j w_j * a_j @ w2`` accumulated in fp32 (error ~2^-24, far below
    the half ulp) and rounded once: it must equal the reference rounded to ``dtype``
    except at the rare near-ties fp32's own error can flip (then 1 ulp). Rounding the
    expert outputs before the weighted k-sum (a second rounding) makes ~1/4 of them 1 ulp
    off and fails. The same holds for ``dweights = <dout, y>`` and ``dw2 = a^T (w dout)``.
    """
    gen = torch.Generator().manual_seed(12)
    tokens, hidden, ffn, experts_, k = 64, 32, 32, 4, 3
    x = torch.randint(-2, 3, (tokens, hidden), generator=gen).to(dtype)
    w1 = torch.randint(-1, 2, (experts_, ffn, hidden), generator=gen).to(dtype)
    w2 = (torch.randn(experts_, ffn, hidden, generator=gen) / 16).to(dtype)
    weights = torch.rand(tokens, k, generator=gen).to(dtype).requires_grad_(True)
    ids = torch.stack([torch.randperm(experts_, generator=gen)[:k] for _ in range(tokens)])
    w2g = w2.clone().requires_grad_(True)
    out = experts(x, ids, weights, w1, w2g, act="relu", glu=False)
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    dweights, dw2 = torch.autograd.grad(out, [weights, w2g], dout)

    w64 = weights.detach().double().requires_grad_(True)
    w2_64 = w2.double().requires_grad_(True)
    ref = reference.experts_reference(x.double(), ids, w64, w1.double(), w2_64, activation="relu")
    ref_dweights, ref_dw2 = torch.autograd.grad(ref, [w64, w2_64], dout.double())
    for name, got, want in (("out", out, ref), ("dweights", dweights, ref_dweights), ("dw2", dw2, ref_dw2)):
        dist = _ulp_distance(got.detach(), want.to(dtype))
        assert int(dist.max()) <= 1, f"{name}: {int(dist.max())} ulp from the once-rounded reference"
        exact = float((dist == 0).double().mean())
        assert exact >= 0.98, f"{name}: only {exact:.1%} equal the once-rounded reference (rounded twice?)"


@pytest.fixture
def three_threads(monkeypatch):
    """BLAS and ATen on 3 threads, even for these small experts (which would otherwise run
    on one): the results must not depend on how the GEMMs are split."""
    monkeypatch.setattr(cpu_experts, "_PARALLEL_MIN_FLOPS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("routing", ["uniform", "skewed", "one-expert"])
@pytest.mark.parametrize("glu", [True, False], ids=["glu", "plain"])
def test_parity_threaded(three_threads, dtype, routing, glu):
    _check(_inputs(dtype, routing=routing, glu=glu, tokens=37, seed=13), act="gelu", glu=glu)
    assert torch.get_num_threads() == 3, "the path leaves torch's thread count as it found it"


def test_small_experts_run_on_one_thread(monkeypatch):
    """A small call runs on one thread and restores the caller's setting after."""
    seen = []
    real_mm = torch.mm

    def mm(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_mm(*args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(torch, "mm", mm)
        _run(_inputs(torch.float32, routing="uniform", seed=15), "silu", True)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_threaded_deterministic(three_threads):
    d = _inputs(torch.float32, routing="skewed", k=3, seed=14)
    out1, g1, dout = _run(d, "silu", True)
    out2, g2, _ = _run(d, "silu", True, dout)
    assert torch.equal(out1, out2) and all(torch.equal(g1[n], g2[n]) for n in g1)
