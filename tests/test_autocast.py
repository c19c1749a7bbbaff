"""Mixed precision: an fp32 layer under ``torch.autocast`` (issue 12).

What autocast promises here (MegaBlocks' behaviour): the experts (and the shared expert)
run in the autocast dtype with the fp32 parameters cast once per call, gradients reach the
fp32 parameters in fp32, the router stays fp32, and the output is in the autocast dtype.

The reference is ``reference.py`` in float64 on exactly what the layer computes with: the
expert weights and x rounded to the autocast dtype, the router on the fp32 values. Rounding
is applied with a straight-through trick (the value rounded, the gradient passed as is),
which is what the cast's gradient is. Tolerances: the table's "layer" entry of the
autocast dtype. CPU bf16 runs everywhere; CUDA fp16/bf16 with ``-m gpu``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from blocksparse_moe import DroplessMoE, backend, reference
from tolerances import assert_close

CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
]


def _rounded(t, dtype):
    """``t`` rounded to ``dtype`` (kept in t's dtype), gradient passed straight through."""
    return None if t is None else t + (t.to(dtype).to(t.dtype) - t).detach()


@pytest.fixture
def cpu_path():
    with backend.prefer_on_cpu("cpu"):
        yield


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shared", [False, True], ids=["experts", "shared-expert"])
def test_layer_under_autocast(cpu_path, device, dtype, shared):
    torch.manual_seed(0)
    kw = dict(shared_expert_size=32, shared_expert_gate=True) if shared else {}
    m = DroplessMoE(32, 32, 4, 2, block_size=16, bias=True, load_balancing_coef=0.01, z_loss_coef=1e-3,
                    device=device, **kw)
    x = torch.randn(2, 9, 32, device=device, requires_grad=True)  # leading dims are flattened
    with torch.autocast(device, dtype=dtype):
        out, aux = m(x)
    assert out.dtype == dtype, "the experts run in the autocast dtype"
    assert aux.router_logits.dtype == torch.float32 and aux.expert_weights.dtype == torch.float32
    gout = torch.randn(out.shape, device=device).to(dtype)
    ((out.float() * gout.float()).sum() + aux.aux_loss).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name

    # float64 reference on what the layer computed with
    m64 = copy.deepcopy(m).double()
    x64 = x.detach().double().requires_grad_(True)
    kwr = m64.reference_weights()
    r = lambda t: _rounded(t, dtype)  # noqa: E731
    f = m.ffn_hidden_size
    x2 = x64.reshape(-1, 32)
    logits = x2 @ kwr["router_weight"].t()
    weights, indices, scores = reference.router_reference(logits, 2, expert_indices=aux.expert_indices)
    w1 = r(m64.w1)
    b1 = r(m64.b1)
    ref = reference.experts_reference(r(x2), indices, weights, w1[:, :f], r(m64.w2), w1[:, f:], b1=b1[:, :f],
                                      b2=r(m64.b2), b3=b1[:, f:], activation="silu")
    if shared:
        se = m64.shared_expert
        sw1, sb1 = r(se.w1), r(se.b1)
        s = reference.mlp_reference(r(x2), sw1[:32], r(se.w2), sw1[32:], b1=sb1[:32], b2=r(se.b2), b3=sb1[32:])
        ref = ref + s * torch.sigmoid(r(x2) @ r(m64.shared_expert_gate).t())
    lb = reference.load_balancing_loss_reference(scores, indices, 4)
    z = reference.z_loss_reference(logits)
    ((ref.reshape(out.shape) * gout.double()).sum() + 0.01 * lb + 1e-3 * z).backward()

    assert_close(out, ref.reshape(out.shape), dtype, "layer", "out")
    assert_close(x.grad, x64.grad, dtype, "layer", "dx")
    grads64 = dict(m64.named_parameters())
    for name, p in m.named_parameters():
        assert_close(p.grad, grads64[name].grad, dtype, "layer", f"d{name}")


@pytest.mark.parametrize("device,dtype", CASES)
def test_expert_dtype_inputs_accepted_under_autocast(cpu_path, device, dtype):
    # Inside an autocast region activations arrive in the autocast dtype (an earlier
    # nn.Linear's output): the fp32 layer takes them.
    torch.manual_seed(1)
    m = DroplessMoE(32, 32, 4, 2, block_size=16, device=device)
    x = torch.randn(7, 32, device=device)
    with torch.autocast(device, dtype=dtype):
        a, _ = m(x.to(dtype))
        b, _ = m(x.to(dtype).float())
    assert a.dtype == b.dtype == dtype
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="DroplessMoE: x is"):
        m(x.to(dtype))  # outside autocast a dtype mismatch is still an error


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("device,dtype", CASES)
def test_transformers_experts_under_autocast(cpu_path, device, dtype):
    from transformers import AutoModelForCausalLM, MixtralConfig

    import blocksparse_moe.integrations.transformers  # noqa: F401  (registers the implementation)

    torch.manual_seed(2)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                        pad_token_id=None, bos_token_id=None, eos_token_id=None)
    model = AutoModelForCausalLM.from_config(cfg).to(device)
    model.set_experts_implementation("blocksparse_moe")
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 1 / math.sqrt(32))
        experts.down_proj.normal_(0, 1 / math.sqrt(32))
    t, k, e, f = 12, 2, 4, 32
    x = torch.randn(t, 32, device=device, requires_grad=True)
    ids = torch.rand(t, e, device=device).topk(k, dim=-1).indices
    w = torch.softmax(torch.randn(t, k, device=device), -1).requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        out = experts(x, ids, w)
    assert out.dtype == dtype
    gout = torch.randn(out.shape, device=device).to(dtype)
    (out.float() * gout.float()).sum().backward()
    assert experts.gate_up_proj.grad.dtype == torch.float32

    gu = experts.gate_up_proj.detach().double().requires_grad_(True)
    dp = experts.down_proj.detach().double().requires_grad_(True)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    r = lambda t_: _rounded(t_, dtype)  # noqa: E731
    ref = reference.experts_reference(r(x64), ids, w64, r(gu)[:, :f], r(dp).transpose(1, 2), r(gu)[:, f:],
                                      activation="silu")
    (ref * gout.double()).sum().backward()
    assert_close(out, ref, dtype, "layer", "out")
    assert_close(x.grad, x64.grad, dtype, "layer", "dx")
    assert_close(w.grad, w64.grad, dtype, "layer", "dweights")
    assert_close(experts.gate_up_proj.grad, gu.grad, dtype, "layer", "d gate_up_proj")
    assert_close(experts.down_proj.grad, dp.grad, dtype, "layer", "d down_proj")

    # and the whole model trains under autocast
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=dtype):
        logits = model(input_ids=torch.randint(0, 64, (2, 5), device=device)).logits
    logits.float().sum().backward()
    assert torch.isfinite(experts.gate_up_proj.grad).all()
