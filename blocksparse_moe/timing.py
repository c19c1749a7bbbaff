"""Wall-clock timing for the main job and the benchmarks: medians, warm-up excluded.

On a GPU each function is timed alone by ``triton.testing.do_bench``. On a CPU the
functions being compared take turns (:func:`time_rounds`): on a shared or virtual machine
the speed drifts by 10-20% over seconds, and timing one implementation after another lets
that drift decide the ratios; in rounds, a machine that speeds up or slows down shifts them
all alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Hashable, List, TypeVar

import torch

__all__ = ["synchronize", "time_ms", "time_rounds"]

K = TypeVar("K", bound=Hashable)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _do_bench(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def time_ms(fn: Callable[[], object], device: torch.device, *, min_runs: int = 5, max_runs: int = 30,
            budget_s: float = 2.0) -> float:
    """Median wall time of ``fn`` alone in ms, warm-up excluded (CUDA: ``do_bench``)."""
    return statistics.median(time_rounds({0: fn}, device, min_runs=min_runs, max_runs=max_runs,
                                         budget_s=budget_s)[0])


def time_rounds(fns: Dict[K, Callable[[], object]], device: torch.device, *, min_runs: int = 5,
                max_runs: int = 30, budget_s: float = 2.0, warmup: bool = True) -> Dict[K, List[float]]:
    """ms of each run of each function, warm-up excluded.

    CUDA: one number each, the median of ``do_bench``. CPU: one warm-up round (unless the
    caller has run them: ``warmup=False``), then rounds in which each function runs once, in
    ``fns``' order, until there are ``min_runs`` rounds and then until ``budget_s`` seconds
    (for all of them) have passed or there are ``max_runs``.
    Medians of the runs and ratios per round (``a[i] / b[i]``) are then fair comparisons.
    """
    if min_runs < 1 or max_runs < min_runs:
        raise ValueError(f"time_rounds: need 1 <= min_runs <= max_runs, got {min_runs}, {max_runs}")
    if device.type == "cuda":
        return {k: [_do_bench(fn)] for k, fn in fns.items()}
    for fn in fns.values() if warmup else ():
        fn()
    runs: Dict[K, List[float]] = {k: [] for k in fns}
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < min_runs or (rounds < max_runs and time.perf_counter() < deadline):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            runs[k].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return runs
