"""Saving and reloading the autotuners' picks (blocksparse_moe.save_tuning / load_tuning).

No GPU here: the launch path is made to see a sm_90 GPU's candidate configs (as in
test_launch.py), an autotuner is built the way a launch builds it, and a pick is put in its
cache the way Triton's timing run would. The round trip must give a fresh process's
autotuner the same pick, so its launch runs that config without timing.
"""

import json

import pytest
import torch

import blocksparse_moe
from blocksparse_moe.kernels import _common
from blocksparse_moe.kernels import experts as K

_DEVICE = torch.device("cuda", 0)  # never touched: only its capability is asked (faked)


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(_common, "interpret_flag", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_common, "_TUNED", {})


def _tiles():
    return K._tiles("down", torch.bfloat16, 64, (64, 0, 128), 4096, 2048, 768)


def _tuned_once(pick_index):
    """A launch's autotuner after a timing run that chose candidate ``pick_index``."""
    tiles = _tiles()
    tuner, meta = _common._runner(K._down_kernel, tiles, _DEVICE, "ieee")
    assert meta == {}
    candidates = _common.tile_configs(64, "", _DEVICE, dtype=torch.bfloat16, caps=tiles.caps)
    assert len(candidates) > pick_index
    chosen = candidates[pick_index]
    tuner.cache[("torch.bfloat16", "torch.int32")] = _common._config(chosen)
    return chosen


def _cached(tuner):
    ((key, cfg),) = tuner.cache.items()
    return key, {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def test_round_trip_gives_a_fresh_process_the_pick(fake_gpu, tmp_path, monkeypatch):
    chosen = _tuned_once(1)  # not the first entry: deterministic mode would take that one
    path = tmp_path / "tuning.json"
    assert blocksparse_moe.save_tuning(path) == 1
    saved = json.loads(path.read_text())
    assert saved["picks"][0]["kernel"] == "blocksparse_moe.kernels.experts:_down_kernel"
    monkeypatch.setattr(_common, "_TUNED", {})  # a fresh process
    assert blocksparse_moe.load_tuning(path) == 1
    tuner, meta = _common._runner(K._down_kernel, _tiles(), _DEVICE, "ieee")
    key, config = _cached(tuner)
    assert key == ("torch.bfloat16", "torch.int32") and config == chosen
    assert len(_common._TUNED) == 1  # the launch found the loaded autotuner, built no other


def test_nothing_tuned_saves_nothing(fake_gpu, tmp_path):
    path = tmp_path / "empty.json"
    assert blocksparse_moe.save_tuning(path) == 0
    assert blocksparse_moe.load_tuning(path) == 0
    assert not _common._TUNED


@pytest.mark.parametrize("change,match", [
    (lambda p: p.update(kernel="os:getcwd"), "not a Triton kernel of blocksparse_moe"),
    (lambda p: p.update(kernel="blocksparse_moe.kernels.experts:no_such_kernel"), "not a saved autotune pick"),
    (lambda p: p["config"].update(BLOCK_M=48), "not among this version's candidates"),
    (lambda p: p.pop("tiles"), "not a saved autotune pick"),
], ids=["foreign-kernel", "unknown-kernel", "config-not-a-candidate", "no-tiles"])
def test_bad_pick_is_refused_and_changes_nothing(fake_gpu, tmp_path, monkeypatch, change, match):
    _tuned_once(0)
    path = tmp_path / "tuning.json"
    blocksparse_moe.save_tuning(path)
    saved = json.loads(path.read_text())
    good = dict(saved["picks"][0])
    bad = json.loads(json.dumps(good))
    change(bad)
    saved["picks"] = [good, bad]
    path.write_text(json.dumps(saved))
    monkeypatch.setattr(_common, "_TUNED", {})
    with pytest.raises(ValueError, match=match):
        blocksparse_moe.load_tuning(path)
    assert not _common._TUNED  # the good pick before the bad one was not applied either


@pytest.mark.parametrize("text", ["not json", json.dumps({"format": "other", "picks": []}), json.dumps([1, 2])],
                         ids=["not-json", "other-format", "a-list"])
def test_not_a_tuning_file(tmp_path, text):
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="path"):
        blocksparse_moe.load_tuning(path)


def test_cpu_run_tunes_nothing(tmp_path):
    # On CPU and under the interpreter there is one config and no autotuner.
    x = torch.randn(4, 32)
    ids = torch.tensor([[0], [1], [0], [1]])
    w1, w2 = torch.randn(2, 64, 32), torch.randn(2, 32, 32)
    K.experts_forward(x, ids, None, w1, w2, None, None, num_experts=2, act="silu", glu=True, block_size=16)
    assert blocksparse_moe.save_tuning(tmp_path / "t.json") == 0
