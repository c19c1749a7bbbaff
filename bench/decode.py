"""Decode benchmark (issue 17, item 6): the experts of one MoE layer at serving sizes, T = 1..64
tokens per call (transformers' ``generate()`` runs every layer's experts with T = batch size).

Per layer and token count:

    latency           forward, no grad, experts only (the router's top-k ids and fp32 weights
                      are inputs), medians, warm-up excluded, the implementations in turns
                      (``timing.time_rounds``; CUDA: ``triton.testing.do_bench`` each):
        blocksparse_moe   ``expert_mlp(..., check_indices=False)``, ``block_size=None`` (the
                          layer's default: chosen per call). On a CPU this is the CPU path
                          (``cpu/experts.py``), on a GPU the Triton kernels.
        hf-grouped_mm     transformers' "grouped_mm" experts (``torch._grouped_mm``)
        hf-eager (loop)   transformers' own per-expert loop (what ``generate()`` runs by default)
                      all three on the same tensors (``peers.transformers_module``: transformers'
                      layout, ``gate_up_proj [E, 2F, H]``, ``down_proj [E, H, F]``, read in place).
    HBM share         (GPU) bytes of the weights of the experts hit (``3*F*H`` elements each)
                      / latency / the device's HBM bandwidth (table ``HBM_BANDWIDTH``): the
                      physical limit of a decode step is reading those weights once.
    device-free       (any machine, at the layer's REAL sizes, ``blocksparse_moe.serving``):
                      CTAs launched (the fewest over the sm_90 configs) vs CTAs whose row tile
                      holds a real row, bytes of new storages vs the floor ``T*k*(2F + H) + T*H``
                      elements, launches (Triton + torch kernels), host reads. The Triton
                      launchers run on CPU tensors in Triton's interpreter, in a subprocess with
                      ``TRITON_INTERPRET=1``; the products are counted, not run
                      (``run_products=False``), so real sizes cost seconds. Weights there are
                      zero-stride expands: nothing reads them.

FP8 rows (issue 19; ``--fp8``, on by default): the same layer with its experts quantized to
blocksparse_moe's fp8 format (e4m3 weights, one fp32 scale per 128x128 block, activations
quantized per 1x128 group inside the kernels; ``bench/common.quantize_experts_fp8``), one row
per layer and T in a second table:

    weight bytes      (device-free, real sizes) the distinct experts hit by the T*k slots (from
                      the routing) times their weights: bf16 ``3*F*H*2`` bytes each, fp8
                      ``3*F*H`` bytes plus 4 bytes per 128x128 block scale
    bytes, CTAs, launches, host reads
                      (device-free, real sizes) ``serving_costs`` of the fp8 forward as above: the
                      fp8 kernels (``kernels/experts_fp8.py``) are row-tiled (``row_slots_ptr``,
                      ``block_expert_ptr``, ``BLOCK_M``), so ``serving.ROW_RULES`` counts their
                      real CTAs and they are not run; x in bf16, floor as above
    latency           blocksparse_moe fp8 (``expert_mlp(..., w1_scale=, w2_scale=)``) vs our
                      bf16/fp32 path on the same routing, and vs torch's fp8 grouped GEMM
                      (``bench/common.scaled_grouped_mm_peer``): "scaled_grouped_mm rowwise"
                      (fp32 RowWise scales, a coarser format with the same bytes: a speed
                      reference) and "scaled_grouped_mm 128x128" (torch asked for this very
                      format; a row that says why when torch rejects it). On a CPU the fp8 column
                      is the CPU path's (x and a quantized and dequantized per group, the weights
                      dequantized to fp32 per call, fp32 GEMMs): the format's arithmetic, not fp8
                      hardware; the torch peers need CUDA.
    fp8 err           ||fp8 - loop||_F / ||loop||_F against the unquantized layer (transformers'
                      loop in the latency dtype): the format's error, not a tolerance
    HBM share fp8     (GPU) fp8 weight bytes of the hit experts / fp8 latency / HBM bandwidth

On a CPU the latency columns use scaled layers: H and F divided by ``--scale`` (default 8,
rounded to a multiple of 32), E and k real; on a GPU the real sizes (``--scale 1``).

Writes ``decode-<device>-<dtype>.json``, ``.md`` and ``.png`` under ``--out-dir`` (bench/results).

    python bench/decode.py [--quick] [--layers qwen3-30b-a3b ...] [--tokens 1 8 64] [--dtype bf16] [--no-fp8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

try:  # the installed package (with its built _C) if there is one, else this checkout
    import blocksparse_moe  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# Python puts this folder first on sys.path, where bench/kernels.py shadows the ``kernels``
# package transformers looks for (its MoE integration then fails to import): last instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

from common import (SCALED_GROUPED_MM_FORMAT, check_out_dir, expert_weight_bytes, interpreted_rows,  # noqa: E402
                    machine_name, quantize_experts_fp8, scaled_grouped_mm_peer, write_results)

from blocksparse_moe import backend  # noqa: E402
from blocksparse_moe.__main__ import check_device, device_label  # noqa: E402
from blocksparse_moe.timing import synchronize, time_rounds  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Issue 17's layers: (H, F, E, k).
LAYERS: Dict[str, Tuple[int, int, int, int]] = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v3": (7168, 2048, 256, 8),
    "gpt-oss-120b": (2880, 2880, 128, 4),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}
TOKENS = (1, 2, 4, 8, 16, 32, 64)
QUICK_TOKENS = (1, 8, 64)

# Peak HBM bandwidth, bytes/s, by a substring of the device name (first match wins).
HBM_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12))

IMPLS = ("blocksparse_moe", "hf-grouped_mm", "hf-eager (loop)")
# The fp8 rows' implementations (``--fp8``): ours, then torch's fp8 grouped GEMM two ways.
FP8_IMPLS = ("blocksparse_moe fp8", "scaled_grouped_mm rowwise", "scaled_grouped_mm 128x128")


def hbm_bandwidth(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in HBM_BANDWIDTH if key in name), None)


def scaled(n: int, scale: int) -> int:
    """``n / scale`` rounded to a multiple of 32 (at least 32): F stays a multiple of a block."""
    return n if scale == 1 else max(32, round(n / scale / 32) * 32)


def _routing(tokens: int, experts: int, top_k: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """k distinct experts per token uniformly at random (a router's top-k of random logits) and
    softmax weights over them in float32 (what routers return)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1).indices
    return ids, torch.softmax(torch.randn(tokens, top_k, generator=g), -1)


