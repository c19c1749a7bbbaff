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

import importlib
import json
import os
from typing import Dict, List, Union

import torch
import triton

from .kernels import _common

_FORMAT = "blocksparse_moe-tuning-1"

PathLike = Union[str, "os.PathLike[str]"]


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__}:{fn.__qualname__}"


def _untuple(v):
    return [_untuple(x) for x in v] if isinstance(v, (tuple, list)) else v


def _retuple(v):
    return tuple(_retuple(x) for x in v) if isinstance(v, list) else v


def _tuned_picks() -> List[Dict[str, object]]:
    """Every pick the autotuners of this process have made, JSON-ready: per pick the
    kernel, the target, the launch's :class:`Tiles`, the input precision, Triton's key of
    the call (its tensors' dtypes) and the config it chose."""
    out = []
    for (kernel, capability, tiles, precision), tuner in _common._TUNED.items():
        for key, cfg in getattr(tuner, "cache", {}).items():
            out.append({
                "kernel": _kernel_name(kernel), "capability": list(capability), "precision": precision,
                "tiles": {"split": tiles.split, "block_size": tiles.block_size,
                          "dtype": str(tiles.dtype).replace("torch.", ""), "key": _untuple(tiles.key),
                          "min_warps": tiles.min_warps, "caps": list(tiles.caps), "fma": list(tiles.fma)},
                "call_key": _untuple(key),
                "config": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}})
    return out


def _restore_picks(picks: List[Dict[str, object]]) -> int:
    """Give the autotuners the ``picks`` of :func:`_tuned_picks` (from another process or
    rank): a launch with the same kernel, target, tiles and call key then runs the saved
    config without timing anything. Returns how many were restored. Raises ``ValueError``
    (before changing anything) for a kernel not in this package, or a config that is not
    one of that launch's candidates here (saved by another version of the tables)."""
    staged = []
    for i, p in enumerate(picks):
        try:
            module, _, name = str(p["kernel"]).partition(":")
            kernel = getattr(importlib.import_module(module), name) if module.startswith("blocksparse_moe.") else None
            t = p["tiles"]
            tiles = _common.Tiles(t["split"], int(t["block_size"]), getattr(torch, t["dtype"]),
                                  key=_retuple(t["key"]), min_warps=int(t["min_warps"]), caps=tuple(t["caps"]),
                                  fma=tuple(t.get("fma", (0, 0))))
            capability = tuple(int(c) for c in p["capability"])
            precision, config, call_key = p["precision"], dict(p["config"]), _retuple(p["call_key"])
        except (KeyError, TypeError, AttributeError, ImportError, ValueError) as e:
            raise ValueError(f"picks[{i}]: not a saved autotune pick ({type(e).__name__}: {e})") from None
        if kernel is None or not hasattr(kernel, "run"):
            raise ValueError(f"picks[{i}]: kernel {p['kernel']!r} is not a Triton kernel of blocksparse_moe")
        configs = tiles.candidates(_common.kernel_name(kernel), precision, capability=capability)
        if config not in configs:
            raise ValueError(f"picks[{i}]: config {config} of {p['kernel']} is not among this version's "
                             f"candidates for sm_{capability[0]}{capability[1]}: {configs}")
        staged.append((kernel, capability, tiles, precision, configs, call_key, config))
    for kernel, capability, tiles, precision, configs, call_key, config in staged:
        _common._autotuner(kernel, capability, tiles, precision, configs).cache[call_key] = _common._config(config)
    return len(staged)


def save_tuning(path: PathLike) -> int:
    """Write every autotune pick made so far in this process to ``path`` (JSON); returns how
    many. Nothing is tuned on CPU or under the interpreter, so there it writes none."""
    picks = _tuned_picks()
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
    return _restore_picks(saved["picks"])
