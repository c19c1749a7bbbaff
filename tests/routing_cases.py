"""Named expert assignments shared by the routing, topology and native (GPU) tests.

Each case is built deterministically on the CPU; GPU tests move the same ids to CUDA and
compare with the CPU results.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Case:
    tokens: int
    top_k: int
    num_experts: int
    block_size: int
    kind: str = "random"  # random | distinct | one-expert | even-experts | last-expert

    def ids(self, dtype: torch.dtype = torch.int64, seed: int = 0) -> torch.Tensor:
        """``[T, k]`` expert ids of this case."""
        g = torch.Generator().manual_seed(seed)
        t, k, e = self.tokens, self.top_k, self.num_experts
        if self.kind == "random":
            ids = torch.randint(0, e, (t, k), generator=g)
        elif self.kind == "distinct":  # a real top-k: k different experts per token
            ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
        elif self.kind == "one-expert":
            ids = torch.full((t, k), e // 2)
        elif self.kind == "last-expert":
            ids = torch.full((t, k), e - 1)
        elif self.kind == "even-experts":  # every odd expert gets no token
            ids = torch.randint(0, (e + 1) // 2, (t, k), generator=g) * 2
        else:
            raise ValueError(self.kind)
        return ids.to(dtype).contiguous()


CASES = [
    pytest.param(Case(0, 2, 4, 16), id="zero-tokens"),
    pytest.param(Case(20, 2, 8, 16, "even-experts"), id="empty-experts"),
    pytest.param(Case(33, 1, 6, 16, "one-expert"), id="one-expert-takes-all"),
    pytest.param(Case(17, 2, 5, 32, "last-expert"), id="last-expert-takes-all-k2"),
    pytest.param(Case(9, 4, 4, 16, "distinct"), id="k-equals-E"),
    pytest.param(Case(13, 3, 5, 16), id="Tk-not-multiple-of-block"),
    pytest.param(Case(7, 1, 1, 16), id="single-expert"),
    pytest.param(Case(1, 1, 3, 128), id="single-token"),
    pytest.param(Case(50, 2, 8, 16, "distinct"), id="block-16"),
    pytest.param(Case(50, 2, 8, 32, "distinct"), id="block-32"),
    pytest.param(Case(50, 2, 8, 64, "distinct"), id="block-64"),
    pytest.param(Case(50, 2, 8, 128, "distinct"), id="block-128"),
    pytest.param(Case(64, 8, 64, 16, "distinct"), id="fine-grained-64-experts"),
    pytest.param(Case(48, 2, 3, 16), id="exact-multiple-of-block"),
]

ID_DTYPES = [pytest.param(torch.int32, id="int32"), pytest.param(torch.int64, id="int64")]
