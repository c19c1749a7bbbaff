"""Kernel-level benchmark: the block-sparse products against dense baselines.

For each MoE shape (T tokens, hidden H, expert width F, E experts, top-k, block b) a random
top-k routing builds the ``P x (E*F)`` topology, and the four product passes of an expert
MLP layer are timed (forward calls only):

    sdd    h  = x_perm @ W1        on the topology      [P, H] x [H, E*F]
    dsd    y  = h @ W2                                  [P, E*F](sparse) x [E*F, H]
    dsd_t  dW2 = h^T @ dy          (transposed metadata) [E*F, P](sparse) x [P, H]
    dds    dW1 = x_perm^T @ dh     (x^T a strided view)  [H, P] x [P, E*F](sparse)

Each does ``2*T*k*H*F`` useful FLOPs (padding rows not counted). Baselines of the same
useful work, measured in the same run:

    bmm    torch.bmm over E equal groups of ceil(T*k/E) rows (a perfectly balanced dense
           grouped GEMM: what the padding-free ideal costs with cuBLAS / MKL)
    dense  torch.matmul on the whole dense matrix (E times the FLOPs; only for E <= 8,
           where it is a baseline anyone would try)
    stk    stk.ops (MegaBlocks' kernels) on the same topology, when ``stk`` imports (GPU)

GPU: ``triton.testing.do_bench`` medians (warm-up excluded), Mixtral- and DeepSeek-like
shapes in bf16. CPU: the torch CPU path (never the interpreter), small shapes, a median of
N wall-clock runs; the whole CPU run takes well under a minute.

Writes ``kernels-<device>.json`` and ``.md`` under ``--out-dir`` (default bench/results),
e.g. ``kernels-H100.json`` or ``kernels-cpu-Intel-Xeon.json``.

    python bench/kernels.py [--out-dir DIR] [--shapes NAME ...]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

try:  # the installed package (with its built _C) if there is one, else this checkout
    import blocksparse_moe  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_name, write_results  # noqa: E402

from blocksparse_moe import backend, ops
from blocksparse_moe.__main__ import LayerShape, device_label
from blocksparse_moe.timing import time_ms
from blocksparse_moe.topology import make_topology


# Only the product-relevant fields of LayerShape are used here (no GLU, router or shared expert).
Shape = LayerShape
_SHAPE_FIELDS = ("name", "tokens", "hidden", "ffn", "experts", "top_k", "block_size")

GPU_SHAPES = [
    Shape("mixtral-8x7b", 8192, 4096, 14336, 8, 2, 128),
    Shape("deepseek-moe-b64", 8192, 2048, 1408, 64, 6, 64),
    Shape("deepseek-moe-b128", 8192, 2048, 1408, 64, 6, 128),
]
CPU_SHAPES = [
    Shape("small-8e-top2", 512, 256, 512, 8, 2, 32),
    Shape("small-32e-top4", 256, 256, 256, 32, 4, 32),
]
OPS = ("sdd", "dsd", "dsd_t", "dds")


# -- one shape ---------------------------------------------------------------------------------

def _routing_topology(shape: Shape, device: torch.device):
    g = torch.Generator().manual_seed(0)
    experts = torch.rand(shape.tokens, shape.experts, generator=g).topk(shape.top_k, dim=1).indices
    counts = torch.bincount(experts.flatten(), minlength=shape.experts)
    b = shape.block_size
    padded = torch.cumsum((counts + b - 1) // b * b, 0)
    return make_topology(padded.to(device), shape.experts, shape.ffn, b)


def _stk_matrix_factory(topo):
    """``data -> stk.Matrix`` on our topology, or ``(None, reason)`` when stk can't be used.

    stk wants int16 block indices (its overflow limit: 32767 blocks per dimension).
    """
    try:
        import stk  # noqa: F401
        import stk.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001 (any import failure means "no stk")
        return None, f"stk not importable ({type(e).__name__})"
    if max(topo.block_rows, topo.block_columns, topo.nnz) > 32767:
        return None, "topology too large for stk's int16 indices"
    i16 = torch.int16
    meta = (topo.row_indices.to(i16), topo.column_indices.to(i16), topo.offsets,
            topo.column_indices_t.to(i16), topo.offsets_t, topo.block_offsets_t)

    def make(data):
        return stk.Matrix(topo.shape, data, *meta)

    try:
        make(torch.empty(topo.nnz, topo.block_size, topo.block_size, device=topo.device, dtype=torch.float16))
    except Exception as e:  # noqa: BLE001
        return None, f"stk.Matrix rejected the topology ({type(e).__name__}: {e})"[:200]
    return make, ""


def bench_shape(shape: Shape, dtype: torch.dtype, device: torch.device) -> List[Dict]:
    topo = _routing_topology(shape, device)
    p, ef = topo.shape
    h, f, e = shape.hidden, shape.ffn, shape.experts
    tk = shape.tokens * shape.top_k
    useful = 2.0 * tk * h * f
    g = torch.Generator(device=device).manual_seed(1)

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    x = rnd(p, h)
    w1 = rnd(h, ef, scale=h ** -0.5)
    w2 = rnd(ef, h, scale=f ** -0.5)
    dy = rnd(p, h)
    hs = ops.sdd(x, w1, topo)
    dh = hs.with_data(rnd(topo.nnz, shape.block_size, shape.block_size))

    ours = {
        "sdd": lambda: ops.sdd(x, w1, topo),
        "dsd": lambda: ops.dsd(hs, w2),
        "dsd_t": lambda: ops.dsd(hs.t(), dy),
        "dds": lambda: ops.dds(x.t(), dh),
    }
    c = math.ceil(tk / e)
    xg, hg, dyg = rnd(e, c, h), rnd(e, c, f), rnd(e, c, h)
    w1g, w2g = rnd(e, h, f), rnd(e, f, h)
    bmm = {
        "sdd": lambda: torch.bmm(xg, w1g),
        "dsd": lambda: torch.bmm(hg, w2g),
        "dsd_t": lambda: torch.bmm(hg.transpose(1, 2), dyg),
        "dds": lambda: torch.bmm(xg.transpose(1, 2), hg),
    }
    dense: Dict[str, Callable] = {}
    if e <= 8:
        hd = hs.to_dense()
        dense = {
            "sdd": lambda: x @ w1,
            "dsd": lambda: hd @ w2,
            "dsd_t": lambda: hd.t() @ dy,
            "dds": lambda: x.t() @ hd,
        }
    stk_fns: Dict[str, Callable] = {}
    stk_note = "CPU run"
    if device.type == "cuda":
        make, stk_note = _stk_matrix_factory(topo)
        if make is not None:
            import stk.ops

            shs, sdh = make(hs.data), make(dh.data)
            stk_fns = {
                "sdd": lambda: stk.ops.sdd(x, w1, shs),
                "dsd": lambda: stk.ops.dsd(shs, w2),
                "dsd_t": lambda: stk.ops.dsd(shs.t(), dy),
                "dds": lambda: stk.ops.dds(x.t(), sdh),
            }

    rows = []
    for op in OPS:
        ms = time_ms(ours[op], device)
        row = {**{f: getattr(shape, f) for f in _SHAPE_FIELDS}, "padded_rows": p, "nnz_blocks": topo.nnz, "dtype": str(dtype).split(".")[-1],
               "op": op, "ms": ms, "useful_tflops": useful / ms / 1e9}
        for name, fns in (("bmm", bmm), ("dense", dense), ("stk", stk_fns)):
            if op in fns:
                try:
                    base = time_ms(fns[op], device)
                except Exception as ex:  # noqa: BLE001 (a failing baseline is reported, not fatal)
                    row[f"{name}_error"] = f"{type(ex).__name__}: {ex}"[:200]
                    continue
                row[f"{name}_ms"] = base
                row[f"speedup_vs_{name}"] = base / ms
        if stk_note and not stk_fns:
            row["stk_note"] = stk_note
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


# -- output -------------------------------------------------------------------------------------

_COLUMNS = [("name", "shape", "{}"), ("block_size", "b", "{}"), ("dtype", "dtype", "{}"), ("op", "op", "{}"),
            ("ms", "ms", "{:.3f}"), ("useful_tflops", "TFLOP/s", "{:.3f}"),
            ("bmm_ms", "bmm ms", "{:.3f}"), ("speedup_vs_bmm", "x vs bmm", "{:.2f}"),
            ("dense_ms", "dense ms", "{:.3f}"), ("speedup_vs_dense", "x vs dense", "{:.2f}"),
            ("stk_ms", "stk ms", "{:.3f}"), ("speedup_vs_stk", "x vs stk", "{:.2f}")]


def _cells(row: Dict) -> List[str]:
    return [fmt.format(row[key]) if key in row else "-" for key, _, fmt in _COLUMNS]


def _format_row(row: Dict) -> str:
    return "  ".join(f"{c:>12}" if i > 3 else f"{c:<18}" if i == 0 else f"{c:>6}"
                     for i, c in enumerate(_cells(row)))


def _markdown(rows: List[Dict], meta: Dict) -> str:
    lines = [f"# Kernel benchmark on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; backend `{meta['backend']}`. "
             "Useful TFLOP/s count 2·T·k·H·F per op (padding excluded); `x vs B` = B's time / ours "
             "(> 1: ours is faster). bmm = balanced dense grouped GEMM of the same useful FLOPs; "
             "dense = full dense matmul (E× the FLOPs).", "",
             "| " + " | ".join(h for _, h, _ in _COLUMNS) + " |",
             "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--shapes", nargs="*", help="only these shape names")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="default: bf16 on GPU, fp32 on CPU")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")]
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    if args.shapes:
        shapes = [s for s in GPU_SHAPES + CPU_SHAPES if s.name in args.shapes]
    label = device_label(device)
    import triton

    with backend.prefer_on_cpu("cpu"):  # never the interpreter: on CPU, time the CPU path users run
        return _run(args, device, dtype, shapes, label, triton.__version__)


def _run(args, device, dtype, shapes, label, triton_version) -> int:
    meta = {"device": label, "torch": torch.__version__, "triton": triton_version,
            "backend": backend.select(torch.empty(0, device=device)), "dtype": str(dtype).split(".")[-1],
            "cpu_threads": torch.get_num_threads()}
    print(f"# {label}  torch {meta['torch']}  triton {meta['triton']}  backend {meta['backend']}")
    print("  ".join(f"{h:>12}" if i > 3 else f"{h:<18}" if i == 0 else f"{h:>6}"
                    for i, (_, h, _) in enumerate(_COLUMNS)))
    rows: List[Dict] = []
    with torch.inference_mode():
        for shape in shapes:
            rows += bench_shape(shape, dtype, device)

    plot = dict(value="useful_tflops", label="useful TFLOP/s", group="op", series="name",
                title=f"blocksparse_moe products, {meta['dtype']}: {machine_name(device)}")
    write_results(args.out_dir, f"kernels-{label}", meta, rows, _markdown(rows, meta), plot=plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