# -- device-free columns (run in a subprocess with TRITON_INTERPRET=1) ---------------------------

def _cost_fields(c, prefix: str = "") -> Dict:
    """A :class:`~blocksparse_moe.serving.ServingCosts` as row fields, keys prefixed."""
    fields = dict(ctas_launched=c.ctas_launched, ctas_real=c.ctas_real, fresh_bytes=c.fresh_bytes,
                  triton_launches=c.triton_launches, torch_kernels=c.torch_kernels, host_reads=c.host_reads,
                  launch_detail=[f"{l.kernel.rsplit('.', 1)[-1]} grid={list(l.grid)} real={l.ctas_real} {l.config}"
                                 for l in c.per_launch],
                  torch_ops=c.torch_ops)
    return {prefix + k: v for k, v in fields.items()}


def costs_rows(layers: Sequence[str], tokens: Sequence[int], dtype: torch.dtype, fp8: bool = True,
               specs: Optional[Dict[str, Tuple[int, int, int, int]]] = None) -> List[Dict]:
    """The device-free columns at real sizes; needs the interpreter (see module docstring).
    ``specs``: ``{layer: (H, F, E, k)}`` (default :data:`LAYERS`). With ``fp8``, the fp8
    forward's costs under ``fp8 ...`` keys (x in ``dtype`` if half, else bf16: the fp8
    kernels take half-precision activations) and both weight byte counts."""
    from blocksparse_moe import expert_mlp
    from blocksparse_moe.fp8 import scale_shape
    from blocksparse_moe.serving import floor_bytes, serving_costs

    specs = LAYERS if specs is None else specs
    x_fp8 = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    rows = []
    for name in layers:
        hidden, ffn, experts, top_k = specs[name]
        w1 = torch.empty(1, 1, 1, dtype=dtype).expand(experts, 2 * ffn, hidden)
        w2 = torch.empty(1, 1, 1, dtype=dtype).expand(experts, ffn, hidden)
        # Zero-stride fp8 weights and scales: the products are counted, not run.
        q1 = torch.empty(1, 1, 1, dtype=torch.float8_e4m3fn).expand(experts, 2 * ffn, hidden)
        q2 = torch.empty(1, 1, 1, dtype=torch.float8_e4m3fn).expand(experts, ffn, hidden)
        s1 = torch.empty(1, 1, 1).expand(*scale_shape(experts, 2 * ffn, hidden))
        s2 = torch.empty(1, 1, 1).expand(*scale_shape(experts, ffn, hidden))
        for t in tokens:
            ids, weights = _routing(t, experts, top_k, seed=t)
            x = torch.randn(t, hidden, generator=torch.Generator().manual_seed(t)).to(dtype)

            def fn():
                with torch.no_grad():
                    expert_mlp(x, ids, weights, w1, w2, check_indices=False)
            t0 = time.perf_counter()
            c = serving_costs(fn, (9, 0), run_products=False)
            row = dict(layer=name, tokens=t, floor_bytes=floor_bytes(t, top_k, hidden, ffn, 2, dtype.itemsize),
                       **_cost_fields(c))
            if fp8:
                hit = len(set(ids.reshape(-1).tolist()))
                row.update(experts_hit=hit, weight_bytes_bf16=expert_weight_bytes(hit, hidden, ffn),
                           weight_bytes_fp8=expert_weight_bytes(hit, hidden, ffn, fp8=True),
                           **{"fp8 floor_bytes": floor_bytes(t, top_k, hidden, ffn, 2, x_fp8.itemsize)})
                xq = x.to(x_fp8)

                def fn8():
                    with torch.no_grad():
                        expert_mlp(xq, ids, weights, q1, q2, check_indices=False, w1_scale=s1, w2_scale=s2)
                try:  # kernels/experts_fp8.py is young: a failure is a row note, not a lost run
                    row.update(_cost_fields(serving_costs(fn8, (9, 0), run_products=False), "fp8 "))
                except Exception as exc:  # noqa: BLE001
                    row["fp8 costs status"] = f"failed: {type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            print(f"  costs {name} T={t}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return rows


