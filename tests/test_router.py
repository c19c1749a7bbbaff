"""Router: top-k selection, weights, expert bias, jitter, and the two auxiliary losses.

Hand-made logits are fed through an identity gate (``H = E``, ``weight = I``, so
``logits = x``) and compared with values worked out by hand in the comments; random cases
are compared with ``reference.py`` in float64, gradients included.
"""

import math

import pytest
import torch

import blocksparse_moe as bm
from blocksparse_moe import reference
from tolerances import assert_close

Router, load_balancing_loss, z_loss = bm.Router, bm.load_balancing_loss, bm.z_loss

LN3 = math.log(3.0)


def identity_router(num_experts, top_k, **kw):
    r = Router(num_experts, num_experts, top_k, dtype=torch.float64, **kw)
    with torch.no_grad():
        r.weight.copy_(torch.eye(num_experts, dtype=torch.float64))
    return r


def t64(rows):
    return torch.tensor(rows, dtype=torch.float64)


# -- selection and weights -------------------------------------------------------------------

def test_softmax_top2_renormalised_by_hand():
    # softmax([ln4, ln2, 0]) = [4, 2, 1] / 7; top-2 = experts 0, 1; renormalised [2/3, 1/3].
    r = identity_router(3, 2, renormalize=True)
    out = r(t64([[math.log(4), math.log(2), 0.0]]))
    assert out.indices.tolist() == [[0, 1]]
    assert_close(out.scores, t64([[4 / 7, 2 / 7, 1 / 7]]), torch.float64)
    assert_close(out.weights, t64([[2 / 3, 1 / 3]]), torch.float64)
    # Without renormalisation the weights are the softmax probabilities themselves (Qwen2-MoE).
    r.renormalize = False
    assert_close(r(t64([[math.log(4), math.log(2), 0.0]])).weights, t64([[4 / 7, 2 / 7]]), torch.float64)


def test_sigmoid_top2_and_scaling_by_hand():
    # sigmoid([0, ln3, -ln3]) = [1/2, 3/4, 1/4]; top-2 = experts 1, 0; renormalised [0.6, 0.4].
    r = identity_router(3, 2, score="sigmoid", renormalize=True, scaling_factor=2.5)
    out = r(t64([[0.0, LN3, -LN3]]))
    assert out.indices.tolist() == [[1, 0]]
    assert_close(out.scores, t64([[0.5, 0.75, 0.25]]), torch.float64)
    assert_close(out.weights, t64([[0.6 * 2.5, 0.4 * 2.5]]), torch.float64)


def test_expert_bias_steers_selection_not_weights():
    # scores [1/2, 3/4, 1/4]; bias [0, -1, 1] -> selection [1/2, -1/4, 5/4] picks experts 2, 0,
    # but their weights are the unbiased scores [1/4, 1/2], renormalised to [1/3, 2/3].
    r = identity_router(3, 2, score="sigmoid", renormalize=True, expert_bias=True)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    out = r(t64([[0.0, LN3, -LN3]]))
    assert out.indices.tolist() == [[2, 0]]
    assert_close(out.weights, t64([[1 / 3, 2 / 3]]), torch.float64)
    # The bias is a buffer: saved with the model, never trained.
    assert "expert_bias" in dict(r.named_buffers()) and "expert_bias" not in dict(r.named_parameters())


def test_update_expert_bias_sign_rule():
    # loads [3, 1, 2], mean 2: over-loaded expert 0 goes down, under-loaded expert 1 goes up.
    r = identity_router(3, 1, expert_bias=True)
    r.update_expert_bias(torch.tensor([3, 1, 2]), rate=0.01)
    assert r.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0])
    with pytest.raises(ValueError, match="tokens_per_expert"):
        r.update_expert_bias(torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="expert_bias=False"):
        identity_router(3, 1).update_expert_bias(torch.tensor([3, 1, 2]))


