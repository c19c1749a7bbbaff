"""Compile every kernel variant for GPU targets and write the table (no GPU needed).

    python bench/compile_report.py                      # every launch x config, sm_80/sm_90/sm_100
    python bench/compile_report.py --capability 90      # one target
    python bench/compile_report.py --capability auto    # the GPU of this machine (gpu_session.sh)
    python bench/compile_report.py --ci                 # the subset tests/test_compile_targets.py compiles

Writes ``compile-sm<cap>.json`` and ``.md`` per target to ``--out-dir`` (default
bench/results): kernel, dtype, block size, flags, unit-stride layout, config, registers,
spill bytes, shared bytes, MMA kind (from the PTX), shared-memory buffers in flight. Exits 1
if any variant fails to compile, spills, or exceeds the target's shared memory. The sweep
itself is tests/compile_targets.py (shared with the test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ["TRITON_INTERPRET"] = "1"  # the recorder runs the launchers interpreted; workers unset it
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import compile_targets as ct  # noqa: E402

COLUMNS = ("kernel", "dtype", "block_size", "flags", "unit_strides", "config", "regs", "spill_bytes", "shared",
           "mma", "buffers")


def _markdown(cap: int, rows, summary, limit: int, meta: dict) -> str:
    lines = [f"# Kernel variants compiled for sm_{cap}", "",
             f"Triton {meta['triton']}, bundled ptxas; {meta['sweep']} sweep; written by bench/compile_report.py.",
             f"Variants {summary['variants']}, compile errors {summary['errors']}, spilling {summary['spilling']}, "
             f"max registers {summary['max_regs']}, max shared {summary['max_shared']} bytes "
             f"(limit {limit}).", "",
             "Columns: `unit_strides` are the stride arguments equal to 1 in that launch (Triton "
             "specializes them), `buffers` the shared-memory tiles the software pipeline keeps in flight, "
             "`mma` the tensor-core instruction in the PTX (`none`: FMAs on the CUDA cores).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r[c] if r[c] is not None else "-" for c in COLUMNS]
        if not r["ok"]:
            cells[COLUMNS.index("regs")] = "ERROR: " + r["error"].splitlines()[-1][:120].replace("|", "/")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", default="all", help="'all', 'auto' (this GPU) or e.g. 90 or 80,90")
    parser.add_argument("--ci", action="store_true", help="the CI subset instead of the full sweep")
    parser.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--unaligned", action="store_true",
                        help="also compile each launch as recorded (pointers/ints not 16-divisible)")
    args = parser.parse_args()

    limits = dict(ct.SHARED_LIMIT)
    if args.capability == "auto":
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        caps = [major * 10 + minor]
        limits[caps[0]] = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    elif args.capability == "all":
        caps = ct.targets()
    else:
        caps = [int(c) for c in args.capability.split(",")]
    for cap in caps:
        limits.setdefault(cap, 99 * 1024)
    ct.SHARED_LIMIT.update(limits)

    start = time.time()
    launches = ct.record()
    if args.ci:
        jobs = [j for j in ct.ci_jobs(launches) if j["capability"] in caps]
    else:
        jobs = ct.jobs(launches, caps, full=args.unaligned)
    print(f"{len(launches)} launches recorded, {len(jobs)} variants to compile for sm_{', sm_'.join(map(str, caps))}",
          flush=True)
    def progress(done, total):
        if done % 50 == 0 or done == total:
            print(f"  {done}/{total} compiled, {time.time() - start:.0f} s", flush=True)

    results = ct.compile_jobs(jobs, workers=args.workers, progress=progress)
    import triton

    sweep = "CI (covering)" if args.ci else "full, as recorded too" if args.unaligned else "full (aligned)"
    meta = dict(triton=triton.__version__, sweep=sweep,
                seconds=round(time.time() - start, 1))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for cap in caps:
        mine = [r for r in results if r["capability"] == cap]
        rows, summary = ct.rows(mine), ct.summary(mine)
        problems = ct.problems(mine)
        (out / f"compile-sm{cap}.json").write_text(json.dumps(dict(meta, capability=cap, summary=summary,
                                                                   problems=problems, variants=rows), indent=1))
        (out / f"compile-sm{cap}.md").write_text(_markdown(cap, rows, summary, limits[cap], meta))
        print(f"sm_{cap}: {summary}")
        for p in problems[:20]:
            print("  " + p.splitlines()[0])
        status |= bool(problems)
    print(f"done in {time.time() - start:.0f} s; tables in {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
