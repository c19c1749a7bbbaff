"""The "blocksparse_moe" experts implementation for 🤗 transformers.

What the references are: transformers' own implementations. Real model families run
``set_experts_implementation("blocksparse_moe")`` against ``"eager"`` (the per-expert loop
each model ships); the flag matrix (transposed, biases, custom/interleaved gates, no gate,
post-expert norm, padded F, expert-parallel sentinels) runs against transformers'
``"batched_mm"``, its generic implementation of every flag. Tiny random models are built
from configs: nothing is downloaded.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from transformers import (AutoModelForCausalLM, GptOssConfig, MixtralConfig, OlmoeConfig,  # noqa: E402
                          Qwen2MoeConfig, Qwen3MoeConfig)
from transformers.activations import ACT2FN  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation  # noqa: E402

from blocksparse_moe import backend  # noqa: E402
from blocksparse_moe.integrations import transformers as bsm_tf  # noqa: E402
from tolerances import assert_close  # noqa: E402

NAME = bsm_tf.IMPLEMENTATION_NAME

_COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=4096, pad_token_id=None, bos_token_id=None, eos_token_id=None)

# Each family with the smallest config that keeps its shape of experts. F = 48 (Qwen3) has
# block 16, F = 32 block 32.
FAMILIES = {
    "mixtral": (MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    "qwen2_moe": (Qwen2MoeConfig, dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=32, intermediate_size=32)),
    "qwen3_moe": (Qwen3MoeConfig, dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48,
                                       norm_topk_prob=True)),
    "olmoe": (OlmoeConfig, dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32)),
    # Transposed, interleaved gate/up, biases and a clamped custom gate; a low swiglu_limit
    # so the clamps actually cut values.
    "gpt_oss": (GptOssConfig, dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=8,
                                   swiglu_limit=1.5)),
}


def _randomize(module: torch.nn.Module) -> None:
    """O(1) activations: weights ~ N(0, 1/fan_in) (fan_in = last dim), biases ~ N(0, 0.1^2).

    transformers' default init (std 0.02, zero biases) makes the experts' share of the
    output so small that a wrong expert would still pass the tolerance.
    """
    for name, p in module.named_parameters():
        if "norm" in name:
            continue
        with torch.no_grad():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
            else:
                p.normal_(0.0, 0.1)


def _tiny_model(family: str, dtype: torch.dtype, seed: int = 0):
    cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cls(**_COMMON, **kw)).to(dtype)
    _randomize(model)
    return model


def _model_pass(model, implementation: str, embeds: torch.Tensor, probe: torch.Tensor):
    """Logits, grad of the input embeddings and of every parameter, for one implementation."""
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    x = embeds.detach().clone().requires_grad_(True)
    logits = model(inputs_embeds=x).logits
    (logits * probe).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), x.grad.detach(), grads


# ----------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------

def test_register_is_idempotent_and_selectable():
    bsm_tf.register()
    bsm_tf.register()
    assert ALL_EXPERTS_FUNCTIONS[NAME] is bsm_tf.blocksparse_experts_forward
    model = _tiny_model("mixtral", torch.float32)
    model.set_experts_implementation(NAME)
    assert model.config._experts_implementation == NAME
    assert all(m.config._experts_implementation == NAME for m in model.modules() if hasattr(m, "has_gate"))


def test_pick_block_size():
    assert bsm_tf.pick_block_size(14336) == (128, 14336)  # Mixtral
    assert bsm_tf.pick_block_size(2880) == (64, 2880)  # GPT-OSS
    assert bsm_tf.pick_block_size(48) == (16, 48)
    assert bsm_tf.pick_block_size(96, max_block_size=16) == (16, 96)
    assert bsm_tf.pick_block_size(24) == (16, 32)  # no block divides 24: padded
    with pytest.raises(ValueError, match="intermediate size"):
        bsm_tf.pick_block_size(0)
    with pytest.raises(ValueError, match="max_block_size"):
        bsm_tf.pick_block_size(64, max_block_size=8)


# ----------------------------------------------------------------------------------------
# Whole models: blocksparse_moe vs eager, outputs and gradients (CPU path)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_matches_eager(family, dtype):
    model = _tiny_model(family, dtype)
    torch.manual_seed(1)
    # 2 x 13 tokens: T*k is not a multiple of any block size.
    embeds = torch.randn(2, 13, _COMMON["hidden_size"], dtype=dtype)
    probe = torch.randn(2, 13, _COMMON["vocab_size"], dtype=dtype)
    with backend.prefer_on_cpu("cpu"):
        ref = _model_pass(model, "eager", embeds, probe)
        out = _model_pass(model, NAME, embeds, probe)
    assert_close(out[0], ref[0], dtype, "layer", msg=f"{family} logits")
    assert_close(out[1], ref[1], dtype, "layer", msg=f"{family} d inputs_embeds")
    assert out[2].keys() == ref[2].keys()
    expert_grads = [n for n in ref[2] if ".experts." in n]
    assert expert_grads, "no expert weight got a gradient"
    for n in ref[2]:
        assert_close(out[2][n], ref[2][n], dtype, "layer", msg=f"{family} grad {n}")
    # The experts must matter, or the comparison above proves nothing.
    assert all(ref[2][n].abs().max() > 1e-2 for n in expert_grads)


def test_model_matches_eager_interpreter():
    """One family end to end through the Triton kernels (interpreted on CPU, real on GPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _tiny_model("gpt_oss", torch.float32).to(device)
    torch.manual_seed(2)
    embeds = torch.randn(1, 9, _COMMON["hidden_size"], device=device)
    probe = torch.randn(1, 9, _COMMON["vocab_size"], device=device)
    with backend.prefer_on_cpu("interpreter"):
        ref = _model_pass(model, "eager", embeds, probe)
        out = _model_pass(model, NAME, embeds, probe)
    assert_close(out[0], ref[0], torch.float32, "layer", msg="logits")
    assert_close(out[1], ref[1], torch.float32, "layer", msg="d inputs_embeds")
    for n in ref[2]:
        assert_close(out[2][n], ref[2][n], torch.float32, "layer", msg=f"grad {n}")


# ----------------------------------------------------------------------------------------
# Experts modules: routing corner cases, on the CPU path and the Triton kernels
# ----------------------------------------------------------------------------------------

def _experts_of(family: str, dtype: torch.dtype, device, **overrides):
    """The experts module of a family, built from its config, randomized."""
    cls, kw = FAMILIES[family]
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(cls(**_COMMON, **{**kw, **overrides}))
    experts = model.model.layers[0].mlp.experts.to(device=device, dtype=dtype)
    _randomize(experts)
    return experts


def _routing_case(case: str, num_tokens: int, top_k: int, num_experts: int, device):
    """``top_k_index [T, k]`` for a named corner case (distinct experts per token)."""
    g = torch.Generator().manual_seed(4)
    if case == "zero-tokens":
        return torch.zeros(0, top_k, dtype=torch.int64, device=device)
    if case == "one-expert-takes-all":
        return torch.full((num_tokens, top_k), num_experts - 1, dtype=torch.int64, device=device)
    if case == "k-equals-E":
        top_k = num_experts
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if case == "empty-expert":
        scores[:, 0] = -1.0  # expert 0 gets no token
    if case == "skewed":
        scores[:, 1] += 0.6  # most tokens pick expert 1
    return scores.topk(top_k, dim=1).indices.to(device)


def _experts_pass(experts, implementation: str, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
    experts.config._experts_implementation = implementation
    for p in experts.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = experts(x, idx, w)
    probe = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    if out.requires_grad:  # eager's output for zero tokens is a constant
        (out * probe).sum().backward()
    dx = torch.zeros_like(x) if x.grad is None else x.grad.detach()
    dw = torch.zeros_like(w) if w.grad is None else w.grad.detach()
    # No token reaching any expert leaves eager's expert grads None: the same as zeros.
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
             for n, p in experts.named_parameters()}
    return out.detach(), dx, dw, grads


def _compare_experts(experts, reference: str, idx, dtype, device, msg=""):
    torch.manual_seed(5)
    t = idx.shape[0]
    hidden = experts.down_proj.shape[2] if experts.is_transposed else experts.down_proj.shape[1]
    x = torch.randn(t, hidden, dtype=dtype, device=device)
    w = torch.rand(idx.shape, dtype=dtype, device=device) + 0.1
    ref = _experts_pass(experts, reference, x, idx, w)
    out = _experts_pass(experts, NAME, x, idx, w)
    for name, a, e in (("out", out[0], ref[0]), ("dx", out[1], ref[1]), ("dw", out[2], ref[2])):
        assert_close(a, e, dtype, "layer", msg=f"{msg} {name}")
    for n in ref[3]:
        assert_close(out[3][n], ref[3][n], dtype, "layer", msg=f"{msg} grad {n}")
    return ref, out


CASES = ["uneven", "empty-expert", "skewed", "one-expert-takes-all", "k-equals-E", "zero-tokens"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_experts_routing_cases(family, case, path):
    dtype = torch.float32
    experts = _experts_of(family, dtype, path)
    idx = _routing_case(case, 7, 2, experts.num_experts, path)  # 7 tokens: T*k not a block multiple
    _compare_experts(experts, "eager", idx, dtype, path, msg=f"{family}/{case}")


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_experts_unpadded_inner_width(family):
    """F = 24: no block size divides it; F is zero-padded to 32 (block 16) and stays exact."""
    with backend.prefer_on_cpu("cpu"):
        experts = _experts_of(family, torch.float64, "cpu", intermediate_size=24)
        idx = _routing_case("uneven", 11, 2, experts.num_experts, "cpu")
        _compare_experts(experts, "eager", idx, torch.float64, "cpu", msg=family)


def test_experts_block_size_cap():
    """A module may cap the block size (less padding for few tokens per expert)."""
    with backend.prefer_on_cpu("cpu"):
        experts = _experts_of("mixtral", torch.float64, "cpu", intermediate_size=64)
        experts.blocksparse_moe_max_block_size = 16
        idx = _routing_case("uneven", 9, 2, experts.num_experts, "cpu")
        _compare_experts(experts, "eager", idx, torch.float64, "cpu", msg="cap 16")


def test_experts_expert_parallel_sentinels(path):
    """Under expert parallelism ids >= num_experts (and -1) are other ranks' experts: zero.

    eager skips id == num_experts; -1 must behave the same. Sentinel slots carry non-zero
    weights here, so a leak would show in the output and in their weight gradients.
    """
    dtype = torch.float32
    experts = _experts_of("mixtral", dtype, path)
    experts._is_expert_parallel = True
    e = experts.num_experts
    idx = _routing_case("uneven", 9, 2, e, path)
    idx[0, 0], idx[3, 1], idx[5] = e, e, e  # token 5 entirely elsewhere
    idx_minus = idx.clone()
    idx_minus[3, 1] = -1
    ref, out = _compare_experts(experts, "eager", idx, dtype, path, msg="sentinel E")
    assert torch.all(out[2][idx == e] == 0), "a sentinel slot's routing weight got a gradient"
    assert torch.all(out[0][5] == 0)
    # -1 as the sentinel: same result as num_experts (compare with eager on the E form).
    torch.manual_seed(5)
    x = torch.randn(9, experts.down_proj.shape[1], dtype=dtype, device=path)
    w = torch.rand(idx.shape, dtype=dtype, device=path) + 0.1
    a = _experts_pass(experts, NAME, x, idx_minus, w)
    b = _experts_pass(experts, "eager", x, idx, w)
    assert_close(a[0], b[0], dtype, "layer", msg="sentinel -1 out")
    assert_close(a[1], b[1], dtype, "layer", msg="sentinel -1 dx")


def test_experts_out_of_range_without_expert_parallel():
    experts = _experts_of("mixtral", torch.float32, "cpu")
    experts.config._experts_implementation = NAME
    idx = torch.tensor([[0, experts.num_experts]])
    with backend.prefer_on_cpu("cpu"), pytest.raises(ValueError, match="expert_indices"):
        experts(torch.randn(1, 32), idx, torch.ones(1, 2))


# ----------------------------------------------------------------------------------------
# The flag matrix, against transformers' batched_mm
# ----------------------------------------------------------------------------------------

class _RowSoftmaxGate:
    """A gate that is not column-wise: it mixes all F columns of a row (softmax)."""

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.softmax(gate, dim=-1) * up * gate.shape[-1] ** 0.5


class _InterleavedGate:
    """GPT-OSS-style: gate at even columns, up at odd ones."""

    def _apply_gate(self, gate_up):
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        return torch.nn.functional.silu(gate.clamp(max=1.0)) * (up + 1)


def _toy_experts(*, gate: str, transposed: bool, bias: bool, post_norm: bool, ffn: int, hidden=32, num_experts=5):
    """An experts module with the given flags (weights only; batched_mm is its reference)."""
    bases = {"default": (), "row-softmax": (_RowSoftmaxGate,), "interleaved": (_InterleavedGate,), "none": ()}[gate]

    class Toy(*bases, torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = num_experts
            self.act_fn = ACT2FN["gelu"]
            w = (2 if gate != "none" else 1) * ffn
            name = "gate_up_proj" if gate != "none" else "up_proj"
            shape_in = (num_experts, hidden, w) if transposed else (num_experts, w, hidden)
            shape_out = (num_experts, ffn, hidden) if transposed else (num_experts, hidden, ffn)
            setattr(self, name, torch.nn.Parameter(torch.randn(shape_in) / math.sqrt(shape_in[-1])))
            self.down_proj = torch.nn.Parameter(torch.randn(shape_out) / math.sqrt(shape_out[-1]))
            if bias:
                setattr(self, name + "_bias", torch.nn.Parameter(0.3 * torch.randn(num_experts, w)))
                self.down_proj_bias = torch.nn.Parameter(0.3 * torch.randn(num_experts, hidden))
            if post_norm:
                self.post_expert_norm = torch.nn.LayerNorm(hidden)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise NotImplementedError("the toy experts run only through the ExpertsInterface")

    cls = use_experts_implementation(Toy, is_transposed=transposed, has_bias=bias, has_gate=gate != "none",
                                     is_concatenated=gate != "interleaved", has_post_expert_norm=post_norm)
    torch.manual_seed(6)
    return cls(SimpleNamespace(_experts_implementation="batched_mm"))


FLAGS = [
    pytest.param(dict(gate="default", transposed=True, bias=True, post_norm=False, ffn=32), id="transposed-bias"),
    pytest.param(dict(gate="row-softmax", transposed=False, bias=True, post_norm=False, ffn=32),
                 id="row-mixing-custom-gate-bias"),
    pytest.param(dict(gate="interleaved", transposed=False, bias=False, post_norm=False, ffn=16),
                 id="interleaved-gate-not-transposed"),
    pytest.param(dict(gate="interleaved", transposed=True, bias=True, post_norm=False, ffn=20),
                 id="interleaved-gate-padded-F"),
    pytest.param(dict(gate="row-softmax", transposed=True, bias=False, post_norm=False, ffn=20),
                 id="custom-gate-padded-F"),
    pytest.param(dict(gate="none", transposed=False, bias=True, post_norm=False, ffn=32), id="no-gate-bias"),
    pytest.param(dict(gate="none", transposed=True, bias=False, post_norm=False, ffn=40), id="no-gate-padded-F"),
    pytest.param(dict(gate="default", transposed=False, bias=False, post_norm=True, ffn=16), id="post-expert-norm"),
]


@pytest.mark.parametrize("flags", FLAGS)
def test_experts_flags_match_batched_mm(flags):
    with backend.prefer_on_cpu("cpu"):
        experts = _toy_experts(**flags).double()
        idx = _routing_case("empty-expert", 10, 3, experts.num_experts, "cpu")
        _compare_experts(experts, "batched_mm", idx, torch.float64, "cpu", msg=str(flags))


@pytest.mark.parametrize("flags", [FLAGS[1], FLAGS[3]])
def test_experts_flags_match_batched_mm_triton(flags, path):
    experts = _toy_experts(**flags).to(path)
    idx = _routing_case("uneven", 6, 2, experts.num_experts, path)
    _compare_experts(experts, "batched_mm", idx, torch.float32, path, msg=str(flags))


def test_no_gate_family_module():
    """A real has_gate=False experts class (NemotronH: up_proj, relu2) against its eager loop."""
    modeling = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    NemotronHExperts = modeling.NemotronHExperts

    cfg = SimpleNamespace(n_routed_experts=6, hidden_size=32, moe_intermediate_size=48, moe_latent_size=None,
                          mlp_hidden_act="relu2", _experts_implementation="eager")
    torch.manual_seed(7)
    experts = NemotronHExperts(cfg).double()
    assert experts.has_gate is False
    _randomize(experts)
    with backend.prefer_on_cpu("cpu"):
        idx = _routing_case("skewed", 12, 2, 6, "cpu")
        _compare_experts(experts, "eager", idx, torch.float64, "cpu", msg="nemotron_h")


# ----------------------------------------------------------------------------------------
# No expert weight is copied per call: both products read the module's weights in place
# ----------------------------------------------------------------------------------------

class _AllocationSpy(TorchDispatchMode):
    """Records every op whose output is a *new* tensor (no storage shared with an input)
    of at least ``threshold`` elements: a copy of a weight would be one."""

    def __init__(self, threshold: int):
        super().__init__()
        self.threshold = threshold
        self.large = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.numel() >= self.threshold
                    and t.untyped_storage().data_ptr() not in inputs):
                self.large.append(f"{func} -> {tuple(t.shape)}")
        return out


@pytest.mark.parametrize("transposed", [False, True], ids=["E-W-H-down-E-H-F", "E-H-W-down-E-F-H"])
def test_experts_read_weights_in_place(path, monkeypatch, transposed):
    """Mixtral/Qwen/OLMoE's layout (down_proj [E, H, F]) and GPT-OSS's (gate_up_proj
    [E, H, 2F]) have no strided 2-D view for one of the two products; they reach the
    launchers as grouped 3-D views of the parameters, and the forward allocates nothing as
    large as a weight. (H = F = 64, 8 experts and blocks of 16 keep every activation below
    the size of down_proj.)"""
    import blocksparse_moe.ops.experts as experts_op

    experts = _toy_experts(gate="default", transposed=transposed, bias=False, post_norm=False, ffn=64, hidden=64,
                           num_experts=8).to(path)
    experts.blocksparse_moe_max_block_size = 16
    experts.config._experts_implementation = NAME
    launched = []
    real = experts_op._forward

    def spy(x, ids, weights, w1, w2, *args):
        launched.append(("w1", w1))
        launched.append(("w2", w2))
        return real(x, ids, weights, w1, w2, *args)

    monkeypatch.setattr(experts_op, "_forward", spy)
    idx = _routing_case("uneven", 6, 2, 8, path)
    x = torch.randn(6, 64, device=path)
    w = torch.rand(6, 2, device=path)
    spy_mode = _AllocationSpy(min(experts.gate_up_proj.numel(), experts.down_proj.numel()))
    with torch.no_grad(), spy_mode:
        out = experts(x, idx, w)
    assert spy_mode.large == [], f"the forward allocated weight-sized tensors: {spy_mode.large}"
    # Same values as transformers' own implementation: the views are the right ones.
    experts.config._experts_implementation = "batched_mm"
    with torch.no_grad():
        assert_close(out, experts(x, idx, w), torch.float32, "layer", msg="in-place weights")
    weights = {"w1": experts.gate_up_proj, "w2": experts.down_proj}
    assert [n for n, _ in launched] == ["w1", "w2"]
    for name, b in launched:
        assert b.dim() == 3, f"{name} got a 2-D (copied) weight {tuple(b.shape)}"
        assert b.untyped_storage().data_ptr() == weights[name].untyped_storage().data_ptr(), \
            f"{name} got a copy of the weight"


# ----------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): the experts (and a whole tiny model) in one graph
# ----------------------------------------------------------------------------------------

def _compiled_vs_eager(fn_eager, fn_compiled, inputs, params):
    """Outputs and gradients (inputs that require grad, then ``params``) of both callables."""
    results = []
    for fn in (fn_eager, fn_compiled):
        for p in params:
            p.grad = None
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves)
        probe = torch.linspace(-1.0, 1.0, out.numel(), device=out.device).view_as(out)
        (out * probe).sum().backward()
        grads = [t.grad for t in leaves if t.is_floating_point()] + [
            torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        results.append((out.detach(), grads))
    return results


@pytest.mark.parametrize("family, expert_parallel", [("mixtral", False), ("gpt_oss", False), ("mixtral", True)],
                         ids=["mixtral", "gpt_oss-transposed-bias-custom-gate", "mixtral-expert-parallel"])
def test_compiled_experts_match_eager(family, expert_parallel):
    """``torch.compile(experts, fullgraph=True)``: one graph (no host read breaks it; P is
    an unbacked size), and the eager results and gradients."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    with backend.prefer_on_cpu("cpu"):
        experts = _experts_of(family, torch.float32, "cpu")
        experts.config._experts_implementation = NAME
        e = experts.num_experts
        idx = _routing_case("empty-expert", 9, 2, e, "cpu")
        if expert_parallel:
            experts._is_expert_parallel = True
            idx[0, 0], idx[4] = e, e  # other ranks' experts
        torch.manual_seed(8)
        x, w = torch.randn(9, _COMMON["hidden_size"]), torch.rand(9, 2) + 0.1
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(experts, fullgraph=True, backend=counter)
        params = list(experts.parameters())
        (out_e, grads_e), (out_c, grads_c) = _compiled_vs_eager(lambda x, w: experts(x, idx, w),
                                                                lambda x, w: compiled(x, idx, w), [x, w], params)
    torch._dynamo.reset()
    assert counter.frame_count == 1
    assert_close(out_c, out_e, torch.float32, "layer", msg=f"{family} compiled out")
    for i, (a, b) in enumerate(zip(grads_c, grads_e)):
        assert_close(a, b, torch.float32, "layer", msg=f"{family} compiled grad {i}")


def test_compiled_model_matches_eager():
    """A whole tiny Mixtral under fullgraph: transformers' own code traces as well."""
    import torch._dynamo

    torch._dynamo.reset()
    with backend.prefer_on_cpu("cpu"):
        model = _tiny_model("mixtral", torch.float32)
        model.set_experts_implementation(NAME)
        torch.manual_seed(9)
        embeds = torch.randn(1, 9, _COMMON["hidden_size"])
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        params = [p for p in model.parameters() if p.requires_grad]
        (out_e, grads_e), (out_c, grads_c) = _compiled_vs_eager(lambda x: model(inputs_embeds=x).logits,
                                                                lambda x: compiled(inputs_embeds=x).logits,
                                                                [embeds], params)
    torch._dynamo.reset()
    assert_close(out_c, out_e, torch.float32, "layer", msg="compiled logits")
    for i, (a, b) in enumerate(zip(grads_c, grads_e)):
        assert_close(a, b, torch.float32, "layer", msg=f"compiled model grad {i}")
