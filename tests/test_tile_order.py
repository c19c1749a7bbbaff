"""The launch order of the fused row-tiled kernels (up, down, act_bwd): expert by expert, in
bands of rows inside an expert, column tile by column tile (``experts._expert_tiles``).

Checked on the tile map a probe kernel writes under the interpreter, against the order
written here from its definition: every real (row tile, column tile) once, with its
expert; every CTA past the real rows told to exit; and the launch order itself.
"""

import pytest
import torch
import triton
import triton.language as tl

from blocksparse_moe.kernels import _common
from blocksparse_moe.kernels import experts as K

_CPU = torch.device("cpu")


@triton.jit
def _probe(out_ptr, expert_offsets_ptr, NUM_EXPERTS, BAND_ROWS, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    e, row, col = K._expert_tiles(expert_offsets_ptr, NUM_EXPERTS, BLOCK_M, BAND_ROWS, E_POW2)
    lin = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(out_ptr + lin * 3, e)
    if e < NUM_EXPERTS:
        tl.store(out_ptr + lin * 3 + 1, row)
        tl.store(out_ptr + lin * 3 + 2, col)


def _tile_map(rows_per_expert, *, block_m, band_rows, n_cols, p_max):
    offsets = torch.tensor([0, *torch.tensor(rows_per_expert).cumsum(0).tolist()], dtype=torch.int32)
    n = len(rows_per_expert)
    grid = (p_max // block_m, n_cols)
    out = torch.full((grid[0] * grid[1], 3), -7, dtype=torch.int32)
    _common.launch(_probe, grid, out, offsets, n, band_rows, device=_CPU, BLOCK_M=block_m,
                   E_POW2=triton.next_power_of_2(n))
    return out, offsets


def _expected_order(rows_per_expert, *, block_m, band_rows, n_cols):
    """Launch order from the definition: experts in order; inside one, bands of
    max(band_rows // block_m, 1) row tiles (the last shorter), each band column-major."""
    band = max(band_rows // block_m, 1)
    order, first = [], 0
    for e, rows in enumerate(rows_per_expert):
        tiles = rows // block_m
        for b0 in range(0, tiles, band):
            size = min(band, tiles - b0)
            for c in range(n_cols):
                for r in range(size):
                    order.append((e, first + b0 + r, c))
        first += tiles
    return order


CASES = {
    # rows per expert (multiples of b), BLOCK_M, band rows, column tiles, b
    "balanced": ([64, 64, 64, 64], 16, 32, 3, 32),
    "empty-and-skewed": ([0, 160, 0, 32, 0, 96], 16, 48, 2, 32),
    "all-to-one": ([0, 0, 256, 0], 32, 64, 4, 64),
    "band-wider-than-expert": ([32, 96, 64], 16, 1024, 3, 32),
    "band-below-one-tile": ([48, 16, 32], 16, 8, 2, 16),
    "first-and-last-empty": ([0, 64, 64, 0], 32, 32, 1, 32),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_expert_tiles_order(case):
    rows, block_m, band_rows, n_cols, b = CASES[case]
    real = sum(rows)
    # The grid covers the static bound: a few block rows more than the real P.
    p_max = real + 2 * b
    out, offsets = _tile_map(rows, block_m=block_m, band_rows=band_rows, n_cols=n_cols, p_max=p_max)
    expected = _expected_order(rows, block_m=block_m, band_rows=band_rows, n_cols=n_cols)
    n_real = len(expected)
    assert n_real == real // block_m * n_cols
    got = [tuple(r) for r in out[:n_real].tolist()]
    assert got == expected
    # Every CTA past the real tiles exits (expert E) and writes nothing else.
    assert (out[n_real:, 0] == len(rows)).all()
    assert (out[n_real:, 1:] == -7).all()
    # Each real tile once, and its rows lie in its expert's range.
    assert len(set(got)) == n_real
    for e, row, _ in got:
        assert offsets[e] <= row * block_m < offsets[e + 1]


def test_band_rows_follows_the_row_operand():
    # A band is BAND_BYTES of the row operand: wider rows, fewer of them; never 0.
    assert K.band_rows(4096 * 2) == K.BAND_BYTES // 8192
    assert K.band_rows(2 * K.BAND_BYTES) == 1
    assert K.band_rows(0) == K.BAND_BYTES
