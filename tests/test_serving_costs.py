"""blocksparse_moe.serving: the counter checked on hand-made launches whose costs are known
by hand, then the fused expert path at decode sizes (issue 17's "Done when" bounds).

The toy kernels below exist only to be launched through ``_common.launch`` with the
parameter names ``serving.ROW_RULES`` keys on; their grids and the configs they "would"
compile with (a ``Tiles`` whose ``variants`` is a hand-written list) are chosen so that the
expected counts follow from a few lines of arithmetic in each test.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Tuple

import pytest
import torch
import triton
import triton.language as tl

from blocksparse_moe import backend, expert_mlp
from blocksparse_moe.kernels import _common
from blocksparse_moe.serving import floor_bytes, serving_costs


@dataclasses.dataclass(frozen=True)
class _HandTiles(_common.Tiles):
    """A tiled launch whose target configs are given by hand (``configs``: tuples of items)."""

    configs: Tuple[Tuple[Tuple[str, int], ...], ...] = ()

    def variants(self, capability, kernel=""):
        return [dict(c) for c in self.configs]


def _tiles(*configs: Dict[str, int]) -> _HandTiles:
    return _HandTiles("mn", 16, torch.float32, configs=tuple(tuple(sorted(c.items())) for c in configs))


@triton.jit
def _toy_rows_kernel(out_ptr, row_slots_ptr, block_expert_ptr, real_rows,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Marks rows >= real_rows as padding (-1) in row_slots, and counts its programs in out."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if tl.program_id(1) == 0:
        s = tl.load(row_slots_ptr + rows)
        tl.store(row_slots_ptr + rows, tl.where(rows < real_rows, s, -1))
    tl.store(out_ptr + pid_m * tl.num_programs(1) + tl.program_id(1), 1)


@triton.jit
def _toy_wgrad_kernel(out_ptr, row_slots_ptr, expert_offsets_ptr, C,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), 1)


@triton.jit
def _toy_banded_kernel(out_ptr, row_slots_ptr, expert_offsets_ptr, BAND_ROWS,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Has the fused row kernels' parameter names (they remap their ids in bands)."""
    tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), 1)


@triton.jit
def _toy_chunked_kernel(out_ptr, row_slots_ptr, expert_offsets_ptr, C, CHUNK,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Has the weight gradient's parameter names (chunk slots of CHUNK rows)."""
    tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), 1)


@triton.jit
def _toy_fixed_kernel(out_ptr, row_slots_ptr, block_expert_ptr, n, CHUNK: tl.constexpr):
    """Like a routing kernel: has row_slots_ptr and block_expert_ptr but tiles no rows."""
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    tl.store(out_ptr + offs, 1, mask=offs < n)


_CPU = torch.device("cpu")