def test_given_expert_indices_override_selection():
    # The router's own choice would be expert 1; forcing expert 2 gives it the weight 1/4
    # (no renormalisation) and the gradient still reaches the gate.
    r = identity_router(3, 1, score="sigmoid", renormalize=False)
    out = r(t64([[0.0, LN3, -LN3]]), expert_indices=torch.tensor([[2]]))
    assert out.indices.tolist() == [[2]]
    assert_close(out.weights, t64([[0.25]]), torch.float64)
    out.weights.sum().backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_top1_renormalised_weight_is_one():
    # k = 1 with renormalisation: every weight is exactly 1 (the router learns from aux losses only).
    r = identity_router(4, 1, renormalize=True)
    out = r(torch.randn(5, 4, dtype=torch.float64))
    assert torch.equal(out.weights, torch.ones(5, 1, dtype=torch.float64))


def test_k_equals_e_selects_every_expert():
    r = identity_router(4, 4, renormalize=False)
    x = torch.randn(6, 4, dtype=torch.float64)
    out = r(x)
    assert torch.equal(out.indices.sort(dim=1).values, torch.arange(4).expand(6, 4))
    assert_close(out.weights.sum(1), torch.ones(6, dtype=torch.float64), torch.float64)


# -- jitter ------------------------------------------------------------------------------

def test_jitter_only_in_training():
    r = identity_router(4, 2, jitter_noise=0.1)
    x = torch.ones(64, 4, dtype=torch.float64)
    r.eval()
    assert torch.equal(r(x).logits, x)  # eval: no noise at all
    r.train()
    torch.manual_seed(0)
    logits = r(x).logits.detach()
    assert not torch.equal(logits, x)
    # Multiplicative U(0.9, 1.1) noise on the router input.
    assert float(logits.min()) >= 0.9 and float(logits.max()) <= 1.1


