"""Shared by the benchmark scripts: result files (json + markdown + png plot) and the
machine's name for titles. Shapes, timing and device labels come from the package's main
job (``blocksparse_moe.__main__``), so the scripts and ``python -m blocksparse_moe`` agree.
"""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Dict, List, Optional

import torch


def machine_name(device: torch.device) -> str:
    """What a plot title calls this machine: the GPU, or the CPU model and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def check_out_dir(parser, path: str) -> None:
    """Fail before the work when the results directory cannot be made or written."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        parser.error(f"--out-dir {path!r}: {probe!r} is not a writable directory")


def write_results(out_dir: str, name: str, meta: Dict, rows: List[Dict], markdown: str,
                  plot: Optional[Dict] = None) -> str:
    """``<out_dir>/<name>.json`` (meta + rows), ``.md`` and, with ``plot`` and matplotlib,
    ``.png``; ``name`` carries the device label.

    ``plot``: ``value`` (row key plotted), ``label`` (its axis label), ``group`` (row key of
    the x-axis groups, e.g. the shape), ``series`` (row key of the bars, e.g. the
    implementation), ``title``. Rows without a finite ``value`` are left out.
    """
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown)
    written = [base + ".json", base + ".md"]
    if plot is not None and _plot(base + ".png", rows, **plot):
        written.append(base + ".png")
    print("wrote " + ", ".join(written))
    return base


def _plot(path: str, rows: List[Dict], *, value: str, label: str, group: str, series: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'blocksparse_moe[bench]')")
        return False
    def finite(r):
        v = r.get(value)
        return isinstance(v, (int, float)) and math.isfinite(v)
    rows = [r for r in rows if finite(r)]  # skipped peers: in the table, not in the plot
    if not rows:
        return False
    scale = 1.0
    if "TFLOP/s" in label and max(r[value] for r in rows) < 1.0:  # CPUs: GFLOP/s reads better
        scale, label = 1e3, label.replace("TFLOP/s", "GFLOP/s")
    groups = list(dict.fromkeys(str(r[group]) for r in rows))
    names = list(dict.fromkeys(str(r[series]) for r in rows))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(len(names), 1) * 0.45), 4.5))
    for i, n in enumerate(names):
        xs, ys = [], []
        for j, g in enumerate(groups):
            v = next((r.get(value) for r in rows if str(r[group]) == g and str(r[series]) == n), None)
            if isinstance(v, (int, float)) and math.isfinite(v):
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(v * scale)
        ax.bar(xs, ys, width, label=n)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
