"""DroplessMoE against the dense float64 reference: output and every gradient.

Each case builds a layer, runs forward + backward (output gradient random, plus the
auxiliary losses), then evaluates ``reference.moe_reference`` on a float64 copy of the same
(already rounded) parameters and inputs and compares the output and the gradients of the
input, the router, the experts' weights and biases and the shared expert. The reference is
given the layer's own expert choice (``aux.expert_indices``) so a near-tie in the router
cannot flip between dtypes; the routing weights are still recomputed in float64.

The CPU path runs the broad grid (fp32 and fp64); the interpreted Triton kernels run a few
tiny cases in fp32/fp16/bf16 (the interpreter is slow), some with several block rows per
expert and every activation.
"""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blocksparse_moe as bm
from blocksparse_moe import backend, reference
from blocksparse_moe.moe import DenseMLP, DroplessMoE, MoEAux
from blocksparse_moe.ops.experts import expert_mlp
from blocksparse_moe.routing import route
from blocksparse_moe.topology import block_size_for_call
from tolerances import assert_close

DenseMLP, DroplessMoE, MoEAux, expert_mlp, route = bm.DenseMLP, bm.DroplessMoE, bm.MoEAux, bm.expert_mlp, bm.route


def _layer_ops_module():
    """The ``ops`` namespace moe.py calls (to spy on padded_gather). PRIVATE HOOK, the only
    one in this file: repoint it when moe.py's imports move (issue 10)."""
    import blocksparse_moe.moe as moe_mod

    return moe_mod.ops

LB_COEF, Z_COEF = 0.01, 0.001


