"""``blocksparse_moe.timing``: on a CPU the compared functions take turns, warm-up excluded."""

import json
import statistics

import pytest
import torch

import blocksparse_moe.__main__ as lb
from blocksparse_moe import timing

CPU = torch.device("cpu")


def _recorder(calls, name):
    return lambda: calls.append(name)


@pytest.mark.parametrize("warmup", [True, False])
def test_rounds_take_turns_in_order(warmup):
    calls = []
    fns = {k: _recorder(calls, k) for k in ("a", "b", "c")}
    runs = timing.time_rounds(fns, CPU, min_runs=4, max_runs=4, budget_s=10.0, warmup=warmup)
    assert calls == ["a", "b", "c"] * (5 if warmup else 4)  # the warm-up round is not timed
    assert {k: len(v) for k, v in runs.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in runs.values() for t in v)


def test_rounds_stop_at_the_budget_or_max_runs():
    calls = []
    runs = timing.time_rounds({"a": _recorder(calls, "a")}, CPU, min_runs=2, max_runs=50, budget_s=0.0)
    assert len(runs["a"]) == 2  # no budget: min_runs only
    runs = timing.time_rounds({"a": _recorder(calls, "a")}, CPU, min_runs=2, max_runs=7, budget_s=60.0)
    assert len(runs["a"]) == 7  # budget left: max_runs


@pytest.mark.parametrize("bad", [dict(min_runs=0), dict(min_runs=5, max_runs=4)])
def test_rounds_reject_bad_counts(bad):
    with pytest.raises(ValueError, match="min_runs"):
        timing.time_rounds({"a": lambda: None}, CPU, **bad)


def test_time_ms_is_the_median_of_its_runs(monkeypatch):
    monkeypatch.setattr(timing, "time_rounds", lambda fns, device, **kw: {0: [5.0, 1.0, 3.0]})
    assert timing.time_ms(lambda: None, CPU) == 3.0


def test_main_job_ratio_is_the_median_over_rounds(monkeypatch, tmp_path):
    # ours 1, 2, 10 ms and a peer 4, 1, 30 ms in the same rounds: per-round ratios 4, 0.5, 3
    # (median 3), where the ratio of the medians would say 2.
    monkeypatch.setattr(lb, "CPU_SHAPES", [lb.LayerShape("tiny", 16, 16, 16, 4, 2, 16)])
    monkeypatch.setattr(lb, "TIMING", dict(min_runs=1, max_runs=1, budget_s=0.0))
    times = {"blocksparse_moe": [1.0, 2.0, 10.0]}

    def fake_rounds(fns, device, **kw):
        return {key: times.get(key[0], [4.0, 1.0, 30.0]) for key in fns}
    monkeypatch.setattr(lb, "time_rounds", fake_rounds)
    path = tmp_path / "out.json"
    assert lb.main(["--device", "cpu", "--json", str(path)]) == 0
    rows = {r["impl"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["blocksparse_moe"]["step_ms"] == 2.0
    assert rows["torch loop"]["step_ms"] == 4.0
    assert rows["torch loop"]["ours_speedup"] == statistics.median([4.0, 0.5, 3.0]) == 3.0
