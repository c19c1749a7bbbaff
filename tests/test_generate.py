"""Greedy ``generate()`` of tiny random transformers MoE models: the "blocksparse_moe" experts
implementation gives the same tokens as transformers' own "eager" experts (issue 17, item 7),
and a forward through it makes no host read inside the experts.

What the reference is: transformers' "eager" experts (the per-expert loop each model ships).
Greedy decoding compares argmaxes, so equal tokens over 8 steps say the two implementations
agree on every step's logits to within the gap between the top two; the decode steps run the
experts with T = batch size tokens, the serving sizes of issue 17. Weights are O(1)
(N(0, 1/fan_in)), so the experts' share of each logit is not negligible. Nothing is downloaded.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402

from blocksparse_moe import backend  # noqa: E402
from blocksparse_moe.costs import count_host_reads  # noqa: E402
from blocksparse_moe.integrations import transformers as bsm_tf  # noqa: E402

NAME = bsm_tf.IMPLEMENTATION_NAME


def _config(family: str, hidden: int, experts: int, top_k: int, ffn: int, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=None, bos_token_id=None,
                  eos_token_id=None)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, head_dim=hidden // 4, num_experts=experts, num_experts_per_tok=top_k,
                              moe_intermediate_size=ffn, intermediate_size=ffn, norm_topk_prob=True)
    return MixtralConfig(**common, num_local_experts=experts, num_experts_per_tok=top_k, intermediate_size=ffn)


def _model(family: str, hidden: int = 64, experts: int = 8, top_k: int = 2, ffn: int = 32, vocab: int = 128,
           seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, hidden, experts, top_k, ffn, vocab)).float().eval()
    for name, p in model.named_parameters():  # O(1) activations (transformers' init: std 0.02)
        if "norm" not in name:
            with torch.no_grad():
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]) if p.dim() >= 2 else 0.1)
    return model


def _generate(model, implementation: str, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    model.set_experts_implementation(implementation)
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)


# Qwen3-MoE: 8 experts, top-3 (T*k = 6 at a 2-sequence decode step, not a multiple of any
# block); Mixtral: 4 experts, top-2 (every expert hit at most steps).
_CPU_CASES = [
    pytest.param("qwen3_moe", dict(experts=8, top_k=3, ffn=48), id="qwen3_moe-E8-k3-F48-b16"),
    pytest.param("mixtral", dict(experts=4, top_k=2, ffn=64), id="mixtral-E4-k2-F64"),
]


@pytest.mark.parametrize("family, sizes", _CPU_CASES)
def test_greedy_generate_matches_eager_cpu_path(family, sizes):
    model = _model(family, **sizes)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with backend.prefer_on_cpu("cpu"):
        ref = _generate(model, "eager", prompt, 8)
        out = _generate(model, NAME, prompt, 8)
    assert ref.shape == (2, 13)
    assert torch.equal(out, ref), f"blocksparse_moe {out[:, 5:].tolist()} vs eager {ref[:, 5:].tolist()}"
    # A model that repeats one token would make the comparison weak.
    assert len(set(ref[:, 5:].flatten().tolist())) > 2


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_greedy_generate_matches_eager_interpreter(family):
    """The Triton kernels (interpreted on CPU) on a smaller case: 1 sequence, 4 new tokens."""
    model = _model(family, hidden=32, experts=4, top_k=2, ffn=32, vocab=64)
    prompt = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(2))
    with backend.prefer_on_cpu("interpreter"):
        ref = _generate(model, "eager", prompt, 4)
        out = _generate(model, NAME, prompt, 4)
    assert torch.equal(out, ref), f"blocksparse_moe {out[:, 3:].tolist()} vs eager {ref[:, 3:].tolist()}"


def test_transformers_forward_makes_no_host_read_inside_the_experts(monkeypatch):
    """Every experts call of a forward (prefill of 2 x 3 tokens and one decode step) through
    the kernels, wrapped in the host-read counter."""
    calls = []

    def counted(self, *args, **kwargs):
        with count_host_reads() as c:
            out = bsm_tf.blocksparse_experts_forward(self, *args, **kwargs)
        calls.append((c.host_reads, list(c.reads)))
        return out

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, "blocksparse_moe-counted", counted)
    model = _model("mixtral", hidden=32, experts=4, top_k=2, ffn=32, vocab=64)
    model.set_experts_implementation("blocksparse_moe-counted")
    prompt = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(3))
    with backend.prefer_on_cpu("interpreter"), torch.no_grad():
        out = model(prompt, use_cache=True)
        model(prompt[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    assert len(calls) == 2 * 2, "the wrapper did not see every layer's experts"  # 2 layers x 2 forwards
    assert all(n == 0 for n, _ in calls), calls