def make_layer(hidden=32, ffn=32, experts=4, top_k=2, *, dtype=torch.float32, device="cpu", seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("load_balancing_coef", LB_COEF)
    kw.setdefault("z_loss_coef", Z_COEF)
    return DroplessMoE(hidden, ffn, experts, top_k, dtype=dtype, device=device, **kw)


def check_parity(layer: DroplessMoE, x: torch.Tensor, dtype: torch.dtype, expert_indices=None, msg=""):
    """Forward + backward of ``layer`` vs the float64 reference; returns ``(out, aux)``."""
    layer64 = copy.deepcopy(layer).to(device="cpu", dtype=torch.float64)
    x = x.detach().requires_grad_(True)
    out, aux = layer(x, expert_indices=expert_indices)
    assert isinstance(aux, MoEAux)
    gen = torch.Generator().manual_seed(1)
    gout = torch.randn(out.shape, generator=gen).to(dtype).to(out.device)
    ((out * gout).sum() + aux.aux_loss).backward()

    x64 = x.detach().to("cpu", torch.float64).requires_grad_(True)
    ref = reference.moe_reference(x64, **layer64.reference_weights(), expert_indices=aux.expert_indices.cpu())
    lc, zc = layer.router.load_balancing_coef, layer.router.z_loss_coef
    ((ref["out"] * gout.double().cpu()).sum() + lc * ref["load_balancing_loss"] + zc * ref["z_loss"]).backward()

    assert_close(out, ref["out"], dtype, "layer", msg=f"{msg} out")
    assert_close(aux.expert_weights, ref["weights"], torch.float32 if dtype != torch.float64 else dtype, "layer",
                 msg=f"{msg} expert_weights")
    if x.numel():
        assert_close(aux.load_balancing_loss, ref["load_balancing_loss"], torch.float32 if dtype != torch.float64
                     else dtype, "layer", msg=f"{msg} load_balancing_loss")
    assert_close(x.grad, _grad(x64), dtype, "layer", msg=f"{msg} d x")
    grads64 = dict(layer64.named_parameters())
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{msg} {name} got no gradient"
        # The reference loop never touches an expert without tokens: no gradient means zero.
        assert_close(p.grad, _grad(grads64[name]), dtype, "layer", msg=f"{msg} d {name}")
    counts = torch.bincount(aux.expert_indices.reshape(-1).cpu(), minlength=layer.num_experts)
    assert torch.equal(aux.tokens_per_expert.cpu().long(), counts)
    return out, aux


def _grad(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t) if t.grad is None else t.grad


# -- the CPU path: the broad grid ------------------------------------------------------------

CASES = [
    pytest.param(dict(experts=1, top_k=1, block_size=16), id="E1-k1-one-expert-b16"),
    pytest.param(dict(experts=4, top_k=1, block_size=32, glu=False, bias=True, renormalize=False),
                 id="E4-k1-mlp-bias-b32"),
    pytest.param(dict(experts=4, top_k=2, block_size=64, ffn=64, bias=True, shared_expert_size=16),
                 id="E4-k2-bias-shared-b64"),
    pytest.param(dict(experts=8, top_k=2, block_size=128, ffn=128, shared_expert_size=32, shared_expert_gate=True),
                 id="E8-k2-shared-gate-b128"),
    pytest.param(dict(experts=8, top_k=8, block_size=16, glu=False, activation="relu"), id="E8-k8-k-equals-E-relu"),
    pytest.param(dict(experts=64, top_k=8, block_size=16, activation="gelu"), id="E64-k8-many-empty-experts-gelu"),
    pytest.param(dict(experts=64, top_k=8, block_size=32, glu=False, bias=True, activation="gelu_tanh"),
                 id="E64-k8-mlp-bias-gelu-tanh-b32"),
    pytest.param(dict(experts=8, top_k=2, block_size=16, score="sigmoid", expert_bias=True, scaling_factor=2.5,
                      shared_expert_size=16), id="deepseek-sigmoid-bias-scaling"),
    pytest.param(dict(experts=8, top_k=2, block_size=16, renormalize=False), id="qwen2-no-renormalise"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cfg", CASES)
def test_layer_matches_reference_cpu(dtype, cfg):
    cfg = dict(cfg)
    tokens = cfg.pop("tokens", 37)  # not a multiple of any block: every expert's last block is padded
    with backend.prefer_on_cpu("cpu"):
        layer = make_layer(dtype=dtype, **cfg)
        if layer.router.expert_bias is not None:
            with torch.no_grad():
                layer.router.expert_bias.copy_(torch.randn(layer.num_experts) * 0.05)
        x = torch.randn(tokens, layer.hidden_size, generator=torch.Generator().manual_seed(2)).to(dtype)
        check_parity(layer, x, dtype)


def test_leading_dims_and_single_block_row():
    # [batch, seq, H] input; 3 tokens top-1 on 2 experts: at most one block row per expert.
    with backend.prefer_on_cpu("cpu"):
        layer = make_layer(experts=2, top_k=1, block_size=16)
        x = torch.randn(1, 3, 32)
        out, _ = check_parity(layer, x, torch.float32)
        assert out.shape == (1, 3, 32)


def test_zero_tokens():
    with backend.prefer_on_cpu("cpu"):
        layer = make_layer(block_size=16, bias=True, shared_expert_size=16)
        x = torch.zeros(2, 0, 32, requires_grad=True)
        out, aux = layer(x)
        assert out.shape == (2, 0, 32)
        (out.sum() + aux.aux_loss).backward()
        assert x.grad.shape == x.shape
        assert int(aux.tokens_per_expert.sum()) == 0 and float(aux.aux_loss.detach()) == 0.0
        for name, p in layer.named_parameters():
            assert p.grad is None or float(p.grad.abs().sum()) == 0.0, name


# -- forced routing distributions (hypothesis) ----------------------------------------------

def _forced_indices(kind: str, tokens: int, experts: int, top_k: int, seed: int) -> torch.Tensor:
    """``[T, k]`` expert ids for a routing distribution of the given ``kind``."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "one-expert-takes-all":
        return torch.full((tokens, top_k), experts - 1, dtype=torch.int64)  # duplicates within a token too
    if kind == "uniform":
        p = torch.ones(experts)
    elif kind == "skewed":
        p = 0.3 ** torch.arange(experts, dtype=torch.float64)
    else:  # "empty-experts": only the even experts receive tokens
        p = (torch.arange(experts) % 2 == 0).double()
    if int((p > 0).sum()) < top_k:
        p = p + 1e-3
    if tokens == 0:
        return torch.zeros(0, top_k, dtype=torch.int64)
    return torch.multinomial(p.expand(tokens, experts), top_k, replacement=False, generator=gen)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["uniform", "skewed", "empty-experts", "one-expert-takes-all"]),
    tokens=st.integers(0, 40),
    experts=st.sampled_from([1, 2, 4, 8]),
    top_k=st.integers(1, 3),
    block_size=st.sampled_from([16, 32]),
    glu=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forced_routing_distributions(kind, tokens, experts, top_k, block_size, glu, seed):
    top_k = min(top_k, experts)
    idx = _forced_indices(kind, tokens, experts, top_k, seed)
    with backend.prefer_on_cpu("cpu"):
        layer = make_layer(experts=experts, top_k=top_k, block_size=block_size, glu=glu, seed=seed)
        x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(seed))
        _, aux = check_parity(layer, x, torch.float32, expert_indices=idx, msg=kind)
    assert torch.equal(aux.expert_indices, idx)


def test_padding_waste_is_bounded():
    """The layer's permuted activation has P <= T*k + min(E, T*k)*(b-1) rows, for skewed
    routings too (at most min(E, T*k) experts hold a row, each pads fewer than b)."""
    # The padded layout of every back end: route()'s P (the unfused ops, the CPU sizes) and
    # the Triton path's static bound, which sizes its buffers without reading P.
    from blocksparse_moe.kernels.static_routing import padded_rows_bound

    for kind in ("uniform", "skewed", "empty-experts", "one-expert-takes-all"):
        for tokens, experts, k, b in ((37, 8, 2, 16), (5, 64, 8, 32), (100, 4, 1, 128)):
            idx = _forced_indices(kind, tokens, experts, k, 0)
            p = bm.route(idx, experts, b).padded_tokens
            bound = tokens * k + min(experts, tokens * k) * (b - 1)
            assert p <= bound, f"{kind}: P={p} > T*k + min(E, T*k)*(b-1) = {bound}"
            assert bound - b < padded_rows_bound(tokens, k, experts, b) <= bound  # bound rounded down to b
            # and it is exactly the block-rounded group sizes
            tpe = torch.bincount(idx.reshape(-1), minlength=experts)
            assert p == int(((tpe + b - 1) // b * b).sum())


# -- router behaviour through the layer ----------------------------------------------------

def test_expert_bias_steers_all_tokens_to_one_expert():
    # A huge bias on expert 3 makes every token choose it (top-1), while its weight stays the
    # unbiased score; the update rule then lowers its bias.
    with backend.prefer_on_cpu("cpu"):
        layer = make_layer(experts=4, top_k=1, block_size=16, score="sigmoid", renormalize=False, expert_bias=True)
        with torch.no_grad():
            layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
        x = torch.randn(20, 32)
        _, aux = check_parity(layer, x, torch.float32)
        assert aux.expert_indices.unique().tolist() == [3]
        assert aux.tokens_per_expert.tolist() == [0, 0, 0, 20]
        layer.router.update_expert_bias(aux.tokens_per_expert, rate=0.5)
        assert layer.router.expert_bias.tolist() == [0.5, 0.5, 0.5, 9.5]


def test_jitter_only_in_training():
    # eval: the same input gives bit-identical outputs; train: the router input is jittered,
    # so the logits differ from the clean ones (and between calls).
    with backend.prefer_on_cpu("cpu"):
        layer = make_layer(experts=8, top_k=2, block_size=16, jitter_noise=0.5)
        x = torch.randn(16, 32)
        layer.eval()
        (a, aux_a), (b, aux_b) = layer(x), layer(x)
        assert torch.equal(a, b) and torch.equal(aux_a.router_logits, aux_b.router_logits)
        layer.train()
        _, aux1 = layer(x)
        _, aux2 = layer(x)
        assert not torch.allclose(aux1.router_logits, aux_a.router_logits)
        assert not torch.allclose(aux1.router_logits, aux2.router_logits)


def test_deterministic_under_deterministic_algorithms():
    with backend.prefer_on_cpu("cpu"), _deterministic():
        grads = []
        for _ in range(2):
            layer = make_layer(experts=8, top_k=2, block_size=16, bias=True)
            out, aux = layer(torch.randn(33, 32, generator=torch.Generator().manual_seed(0)))
            (out.square().sum() + aux.aux_loss).backward()
            grads.append([p.grad.clone() for p in layer.parameters()])
        for g0, g1 in zip(*grads):
            assert torch.equal(g0, g1)


class _deterministic:
    def __enter__(self):
        self.prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev)


# -- both back ends: the Triton kernels (interpreted on CPU: tiny and few) and the CPU path --

TRITON_CASES = [
    pytest.param(torch.float32, dict(experts=4, top_k=2, block_size=16, ffn=16, hidden=16), id="fp32-glu-E4-k2"),
    pytest.param(torch.float16, dict(experts=4, top_k=1, block_size=16, ffn=16, hidden=16, glu=False, bias=True),
                 id="fp16-mlp-bias-E4-k1"),
    pytest.param(torch.bfloat16, dict(experts=8, top_k=2, block_size=32, ffn=32, hidden=16, shared_expert_size=16),
                 id="bf16-glu-shared-E8-k2-b32"),
]


@pytest.mark.parametrize("dtype,cfg", TRITON_CASES)
def test_layer_matches_reference_both_paths(path, dtype, cfg):
    """Tiny layers on the CPU path and on the Triton kernels (interpreted on a CPU machine)."""
    cfg = dict(cfg)
    hidden = cfg.pop("hidden")
    layer = make_layer(hidden=hidden, dtype=dtype, device=path, **cfg)
    x = torch.randn(13, hidden, generator=torch.Generator().manual_seed(3)).to(dtype).to(path)
    check_parity(layer, x, dtype, msg=f"{path} {dtype}")


# Several block rows per expert (T*k/E = 20 or 24 slots per expert with b = 16, forced
# round-robin so each expert gets them) and two block columns per expert (F = 2b): only then
# is block_offsets_t not the identity and a block column of S^T longer than one block, which
# the layer's backward (dW2 = S^T dY, the sdd's dW1) reads. Each non-silu activation once.
# Mutations caught (tried on the interpreter): the transposed DSD reading data[i] instead of
# data[block_offsets_t[i]] (every case: the weight gradients); a wrong gelu_tanh derivative
# (the gelu_tanh case: d x and the weight gradients).
MULTI_ROW_CASES = [
    pytest.param(torch.float32, 40, dict(experts=2, top_k=1, block_size=16, ffn=32, hidden=16,
                                         activation="gelu_tanh"), id="fp32-glu-gelu_tanh-E2-k1-2-rows"),
    pytest.param(torch.bfloat16, 30, dict(experts=3, top_k=2, block_size=16, ffn=32, hidden=16, glu=False,
                                          bias=True, activation="gelu"), id="bf16-mlp-bias-gelu-E3-k2-2-rows"),
    pytest.param(torch.float16, 24, dict(experts=2, top_k=2, block_size=16, ffn=32, hidden=16,
                                         activation="relu"), id="fp16-glu-relu-k-equals-E-2-rows"),
]


@pytest.mark.parametrize("dtype,tokens,cfg", MULTI_ROW_CASES)
def test_layer_several_block_rows_per_expert_both_paths(path, dtype, tokens, cfg):
    cfg = dict(cfg)
    hidden = cfg.pop("hidden")
    e, k = cfg["experts"], cfg["top_k"]
    ids = (torch.arange(tokens * k) % e).reshape(tokens, k)  # distinct experts within a token
    counts = torch.bincount(ids.reshape(-1), minlength=e)
    assert int(counts.min()) > cfg["block_size"]  # every expert spans at least two block rows
    layer = make_layer(hidden=hidden, dtype=dtype, device=path, **cfg)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(5)).to(dtype).to(path)
    check_parity(layer, x, dtype, expert_indices=ids.to(path), msg=f"{path} {dtype}")


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    pytest.param(dict(ffn=48, block_size=32), ValueError, r"ffn_hidden_size \(48\) must be a multiple of block_size \(32\)",
                 id="ffn-not-multiple-of-block"),
    pytest.param(dict(ffn=40, block_size=None), ValueError, r"ffn_hidden_size = 40, which no block size",
                 id="default-block-size-but-no-block-divides-ffn"),
    pytest.param(dict(block_size=8), ValueError, "block_size must be one of", id="block-size-8"),
    pytest.param(dict(top_k=5), ValueError, r"top_k \(5\) must be <= num_experts \(4\)", id="k-above-E"),
    pytest.param(dict(activation="tanh"), ValueError, "unknown activation 'tanh'", id="bad-activation"),
    pytest.param(dict(score="relu"), ValueError, "score must be one of", id="bad-score"),
    pytest.param(dict(shared_expert_gate=True), ValueError, "shared_expert_gate needs", id="gate-without-shared"),
    pytest.param(dict(experts=0), ValueError, "num_experts must be >= 1", id="zero-experts"),
    pytest.param(dict(hidden=32.0), TypeError, "hidden_size must be an int", id="float-hidden"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    kwargs = dict(kwargs)
    args = dict(hidden=kwargs.pop("hidden", 32), ffn=kwargs.pop("ffn", 32), experts=kwargs.pop("experts", 4),
                top_k=kwargs.pop("top_k", 2), block_size=kwargs.pop("block_size", 16))
    with pytest.raises(exc, match=match):
        make_layer(**args, **kwargs)


@pytest.mark.parametrize("ffn,block", [(16, 16), (48, 16), (96, 32), (192, 64), (1408, 128)])
def test_default_block_size_is_chosen_per_call(ffn, block):
    # DroplessMoE(H, F, E, k) must work for any F a block size divides, small ones too; by
    # default the row padding is chosen per call, up to the largest block dividing F.
    layer = DroplessMoE(8, ffn, 2, 1)
    assert layer.block_size is None
    assert block_size_for_call(4096, 2, ffn, "F") == block  # 2048 rows per expert: the largest
    assert block_size_for_call(3, 2, ffn, "F") == 16       # a decode step: the smallest
    out, _ = layer(torch.randn(3, 8))
    assert out.shape == (3, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("slots,experts,ffn,expected", [
    pytest.param(1, 256, 2048, 16, id="one-token-many-experts"),
    pytest.param(8, 256, 2048, 16, id="decode-k8"),
    pytest.param(512, 128, 768, 16, id="qwen3-T64-four-rows-each"),
    pytest.param(64 * 2, 8, 14336, 16, id="mixtral-T64-16-rows-each"),
    pytest.param(128 * 2, 8, 14336, 16, id="mixtral-T128-32-rows-each"),
    pytest.param(256 * 2, 8, 14336, 32, id="mixtral-T256-64-rows-each"),
    pytest.param(4096 * 8, 128, 768, 128, id="qwen3-prefill"),
    pytest.param(4096 * 4, 128, 2880, 64, id="gptoss-prefill-capped-by-F"),
    pytest.param(4096 * 8, 128, 48, 16, id="F-allows-only-16"),
    pytest.param(0, 8, 256, 16, id="no-tokens"),
])
def test_block_size_for_call(slots, experts, ffn, expected):
    # The largest power of two <= rows-per-hit-expert / 2, within [16, largest dividing F].
    b = block_size_for_call(slots, experts, ffn, "F")
    assert b == expected and ffn % b == 0


def test_block_size_for_call_symbolic_tokens_take_the_largest():
    # A SymInt token count (torch.compile, dynamic) must not be guarded on.
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    env = ShapeEnv()
    sym = env.create_unbacked_symint()
    assert block_size_for_call(sym * 8, 128, 768, "F") == 128


@pytest.mark.parametrize("block_size", [None, 16], ids=["default-block", "block-16"])
def test_expert_mlp_rejects_zero_inner_width(block_size):
    # F = 0 used to pass (0 is a multiple of every block) and leave db2 unwritten.
    x = torch.randn(3, 8)
    w1, w2 = torch.randn(2, 0, 8), torch.randn(2, 0, 8)
    with pytest.raises(ValueError, match="expert_mlp: w2 has F = 0"):
        expert_mlp(x, torch.zeros(3, 1, dtype=torch.int64), None, w1, w2, b2=torch.randn(2, 8),
                   block_size=block_size)


def test_bad_forward_arguments():
    layer = make_layer(block_size=16)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 32\]"):
        layer(torch.randn(4, 31))
    with pytest.raises(TypeError, match="x is torch.float64 but the layer's parameters are torch.float32"):
        layer(torch.randn(4, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expert_indices must be \[4, 2\]"):
        layer(torch.randn(4, 32), expert_indices=torch.zeros(4, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expert_indices must lie in \[0, 4\)"):
        layer(torch.randn(4, 32), expert_indices=torch.full((4, 2), 7))


def test_expert_mlp_bad_arguments():
    layer = make_layer(block_size=16)
    x = torch.randn(5, 32)
    routing = route(torch.zeros(5, 2, dtype=torch.int64), 4, 16, ffn_hidden_size=32)
    w1, w2 = layer.w1.detach(), layer.w2.detach()
    with pytest.raises(ValueError, match=r"w1 must be \[E, G\*F, H\] = \[4, 64, 32\]"):
        expert_mlp(x, routing, None, w1[:, :32], w2)
    with pytest.raises(ValueError, match="expert_indices has 5 rows but x has 4 tokens"):
        expert_mlp(x[:4], routing, None, w1, w2)
    with pytest.raises(ValueError, match=r"weights must be \[T, k\] = \[5, 2\]"):
        expert_mlp(x, routing, torch.ones(5, 1), w1, w2)
    with pytest.raises(TypeError, match="expert_mlp: w2 (is torch.float64|has dtype torch.float64)"):
        expert_mlp(x, routing, None, w1, w2.double())
    with pytest.raises(TypeError, match="expert_indices must be a tensor, got NoneType"):
        expert_mlp(x, None, None, w1, w2)
    with pytest.raises(ValueError, match="expert_mlp: w2's F = 24, which no block size"):
        expert_mlp(x, torch.zeros(5, 2, dtype=torch.int64), None, torch.zeros(4, 48, 32), torch.zeros(4, 24, 32))
    with pytest.raises(ValueError, match="F = 8 .* must be a multiple of block_size 16"):
        expert_mlp(x, routing, None, torch.zeros(4, 16, 32), torch.zeros(4, 8, 32))
    with pytest.raises(ValueError, match=r"expert_mlp: expert_indices must lie in \[0, 4\), got values in \[4, 4\]"):
        expert_mlp(x, torch.full((5, 2), 4), None, w1, w2, block_size=16)


@pytest.mark.parametrize("layout", ["contiguous", "column-major-experts"])
def test_expert_mlp_with_given_routing_matches_reference(layout):
    # The functional form integrations call: routing and weights from outside, no router.
    # The weights are read in place in any layout (grouped operands), e.g. each expert's
    # matrix stored column-major, where no 2-D [E*R, H] view of the stack exists.
    with backend.prefer_on_cpu("cpu"):
        torch.manual_seed(0)
        e, f, h, t, k = 4, 32, 16, 9, 2
        x = torch.randn(t, h, dtype=torch.float64, requires_grad=True)
        w1 = torch.randn(e, 2 * f, h, dtype=torch.float64) * 0.2
        w2 = torch.randn(e, f, h, dtype=torch.float64) * 0.2
        if layout != "contiguous":
            w1, w2 = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (w1, w2))
        w1.requires_grad_(True)
        w2.requires_grad_(True)
        idx = torch.tensor([[0, 1], [1, 2], [3, 0], [0, 2], [1, 3], [2, 0], [3, 1], [0, 3], [2, 1]])
        wts = torch.rand(t, k, dtype=torch.float64)
        out = expert_mlp(x, route(idx, e, 16), wts, w1, w2, activation="silu", glu=True)
        want = reference.experts_reference(x, idx, wts, w1[:, :f], w2, w1[:, f:], activation="silu")
        assert_close(out, want, torch.float64, "layer")
        g = torch.autograd.grad(out.sum(), (x, w1, w2))
        gr = torch.autograd.grad(want.sum(), (x, w1, w2))
        for a, b_ in zip(g, gr):
            assert_close(a, b_, torch.float64, "layer")


def test_reset_parameters_and_repr():
    layer = make_layer(hidden=64, ffn=32, experts=4, top_k=2, block_size=16, bias=True, shared_expert_size=16)
    assert float(layer.w1.detach().abs().max()) <= 1 / 64 ** 0.5
    assert float(layer.w2.detach().abs().max()) <= 1 / 32 ** 0.5
    assert float(layer.b2.detach().abs().max()) <= 1 / 32 ** 0.5
    assert layer.w1.std() > 0.5 / (3 * 64) ** 0.5  # really uniform over the range, not tiny
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(7.0)
    layer.reset_parameters()
    assert all(float(p.detach().abs().max()) < 1 for p in layer.parameters())
    text = repr(layer)
    for part in ("hidden_size=64", "ffn_hidden_size=32", "num_experts=4", "top_k=2", "activation='silu'",
                 "glu=True", "bias=True", "block_size=16", "shared_expert_size=16", "Router(", "DenseMLP("):
        assert part in text, part
    assert isinstance(layer.shared_expert, DenseMLP)


# -- GPU twin ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", [
    pytest.param(dict(experts=8, top_k=2, block_size=64, ffn=128, hidden=128, shared_expert_size=64), id="E8-k2-b64"),
    pytest.param(dict(experts=64, top_k=8, block_size=16, ffn=64, hidden=128, glu=False, bias=True),
                 id="E64-k8-mlp-bias-b16"),
    pytest.param(dict(experts=4, top_k=1, block_size=128, ffn=128, hidden=64), id="E4-k1-b128"),
])
def test_layer_matches_reference_gpu(dtype, cfg):
    cfg = dict(cfg)
    hidden = cfg.pop("hidden")
    layer = make_layer(hidden=hidden, dtype=dtype, device="cuda", **cfg)
    x = torch.randn(300, hidden, generator=torch.Generator().manual_seed(3)).to(dtype).cuda()
    check_parity(layer, x, dtype, msg=f"cuda {dtype}")


@pytest.mark.gpu
def test_deterministic_gpu(monkeypatch):
    # Under deterministic algorithms torch refuses a cuBLAS matmul (the router's) unless
    # CUBLAS_WORKSPACE_CONFIG pins cuBLAS's workspace; torch reads it at each such check,
    # and the value it names is the one torch's own error message asks for.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with _deterministic():
        grads = []
        for _ in range(2):
            layer = make_layer(hidden=128, ffn=128, experts=8, top_k=2, block_size=64, bias=True,
                               dtype=torch.bfloat16, device="cuda")
            x = torch.randn(257, 128, generator=torch.Generator().manual_seed(0)).bfloat16().cuda()
            out, aux = layer(x)
            (out.float().square().sum() + aux.aux_loss).backward()
            grads.append([p.grad.clone() for p in layer.parameters()])
        for g0, g1 in zip(*grads):
            assert torch.equal(g0, g1)