def device_free(layers: Sequence[str], tokens: Sequence[int], dtype_name: str,
                fp8: bool = True) -> Tuple[List[Dict], str]:
    """``(rows, note)``: :func:`costs_rows` in a subprocess with the interpreter on."""
    return interpreted_rows(__file__, ["--dtype", dtype_name, "--layers", *layers, "--tokens", *map(str, tokens),
                                       "--fp8" if fp8 else "--no-fp8"])


# -- latency --------------------------------------------------------------------------------------

class Layer:
    """One layer's weights (transformers' layout) on ``device``, at H and F divided by ``scale``."""

    def __init__(self, name: str, scale: int, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 fp8: bool = False):
        from blocksparse_moe.peers import transformers_experts, transformers_module

        hidden, ffn, experts, top_k = LAYERS[name]
        self.name, self.dtype, self.device = name, dtype, device
        self.hidden, self.ffn, self.experts, self.top_k = scaled(hidden, scale), scaled(ffn, scale), experts, top_k
        g = torch.Generator(device=device).manual_seed(seed)
        h, f, e = self.hidden, self.ffn, self.experts
        self.w1 = torch.randn(e, 2 * f, h, generator=g, device=device, dtype=dtype) / math.sqrt(h)  # gate_up_proj
        down = torch.randn(e, h, f, generator=g, device=device, dtype=dtype) / math.sqrt(f)  # down_proj
        self.w2 = down.transpose(1, 2)  # [E, F, H], a view: read in place
        module = transformers_module(self.w1, self.w2, top_k)
        self.peers = {"hf-grouped_mm": transformers_experts(module, "grouped_mm"),
                      "hf-eager (loop)": transformers_experts(module, "eager")}
        self.fp8 = None
        self.unavailable: Dict[str, str] = {}  # impl -> why it cannot run here
        if fp8:
            # The checkpoint's layout: down_proj [E, H, F] quantized, w2 its transposed view.
            self.fp8 = quantize_experts_fp8(self.w1, down)
            for impl, recipe in (("scaled_grouped_mm rowwise", "rowwise"), ("scaled_grouped_mm 128x128", "128x128")):
                try:
                    self.peers[impl] = scaled_grouped_mm_peer(self.w1, down, top_k, recipe, self.fp8)
                except Exception as exc:  # noqa: BLE001 - no CUDA, an old torch or GPU: the row says why
                    self.unavailable[impl] = f"{type(exc).__name__}: {exc}"

    def describe(self) -> str:
        return f"H={self.hidden} F={self.ffn} E={self.experts} k={self.top_k}"

    def fns(self, tokens: int) -> Tuple[Dict[str, Callable], int]:
        """``({impl: forward}, experts hit)`` for a batch of ``tokens``."""
        from blocksparse_moe import expert_mlp

        ids, weights = _routing(tokens, self.experts, self.top_k, seed=tokens)
        ids, weights = ids.to(self.device), weights.to(self.device)
        x = torch.randn(tokens, self.hidden, generator=torch.Generator().manual_seed(tokens)).to(self.device,
                                                                                                  self.dtype)
        fns = {"blocksparse_moe": lambda: expert_mlp(x, ids, weights, self.w1, self.w2, check_indices=False)}
        if self.fp8 is not None:
            q1, s1, q2, s2 = self.fp8
            fns["blocksparse_moe fp8"] = lambda: expert_mlp(x, ids, weights, q1, q2, check_indices=False,
                                                            w1_scale=s1, w2_scale=s2)
        for name, peer in self.peers.items():
            fns[name] = (lambda p: lambda: p(x, ids, weights))(peer)
        return fns, int(torch.unique(ids).numel())