def _ks_uniform(u: torch.Tensor, lo: float, hi: float) -> float:
    """Kolmogorov-Smirnov distance between the samples ``u`` and U(lo, hi)."""
    v = torch.sort(((u - lo) / (hi - lo)).reshape(-1)).values
    n = v.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - v, v - (i - 1) / n).max())


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_jitter_noise_distribution(eps):
    # The router's input is multiplied elementwise by independent U(1 - eps, 1 + eps) noise
    # (Switch Transformer). An invertible gate W recovers the jittered input from the logits
    # (x * noise = logits W^-T) and so the noise; x has mixed signs and magnitudes, so noise
    # that is additive, applied to the logits, or drawn from another distribution does not
    # reproduce this ratio. Fixed seed: a deterministic test.
    # Mutations caught: normal noise N(1, eps) (bounds, KS); U(1 - eps/2, 1 + eps/2) or
    # U(1, 1 + eps) (extremes, mean, spread, KS); additive U(-eps, eps) noise or noise on the
    # logits (the recovered ratio is not uniform: KS); one noise value per token shared by
    # its H features (correlation); no jitter in training (spread).
    e = h = 8
    n = 4096
    r = Router(h, e, 2, jitter_noise=eps, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        r.weight.copy_(torch.eye(e, dtype=torch.float64) + 0.3 * torch.randn(e, h, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(n, h, generator=g) < 0.5, -1.0, 1.0).double()
    x = sign * (0.5 + 2.0 * torch.rand(n, h, generator=g, dtype=torch.float64))
    r.train()
    torch.manual_seed(0)
    logits = r(x).logits.detach()
    noise = torch.linalg.solve(r.weight.detach(), logits.t()).t() / x  # x*noise = logits @ W^-T
    samples = noise.numel()
    lo, hi = 1.0 - eps, 1.0 + eps
    slack = 1e-9  # the solve's rounding
    assert float(noise.min()) >= lo - slack and float(noise.max()) <= hi + slack
    # 32768 draws: the extremes sit within ~(2 eps) * 10 / n of the ends (probability e^-10 otherwise).
    assert float(noise.min()) < lo + 2 * eps * 1e-3 and float(noise.max()) > hi - 2 * eps * 1e-3
    sd = 2 * eps / 12 ** 0.5  # standard deviation of U(lo, hi)
    assert abs(float(noise.mean()) - 1.0) < 5 * sd / samples ** 0.5
    assert abs(float(noise.std()) / sd - 1.0) < 0.02  # the spread's own sd is ~0.5% here
    # Kolmogorov-Smirnov: 1.95 / sqrt(n) is the 0.1% critical value.
    assert _ks_uniform(noise, lo, hi) < 1.95 / samples ** 0.5
    # Independent per element: neighbouring features of a token are uncorrelated.
    c = torch.corrcoef(torch.stack([noise[:, 0], noise[:, 1]]))[0, 1]
    assert abs(float(c)) < 5 / n ** 0.5


def test_no_jitter_means_deterministic_in_training():
    r = identity_router(4, 2)
    r.train()
    x = torch.randn(8, 4, dtype=torch.float64)
    assert torch.equal(r(x).logits, r(x).logits)


# -- losses --------------------------------------------------------------------------------

def test_load_balancing_loss_by_hand():
    # Two tokens, softmax([ln3, 0]) = [3/4, 1/4] and [1/4, 3/4], top-1 -> experts 0 and 1:
    # f = [1/2, 1/2], P = [1/2, 1/2], L = 2 * (1/4 + 1/4) = 1 (balanced).
    r = identity_router(2, 1, load_balancing_coef=0.5, z_loss_coef=0.0)
    out = r(t64([[LN3, 0.0], [0.0, LN3]]))
    assert_close(out.load_balancing_loss, torch.tensor(1.0, dtype=torch.float64), torch.float64)
    assert_close(out.aux_loss, torch.tensor(0.5, dtype=torch.float64), torch.float64)
    # Both tokens prefer expert 0: f = [1, 0], P = [3/4, 1/4], L = 2 * 3/4 = 1.5.
    out = r(t64([[LN3, 0.0], [LN3, 0.0]]))
    assert_close(out.load_balancing_loss, torch.tensor(1.5, dtype=torch.float64), torch.float64)


def test_load_balancing_loss_top2_by_hand():
    # E = 3, k = 2, one token: softmax([ln4, ln2, 0]) = [4,2,1]/7, slots to experts 0 and 1:
    # f = [1/2, 1/2, 0], P = [4/7, 2/7, 1/7], L = 3 * (2/7 + 1/7) = 9/7.
    scores = t64([[4 / 7, 2 / 7, 1 / 7]])
    got = load_balancing_loss(scores, torch.tensor([[0, 1]]), 3)
    assert_close(got, torch.tensor(9 / 7, dtype=torch.float64), torch.float64)


def test_z_loss_by_hand():
    # logsumexp([ln3, 0]) = ln 4 and logsumexp([0, 0]) = ln 2: z = ((ln4)^2 + (ln2)^2) / 2.
    got = z_loss(t64([[LN3, 0.0], [0.0, 0.0]]))
    expected = (math.log(4) ** 2 + math.log(2) ** 2) / 2
    assert_close(got, torch.tensor(expected, dtype=torch.float64), torch.float64)
    r = identity_router(2, 1, z_loss_coef=1e-3)
    out = r(t64([[LN3, 0.0], [0.0, 0.0]]))
    assert_close(out.z_loss, torch.tensor(expected, dtype=torch.float64), torch.float64)
    assert_close(out.aux_loss, torch.tensor(1e-3 * expected, dtype=torch.float64), torch.float64)


def test_zero_tokens_give_zero_losses():
    r = Router(8, 4, 2, load_balancing_coef=1.0, z_loss_coef=1.0)
    out = r(torch.zeros(0, 8))
    assert out.weights.shape == (0, 2) and out.indices.shape == (0, 2)
    assert float(out.aux_loss.detach()) == 0.0
    out.aux_loss.backward()  # still part of the graph
    assert r.weight.grad is not None and float(r.weight.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("score,renormalize", [("softmax", True), ("softmax", False), ("sigmoid", True)])
@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (8, 2), (64, 8)])
def test_router_matches_reference_with_gradients(score, renormalize, num_experts, top_k):
    """Random float64 case: every output and the gradient of (weights, aux_loss) to the gate."""
    torch.manual_seed(num_experts * 10 + top_k)
    hidden = 16
    r = Router(hidden, num_experts, top_k, score=score, renormalize=renormalize, dtype=torch.float64,
               load_balancing_coef=0.01, z_loss_coef=0.001, expert_bias=(score == "sigmoid"))
    if r.expert_bias is not None:
        with torch.no_grad():
            r.expert_bias.copy_(torch.randn(num_experts) * 0.1)
    x = torch.randn(32, hidden, dtype=torch.float64, requires_grad=True)
    out = r(x)
    g = torch.randn_like(out.weights)
    ((out.weights * g).sum() + out.aux_loss).backward()

    w = r.weight.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    logits = xr @ w.t()
    weights, indices, scores = reference.router_reference(logits, top_k, score=score, renormalize=renormalize,
                                                          expert_bias=r.expert_bias)
    lb = reference.load_balancing_loss_reference(scores, indices, num_experts)
    z = reference.z_loss_reference(logits)
    ((weights * g).sum() + 0.01 * lb + 0.001 * z).backward()

    assert torch.equal(out.indices, indices)
    assert_close(out.logits, logits, torch.float64)
    assert_close(out.scores, scores, torch.float64)
    assert_close(out.weights, weights, torch.float64)
    assert_close(out.load_balancing_loss, lb, torch.float64)
    assert_close(out.z_loss, z, torch.float64)
    assert_close(r.weight.grad, w.grad, torch.float64, msg="d router weight")
    assert_close(x.grad, xr.grad, torch.float64, msg="d x")


def test_float32_router_computes_in_float32_for_half_inputs():
    # bf16 tokens: logits, scores and weights come back in float32 (never rounded to bf16).
    r = Router(8, 4, 2, dtype=torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    out = r(x)
    assert out.logits.dtype == torch.float32 and out.scores.dtype == torch.float32
    assert out.weights.dtype == torch.float32
    # ... and their values are the fp32 ones: a bf16 rounding on the way (~4e-3 relative)
    # would fail the fp32 tolerance against the float64 reference of the rounded inputs.
    weights, _, scores = reference.router_reference(x.double() @ r.weight.detach().double().t(), 2,
                                                    expert_indices=out.indices)
    assert_close(out.logits, x.double() @ r.weight.detach().double().t(), torch.float32, msg="logits")
    assert_close(out.scores, scores, torch.float32, msg="scores")
    assert_close(out.weights, weights, torch.float32, msg="weights")


# -- errors and module plumbing -------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    pytest.param(dict(top_k=5), ValueError, "top_k", id="k-above-E"),
    pytest.param(dict(top_k=0), ValueError, "top_k", id="k-zero"),
    pytest.param(dict(score="relu"), ValueError, "score", id="bad-score"),
    pytest.param(dict(jitter_noise=-0.1), ValueError, "jitter_noise", id="negative-jitter"),
    pytest.param(dict(jitter_noise=1.0), ValueError, "jitter_noise", id="jitter-one"),
    pytest.param(dict(load_balancing_coef=float("nan")), ValueError, "load_balancing_coef", id="nan-coef"),
    pytest.param(dict(top_k=2.0), TypeError, "top_k", id="float-k"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    args = dict(hidden_size=8, num_experts=4, top_k=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        Router(**args)


def test_bad_forward_arguments():
    r = Router(8, 4, 2)
    with pytest.raises(ValueError, match=r"\[T, 8\]"):
        r(torch.randn(3, 7))
    with pytest.raises(TypeError, match="float64"):
        r(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="expert_indices must be"):
        r(torch.randn(3, 8), expert_indices=torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        r(torch.randn(3, 8), expert_indices=torch.full((3, 2), 4))
    with pytest.raises(TypeError, match="int32 or int64"):
        r(torch.randn(3, 8), expert_indices=torch.zeros(3, 2))


def test_reset_parameters_and_repr():
    r = Router(64, 8, 2, expert_bias=True, jitter_noise=0.01, load_balancing_coef=0.01)
    bound = 1 / math.sqrt(64)  # nn.Linear's init range
    assert float(r.weight.detach().abs().max()) <= bound
    with torch.no_grad():
        r.expert_bias.fill_(3.0)
    r.reset_parameters()
    assert float(r.expert_bias.abs().max()) == 0.0
    text = repr(r)
    assert "num_experts=8" in text and "top_k=2" in text and "expert_bias=True" in text
