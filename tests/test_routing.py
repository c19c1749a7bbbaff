"""Routing (blocksparse_moe.route): every field against ``reference.routing_reference``
(plain Python lists: a stable sort, a histogram and running sums written out), on named
cases and on hypothesis inputs.

route() dispatches to the native C++ CPU op (the torch fallback only when _C is missing, with
a warning; CI sets BLOCKSPARSE_MOE_REQUIRE_NATIVE=1 so a missing _C fails instead). The
expectation never comes from either of them: tests/test_native.py runs the same reference
against the fallback.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blocksparse_moe as bm
from blocksparse_moe import reference
from routing_cases import CASES, ID_DTYPES, Case

FIELDS = reference.ROUTING_FIELDS


def _native_route():
    """The native op behind route(), without route()'s own checks. PRIVATE HOOK: the one place
    this file reaches inside the package; repoint it when the loader moves (issue 10)."""
    from blocksparse_moe import native as _native

    return _native.route


def check_routing(ids: torch.Tensor, num_experts: int, block_size: int) -> bm.Routing:
    r = bm.route(ids, num_experts, block_size)
    want = reference.routing_reference(ids, num_experts, block_size)
    n = ids.numel()
    for name in FIELDS:
        got = getattr(r, name)
        assert got.dtype == torch.int32, name
        assert got.device == ids.device, name
        assert got.shape == ((num_experts,) if name in ("tokens_per_expert", "bins", "padded_bins") else (n,)), name
        assert torch.equal(got, want[name]), f"{name} differs from reference.routing_reference"
    assert (r.num_experts, r.top_k, r.block_size) == (num_experts, ids.shape[1], block_size)
    assert r.num_tokens == ids.shape[0]
    # The whole padding waste: each expert adds fewer than one block.
    assert r.padded_tokens <= n + num_experts * (block_size - 1)
    assert r.padded_tokens % block_size == 0
    return r


@pytest.mark.parametrize("dtype", ID_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_route_cases(case: Case, dtype: torch.dtype):
    check_routing(case.ids(dtype), case.num_experts, case.block_size)


BY_HAND = dict(  # 3 tokens, k=2, E=3, b=16: slots 0..5 choose experts [2,0 | 0,2 | 1,0].
    tokens_per_expert=[3, 1, 2],
    bins=[3, 4, 6],
    padded_bins=[16, 32, 48],
    indices=[1, 2, 5, 4, 0, 3],  # expert 0: slots 1,2,5; expert 1: 4; expert 2: 0,3
    bin_ids=[0, 0, 0, 1, 2, 2],
    rows=[4, 0, 1, 5, 3, 2],
    padded_rows=[32, 0, 1, 33, 16, 2],  # expert 1 starts at row 32, expert 2 at 16
)


@pytest.mark.parametrize("who", ["route", "reference"])
def test_route_values_by_hand(who):
    # The op and the reference it is checked against, both on values worked out by hand.
    ids = torch.tensor([[2, 0], [0, 2], [1, 0]], dtype=torch.int32)
    r = bm.route(ids, 3, 16) if who == "route" else reference.routing_reference(ids, 3, 16)
    for name, want in BY_HAND.items():
        got = getattr(r, name) if who == "route" else r[name]
        assert got.tolist() == want, name


@st.composite
def assignments(draw):
    """Random [T, k] ids: uniform, skewed onto a few experts, or all on one (degenerate)."""
    e = draw(st.integers(1, 12))
    k = draw(st.integers(1, 4))
    t = draw(st.integers(0, 40))
    # A random subset of experts that receive tokens: the others stay empty.
    allowed = draw(st.lists(st.integers(0, e - 1), min_size=1, max_size=e, unique=True))
    flat = draw(st.lists(st.sampled_from(allowed), min_size=t * k, max_size=t * k))
    b = draw(st.sampled_from([16, 32, 64, 128]))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    return torch.tensor(flat, dtype=dtype).reshape(t, k), e, b


@settings(max_examples=150, deadline=None)
@given(assignments())
def test_route_property(arg):
    ids, e, b = arg
    r = check_routing(ids, e, b)
    n = ids.numel()
    # Structural properties, independent of any reference.
    assert sorted(r.indices.tolist()) == list(range(n))  # a permutation of the slots
    assert r.rows[r.indices.long()].tolist() == list(range(n))  # rows inverts indices
    if n:
        assert bool((r.bin_ids[1:] >= r.bin_ids[:-1]).all())  # sorted by expert
        pr = r.padded_rows.long()
        assert pr.unique().numel() == n and int(pr.max()) < r.padded_tokens
        # each slot lands inside its expert's padded group
        e_of = ids.reshape(-1).long()
        lo = (r.padded_bins.long() - ((r.tokens_per_expert.long() + b - 1) // b) * b)[e_of]
        assert bool(((pr >= lo) & (pr < lo + r.tokens_per_expert.long()[e_of])).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.integers(1, 300), st.sampled_from([16, 32, 64, 128]))
def test_route_skewed_one_hot(e, t, b):
    # Degenerate: every token on expert e-1 except one on expert 0.
    ids = torch.full((t, 1), e - 1, dtype=torch.int64)
    ids[0, 0] = 0
    r = check_routing(ids, e, b)
    assert r.tokens_per_expert[e - 1] == (t if e == 1 else t - 1)


# -- bad inputs: error type and the argument's name in the message -----------------------------

GOOD = torch.zeros(4, 2, dtype=torch.int64)

BAD = [
    pytest.param(lambda: bm.route(torch.tensor([[0, -1]]), 4, 16), ValueError, "expert_indices", id="negative-id"),
    pytest.param(lambda: bm.route(torch.tensor([[0, 4]], dtype=torch.int32), 4, 16), ValueError, "expert_indices",
                 id="id-equals-E"),
    pytest.param(lambda: bm.route(GOOD.float(), 4, 16), TypeError, "expert_indices", id="float-ids"),
    pytest.param(lambda: bm.route(GOOD.to(torch.int16), 4, 16), TypeError, "expert_indices", id="int16-ids"),
    pytest.param(lambda: bm.route(GOOD.tolist(), 4, 16), TypeError, "expert_indices", id="list-ids"),
    pytest.param(lambda: bm.route(GOOD.to("meta"), 4, 16), ValueError, "expert_indices", id="meta-device"),
    pytest.param(lambda: bm.route(torch.zeros(4, 4, dtype=torch.int64)[:, ::2], 4, 16), ValueError,
                 "contiguous", id="non-contiguous"),
    pytest.param(lambda: bm.route(GOOD.reshape(-1), 4, 16), ValueError, "expert_indices", id="1-d"),
    pytest.param(lambda: bm.route(GOOD.reshape(2, 2, 2), 4, 16), ValueError, "expert_indices", id="3-d"),
    pytest.param(lambda: bm.route(torch.zeros(4, 0, dtype=torch.int64), 4, 16), ValueError, "k >= 1", id="k-0"),
    pytest.param(lambda: bm.route(GOOD, 0, 16), ValueError, "num_experts", id="zero-experts"),
    pytest.param(lambda: bm.route(GOOD, 4.0, 16), TypeError, "num_experts", id="float-num-experts"),
    pytest.param(lambda: bm.route(GOOD, 4, 48), ValueError, "block_size", id="block-48"),
    pytest.param(lambda: bm.route(GOOD, 4, 8), ValueError, "block_size", id="block-8"),
    pytest.param(lambda: bm.route(GOOD, 4, 16.0), TypeError, "block_size", id="float-block"),
    pytest.param(lambda: bm.route(GOOD, 4, True), TypeError, "block_size", id="bool-block"),
    pytest.param(lambda: bm.route(GOOD, 2**30, 128), ValueError, "int32", id="int32-overflow"),
]


@pytest.mark.parametrize("call, exc, needle", BAD)
def test_route_bad_inputs(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()


def test_native_op_rejects_out_of_range_itself():
    # The C++ op does not trust its caller: bypassing route()'s checks still raises, before
    # any output is written.
    if not bm.native_status()["cpu_ops"]:
        pytest.skip("blocksparse_moe._C not built")
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="expert_indices"):
            _native_route()(torch.tensor([[0, bad]], dtype=torch.int64), 5, 16)