def bench_layer(layer: Layer, tokens: Sequence[int], timing: Dict) -> List[Dict]:
    rows = []
    bandwidth = hbm_bandwidth(layer.device)
    for t in tokens:
        fns, hit = layer.fns(t)
        row: Dict[str, object] = dict(layer=layer.name, tokens=t, timed_shape=layer.describe(), experts_hit=hit)
        for name, why in layer.unavailable.items():
            row[f"{name} status"] = f"skipped: {why}"[:240]
        with torch.no_grad():
            outs = {}
            for name, fn in fns.items():  # the check doubles as the warm-up
                try:
                    outs[name] = fn().float()
                except Exception as exc:  # noqa: BLE001 - a peer this torch cannot run: say why
                    row[f"{name} status"] = f"skipped: {type(exc).__name__}: {exc}"[:160]
            ok = {n: fns[n] for n in outs}
            ref = outs.get("hf-eager (loop)")
            for name, out in outs.items():
                if ref is not None and name != "hf-eager (loop)":
                    row[f"{name} rel_err"] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                    if name in FP8_IMPLS:  # the format's error against the unquantized layer
                        row[f"{name} fro_err"] = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            runs = time_rounds(ok, layer.device, warmup=False, **timing)
        synchronize(layer.device)
        weight_bytes = hit * 3 * layer.ffn * layer.hidden * layer.w1.element_size()
        fp8_bytes = expert_weight_bytes(hit, layer.hidden, layer.ffn, fp8=True)
        for name in IMPLS + FP8_IMPLS:
            if name not in runs:
                continue
            ms = statistics.median(runs[name])
            row[f"{name} ms"] = ms
            if bandwidth:
                row[f"{name} hbm_share"] = (fp8_bytes if name in FP8_IMPLS else weight_bytes) / (ms * 1e-3) / bandwidth
        ours = row.get("blocksparse_moe ms")
        for name in IMPLS[1:]:
            if ours and row.get(f"{name} ms"):
                row[f"x {name}"] = row[f"{name} ms"] / ours
        ours8 = row.get("blocksparse_moe fp8 ms")
        for name in ("blocksparse_moe",) + FP8_IMPLS[1:]:  # their latency over our fp8's (>1: fp8 faster)
            if ours8 and row.get(f"{name} ms"):
                row[f"fp8 x {name}"] = row[f"{name} ms"] / ours8
        rows.append(row)
        print(f"  {layer.name} T={t}: " + ", ".join(f"{n} {row[f'{n} ms']:.3f} ms" for n in IMPLS + FP8_IMPLS
                                                   if f"{n} ms" in row), file=sys.stderr, flush=True)
    return rows


