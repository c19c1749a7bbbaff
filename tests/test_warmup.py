"""blocksparse_moe.warmup and what a CUDA-graph capture of a decode step needs (issue 17).

On a GPU (``-m gpu``): after ``warmup`` a decode step of ``DroplessMoE`` and of a transformers
experts module is captured in a CUDA graph and replayed, bitwise equal to eager. Their CPU
twins run the same step through the interpreted kernels and show what makes the capture
possible: no host read, and the same allocations (sizes and order) whatever the routing, so
nothing a step allocates depends on data.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import blocksparse_moe as bm
from blocksparse_moe import backend
from blocksparse_moe.costs import count_host_reads
from blocksparse_moe.moe import DroplessMoE
from blocksparse_moe.ops.experts import expert_mlp

transformers = pytest.importorskip("transformers")


class _Allocations(TorchDispatchMode):
    """The (op, shape, dtype) of every tensor an op returns that aliases no input."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.seen.append((func.overloadpacket.__name__, tuple(t.shape), t.dtype))
        return out


def _decode_step(layer: DroplessMoE, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    w = torch.full(ids.shape, 1.0 / ids.shape[1], dtype=x.dtype)
    return expert_mlp(x, ids, w, layer.w1, layer.w2, activation=layer.activation, glu=layer.glu,
                      block_size=layer.block_size, check_indices=False)


@pytest.mark.parametrize("tokens", [1, 3, 8], ids=lambda t: f"T{t}")
def test_decode_step_reads_nothing_and_allocates_the_same_whatever_the_routing(tokens):
    torch.manual_seed(0)
    layer = DroplessMoE(32, 64, 16, 4, dtype=torch.bfloat16)
    x = torch.randn(tokens, 32, dtype=torch.bfloat16)
    spread = torch.stack([torch.randperm(16)[:4] for _ in range(tokens)])       # distinct experts
    piled = torch.arange(4).repeat(tokens, 1)                                    # every token on experts 0-3
    runs = []
    with backend.prefer_on_cpu("interpreter"), torch.no_grad():
        for ids in (spread, piled):
            allocations = _Allocations()
            with count_host_reads() as reads, allocations:
                out = _decode_step(layer, x, ids)
            assert reads.host_reads == 0, reads.reads
            assert torch.isfinite(out.float()).all()
            runs.append(allocations.seen)
    assert runs[0] == runs[1], "an allocation's size depends on the routing"


def test_warmup_runs_every_layer_once_per_token_count(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(DroplessMoE(16, 32, 4, 2), DroplessMoE(16, 32, 8, 1, glu=False))
    module = importlib.import_module("blocksparse_moe.warmup")
    calls = []
    real = module._run

    def spy(name, layer, tokens, top_k, generator):
        calls.append((name, tokens))
        return real(name, layer, tokens, top_k, generator)

    monkeypatch.setattr(module, "_run", spy)
    with backend.prefer_on_cpu("cpu"):
        n = bm.warmup(model, [1, 5], backward=True)
    assert n == 4 and calls == [("0", 1), ("0", 5), ("1", 1), ("1", 5)]
    assert all(p.grad is None for p in model.parameters())  # backward's grads cleared


def _tiny_qwen3(**kw):
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         moe_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16, num_experts=8, num_experts_per_tok=2,
                                         decoder_sparse_step=1, mlp_only_layers=[], **kw)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_warmup_finds_transformers_experts_and_their_top_k():
    import blocksparse_moe.integrations.transformers  # noqa: F401  (registers the implementation)

    model = _tiny_qwen3()
    model.set_experts_implementation("blocksparse_moe")
    with backend.prefer_on_cpu("cpu"):
        assert bm.warmup(model, [1, 2]) == 2  # one experts module, two token counts


@pytest.mark.parametrize("counts,match", [([], "token_counts"), ([0], "token_counts"), ([2, -1], "token_counts")])
def test_warmup_rejects_bad_token_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        bm.warmup(DroplessMoE(16, 32, 4, 2), counts)


def test_warmup_rejects_a_module_without_experts():
    with pytest.raises(ValueError, match="holds no DroplessMoE"):
        bm.warmup(torch.nn.Linear(4, 4), [1])


def _capture_and_replay(fn):
    """(eager, replayed) outputs of ``fn`` captured in a CUDA graph after two warm-up runs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = fn().clone()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    graph.replay()
    torch.cuda.synchronize()
    return eager, captured


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 4, 16, 64])
def test_droplessmoe_decode_step_captures_after_warmup(tokens):
    """(CPU twin: the allocation/host-read test above, through the same code.)"""
    torch.manual_seed(0)
    layer = DroplessMoE(512, 256, 64, 8, dtype=torch.bfloat16, device="cuda")
    bm.warmup(layer, [tokens])
    x = torch.randn(tokens, 512, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        eager, captured = _capture_and_replay(lambda: layer(x)[0])
    assert torch.equal(captured, eager)


@pytest.mark.gpu
def test_transformers_experts_decode_step_captures_after_warmup():
    """(CPU twin: test_warmup_finds_transformers_experts_and_their_top_k and the zero host
    reads of tests/test_generate.py.)"""
    import blocksparse_moe.integrations.transformers as integration

    model = _tiny_qwen3().to("cuda", torch.bfloat16)
    model.set_experts_implementation("blocksparse_moe")
    bm.warmup(model, [4])
    experts = next(m for _, m in model.named_modules() if hasattr(m, "down_proj") and hasattr(m, "num_experts"))
    x = torch.randn(4, 32, dtype=torch.bfloat16, device="cuda")
    ids = torch.stack([torch.randperm(8, device="cuda")[:2] for _ in range(4)])
    w = torch.rand(4, 2, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        eager, captured = _capture_and_replay(lambda: integration.blocksparse_experts_forward(experts, x, ids, w))
    assert torch.equal(captured, eager)
