"""How the Triton launchers pick tiles (kernels/_common.py, kernels/experts.py `_tiles`).

* Row tiles divide the row padding ``b``; tiles along F divide ``col_tile(F)``, whatever ``b``
  is (a small ``b`` at decode must not shrink the column tiles).
* Autotune keys carry the call's token-count class, so a first 1-token call does not fix the
  tiles of later prefills.
* Under ``torch.use_deterministic_algorithms(True)`` the tiles come from the table, not from
  a timing run, so two processes compute with the same tiles.
"""

from __future__ import annotations

import pytest
import torch

from blocksparse_moe.kernels import _common, experts


@pytest.mark.parametrize("ffn,expected", [(16, 16), (48, 16), (96, 32), (768, 128), (1408, 128), (2880, 64),
                                          (14336, 128), (1536, 128), (80, 16)])
def test_col_tile_is_the_largest_power_of_two_dividing_ffn(ffn, expected):
    assert experts.col_tile(ffn) == expected and ffn % expected == 0


@pytest.mark.parametrize("b", [16, 32, 64, 128])
def test_column_tiles_do_not_shrink_with_the_row_padding(b):
    ffn = 768
    cols = experts.col_tile(ffn)
    # The up kernel's plan on sm_90: rows <= min(b, 64), columns <= min(col_tile, 64).
    plan = experts._tiles("up", torch.bfloat16, b, (min(b, 64), min(cols, 64), 0), 8, 2048, ffn)
    configs = plan.variants((9, 0))
    assert {c["BLOCK_M"] for c in configs} <= {m for m in (16, 32, 64) if m <= b}
    assert max(c["BLOCK_N"] for c in configs) == 64, "column tiles clipped to b"
    # The down kernel's K runs along F: bounded by col_tile, not by b.
    plan = experts._tiles("down-act", torch.bfloat16, b, (b, 0, cols), 8, 2048, ffn)
    assert max(c["BLOCK_K"] for c in plan.variants((9, 0))) == 64  # the table's largest BLOCK_K
    assert all(c["BLOCK_M"] <= b for c in plan.variants((9, 0)))


@pytest.mark.parametrize("slots,cls", [(0, 16), (1, 16), (8, 16), (17, 32), (512, 512), (4097, 8192),
                                       (1 << 20, 8192)])
def test_token_class(slots, cls):
    assert _common.token_class(slots) == cls


def test_decode_and_prefill_tune_apart():
    decode = experts._tiles("up", torch.bfloat16, 16, (16, 64, 0), 8, 2048, 768)
    prefill = experts._tiles("up", torch.bfloat16, 16, (16, 64, 0), 4096 * 8, 2048, 768)
    assert decode != prefill and decode.key != prefill.key


def _fake_gpu(monkeypatch):
    """Make _runner see a GPU's several candidate configs on a CPU tensor."""
    monkeypatch.setattr(_common, "interpret_flag", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_common, "_TUNED", {})


def test_deterministic_mode_takes_tiles_from_the_table(monkeypatch):
    _fake_gpu(monkeypatch)
    tiles = _common.Tiles("", 64, torch.bfloat16, key=("t",), caps=(64, 64, 0))
    device = torch.device("cuda", 0)
    candidates = _common.tile_configs(64, "", device, dtype=torch.bfloat16, caps=(64, 64, 0))
    assert len(candidates) > 1
    kernel = object()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runner, meta = _common._runner(kernel, tiles, device, "ieee")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert runner is kernel and meta == candidates[0]
    assert not _common._TUNED, "an autotuner was built in deterministic mode"


def test_autotuner_otherwise(monkeypatch):
    import triton

    _fake_gpu(monkeypatch)

    @triton.jit
    def k(x, BLOCK_M: "tl.constexpr", BLOCK_N: "tl.constexpr", BLOCK_K: "tl.constexpr"):
        pass

    tiles = _common.Tiles("", 64, torch.bfloat16, key=("t",), caps=(64, 64, 0))
    runner, meta = _common._runner(k, tiles, torch.device("cuda", 0), "ieee")
    assert meta == {} and runner is not k and len(_common._TUNED) == 1


