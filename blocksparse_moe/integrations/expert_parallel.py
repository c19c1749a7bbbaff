"""Expert parallelism: a DroplessMoE whose experts are sharded over a process group.

Rank ``r`` of a group of ``W`` ranks holds experts ``[r*E/W, (r+1)*E/W)`` (``E`` divisible by
``W``); the router and the shared expert are replicated (every rank holds the same copy,
and their gradients are per-rank partial sums, to be reduced like any data-parallel
parameter, e.g. by DDP). One forward, on each rank, for its own batch of tokens::

    route locally        router -> top-k ids (global) -> route(): slots sorted by expert,
                         so the slots bound for one rank are contiguous
    exchange sizes       all_to_all of the [E] per-expert counts (equal splits, E/W each):
                         each rank learns how many rows every source sends to each of
                         its experts (one device->host read for the split sizes)
    dispatch             all_to_all_single of the [T*k, H] gathered rows, uneven splits
    local experts        expert_mlp on the received rows (route by local expert id, then
                         the block-sparse SDD -> activation -> DSD, unweighted)
    combine              the reverse all_to_all_single, then scatter with the top-k weights

Both exchanges are autograd Functions whose backward is the reverse exchange, so the
gradients of the input, of the router (through the top-k weights) and of every expert
weight flow across ranks. Works with NCCL on CUDA tensors and gloo on CPU tensors.

Every rank must run the forward and the backward of every layer (as with DDP): the
backward exchanges are collectives. A rank with no tokens still takes part (its splits
are zero).
"""

from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..moe import DroplessMoE, MoEAux
from ..ops.experts import expert_mlp
from ..routing import route
from ..topology import block_size_for

__all__ = ["ExpertParallelMoE", "all_to_all"]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; backward is the same exchange reversed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: List[int], input_splits: List[int], group) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        return _exchange(dout, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, output_splits: List[int], input_splits: List[int], group) -> torch.Tensor:
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=output_splits, input_split_sizes=input_splits,
                           group=group)
    return out


def all_to_all(x: torch.Tensor, output_splits: List[int], input_splits: List[int], group=None) -> torch.Tensor:
    """Differentiable ``all_to_all_single``: rows ``x[sum(input_splits[:j]) : ...]`` go to rank ``j``.

    Returns the ``sum(output_splits)`` rows received, ordered by source rank. Its backward
    sends the gradient rows back the way they came (a collective: every rank must run it).
    """
    if len(output_splits) != len(input_splits):
        raise ValueError(f"all_to_all: {len(output_splits)} output splits but {len(input_splits)} input splits")
    if x.shape[0] != sum(input_splits):
        raise ValueError(f"all_to_all: x has {x.shape[0]} rows but the input splits sum to {sum(input_splits)}")
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


