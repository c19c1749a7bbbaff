"""Topology of the P x (E*F) hidden activation (blocksparse_moe.make_topology).

Every field must equal ``reference.topology_reference`` (Python loops over the block mask
of ``reference.moe_block_mask``), and, independently of the reference's field order, the
metadata must describe that mask in both orientations: the row-major CSR/COO fields the
mask, the transposed fields (column_indices_t, offsets_t, block_offsets_t) mask.T, each
pointing back at the right stored block. The expectation never comes from the native build
or from the torch fallback (tests/test_native.py runs the same reference against the fallback).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blocksparse_moe as bm
from blocksparse_moe import reference
from routing_cases import CASES, Case

FIELDS = reference.TOPOLOGY_FIELDS


def check_topology(topo: bm.Topology, padded_bins: list, num_experts: int, ffn_hidden_size: int, block_size: int):
    b = block_size
    mask = reference.moe_block_mask(padded_bins, num_experts, ffn_hidden_size, b)
    nbr, nbc = len(mask), num_experts * ffn_hidden_size // b
    assert topo.shape == (nbr * b, nbc * b)
    assert topo.block_size == b
    want = reference.topology_reference(padded_bins, num_experts, ffn_hidden_size, b)
    assert topo.shape == want["shape"]
    for name in FIELDS:
        assert getattr(topo, name).dtype == torch.int32, name
        assert torch.equal(getattr(topo, name).cpu(), want[name]), f"{name} differs from reference.topology_reference"
    row_indices = topo.row_indices.tolist()
    column_indices = topo.column_indices.tolist()
    offsets = topo.offsets.tolist()
    assert topo.nnz == sum(map(sum, mask))

    # Row-major orientation: CSR rows, COO rows agree, columns ascending within a row.
    got = [[False] * nbc for _ in range(nbr)]
    assert len(offsets) == nbr + 1 and offsets[0] == 0 and offsets[-1] == topo.nnz
    for r in range(nbr):
        cols = column_indices[offsets[r]:offsets[r + 1]]
        assert cols == sorted(cols) and len(set(cols)) == len(cols)
        for i in range(offsets[r], offsets[r + 1]):
            assert row_indices[i] == r
            got[r][column_indices[i]] = True
    assert got == mask

    # Transposed orientation: describes mask.T, rows ascending in each column, and each
    # block_offsets_t entry is the row-major index of that very block.
    column_indices_t = topo.column_indices_t.tolist()
    offsets_t = topo.offsets_t.tolist()
    block_offsets_t = topo.block_offsets_t.tolist()
    assert len(offsets_t) == nbc + 1 and offsets_t[0] == 0 and offsets_t[-1] == topo.nnz
    got_t = [[False] * nbr for _ in range(nbc)]
    for c in range(nbc):
        rows = column_indices_t[offsets_t[c]:offsets_t[c + 1]]
        assert rows == sorted(rows) and len(set(rows)) == len(rows)
        for q in range(offsets_t[c], offsets_t[c + 1]):
            r, blk = column_indices_t[q], block_offsets_t[q]
            got_t[c][r] = True
            assert (row_indices[blk], column_indices[blk]) == (r, c)
    assert got_t == [[mask[r][c] for r in range(nbr)] for c in range(nbc)]  # mask.T
    assert sorted(block_offsets_t) == list(range(topo.nnz))

    # The element mask the products see.
    dense = topo.to_dense_mask()
    assert dense.shape == topo.shape
    if nbr:
        want = torch.tensor(mask).repeat_interleave(b, 0).repeat_interleave(b, 1)
        assert torch.equal(dense, want)


TOPOLOGY_BY_HAND = dict(  # padded_bins [32, 32, 48], E=3, F=32, b=16: expert 0 has block rows 0, 1,
    # expert 1 none, expert 2 row 2; expert e's block columns are 2e, 2e+1.
    row_indices=[0, 0, 1, 1, 2, 2],
    column_indices=[0, 1, 0, 1, 4, 5],
    offsets=[0, 2, 4, 6],
    column_indices_t=[0, 1, 0, 1, 2, 2],  # column 0: rows 0, 1; column 1: rows 0, 1; columns 2, 3: none
    offsets_t=[0, 2, 4, 4, 4, 5, 6],
    block_offsets_t=[0, 2, 1, 3, 4, 5],  # column 0's blocks are data[0], data[2]: not the identity
)


@pytest.mark.parametrize("who", ["make_topology", "reference"])
def test_topology_values_by_hand(who):
    # The op and the reference it is checked against, both on values worked out by hand.
    pb = torch.tensor([32, 32, 48])
    if who == "make_topology":
        topo = bm.make_topology(pb, 3, 32, 16)
        assert topo.shape == (48, 96)
        got = {name: getattr(topo, name) for name in FIELDS}
    else:
        got = reference.topology_reference(pb, 3, 32, 16)
        assert got["shape"] == (48, 96) and got["block_size"] == 16
    for name, want in TOPOLOGY_BY_HAND.items():
        assert got[name].tolist() == want, name


@pytest.mark.parametrize("ffn_mult", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_topology_from_routing(case: Case, ffn_mult: int):
    ffn = case.block_size * ffn_mult
    r = bm.route(case.ids(), case.num_experts, case.block_size, ffn_hidden_size=ffn)
    # padded_bins from the routing reference, not from the routing under test
    padded_bins = reference.routing_reference(case.ids(), case.num_experts, case.block_size)["padded_bins"]
    check_topology(r.topology, padded_bins.tolist(), case.num_experts, ffn, case.block_size)
    # make_topology of the same padded_bins (route() builds it from its own)
    again = bm.make_topology(padded_bins, case.num_experts, ffn, case.block_size)
    check_topology(again, padded_bins.tolist(), case.num_experts, ffn, case.block_size)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("b", [16, 32, 64, 128])
def test_topology_each_block_size(b, dtype):
    padded_bins = [2 * b, 2 * b, 5 * b, 6 * b]  # expert 1 empty, others 2, 3, 1 block rows
    pb = torch.tensor(padded_bins, dtype=dtype)
    topo = bm.make_topology(pb, 4, 2 * b, b)
    check_topology(topo, padded_bins, 4, 2 * b, b)


@pytest.mark.parametrize("num_experts", [1, 5])
def test_topology_empty_p0(num_experts):
    pb = torch.zeros(num_experts, dtype=torch.int32)
    topo = bm.make_topology(pb, num_experts, 64, 16)
    assert topo.shape == (0, num_experts * 64) and topo.nnz == 0
    assert topo.offsets.tolist() == [0]
    assert topo.offsets_t.tolist() == [0] * (num_experts * 4 + 1)
    check_topology(topo, pb.tolist(), num_experts, 64, 16)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=10), st.sampled_from([16, 32, 64, 128]),
       st.integers(1, 4))
def test_topology_property(rows_per_expert, b, fb):
    padded_bins = [x * b for x in torch.tensor(rows_per_expert).cumsum(0).tolist()]
    e = len(padded_bins)
    topo = bm.make_topology(torch.tensor(padded_bins, dtype=torch.int32), e, fb * b, b)
    check_topology(topo, padded_bins, e, fb * b, b)


BAD = [
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 32]), 2, 40, 16), ValueError, "ffn_hidden_size",
                 id="ffn-not-multiple-of-block"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 32]), 2, 0, 16), ValueError, "ffn_hidden_size",
                 id="ffn-zero"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 32]), 2, 32, 24), ValueError, "block_size",
                 id="block-24"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 32]), 3, 32, 16), ValueError, "padded_bins",
                 id="wrong-length"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16.0, 32.0]), 2, 32, 16), TypeError, "padded_bins",
                 id="float-padded-bins"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 0, 32, 0])[::2], 2, 32, 16), ValueError,
                 "padded_bins", id="non-contiguous"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 32], device="meta"), 2, 32, 16), ValueError,
                 "padded_bins", id="meta-device"),
    pytest.param(lambda: bm.make_topology(torch.tensor([32, 16]), 2, 32, 16), ValueError, "padded_bins",
                 id="decreasing"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 40]), 2, 32, 16), ValueError, "padded_bins",
                 id="not-block-multiple"),
    pytest.param(lambda: bm.make_topology(torch.tensor([-16, 16]), 2, 32, 16), ValueError, "padded_bins",
                 id="negative"),
    pytest.param(lambda: bm.make_topology(torch.tensor([16, 32]), 2.0, 32, 16), TypeError, "num_experts",
                 id="float-num-experts"),
    pytest.param(lambda: bm.route(torch.zeros(2, 1, dtype=torch.int64), 2, 16, ffn_hidden_size=24), ValueError,
                 "ffn_hidden_size", id="route-ffn-not-multiple"),
]


@pytest.mark.parametrize("call, exc, needle", BAD)
def test_topology_bad_inputs(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()