# -- output ---------------------------------------------------------------------------------------

HEADER = ("layer", "T", "ours ms", "grouped_mm ms", "loop ms", "x grouped_mm", "x loop", "ours err", "HBM share",
          "CTAs launched", "CTAs real", "launched/real", "MB allocated", "MB floor", "alloc/floor",
          "launches (triton+torch)", "host reads")


def _cells(r: Dict) -> Tuple[str, ...]:
    def f(key, spec, scale=None):
        v = r.get(key)
        return "-" if v is None else format(v if scale is None else v * scale, spec)

    def ratio(a, b):
        return f"{r[a] / r[b]:.2f}" if r.get(a) is not None and r.get(b) else "-"
    launches = (f"{r['triton_launches'] + r['torch_kernels']} ({r['triton_launches']}+{r['torch_kernels']})"
                if r.get("triton_launches") is not None else "-")
    return (r["layer"], str(r["tokens"]), f("blocksparse_moe ms", ".3f"), f("hf-grouped_mm ms", ".3f"),
            f("hf-eager (loop) ms", ".3f"), f("x hf-grouped_mm", ".2f"), f("x hf-eager (loop)", ".2f"),
            f("blocksparse_moe rel_err", ".0e"),
            f("blocksparse_moe hbm_share", ".0%"), f("ctas_launched", ",d"), f("ctas_real", ",d"),
            ratio("ctas_launched", "ctas_real"), f("fresh_bytes", ",.2f", 1e-6), f("floor_bytes", ",.3f", 1e-6),
            ratio("fresh_bytes", "floor_bytes"), launches, f("host_reads", "d"))


FP8_HEADER = ("layer", "T", "experts hit", "weights MB bf16", "weights MB fp8", "fp8/bf16", "fp8 ms", "ours ms",
              "x ours", "scaled_gmm ms", "x scaled_gmm", "scaled_gmm 128x128 ms", "fp8 err", "HBM share fp8",
              "CTAs launched", "CTAs real", "launched/real", "MB allocated", "MB floor", "alloc/floor",
              "launches (triton+torch)", "host reads")


def _fp8_cells(r: Dict) -> Tuple[str, ...]:
    def f(key, spec, scale=None):
        v = r.get(key)
        return "-" if v is None else format(v if scale is None else v * scale, spec)

    def ratio(a, b, spec=".2f"):
        return format(r[a] / r[b], spec) if r.get(a) is not None and r.get(b) else "-"
    launches = (f"{r['fp8 triton_launches'] + r['fp8 torch_kernels']} "
                f"({r['fp8 triton_launches']}+{r['fp8 torch_kernels']})"
                if r.get("fp8 triton_launches") is not None else "-")
    return (r["layer"], str(r["tokens"]), f("experts_hit", "d"), f("weight_bytes_bf16", ",.1f", 1e-6),
            f("weight_bytes_fp8", ",.1f", 1e-6), ratio("weight_bytes_fp8", "weight_bytes_bf16", ".3f"),
            f("blocksparse_moe fp8 ms", ".3f"), f("blocksparse_moe ms", ".3f"), f("fp8 x blocksparse_moe", ".2f"),
            f("scaled_grouped_mm rowwise ms", ".3f"), f("fp8 x scaled_grouped_mm rowwise", ".2f"),
            f("scaled_grouped_mm 128x128 ms", ".3f"),
            f("blocksparse_moe fp8 fro_err", ".1e"), f("blocksparse_moe fp8 hbm_share", ".0%"),
            f("fp8 ctas_launched", ",d"), f("fp8 ctas_real", ",d"), ratio("fp8 ctas_launched", "fp8 ctas_real"),
            f("fp8 fresh_bytes", ",.2f", 1e-6), f("fp8 floor_bytes", ",.3f", 1e-6),
            ratio("fp8 fresh_bytes", "fp8 floor_bytes"), launches, f("fp8 host_reads", "d"))


