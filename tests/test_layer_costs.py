"""What one training step of DroplessMoE costs (issue 11): bytes kept for backward, fresh
bytes, host reads of device data; and the CUDA-graph capture that zero host reads allow.

Units: one bf16 row of H per routed slot, ``T*k*H*2`` bytes (DESIGN.md). The unfused
MegaBlocks layer measured 4.9 kept / ~11 fresh / 3 host reads per forward at the shape
below; the fused path promises <= 2.5 / <= 7.5 / 0 on the Triton path (a GPU, and the same
code under the interpreter). The counters (``blocksparse_moe.costs``) see allocations and
torch ops, never a kernel's work, so the large shape runs with every Triton launch stubbed
out (an interpreted step there takes minutes); ``test_costs_do_not_depend_on_the_launches``
shows on a small shape that stubbing changes none of the three numbers.
"""

from __future__ import annotations

import pytest
import torch

from blocksparse_moe import DroplessMoE, backend
from blocksparse_moe.costs import count_host_reads, measure_step
from blocksparse_moe.kernels import _common


def _step_costs(tokens, hidden, ffn, experts, top_k, block_size, *, stub_launches, bias=False, glu=True, seed=0):
    torch.manual_seed(seed)
    layer = DroplessMoE(hidden, ffn, experts, top_k, block_size=block_size, bias=bias, glu=glu,
                        dtype=torch.bfloat16)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    with backend.prefer_on_cpu("interpreter"):
        if stub_launches:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(_common, "launch", lambda *args, **kwargs: None)
                costs = measure_step(lambda: layer(x)[0], exclude=[x, *layer.parameters()])
        else:
            costs = measure_step(lambda: layer(x)[0], exclude=[x, *layer.parameters()])
    unit = tokens * top_k * hidden * 2
    weight_grads = sum(p.numel() * p.element_size() for p in layer.parameters())
    return costs, unit, weight_grads


def test_costs_do_not_depend_on_the_launches():
    """Catches a measurement that would silently change when kernels are stubbed (e.g. a
    launcher that reads a kernel's output on the host)."""
    real, _, _ = _step_costs(20, 32, 32, 4, 2, 16, stub_launches=False, bias=True)
    stub, _, _ = _step_costs(20, 32, 32, 4, 2, 16, stub_launches=True, bias=True)
    assert (real.kept_bytes, real.fresh_forward_bytes, real.fresh_backward_bytes) == \
        (stub.kept_bytes, stub.fresh_forward_bytes, stub.fresh_backward_bytes)
    assert real.host_reads == stub.host_reads == 0, real.host_read_ops


@pytest.mark.parametrize("glu", [True, False], ids=["glu", "plain"])
def test_fused_layer_costs_at_the_issue_shape(glu):
    """T=256 H=256 F=128 E=16 k=4 b=32 bf16: kept <= 2.5, fresh <= 7.5 units, 0 host reads.

    Catches: a materialised permute ([P, H] copy of x: +1.5 units kept and fresh), a kept
    activation output or expert output (+0.75 / +1 unit), a float32 copy of x kept by the
    router (+0.5), a host read of P or of the expert-id range (sizes from data)."""
    costs, unit, weight_grads = _step_costs(256, 256, 128, 16, 4, 32, stub_launches=True, glu=glu)
    kept = costs.kept_bytes / unit
    fresh = (costs.fresh_bytes - weight_grads) / unit
    assert costs.host_reads_forward == 0 and costs.host_reads_backward == 0, costs.host_read_ops
    assert kept <= 2.5, f"kept for backward: {kept:.2f} units"
    assert fresh <= 7.5, f"fresh bytes: {fresh:.2f} units"


def test_caller_ids_are_checked_with_one_host_read():
    """Ids a caller passes are range-checked (one read); the router's own never are."""
    torch.manual_seed(0)
    layer = DroplessMoE(32, 32, 4, 2, block_size=16, dtype=torch.bfloat16)
    x = torch.randn(10, 32, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 4, (10, 2))
    with backend.prefer_on_cpu("interpreter"):
        given = measure_step(lambda: layer(x, ids)[0], exclude=[x, *layer.parameters()])
    assert given.host_reads_forward == 1 and given.host_reads_backward == 0, given.host_read_ops


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_captures_in_a_cuda_graph(dtype):
    """Zero host reads let forward + backward be captured and replayed; the replay matches
    eager bitwise. (CPU twin: test_fused_layer_costs_at_the_issue_shape's zero host reads
    through the same code under the interpreter.)"""
    torch.manual_seed(0)
    layer = DroplessMoE(256, 256, 8, 2, block_size=64, dtype=dtype, device="cuda")
    x = torch.randn(512, 256, dtype=dtype, device="cuda", requires_grad=True)

    def step():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        out, _ = layer(x)
        out.float().square().sum().backward()
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: autotuning and allocator pools outside the capture
            eager = step().detach().clone()
    torch.cuda.current_stream().wait_stream(stream)
    eager_grad = layer.w1.grad.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    assert torch.equal(layer.w1.grad, eager_grad)


@pytest.mark.parametrize("glu", [True, False], ids=["glu", "plain"])
def test_inference_stores_no_pre_activation(glu):
    """Under no_grad the fused path stores no h (only backward reads it): a forward allocates
    exactly T*k*G*F elements less than one that will be differentiated, and still matches."""
    torch.manual_seed(0)
    tokens, hidden, ffn, experts, k = 40, 32, 48, 4, 2
    layer = DroplessMoE(hidden, ffn, experts, k, glu=glu, dtype=torch.bfloat16)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    with backend.prefer_on_cpu("interpreter"):
        with count_host_reads() as training:
            out_train, _ = layer(x)
        with torch.no_grad(), count_host_reads() as inference:
            out_infer, _ = layer(x)
    h_bytes = tokens * k * (2 if glu else 1) * ffn * 2
    assert training.fresh_bytes - inference.fresh_bytes == h_bytes
    assert torch.equal(out_train.detach(), out_infer)