def _launch_rows(out, row_slots, real_rows, tiles, rows=128, cols=64):
    _common.launch(_toy_rows_kernel, lambda p: (rows // p["BLOCK_M"], cols // p["BLOCK_N"]),
                   out, row_slots, row_slots, real_rows, device=_CPU, tiles=tiles)


# -- the counter on hand-made launches ----------------------------------------------------------

def test_floor_bytes_by_hand():
    # T=2, k=3, H=5, F=7, GLU: 6 slots * (14 + 5) + 2 * 5 = 124 elements of 2 bytes.
    assert floor_bytes(2, 3, 5, 7, 2, 2) == 248
    assert floor_bytes(1, 1, 4, 4, 1, 4) == (1 * (4 + 4) + 4) * 4


@pytest.mark.parametrize("order, expected_real", [
    pytest.param("B-first", 2, id="tie-takes-first-config-BM64-one-real-tile-x2-cols"),
    pytest.param("C-first", 1, id="tie-takes-first-config-BM32-one-real-tile-x1-col"),
])
def test_row_tiled_fewest_ctas_and_real_rows_read_after_the_launch(order, expected_real):
    # 128 rows x 64 columns. A: 16x16 -> 8*4 = 32 CTAs; B: 64x32 -> 2*2 = 4; C: 32x64 -> 4*1 = 4.
    # Fewest: 4 (B and C tie; the first listed wins). The kernel itself marks rows >= 20 as
    # padding: before the launch every row was real (B would give 4 real CTAs, C 4), after it
    # only rows 0..19 are, i.e. row tile 0 of either: B 1*2 = 2, C 1*1 = 1.
    a = dict(BLOCK_M=16, BLOCK_N=16)
    b = dict(BLOCK_M=64, BLOCK_N=32)
    c = dict(BLOCK_M=32, BLOCK_N=64)
    tiles = _tiles(a, b, c) if order == "B-first" else _tiles(a, c, b)
    out = torch.zeros(64, dtype=torch.int32)
    row_slots = torch.arange(128, dtype=torch.int32)

    costs = serving_costs(lambda: _launch_rows(out, row_slots, 20, tiles))
    assert costs.triton_launches == 1
    assert costs.ctas_launched == 4
    assert costs.ctas_real == expected_real
    assert costs.per_launch[0].rule == "row-tiled"
    assert int(out.sum()) > 0, "the launch did not run"
    assert (row_slots[20:] == -1).all() and (row_slots[:20] >= 0).all()
    # The interpreter's copies of the arguments are not allocations, nor kernels, nor reads.
    assert (costs.fresh_bytes, costs.torch_kernels, costs.host_reads) == (0, 0, 0)


def test_row_banded_rule_counts_real_row_tiles():
    # 128 rows, 32x64 tiles: 4 row tiles x 1 col tile; rows 0..40 real (tiles 0 and 1) plus
    # row 100 (tile 3): 3 real CTAs of 4, whatever order the kernel walks them in.
    out = torch.zeros(64, dtype=torch.int32)
    row_slots = torch.full((128,), -1, dtype=torch.int32)
    row_slots[:41] = torch.arange(41, dtype=torch.int32)
    row_slots[100] = 41
    offsets = torch.tensor([0, 64, 128], dtype=torch.int32)
    tiles = _tiles(dict(BLOCK_M=32, BLOCK_N=64))
    costs = serving_costs(lambda: _common.launch(
        _toy_banded_kernel, lambda p: (128 // p["BLOCK_M"], 64 // p["BLOCK_N"]), out, row_slots, offsets, 64,
        device=_CPU, tiles=tiles))
    assert (costs.ctas_launched, costs.ctas_real) == (4, 3)
    assert costs.per_launch[0].rule == "row-banded"


def test_row_tiled_partial_tiles_count_whole():
    # One config 32x64: 4 row tiles x 1 col tile. Real rows 0..32: tiles 0 and 1 (row 32 is
    # tile 1's first), so 2 real CTAs of 4.
    out = torch.zeros(64, dtype=torch.int32)
    row_slots = torch.arange(128, dtype=torch.int32)
    costs = serving_costs(lambda: _launch_rows(out, row_slots, 33, _tiles(dict(BLOCK_M=32, BLOCK_N=64))))
    assert (costs.ctas_launched, costs.ctas_real) == (4, 2)


def test_expert_ranges_rule():
    # E = 3 experts, C = 64, BLOCK_M = 16: 4 tiles per expert, grid (12, 3) = 36 CTAs.
    # expert 0 owns rows [0, 32) (padding only), expert 1 none, expert 2 rows [32, 96)
    # with one real row (40): 1 expert * 4 tiles * 3 = 12 real CTAs.
    offsets = torch.tensor([0, 32, 32, 96], dtype=torch.int32)
    row_slots = torch.full((96,), -1, dtype=torch.int32)
    row_slots[40] = 7
    out = torch.zeros(64, dtype=torch.int32)

    def fn():
        _common.launch(_toy_wgrad_kernel, lambda p: (3 * (64 // p["BLOCK_M"]), 3), out, row_slots, offsets, 64,
                       device=_CPU, tiles=_tiles(dict(BLOCK_M=16, BLOCK_N=32)))
    costs = serving_costs(fn)
    assert (costs.ctas_launched, costs.ctas_real) == (36, 12)
    assert costs.per_launch[0].rule == "expert-ranges"


def test_expert_chunks_rule():
    # E = 2, C = 32, BLOCK_M = 16: 2 tiles per chunk slot; chunks of 32 rows; X = 3 extra
    # slots: grid (5 * 2, 1) = 10 CTAs. Expert 0 rows [0, 96): chunks [0,32) (row 5 real),
    # [32,64) (padding), [64,96) (row 70 real); expert 1 [96, 128) (row 100 real): 3 real
    # chunks * 2 tiles = 6 real CTAs.
    offsets = torch.tensor([0, 96, 128], dtype=torch.int32)
    row_slots = torch.full((128,), -1, dtype=torch.int32)
    row_slots[[5, 70, 100]] = torch.tensor([0, 1, 2], dtype=torch.int32)
    out = torch.zeros(64, dtype=torch.int32)

    def fn():
        _common.launch(_toy_chunked_kernel, lambda p: (5 * (32 // p["BLOCK_M"]), 1), out, row_slots, offsets, 32, 32,
                       device=_CPU, tiles=_tiles(dict(BLOCK_M=16, BLOCK_N=32)))
    costs = serving_costs(fn)
    assert (costs.ctas_launched, costs.ctas_real) == (10, 6)
    assert costs.per_launch[0].rule == "expert-chunks"


def test_expert_ranges_rule_rejects_a_grid_it_does_not_know():
    offsets = torch.tensor([0, 16, 32], dtype=torch.int32)
    row_slots = torch.zeros(32, dtype=torch.int32)
    out = torch.zeros(64, dtype=torch.int32)

    def fn():  # axis 0 = 5, not a multiple of E = 2
        _common.launch(_toy_wgrad_kernel, (5, 1), out, row_slots, offsets, 16, device=_CPU,
                       tiles=_tiles(dict(BLOCK_M=16, BLOCK_N=16)))
    with pytest.raises(ValueError, match="ROW_RULES"):
        serving_costs(fn)


@pytest.mark.parametrize("grid, expected", [
    pytest.param((3, 5), 15, id="fixed-tuple-grid"),
    pytest.param(lambda meta: (triton.cdiv(meta["n"], meta["CHUNK"]),), 4, id="fixed-lambda-grid-of-its-args"),
])
def test_fixed_launch_counts_its_grid_every_cta_real(grid, expected):
    # A fixed launch (no Tiles) with row_slots_ptr and block_expert_ptr but no BLOCK_M (a
    # routing kernel): its grid as given, every CTA real although every row is padding.
    out = torch.zeros(256, dtype=torch.int32)
    row_slots = torch.full((64,), -1, dtype=torch.int32)

    def fn():  # n = 50, CHUNK = 16: cdiv = 4
        _common.launch(_toy_fixed_kernel, grid, out, row_slots, row_slots, 50, device=_CPU, CHUNK=16, num_warps=1)
    costs = serving_costs(fn)
    assert (costs.triton_launches, costs.ctas_launched, costs.ctas_real) == (1, expected, expected)
    assert costs.per_launch[0].rule == "all"


def test_torch_kernels_fresh_bytes_and_host_reads():
    x = torch.ones(4)

    def fn():
        a = torch.empty(8)            # allocation: no kernel; 32 fresh bytes
        a.fill_(1.0)                  # 1 kernel
        v = a.view(2, 4)[:, 1:]       # views: no kernel
        b = v + 1                     # 1 kernel; 2*3*4 = 24 fresh bytes
        c = b.clone()                 # 1 kernel (a copy); 24 fresh bytes
        c.zero_()                     # 1 kernel (a fill)
        return float(x.sum().item())  # 1 kernel (sum: 4 fresh bytes) and 1 host read
    costs = serving_costs(fn)
    assert costs.torch_kernels == 5, costs.torch_ops
    assert costs.triton_launches == 0 and costs.launches == 5
    assert costs.fresh_bytes == 32 + 24 + 24 + 4
    assert costs.host_reads == 1


def test_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        serving_costs(lambda: None)


# -- the fused expert path ----------------------------------------------------------------------

def _decode_case(tokens: int, hidden: int, ffn: int, experts: int, top_k: int, dtype: torch.dtype,
                 real_weights: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1).indices  # a router's distinct top-k
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1)
    if real_weights:
        w1 = (torch.randn(experts, 2 * ffn, hidden, generator=g) / hidden ** 0.5).to(dtype)
        w2 = (torch.randn(experts, ffn, hidden, generator=g) / ffn ** 0.5).to(dtype)
    else:  # nothing reads them (run_products=False): zero-stride, no memory at real sizes
        w1 = torch.empty(1, 1, 1, dtype=dtype).expand(experts, 2 * ffn, hidden)
        w2 = torch.empty(1, 1, 1, dtype=dtype).expand(experts, ffn, hidden)
    return x, ids, weights, w1, w2


def _forward(case, check_indices=False):
    x, ids, weights, w1, w2 = case

    def fn():
        with torch.no_grad():
            return expert_mlp(x, ids, weights, w1, w2, check_indices=check_indices)
    return fn


# A decode step scaled down (T = 4 tokens, k = 2 of E = 8, H = F = 64) through the kernels.
_SCALED = (4, 64, 64, 8, 2)


def test_fused_decode_step_makes_no_host_read():
    case = _decode_case(*_SCALED, torch.bfloat16, real_weights=True)
    costs = serving_costs(_forward(case))
    assert costs.host_reads == 0, costs.host_read_ops
    assert costs.triton_launches >= 2  # at least the two products
    assert 0 < costs.ctas_real <= costs.ctas_launched
    # The counter sees a host read on this path when there is one: caller-given ids are
    # range-checked on the host.
    assert serving_costs(_forward(case, check_indices=True)).host_reads >= 1


def test_not_running_the_products_changes_no_count():
    case = _decode_case(*_SCALED, torch.bfloat16, real_weights=True)
    ran = serving_costs(_forward(case))
    skipped = serving_costs(_forward(case), run_products=False)
    for name in ("triton_launches", "torch_kernels", "ctas_launched", "ctas_real", "fresh_bytes", "host_reads"):
        assert getattr(skipped, name) == getattr(ran, name), name


# Issue 17's four layers (H, F, E, k), at their real sizes: the products are counted, not
# run (run_products=False: the interpreter would take hours and the weights tens of GB).
# Every count depends on T, k, E and the shapes only through the launchers' arithmetic,
# which runs in full; the routing kernels (if any) run too.
LAYERS = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v3": (7168, 2048, 256, 8),
    "gpt-oss-120b": (2880, 2880, 128, 4),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}
_BOUND_CASES = [pytest.param(layer, t, id=f"{layer}-T{t}") for layer in LAYERS for t in (1, 8, 64)]


@functools.lru_cache(maxsize=None)
def _real_size_costs(layer: str, tokens: int):
    hidden, ffn, experts, top_k = LAYERS[layer]
    case = _decode_case(tokens, hidden, ffn, experts, top_k, torch.bfloat16, real_weights=False)
    costs = serving_costs(_forward(case), run_products=False)
    return costs, floor_bytes(tokens, top_k, hidden, ffn, 2, 2)


@pytest.mark.parametrize("layer, tokens", _BOUND_CASES)
def test_decode_ctas_launched_within_twice_the_real(layer, tokens):
    costs, _ = _real_size_costs(layer, tokens)
    assert costs.host_reads == 0, costs.host_read_ops
    assert costs.ctas_launched <= 2 * costs.ctas_real, [dataclasses.astuple(l)[:5] for l in costs.per_launch]


@pytest.mark.parametrize("layer, tokens", _BOUND_CASES)
def test_decode_bytes_within_four_floors_and_a_mib(layer, tokens):
    costs, floor = _real_size_costs(layer, tokens)
    assert costs.fresh_bytes <= 4 * floor + 2**20, f"{costs.fresh_bytes / 2**20:.2f} MiB, floor {floor / 2**20:.3f} MiB"


def test_decode_bench_fp8_device_free_columns():
    """bench/decode.py's fp8 rows (issue 19) on a tiny layer with partial 128-blocks (H = 160:
    2 blocks, the last of 32; 2F = 192: 2 blocks; F = 96: 1 block): the weight bytes follow the
    format's definition (1 byte per element + a 4-byte scale per 128x128 block, vs bf16's 2
    bytes, for the experts the routing hits) and the fp8 forward's serving costs are counted."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "decode.py")
    spec = importlib.util.spec_from_file_location("bench_decode_under_test", path)
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    hidden, ffn, experts, top_k, tokens = 160, 96, 8, 2, 3
    (row,) = decode.costs_rows(["tiny"], [tokens], torch.bfloat16, fp8=True,
                               specs={"tiny": (hidden, ffn, experts, top_k)})
    ids, _ = decode._routing(tokens, experts, top_k, seed=tokens)
    hit = len(set(ids.reshape(-1).tolist()))
    assert row["experts_hit"] == hit and 1 <= hit <= tokens * top_k
    elements = 3 * ffn * hidden  # w1 [2F, H] and w2 [F, H]
    scales = 2 * 2 + 1 * 2  # ceil(192/128)*ceil(160/128) + ceil(96/128)*ceil(160/128)
    assert row["weight_bytes_bf16"] == hit * elements * 2
    assert row["weight_bytes_fp8"] == hit * (elements + 4 * scales) == row["weight_bytes_bf16"] // 2 + hit * 4 * scales
    assert "fp8 costs status" not in row, row.get("fp8 costs status")
    assert row["fp8 host_reads"] == 0
    assert row["fp8 triton_launches"] >= 2  # at least the two fp8 products
    assert 0 < row["fp8 ctas_real"] <= row["fp8 ctas_launched"]
    assert any("fp8" in d for d in row["fp8 launch_detail"]), row["fp8 launch_detail"]
    floor = floor_bytes(tokens, top_k, hidden, ffn, 2, 2)
    assert row["fp8 floor_bytes"] == floor
    assert 0 < row["fp8 fresh_bytes"] <= 4 * floor + 2**20