def _table(header: Sequence[str], cells: List[Tuple[str, ...]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |"
                                                                             for c in cells]


def _notes(rows: List[Dict], impls: Sequence[str]) -> List[str]:
    """Why implementations were not timed, one line per (implementation, reason) with where."""
    seen: Dict[Tuple[str, str], List[str]] = {}
    for r in rows:
        for impl in impls:
            why = r.get(f"{impl} status")
            if why:
                seen.setdefault((impl, why), []).append(f"{r['layer']} T={r['tokens']}")
    total = len(rows)
    return [f"- {impl}: {why} ({'every row' if len(where) == total else ', '.join(where)})"
            for (impl, why), where in seen.items()]


def _markdown(rows: List[Dict], meta: Dict) -> str:
    lines = [f"# Decode benchmark: {meta['machine']}", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, latency in {meta['dtype']}"
             f"{', quick run' if meta['quick'] else ''}; load average at start {meta['load_start']}, at end "
             f"{meta['load_end']}. Experts only (routing given), forward, no grad; medians, warm-up excluded, "
             "the implementations in turns. `x grouped_mm` / `x loop`: their latency over ours (>1 = we are "
             "faster). `ours err`: max |ours - loop| / max |loop| (a check, not a tolerance). HBM share (GPU): "
             "bytes of the hit experts' weights / our latency / the HBM bandwidth.", "",
             f"Latency shapes: {meta['latency_shapes']}. {meta['latency_note']}", "",
             f"Device-free columns at the layers' REAL sizes in {meta['costs_dtype']} (blocksparse_moe.serving, "
             "the Triton launchers interpreted on CPU tensors, sm_90 configs, products counted not run): CTAs "
             "launched (fewest over the configs) vs CTAs whose row tile holds a real row; bytes of new storages "
             "vs the floor `T*k*(2F+H) + T*H` elements; launches = Triton launches + torch ops that launch a "
             "kernel; host reads of device data. Issue 17's bound: launched <= 2x real, allocated <= 4x floor "
             f"+ 1 MiB. {meta['costs_note']}", "",
             ] + _table(HEADER, [_cells(r) for r in rows])
    notes = _notes(rows, IMPLS)
    if notes:
        lines += ["", "Not timed:", ""] + notes
    if meta.get("fp8"):
        lines += ["", "## FP8 experts (issue 19)", "",
                  "The same layers with their experts in blocksparse_moe's fp8 format (e4m3 weights, one fp32 scale "
                  "per 128x128 block, x and a quantized per 1x128 group inside the kernels), forward only. Device-"
                  "free, at the REAL sizes: `experts hit` = distinct experts among the T*k slots of the routing; "
                  "`weights MB` = their w1 and w2 read once: bf16 2 bytes per element, fp8 1 byte plus a 4-byte "
                  "scale per 128x128 block; CTAs, MB allocated (floor as above, x in "
                  f"{meta.get('fp8_x_dtype', 'bf16')}), launches and host reads of the fp8 forward "
                  "(`kernels/experts_fp8.py`, row-tiled: `serving.ROW_RULES` counts its real CTAs; products "
                  "counted, not run). Latency on the latency shapes: `fp8 ms` = blocksparse_moe with fp8 weights, "
                  "`ours ms` = our path with the unquantized weights (the first table's), `x ours` = ours / fp8 "
                  "(>1 = fp8 faster); `scaled_gmm` = torch's fp8 grouped GEMM with fp32 RowWise scales (a coarser "
                  "format, the same bytes: a speed reference), `x scaled_gmm` = its latency / ours fp8, `scaled_gmm "
                  "128x128` = torch asked for this format (a note below when it cannot). `fp8 err` "
                  "= ||fp8 - loop||_F / ||loop||_F against transformers' loop on the unquantized weights (the "
                  "format's error, not a tolerance). HBM share fp8 (GPU): the hit experts' fp8 weight bytes / "
                  f"fp8 latency / HBM bandwidth. Why torch's rows are a speed reference: {SCALED_GROUPED_MM_FORMAT}.",
                  "",
                  meta.get("fp8_latency_note", ""), ""]
        lines += _table(FP8_HEADER, [_fp8_cells(r) for r in rows])
        notes = _notes(rows, FP8_IMPLS) + [f"- {r['layer']} T={r['tokens']} fp8 device-free columns: "
                                           f"{r['fp8 costs status']}" for r in rows if r.get("fp8 costs status")]
        if notes:
            lines += ["", "Not timed / not counted:", ""] + notes
    lines += ["", "Layers (H, F, E, k): " + "; ".join(f"{n} {v}" for n, v in LAYERS.items() if n in meta['layers'])]
    return "\n".join(lines) + "\n"


def _plot(path: str, rows: List[Dict], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'blocksparse_moe[bench]')")
        return False
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    if not layers:
        return False
    fig, axes = plt.subplots(2, len(layers), figsize=(3.4 * len(layers), 6.2), squeeze=False)
    for j, name in enumerate(layers):
        rs = [r for r in rows if r["layer"] == name]
        ts = [r["tokens"] for r in rs]
        ax = axes[0][j]
        for impl in IMPLS + FP8_IMPLS:
            pts = [(r["tokens"], r[f"{impl} ms"]) for r in rs if r.get(f"{impl} ms")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("T (tokens per call)", fontsize=8)
        if j == 0:
            ax.set_ylabel("forward ms", fontsize=8)
            if ax.get_legend_handles_labels()[0]:  # no latency measured: no lines
                ax.legend(fontsize=7)
        ax = axes[1][j]
        for key_a, key_b, label in (("ctas_launched", "ctas_real", "CTAs launched / real"),
                                    ("fresh_bytes", "floor_bytes", "bytes allocated / floor"),
                                    ("fp8 ctas_launched", "fp8 ctas_real", "fp8 CTAs launched / real"),
                                    ("fp8 fresh_bytes", "fp8 floor_bytes", "fp8 bytes allocated / floor"),
                                    ("weight_bytes_fp8", "weight_bytes_bf16", "fp8 / bf16 weight bytes")):
            pts = [(r["tokens"], r[key_a] / r[key_b]) for r in rs if r.get(key_a) is not None and r.get(key_b)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(2.0, color="grey", lw=0.6, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ts)
        ax.set_xlabel("T (real sizes, sm_90)", fontsize=8)
        if j == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def meta_device(device: torch.device) -> str:
    return machine_name(device) if device.type == "cuda" else "a CPU"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Decode benchmark: expert-path latency at T = 1..64 and the "
                                            "device-free serving costs (issue 17)")
    p.add_argument("--quick", action="store_true", help=f"T in {QUICK_TOKENS}, few timing runs")
    p.add_argument("--layers", nargs="*", default=None, help=f"some of {list(LAYERS)}")
    p.add_argument("--tokens", nargs="*", type=int, default=None, help=f"token counts (default {TOKENS})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="latency dtype (default: bf16 on CUDA, fp32 on CPU); the device-free columns use "
                        "it too when given, else bf16")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--scale", type=int, default=None, help="divide H and F by this for the latency columns "
                   "(default: 8 on CPU, 1 on CUDA)")
    p.add_argument("--no-latency", action="store_true", help="only the device-free columns")
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True,
                   help="the fp8 rows (issue 19): device-free weight bytes and costs, fp8 latency and torch's fp8 "
                        "grouped GEMM (default: on)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--costs-json", default=None, help=argparse.SUPPRESS)  # the subprocess of device_free()
    args = p.parse_args(argv)
    layers = args.layers or list(LAYERS)
    unknown = set(layers) - set(LAYERS)
    if unknown:
        p.error(f"unknown layers {sorted(unknown)}; known: {list(LAYERS)}")
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    if any(t < 1 for t in tokens):
        p.error(f"--tokens must be >= 1, got {tokens}")
    costs_dtype_name = args.dtype or "bf16"
    if args.costs_json:
        if not backend.interpreter_enabled():
            p.error("--costs-json needs TRITON_INTERPRET=1")
        with open(args.costs_json, "w") as f:
            json.dump(costs_rows(layers, tokens, DTYPES[costs_dtype_name], fp8=args.fp8), f)
        return 0

    device = check_device(p, args.device)
    check_out_dir(p, args.out_dir)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    scale = args.scale or (1 if device.type == "cuda" else 8)
    timing = dict(min_runs=3, max_runs=5, budget_s=0.3) if args.quick else dict(min_runs=7, max_runs=30,
                                                                                  budget_s=1.0)
    import transformers

    load_start = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print("device-free columns (real sizes, interpreter subprocess) ...", file=sys.stderr, flush=True)
    free, costs_note = device_free(layers, tokens, costs_dtype_name, fp8=args.fp8)
    by_key = {(r["layer"], r["tokens"]): r for r in free}
    rows: List[Dict] = []
    shapes = []
    for name in layers:
        if args.no_latency:
            rows += [dict(layer=name, tokens=t) for t in tokens]
            continue
        print(f"{name}: latency", file=sys.stderr, flush=True)
        layer = Layer(name, scale, dtype, device, fp8=args.fp8)
        shapes.append(f"{name} {layer.describe()}")
        with backend.prefer_on_cpu("cpu"):
            rows += bench_layer(layer, tokens, timing)
        del layer
    for r in rows:
        r.update(by_key.get((r["layer"], r["tokens"]), {}))

    widths = [max(len(HEADER[i]), *(len(_cells(r)[i]) for r in rows)) for i in range(len(HEADER))]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(_cells(r), widths)))
    if args.fp8:
        cells = [_fp8_cells(r) for r in rows]
        widths = [max(len(FP8_HEADER[i]), *(len(c[i]) for c in cells)) for i in range(len(FP8_HEADER))]
        print("\nFP8 experts:")
        print("  ".join(h.ljust(w) for h, w in zip(FP8_HEADER, widths)))
        for c in cells:
            print("  ".join(v.ljust(w) for v, w in zip(c, widths)))

    label = device_label(device)
    latency_note = ("Latency not measured (--no-latency)." if args.no_latency else
                    f"H and F divided by {scale} (rounded to a multiple of 32), E and k real; on a CPU "
                    "blocksparse_moe runs its CPU path." if scale != 1 else "Real sizes.")
    meta = dict(device=label, machine=machine_name(device), torch=torch.__version__,
                transformers=transformers.__version__, quick=bool(args.quick), dtype=dtype_name,
                costs_dtype=costs_dtype_name, scale=scale, layers=layers, tokens=list(tokens),
                threads=torch.get_num_threads(), load_start=load_start,
                load_end=", ".join(f"{v:.1f}" for v in os.getloadavg()),
                latency_shapes="; ".join(shapes) or "-", latency_note=latency_note, costs_note=costs_note,
                hbm_bandwidth=hbm_bandwidth(device), fp8=bool(args.fp8),
                fp8_x_dtype=costs_dtype_name if costs_dtype_name in ("bf16", "fp16") else "bf16",
                fp8_latency_note=("" if args.no_latency or not args.fp8 else
                                  f"fp8 latency in {dtype_name} activations on {meta_device(device)}: " + (
                                      "the CPU path (x and a quantized and dequantized per 1x128 group, fp32 "
                                      "GEMMs; every call dequantizes the weights of the experts its row chunks "
                                      "span, experts without rows included, so its time barely moves with T): "
                                      "the format's arithmetic without fp8 hardware, not a prediction of GPU "
                                      "speed; torch's fp8 grouped GEMM needs CUDA." if device.type == "cpu" else
                                      "the Triton fp8 kernels.")))
    base = write_results(args.out_dir, f"decode-{label}-{dtype_name}", meta, rows, _markdown(rows, meta))
    if _plot(base + ".png", rows, f"decode, {dtype_name}: {meta['machine']}"):
        print(f"wrote {base}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
