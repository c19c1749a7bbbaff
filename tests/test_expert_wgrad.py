"""The expert weight gradient with split row ranges (``kernels/expert_wgrad.py``, issue 18 item 5).

Interpreter (CPU tensors) without a GPU, CUDA tensors with one. The chunk length S is forced
small (``SPLIT_ROWS``) so that tiny routings split into several chunks; the references are
written from the definition in float64 (``dW[e] = sum over e's slots s of L[s]^T (w_s
src[s // k])``, from the expert ids, not from the routing tensors the kernel reads), and the
end-to-end cases use ``reference.experts_reference``. Outputs and the workspace are poisoned
with NaN, so an element nobody wrote (a skipped second pass, a lost chunk) fails.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksparse_moe import reference
from blocksparse_moe.kernels import expert_wgrad as W
from blocksparse_moe.kernels import experts as K
from blocksparse_moe.kernels.static_routing import padded_rows_bound, static_route
from tolerances import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture
def split_rows(monkeypatch):
    """Force the chunk length S (rows) for one test."""
    def force(rows):
        monkeypatch.setattr(W, "SPLIT_ROWS", rows)
    return force


def _ids(counts, top_k, gen):
    """``[T, k]`` expert ids with exactly ``counts[e]`` slots on expert e, shuffled."""
    flat = torch.cat([torch.full((c,), e, dtype=torch.int64) for e, c in enumerate(counts)])
    assert flat.numel() % top_k == 0
    return flat[torch.randperm(flat.numel(), generator=gen)].view(-1, top_k)


def _problem(counts, top_k, cols, n, dtype, *, weights=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = _ids(counts, top_k, gen)
    tokens = ids.shape[0]
    left = torch.randn(tokens * top_k, cols, generator=gen).to(dtype)
    src = torch.randn(tokens, n, generator=gen).to(dtype)
    # Powers of two: w_s * src is exact in bf16, so the reference needs no rounding model.
    w = (2.0 ** torch.randint(-2, 2, (tokens, top_k), generator=gen)).float() if weights else None
    return dict(ids=ids, left=left, src=src, weights=w)


def _reference(p, experts):
    """float64 ``(dW, db_left, db_src)`` from the definition, slot by slot."""
    ids, left, src, w = p["ids"], p["left"].double(), p["src"].double(), p["weights"]
    top_k = ids.shape[1]
    cols, n = left.shape[1], src.shape[1]
    dw = torch.zeros(experts, cols, n, dtype=torch.float64)
    dbl = torch.zeros(experts, cols, dtype=torch.float64)
    dbr = torch.zeros(experts, n, dtype=torch.float64)
    for s, e in enumerate(ids.reshape(-1).tolist()):
        r = src[s // top_k] * (1.0 if w is None else float(w.reshape(-1)[s]))
        dw[e] += torch.outer(left[s], r)
        dbl[e] += left[s]
        dbr[e] += r
    return dw, dbl, dbr


def _run(p, experts, block, *, sums=True, layout="contiguous", poison=True):
    """``weight_grad`` on ``p`` into NaN-filled outputs: ``(dw, db_left, db_src)``."""
    ids = p["ids"].to(DEVICE)
    tokens, top_k = ids.shape
    row_slots, _, offsets, _ = static_route(ids, experts, block)
    p_max = padded_rows_bound(tokens, top_k, experts, block)
    cols, n = p["left"].shape[1], p["src"].shape[1]
    dtype = p["left"].dtype
    if layout == "contiguous":
        dw = torch.full((experts, cols, n), float("nan"), dtype=dtype, device=DEVICE)
    else:  # the weights' layout of a w stored [N, E, C]: every stride other than 1 on C
        dw = torch.full((n, experts, cols), float("nan"), dtype=dtype, device=DEVICE).permute(1, 2, 0)
    dbl = torch.full((experts, cols), float("nan"), dtype=dtype, device=DEVICE) if sums else None
    dbr = torch.full((experts, n), float("nan"), dtype=dtype, device=DEVICE) if sums else None
    tiles = K._tiles("wgrad", dtype, block, (K.col_tile(cols), 0, block), tokens * top_k, cols, n)
    w = p["weights"].to(DEVICE) if p["weights"] is not None else None
    W.weight_grad(p["left"].to(DEVICE), p["src"].to(DEVICE), w, dw, dbl, dbr, row_slots, offsets, top_k=top_k,
                  p_max=p_max, block_size=block, tiles=tiles, poison=poison)
    return dw, dbl, dbr


def _check(got, want, dtype, sums=True):
    names = ("dW", "db_left", "db_src")
    for name, g, r in zip(names, got, want):
        if g is None:
            assert not sums
            continue
        assert_close(g, r, dtype, "op", msg=name)


def _chunks(counts, block, rows):
    """Chunks per expert for a chunk length of ``rows``: ceil(padded / rows)."""
    return [-(-(-(-c // block) * block) // rows) for c in counts]


# (counts per expert, top_k, block b, forced S, what the case is for). cols = 32 and n = 40:
# two column tiles of the interpreter's 32-wide tile, the last one masked.
CASES = [
    pytest.param([40, 0, 0], 2, 16, 16, id="all-rows-one-expert-3-chunks"),
    pytest.param([40, 10, 20, 0], 2, 16, 16, id="skewed-two-split-one-not-one-empty"),
    pytest.param([30, 40, 0, 6], 2, 16, 32, id="exactly-S-rows-and-S-plus-b-rows"),
    pytest.param([0, 0, 70], 1, 32, 32, id="b32-empty-experts-then-one-takes-all"),
    pytest.param([24], 3, 16, 16, id="single-expert"),
]


@pytest.mark.parametrize("counts,top_k,block,rows", CASES)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_split_matches_definition(split_rows, counts, top_k, block, rows, dtype):
    split_rows(rows)
    chunks = _chunks(counts, block, rows)
    assert max(chunks) >= 2, "the case must split an expert"
    p = _problem(counts, top_k, 32, 40, dtype)
    _check(_run(p, len(counts), block), _reference(p, len(counts)), dtype)


@pytest.mark.parametrize("weights,sums", [(False, True), (True, False), (False, False)],
                         ids=["biases-no-router-weights", "router-weights-no-biases", "dW-only"])
def test_split_flag_combinations(split_rows, weights, sums):
    split_rows(16)
    counts = [40, 10, 20, 0]
    p = _problem(counts, 2, 32, 40, F32, weights=weights, seed=1)
    got = _run(p, len(counts), 16, sums=sums)
    _check(got, _reference(p, len(counts)), F32, sums=sums)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_split_strided_dw(split_rows, dtype):
    # dW with the strides of a weight stored [N, E, C] (AccumulateGrad keeps them), L and src
    # column slices: the second pass writes through the same strides as the first.
    split_rows(16)
    counts = [40, 10, 20, 0]
    p = _problem(counts, 2, 32, 40, dtype, seed=2)
    p["left"] = torch.cat([p["left"], p["left"][:, :8]], dim=1)[:, :32]
    p["src"] = torch.cat([p["src"][:, :4], p["src"]], dim=1)[:, 4:]
    assert p["left"].stride() != (32, 1) and p["src"].stride() != (40, 1)
    got = _run(p, len(counts), 16, layout="strided")
    assert got[0].stride(2) != 1
    _check(got, _reference(p, len(counts)), dtype)


def test_split_is_deterministic_and_leaves_unsplit_experts_bitwise(split_rows):
    counts = [40, 10, 20, 0]
    p = _problem(counts, 2, 32, 40, BF16, seed=3)
    split_rows(32)  # two K steps per chunk: the partial sums do run in another order
    first, second = _run(p, 4, 16), _run(p, 4, 16)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "two runs differ"
    split_rows(None)  # the rule: this small problem does not split
    unsplit = _run(p, 4, 16)
    for name, a, b in zip(("dW", "db_left", "db_src"), first, unsplit):
        assert_close(a, b.double(), BF16, "op", msg=f"{name} split vs unsplit")
        # expert 1 (16 rows) and the empty expert 3 have one chunk: stored directly, as before
        for e in (1, 3):
            assert torch.equal(a[e], b[e]), f"{name}[{e}] must be bitwise the unsplit result"


def test_fails_without_the_second_pass(split_rows, monkeypatch):
    # Skip the second launch: the split experts' dW stays poisoned and the check must fail,
    # the one-chunk experts are still right (they never go through the workspace).
    split_rows(16)
    counts = [40, 10, 20, 0]
    p = _problem(counts, 2, 32, 40, F32, seed=4)
    real = W._common.launch
    seen = []

    def launch(kernel, *args, **kwargs):
        seen.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        if seen[-1] != "_wgrad_sum_kernel":
            real(kernel, *args, **kwargs)

    monkeypatch.setattr(W._common, "launch", launch)
    got = _run(p, len(counts), 16)
    assert [k for k in seen if "wgrad" in k] == ["_wgrad_kernel", "_wgrad_sum_kernel"]
    want = _reference(p, len(counts))
    with pytest.raises(AssertionError):
        _check(got, want, F32)
    assert torch.isnan(got[0][0]).all() and torch.isnan(got[0][2]).all()
    assert_close(got[0][1], want[0][1], F32, "op", msg="unsplit expert")


def test_no_split_means_one_launch_and_no_workspace(monkeypatch):
    # Small problems (P_max < 2 * MIN_CHUNK_ROWS) keep one launch, the kernel compiled
    # without the split code, and no workspace (X = 0).
    kernels = []
    real_launch = W._common.launch

    def launch(kernel, *args, **kwargs):
        kernels.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, kwargs.get("SPLIT")))
        real_launch(kernel, *args, **kwargs)

    monkeypatch.setattr(W._common, "launch", launch)
    p = _problem([40, 10, 20, 0], 2, 32, 40, F32, seed=5)
    p_max = padded_rows_bound(35, 2, 4, 16)
    assert W.extra_chunks(p_max, W.chunk_rows(p_max, 32, 40, 16), 16) == 0
    got = _run(p, 4, 16, poison=True)
    assert [k for k in kernels if "wgrad" in k[0]] == [("_wgrad_kernel", False)]
    _check(got, _reference(p, 4), F32)


# -- end to end: experts_backward with a forced split, against the dense reference ----------

def _layer_inputs(dtype, counts, top_k, hidden, ffn, glu, bias, weights, seed):
    gen = torch.Generator().manual_seed(seed)
    experts = len(counts)
    g = 2 if glu else 1

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

    ids = _ids(counts, top_k, gen).to(DEVICE)
    tokens = ids.shape[0]
    return dict(x=randn(tokens, hidden), ids=ids, w1=randn(experts, g * ffn, hidden, scale=hidden ** -0.5),
                w2=randn(experts, ffn, hidden, scale=ffn ** -0.5),
                b1=randn(experts, g * ffn, scale=0.5) if bias else None, b2=randn(experts, hidden, scale=0.5) if bias else None,
                weights=torch.rand(tokens, top_k, generator=gen).to(DEVICE) if weights else None,
                dout=randn(tokens, hidden, scale=hidden ** -0.5))


@pytest.mark.parametrize("dtype,glu,bias,weights", [(BF16, True, True, True), (F32, False, False, False)],
                         ids=["bf16-glu-biases-weights", "fp32-plain-no-bias-no-weights"])
def test_experts_backward_with_split_matches_reference(split_rows, monkeypatch, dtype, glu, bias, weights):
    monkeypatch.setattr(K, "POISON_BUFFERS", True)
    split_rows(16)
    counts, top_k, hidden, ffn = [36, 4, 0, 8], 2, 24, 16  # expert 0: 3 chunks of 16 rows
    inp = _layer_inputs(dtype, counts, top_k, hidden, ffn, glu, bias, weights, seed=6)
    kw = dict(num_experts=len(counts), act="silu", glu=glu, block_size=16)
    args = (inp["x"], inp["ids"], inp["weights"], inp["w1"], inp["w2"], inp["b1"], inp["b2"])
    _, saved = K.experts_forward(*args, **kw)
    grads = K.experts_backward(inp["dout"], saved, *args, needs_input_grad=(True,) * 6, **kw)
    names = ("x", "weights", "w1", "w2", "b1", "b2")
    leaves = {n: None if inp[n] is None else inp[n].detach().cpu().double().requires_grad_() for n in names}
    w1 = leaves["w1"]
    b1 = leaves["b1"]
    wts = leaves["weights"] if weights else torch.ones(inp["ids"].shape, dtype=torch.float64)
    out = reference.experts_reference(
        leaves["x"], inp["ids"].cpu(), wts, w1[:, :ffn], leaves["w2"], w1[:, ffn:] if glu else None,
        b1=None if b1 is None else b1[:, :ffn], b2=leaves["b2"], b3=None if (b1 is None or not glu) else b1[:, ffn:],
        activation="silu")
    out.backward(inp["dout"].cpu().double())
    for name, got in zip(names, grads):
        leaf = leaves[name]
        if leaf is None:
            assert got is None
            continue
        want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        assert_close(got, want, dtype, "layer", msg=f"d{name}")


# -- the static chunk rule ------------------------------------------------------------------

def _model(tokens, hidden, ffn, experts, top_k, block=128, glu=True):
    p_max = padded_rows_bound(tokens, top_k, experts, block)
    out = {}
    for name, cols in (("dW2", ffn), ("dW1", (2 if glu else 1) * ffn)):
        s = W.chunk_rows(p_max, cols, hidden, block)
        x = W.extra_chunks(p_max, s, block)
        out[name] = dict(S=s, X=x, workspace=2 * x * cols * hidden * 4)
    return p_max, out


def test_chunk_rule_at_model_shapes():
    # All rows on one expert: CTAs with work = chunks x tiles of the one expert.
    p_max, qwen = _model(4096, 2048, 768, 128, 8)  # Qwen3-30B-A3B, T = 4096
    assert p_max == 49024
    assert qwen["dW2"] == dict(S=16384, X=2, workspace=4 * 768 * 2048 * 4)  # 96 -> 192 CTAs working
    assert qwen["dW1"] == dict(S=24576, X=1, workspace=2 * 1536 * 2048 * 4)  # 192 -> 384
    for model in (_model(4096, 4096, 14336, 8, 2)[1], _model(4096, 7168, 2048, 256, 8)[1]):  # Mixtral, DS-V3
        assert all(v["X"] == 0 and v["workspace"] == 0 for v in model.values()), model  # enough tiles already
    assert _model(256, 256, 128, 16, 4, block=32)[1]["dW2"]["X"] == 0  # small: no split


@settings(max_examples=200, deadline=None)
@given(rows_per_expert=st.lists(st.integers(0, 3000), min_size=1, max_size=64), block=st.sampled_from([16, 32, 64, 128]),
       cols=st.sampled_from([16, 128, 768, 1536, 4096]), n=st.integers(1, 8192))
def test_extra_chunks_bound_and_workspace_bound(rows_per_expert, block, cols, n):
    # X bounds the extra chunks of every routing whose padded rows fit P_max, and the workspace
    # stays within 2 * TARGET_CTAS * 128 * 128 fp32 elements.
    padded = [-(-r // block) * block for r in rows_per_expert]
    p_max = max(sum(padded), block)
    s = W.chunk_rows(p_max, cols, n, block)
    assert s % block == 0 and s > 0
    x = W.extra_chunks(p_max, s, block)
    assert sum(max(-(-r // s) - 1, 0) for r in padded) <= x
    assert 2 * x * cols * n <= 2 * W.TARGET_CTAS * 128 * 128