class ExpertParallelMoE(nn.Module):
    """The experts of a :class:`~blocksparse_moe.moe.DroplessMoE`, sharded over ``group``.

    Args:
        moe: the full layer, identical on every rank (same seed, or the same state dict).
            This rank copies its slice of the experts (``w1, w2, b1, b2``
            ``[E/W, ...]``) and shares ``moe``'s router and shared expert modules; drop
            ``moe`` afterwards to free the other ranks' experts.
        group: the process group (default: the world). Its size must divide ``E``.

    ``forward(x [..., H], expert_indices=None) -> (out [..., H], MoEAux)`` like the
    DroplessMoE, on this rank's tokens; the result equals the full layer's on the same
    tokens, and gradients of the local experts sum the contributions of every rank's tokens.
    ``aux.tokens_per_expert`` counts this rank's slots per (global) expert.
    """

    def __init__(self, moe: DroplessMoE, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        if not isinstance(moe, DroplessMoE):
            raise TypeError(f"ExpertParallelMoE: moe must be a DroplessMoE, got {type(moe).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE: torch.distributed is not initialized (init_process_group first)")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if moe.num_experts % self.world_size:
            raise ValueError(f"ExpertParallelMoE: {moe.num_experts} experts cannot be split evenly over "
                             f"{self.world_size} ranks")
        self.hidden_size = moe.hidden_size
        self.ffn_hidden_size = moe.ffn_hidden_size
        self.num_experts = moe.num_experts
        self.num_local_experts = moe.num_experts // self.world_size
        self.top_k = moe.top_k
        self.activation = moe.activation
        self.glu = moe.glu
        # The unfused local products need one block size for the whole layer.
        self.block_size = moe.block_size if moe.block_size is not None else block_size_for(
            moe.ffn_hidden_size, "ExpertParallelMoE: ffn_hidden_size")
        self.router = moe.router
        self.shared_expert = moe.shared_expert
        self.shared_expert_gate = moe.shared_expert_gate
        lo, hi = self.local_expert_range
        for name in ("w1", "w2", "b1", "b2"):
            p = getattr(moe, name)
            setattr(self, name, None if p is None else nn.Parameter(p.detach()[lo:hi].clone(),
                                                                     requires_grad=p.requires_grad))

    @classmethod
    def from_dropless(cls, moe: DroplessMoE, group: Optional[dist.ProcessGroup] = None,
                      copy_shared: bool = False) -> "ExpertParallelMoE":
        """Build from a full layer; ``copy_shared=True`` deep-copies router and shared expert
        instead of sharing the modules with ``moe``."""
        ep = cls(moe, group)
        if copy_shared:
            ep.router = copy.deepcopy(moe.router)
            ep.shared_expert = copy.deepcopy(moe.shared_expert)
            if moe.shared_expert_gate is not None:
                ep.shared_expert_gate = nn.Parameter(moe.shared_expert_gate.detach().clone(),
                                                     requires_grad=moe.shared_expert_gate.requires_grad)
        return ep

    @property
    def local_expert_range(self) -> Tuple[int, int]:
        """``[lo, hi)``: the global ids of this rank's experts."""
        return self.rank * self.num_local_experts, (self.rank + 1) * self.num_local_experts

    def extra_repr(self) -> str:
        lo, hi = self.local_expert_range
        return (f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
                f"num_experts={self.num_experts}, local_experts=[{lo}, {hi}), world_size={self.world_size}, "
                f"top_k={self.top_k}, activation={self.activation!r}, glu={self.glu}, block_size={self.block_size}")

    def forward(self, x: torch.Tensor, expert_indices: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, MoEAux]:
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"ExpertParallelMoE: x must be [..., {self.hidden_size}], got shape {tuple(x.shape)}")
        if x.dtype != self.w1.dtype or x.device != self.w1.device:
            raise TypeError(f"ExpertParallelMoE: x is {x.dtype} on {x.device} but the experts are "
                            f"{self.w1.dtype} on {self.w1.device}")
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        r = self.router(x2, expert_indices)
        k = self.top_k
        world, local = self.world_size, self.num_local_experts

        # Slots sorted by global expert: the rows for rank j are one contiguous range.
        routing = route(r.indices.contiguous(), self.num_experts, self.block_size)
        counts = routing.tokens_per_expert  # [E] int32
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [W * E/W]: source-major
        sizes = torch.stack([counts.view(world, local).sum(1), recv_counts.view(world, local).sum(1)]).tolist()
        send_sizes, recv_sizes = sizes

        send = ops.gather(x2, routing, k)  # [T*k, H]
        recv = all_to_all(send, recv_sizes, send_sizes, self.group)  # source-major, then local expert

        # Received rows of one source come sorted by local expert; route them once more so
        # each local expert's rows (from every source) form one padded group.
        local_ids = torch.repeat_interleave(
            torch.arange(local, device=x.device).repeat(world), recv_counts.to(torch.int64),
            output_size=recv.shape[0])
        local_routing = route(local_ids.view(-1, 1), local, self.block_size, ffn_hidden_size=self.ffn_hidden_size)
        y = expert_mlp(recv, local_routing, None, self.w1, self.w2, self.b1, self.b2,
                       activation=self.activation, glu=self.glu)  # [N, H], unweighted

        back = all_to_all(y, send_sizes, recv_sizes, self.group)  # [T*k, H] in send's order
        out = ops.scatter(back, routing, r.weights, k)
        if self.shared_expert is not None:
            shared = self.shared_expert(x2)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(x2 @ self.shared_expert_gate.t())
            out = out + shared
        aux = MoEAux(aux_loss=r.aux_loss, load_balancing_loss=r.load_balancing_loss, z_loss=r.z_loss,
                     tokens_per_expert=counts, router_logits=r.logits, expert_indices=r.indices,
                     expert_weights=r.weights)
        return out.view(shape), aux
