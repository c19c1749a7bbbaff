"""Shared by the benchmark scripts: result files (json + markdown + png plot) and the
machine's name for titles. Shapes, timing and device labels come from the package's main
job (``blocksparse_moe.__main__``), so the scripts and ``python -m blocksparse_moe`` agree.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

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


# -- FP8 experts (issue 19): shared by decode.py and layer.py ------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expert_weight_bytes(experts_hit: int, hidden: int, ffn: int, *, glu: bool = True, fp8: bool = False,
                        dtype_bytes: int = 2) -> int:
    """Bytes of the expert weights a call reads once: ``experts_hit`` experts' ``w1 [G*F, H]``
    and ``w2 [F, H]``. fp8 (blocksparse_moe/fp8.py's format): 1 byte per element plus one
    float32 scale per 128x128 block of each (``ceil(G*F/128)*ceil(H/128) +
    ceil(F/128)*ceil(H/128)``); otherwise ``dtype_bytes`` per element (2: bf16)."""
    g = 2 if glu else 1
    elements = (g + 1) * ffn * hidden
    if not fp8:
        return experts_hit * elements * dtype_bytes
    scales = _cdiv(g * ffn, 128) * _cdiv(hidden, 128) + _cdiv(ffn, 128) * _cdiv(hidden, 128)
    return experts_hit * (elements + 4 * scales)


def quantize_experts_fp8(gate_up: torch.Tensor, down: torch.Tensor, chunk: int = 8):
    """``(w1, w1_scale, w2, w2_scale)`` for ``expert_mlp``: transformers' ``gate_up_proj [E, G*F, H]``
    and ``down_proj [E, H, F]`` quantized with the 128x128 block quantizer
    (``fp8.quantize_weight_blockwise``), ``chunk`` experts at a time (it makes float32 copies:
    a whole DeepSeek-V3 layer at once would not fit a GPU). ``w2``/``w2_scale`` are the
    transposed views of the quantized ``down_proj`` and its scales, as a checkpoint's
    ``down_proj``/``down_proj_scale_inv`` are read (K-major for the down product)."""
    from blocksparse_moe.fp8 import quantize_weight_blockwise

    def quantize(w):
        parts = [quantize_weight_blockwise(w[i:i + chunk]) for i in range(0, w.shape[0], chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    w1, s1 = quantize(gate_up)
    dq, ds = quantize(down)
    return w1, s1, dq.transpose(1, 2), ds.transpose(1, 2)


#: What torch's grouped scaled matmul is asked to run, and what it can run, in words (the
#: rows that cannot run say this).
SCALED_GROUPED_MM_FORMAT = (
    "torch._scaled_grouped_mm's checks (torch/_meta_registrations.py) take fp32 RowWise scales (one per row "
    "of A, one per output column of each expert's B; sm_90) or MXFP8 e8m0 1x32 scales (sm_100), not the "
    "1x128 x 128x128 block scales of this format")


def scaled_grouped_mm_peer(gate_up: torch.Tensor, down: torch.Tensor, top_k: int, recipe: str = "rowwise",
                           fp8_weights=None):
    """``forward(x, expert_indices, weights) -> [T, H]``: the GLU experts (silu) through torch's
    fp8 grouped matmul, the way a torch user would write it: sort the slots by expert, pad each
    expert's rows to a multiple of 16 (what fp8 grouped GEMMs want), quantize the gathered rows,
    two grouped products, unpad, weight, sum the k slots. No host read (the padded row count is
    the static bound ``T*k + min(E, T*k)*15``).

    ``recipe``:
        "rowwise"   ``torch._scaled_grouped_mm`` with fp32 RowWise scales: each activation row
                    and each output column of each expert's weights get one scale (a coarser
                    format than 128x128 blocks, the same bytes read): a speed reference.
        "128x128"   ``torch.nn.functional.scaled_grouped_mm`` asked for THIS format
                    (activations BlockWise1x128, weights BlockWise128x128); torch may reject
                    it: the caller's row then says why.
    Weights are quantized here, once (not timed); "128x128" reuses ``fp8_weights`` (what
    :func:`quantize_experts_fp8` returned for these weights) when given. Raises RuntimeError
    with the reason when this torch or device cannot run it at all.
    """
    if not hasattr(torch, "_scaled_grouped_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no torch._scaled_grouped_mm")
    if gate_up.device.type != "cuda":
        raise RuntimeError("needs CUDA (torch's fp8 grouped GEMM)" + (
            "" if recipe == "rowwise" else "; torch documents RowWise and MXFP8 scales for it, not 128x128 "
            "blocks: on a GPU this row gives torch's answer"))
    if tuple(torch.cuda.get_device_capability(gate_up.device)) < (9, 0):
        raise RuntimeError("torch's fp8 grouped GEMM needs sm_90+")
    return _grouped_fp8_forward(gate_up, down, top_k, recipe, fp8_weights)


def _grouped_fp8_forward(gate_up: torch.Tensor, down: torch.Tensor, top_k: int, recipe: str, fp8_weights=None):
    """:func:`scaled_grouped_mm_peer` without the device checks (a CPU test patches the GEMM)."""
    import torch.nn.functional as F

    fp8, glu_f = torch.float8_e4m3fn, gate_up.shape[1] // 2
    experts = gate_up.shape[0]

    if recipe == "rowwise":
        def rows_q(w):  # [E, N, K] -> fp8 [E, N, K], fp32 scale [E, N] (one per output row n)
            s = w.float().abs().amax(dim=2).clamp(min=1e-12) / 448.0
            return (w.float() / s.unsqueeze(2)).to(fp8), s.contiguous()
        parts = [rows_q(gate_up[i:i + 8]) for i in range(0, experts, 8)]
        w1q, s1 = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        parts = [rows_q(down[i:i + 8]) for i in range(0, experts, 8)]
        w2q, s2 = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        b1, b2 = w1q.transpose(1, 2), w2q.transpose(1, 2)  # [E, H, 2F], [E, F, H]: column-major, as torch wants

        def act_q(v):  # one scale per row
            s = v.float().abs().amax(dim=1).clamp(min=1e-4) / 448.0
            return (v.float() / s.unsqueeze(1)).to(fp8), s.contiguous()

        def gmm(a, sa, b, sb, offs):
            return torch._scaled_grouped_mm(a, b, sa, sb, offs=offs, out_dtype=torch.bfloat16)
    elif recipe == "128x128":
        from blocksparse_moe.fp8 import quantize_activation_groups

        w1q, s1, b2, s2t = fp8_weights if fp8_weights is not None else quantize_experts_fp8(gate_up, down)
        b1, s1t = w1q.transpose(1, 2), s1.transpose(1, 2)  # [E, H, 2F] and its [E, H/128, 2F/128]

        def act_q(v):
            return quantize_activation_groups(v)

        def gmm(a, sa, b, sb, offs):
            return F.scaled_grouped_mm(a, b, sa, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
                                       offs=offs, output_dtype=torch.bfloat16)
        s1, s2 = s1t, s2t
    else:
        raise ValueError(f"scaled_grouped_mm_peer: recipe must be 'rowwise' or '128x128', got {recipe!r}")

    def forward(x: torch.Tensor, expert_indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        tokens, hidden = x.shape
        slots = tokens * top_k
        ids = expert_indices.reshape(-1)
        order = torch.argsort(ids, stable=True)
        counts = torch.zeros(experts, dtype=torch.int64, device=x.device).scatter_add_(0, ids, torch.ones_like(ids))
        padded = (counts + 15) // 16 * 16
        start = torch.cumsum(counts, 0) - counts
        start_p = torch.cumsum(padded, 0) - padded
        e_sorted = ids[order]
        dest = start_p[e_sorted] + torch.arange(slots, device=x.device) - start[e_sorted]
        rows = slots + min(experts, slots) * 15
        xs = x.new_zeros(rows, hidden).index_copy_(0, dest, x[order // top_k])
        offs = torch.cumsum(padded, 0).to(torch.int32)
        q, s = act_q(xs)
        h = gmm(q, s, b1, s1, offs)
        a = F.silu(h[:, :glu_f].float()) * h[:, glu_f:].float()
        q, s = act_q(a)
        y = gmm(q, s, b2, s2, offs)[dest].float() * weights.reshape(-1)[order, None].float()
        out = torch.empty_like(y).index_copy_(0, order, y)
        return out.view(tokens, top_k, hidden).sum(1).to(x.dtype)
    return forward


def interpreted_rows(script: str, args: Sequence[str]) -> Tuple[List[Dict], str]:
    """``(rows, note)``: run ``script --costs-json PATH *args`` in a subprocess with Triton's
    interpreter on (the device-free columns, on any machine: the launchers run on CPU tensors)
    and read the rows it wrote to PATH; ``note`` says why when it failed."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--costs-json", path, *args], env=env,
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            return [], f"device-free columns failed (exit {proc.returncode}): see stderr"
        with open(path) as f:
            return json.load(f), ""
    finally:
        os.unlink(path)