def test_fma_bounds_raise_only_the_true_fp32_configs():
    kw = dict(capability=(9, 0), caps=(64, 32, 0))
    plain = _common.tile_configs(64, "", dtype=torch.float32, **kw)
    raised = _common.tile_configs(64, "", dtype=torch.float32, fma=(32, 8), **kw)
    assert min(c["BLOCK_K"] for c in plain) == 16 and min(c["num_warps"] for c in plain) == 4
    assert all(c["BLOCK_K"] >= 32 and c["num_warps"] >= 8 for c in raised)
    # TF32 and half precision run on the tensor cores: their configs are left alone.
    for dtype, tf32 in ((torch.float32, True), (torch.bfloat16, False)):
        assert (_common.tile_configs(64, "", dtype=dtype, tf32=tf32, fma=(32, 8), **kw)
                == _common.tile_configs(64, "", dtype=dtype, tf32=tf32, **kw))
    # A cap on BLOCK_K still wins (a K step must divide what the cap says).
    capped = _common.tile_configs(64, "", dtype=torch.float32, capability=(9, 0), caps=(64, 32, 16), fma=(32, 0))
    assert all(c["BLOCK_K"] == 16 for c in capped)
    # Nor past the row padding when BLOCK_K splits the b x b blocks ("k" in split).
    split_k = _common.tile_configs(16, "k", dtype=torch.float32, capability=(9, 0), fma=(32, 0))
    assert all(c["BLOCK_K"] == 16 for c in split_k)


_as_tuple = _common._as_tuple  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)


def test_spilling_configs_are_dropped_for_their_kernel_only():
    # dsd at b = 32 in half precision on sm_80: the 32x64x32 4-warp 3-stage and 32x128x32
    # 8-warp 3-stage variants spilled (full compile sweep, Triton 3.9). Those two only go.
    kw = dict(dtype=torch.bfloat16, capability=(8, 0))
    everyone = [_as_tuple(c) for c in _common.tile_configs(32, "mk", **kw)]
    dsd = [_as_tuple(c) for c in _common.tile_configs(32, "mk", kernel="_dsd_kernel", **kw)]
    gone = {(32, 64, 32, 4, 3), (32, 128, 32, 8, 3)}
    assert gone <= set(everyone)
    assert dsd == [c for c in everyone if c not in gone] and dsd
    # Another kernel, another target, the interpreter: untouched.
    assert [_as_tuple(c) for c in _common.tile_configs(32, "mk", kernel="_sdd_kernel", **kw)] == everyone
    sm90 = dict(kw, capability=(9, 0))
    assert _common.tile_configs(32, "mk", kernel="_dsd_kernel", **sm90) == _common.tile_configs(32, "mk", **sm90)
    assert _common.tile_configs(32, "mk", kernel="_dsd_kernel") == _common.tile_configs(32, "mk")
    # A plan's variants (what the compile test compiles) drop them the same way.
    plan = _common.Tiles("mk", 32, torch.bfloat16)
    assert [_as_tuple(v) for v in plan.variants((8, 0), kernel="_dsd_kernel")] == dsd


def test_spilling_table_names_real_kernels_targets_and_classes():
    import importlib
    import inspect

    modules = [importlib.import_module(f"blocksparse_moe.kernels.{m}") for m in ("experts", "dsd", "sdd", "expert_wgrad")]
    names = {name for mod in modules for name, _ in inspect.getmembers(mod) if name.endswith("_kernel")}
    for (kernel, family, cls), configs in _common._SPILLING.items():
        assert kernel in names, kernel
        assert (family, cls) in _common._CONFIGS, (family, cls)
        assert configs and all(len(c) == 5 for c in configs)


def test_a_kernel_left_without_configs_is_an_error(monkeypatch):
    kw = dict(dtype=torch.bfloat16, capability=(8, 0))
    every = tuple(_as_tuple(c) for c in _common.tile_configs(64, "", **kw))
    monkeypatch.setitem(_common._SPILLING, ("_dsd_kernel", "sm80", "half"), every)
    with pytest.raises(RuntimeError, match="_SPILLING"):
        _common.tile_configs(64, "", kernel="_dsd_kernel", **kw)
