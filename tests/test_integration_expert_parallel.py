"""ExpertParallelMoE over gloo ranks on CPU == the single-rank DroplessMoE with the same weights.

Each case spawns ``W`` processes. Every rank builds the same DroplessMoE (same seed), shards
it, and runs its own batch (ranks hold different token counts, one may hold none). The
reference is the full layer run in the same process on every rank's batch, one call per
batch (so the auxiliary losses are per-batch on both sides), with the summed loss
backpropagated. Then, on every rank:

* the output and the input gradient equal the reference's for that rank's batch;
* each local expert's weight gradients equal the reference's for that expert (they sum the
  contributions of every rank's tokens, so the exchange's backward must be right);
* the router's and shared expert's gradients, summed over ranks, equal the reference's.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blocksparse_moe import backend
from blocksparse_moe.integrations.expert_parallel import ExpertParallelMoE
from blocksparse_moe.moe import DroplessMoE
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _check_case(rank: int, world: int, *, dtype, path, tokens, moe_kwargs, forced=None, msg=""):
    with backend.prefer_on_cpu(path):
        torch.manual_seed(0)
        moe = DroplessMoE(dtype=dtype, **moe_kwargs)
        ep = ExpertParallelMoE.from_dropless(moe, copy_shared=True)
        h = moe.hidden_size
        g = torch.Generator().manual_seed(1)
        inputs = [torch.randn(t, h, generator=g, dtype=torch.float64).to(dtype) for t in tokens]
        probes = [torch.randn(t, h, generator=g, dtype=torch.float64).to(dtype) for t in tokens]
        idx = [None if forced is None else forced(t, j) for j, t in enumerate(tokens)]

        x = inputs[rank].clone().requires_grad_(True)
        out, aux = ep(x, idx[rank])
        ((out * probes[rank]).sum() + aux.aux_loss).backward()

        ref_total, ref_out, ref_x = 0.0, None, None
        for j in range(world):
            xj = inputs[j].clone().requires_grad_(True)
            oj, auxj = moe(xj, idx[j])
            ref_total = ref_total + (oj * probes[j]).sum() + auxj.aux_loss
            if j == rank:
                ref_out, ref_x = oj, xj
        ref_total.backward()

    tag = f"{msg} rank {rank}/{world}"
    assert_close(out, ref_out, dtype, "layer", msg=f"{tag} out")
    assert_close(x.grad, ref_x.grad, dtype, "layer", msg=f"{tag} dx")
    lo, hi = ep.local_expert_range
    for name in ("w1", "w2", "b1", "b2"):
        p = getattr(ep, name)
        if p is not None:
            assert_close(p.grad, getattr(moe, name).grad[lo:hi], dtype, "layer", msg=f"{tag} d{name}")
    replicated = [("router.weight", ep.router.weight, moe.router.weight)]
    if moe.shared_expert is not None:
        replicated += [(f"shared_expert.{n}", p, dict(moe.shared_expert.named_parameters())[n])
                       for n, p in ep.shared_expert.named_parameters()]
    if moe.shared_expert_gate is not None:
        replicated.append(("shared_expert_gate", ep.shared_expert_gate, moe.shared_expert_gate))
    for name, p, ref in replicated:
        grad = p.grad.clone()
        dist.all_reduce(grad)  # what data parallelism does with replicated parameters
        assert_close(grad, ref.grad, dtype, "layer", msg=f"{tag} d{name} (summed over ranks)")
    assert moe.w1.grad.abs().max() > 1e-3, "the experts got no gradient: the comparison proves nothing"


def _one_rank_takes_all(t, j):
    """Every slot on experts 0 and 1 (rank 0's): the other ranks' experts receive nothing."""
    return torch.stack([torch.zeros(t, dtype=torch.int64), torch.ones(t, dtype=torch.int64)], 1)


CASES = {
    2: [
        dict(dtype=torch.float64, path="cpu", tokens=[7, 12], msg="glu+bias+gated shared expert",
             moe_kwargs=dict(hidden_size=32, ffn_hidden_size=32, num_experts=4, top_k=2, block_size=16, bias=True,
                             shared_expert_size=16, shared_expert_gate=True, load_balancing_coef=0.1,
                             z_loss_coef=0.01)),
        dict(dtype=torch.float32, path="cpu", tokens=[9, 4], msg="fp32", forced=None,
             moe_kwargs=dict(hidden_size=32, ffn_hidden_size=32, num_experts=4, top_k=2, block_size=32)),
        dict(dtype=torch.float32, path="interpreter", tokens=[5, 8], msg="triton kernels",
             moe_kwargs=dict(hidden_size=32, ffn_hidden_size=16, num_experts=4, top_k=2, block_size=16, bias=True)),
    ],
    4: [
        dict(dtype=torch.float64, path="cpu", tokens=[6, 0, 11, 3], msg="plain MLP, a rank without tokens",
             moe_kwargs=dict(hidden_size=32, ffn_hidden_size=32, num_experts=8, top_k=3, block_size=16, glu=False,
                             activation="gelu", bias=True, load_balancing_coef=0.1)),
        dict(dtype=torch.float64, path="cpu", tokens=[5, 3, 4, 2], msg="one rank's experts take all",
             forced=_one_rank_takes_all,
             moe_kwargs=dict(hidden_size=32, ffn_hidden_size=16, num_experts=8, top_k=2, block_size=16)),
    ],
}


def _worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for case in CASES[world]:
            _check_case(rank, world, **case)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_rank(world):
    with tempfile.TemporaryDirectory() as tmp:
        # The workers inherit TRITON_INTERPRET from conftest (set before they import triton).
        mp.spawn(_worker, args=(world, os.path.join(tmp, "rendezvous")), nprocs=world, join=True)


def test_expert_parallel_needs_initialized_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    moe = DroplessMoE(32, 32, 4, 2, block_size=32)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(moe)
