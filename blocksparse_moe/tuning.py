"""Saving and reloading the autotuners' picks.

On a GPU each tiled kernel launch is autotuned once per (kernel, target, launch plan) in a
process: the first call of each shape class times every candidate config. Two processes
(or two ranks) may pick different tiles, and the sums then differ in their last bits. Two
ways to make runs reproducible:

* ``torch.use_deterministic_algorithms(True)``: no timing at all, every launch takes the
  first config of its table (``kernels/_common.py``);
* tune once, :func:`save_tuning` the picks, and :func:`load_tuning` them in every other
  process or rank before its first call: each launch then runs the saved config without
  timing (and without the time the tuning takes).

    import blocksparse_moe
    ...                                   # a warm-up run, e.g. blocksparse_moe.warmup(model, ...)
    blocksparse_moe.save_tuning("tuning.json")
    # elsewhere, before the first call:
    blocksparse_moe.load_tuning("tuning.json")

A file lists picks for a target (``sm_90`` ...): a process on another GPU ignores them (its
launches have another key) and tunes as usual. Deterministic mode ignores them too.
"""

from __future__ import annotations

import json
import os
from typing import Union

import triton

from .kernels import _common

_FORMAT = "blocksparse_moe-tuning-1"

PathLike = Union[str, "os.PathLike[str]"]


def save_tuning(path: PathLike) -> int:
    """Write every autotune pick made so far in this process to ``path`` (JSON); returns how
    many. Nothing is tuned on CPU or under the interpreter, so there it writes none."""
    picks = _common.tuned_picks()
    with open(path, "w") as f:
        json.dump({"format": _FORMAT, "triton": triton.__version__, "picks": picks}, f, indent=1)
    return len(picks)


def load_tuning(path: PathLike) -> int:
    """Load the picks :func:`save_tuning` wrote; returns how many. Raises ``ValueError``
    (changing nothing) if ``path`` is not such a file, or a pick names a kernel or a config
    this version does not have."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"load_tuning: path {os.fspath(path)!r} is not JSON: {e}") from None
    if not isinstance(saved, dict) or saved.get("format") != _FORMAT or not isinstance(saved.get("picks"), list):
        raise ValueError(f"load_tuning: path {os.fspath(path)!r} is not a file written by save_tuning "
                         f"(format {_FORMAT!r})")
    return _common.restore_picks(saved["picks"])
