"""Compile every kernel variant for GPU targets and write the table (no GPU needed).

    python bench/compile_report.py                      # every launch x config, sm_80/sm_90/sm_100
    python bench/compile_report.py --capability 90      # one target
    python bench/compile_report.py --capability auto    # the GPU of this machine (gpu_session.sh)
    python bench/compile_report.py --ci                 # the subset tests/test_compile_targets.py compiles
    python bench/compile_report.py --kernel sdd.        # one kernel family (module.qualname substring)

Writes ``compile-sm<cap>.json`` and ``.md`` per target to ``--out-dir`` (default
bench/results): kernel, dtype, block size, flags, unit-stride layout, config, registers,
spill bytes, shared bytes, MMA kind (from the PTX), shared-memory buffers in flight. fp8
products have no sm_80 variant (no fp8 tensor cores): for sm_80 they compile for sm_89, and
those land in ``compile-sm89.*``. Under a Triton other than CI's (:data:`CI_TRITON`) the
names carry its version, ``compile-sm90-triton3.6.json``, so the tables of both Tritons
(CI's and the GPU image's 3.6) live side by side; ``--suffix`` overrides. Each table opens
with one summary line per target, also printed, e.g.
``sm_90, Triton 3.9.0: variants 1175, compile errors 0, spilling 0, over shared 0``.
Exits 1 if any variant fails to compile, spills, or exceeds the target's shared memory. The
sweep itself is tests/compile_targets.py (shared with the test).
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

# The Triton of CI (.ci/run's main venv): its tables keep the plain names compile-sm<cap>.*.
CI_TRITON = "3.9"

COLUMNS = ("kernel", "dtype", "block_size", "flags", "unit_strides", "config", "regs", "spill_bytes", "shared",
           "mma", "buffers")


def version_suffix(version: str) -> str:
    """``""`` under CI's Triton, else ``"-triton<major>.<minor>"`` (the file-name tag)."""
    major_minor = ".".join(version.split(".")[:2])
    return "" if major_minor == CI_TRITON else f"-triton{major_minor}"


def summary_line(cap: int, summary: dict, triton_version: str) -> str:
    """The one line per target a reader or CI greps: all three counts must be 0."""
    return (f"sm_{cap}, Triton {triton_version}: variants {summary['variants']}, compile errors {summary['errors']}, "
            f"spilling {summary['spilling']}, over shared {summary['over_shared']}")


def _markdown(cap: int, rows, summary, limit: int, meta: dict) -> str:
    lines = [f"# Kernel variants compiled for sm_{cap} (Triton {meta['triton']})", "",
             summary_line(cap, summary, meta["triton"]), "",
             f"Triton {meta['triton']}, bundled ptxas; {meta['sweep']} sweep; written by bench/compile_report.py "
             f"in {meta['seconds']} s.",
             f"Max registers {summary['max_regs']}, max shared {summary['max_shared']} bytes (limit {limit}).", "",
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
    parser.add_argument("--kernel", action="append", default=[],
                        help="only kernels whose module.qualname contains this (repeatable): re-checks one "
                             "family after a change; the tables then hold that family only")
    parser.add_argument("--suffix", default=None,
                        help="file-name tag after compile-sm<cap> (default: '' under Triton "
                             f"{CI_TRITON}, else '-triton<major.minor>')")
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
    if args.kernel:
        jobs = [j for j in jobs if any(k in f"{j['module']}.{j['qualname']}" for k in args.kernel)]
    print(f"{len(launches)} launches recorded, {len(jobs)} variants to compile for sm_{', sm_'.join(map(str, caps))}",
          flush=True)
    def progress(done, total):
        if done % 50 == 0 or done == total:
            print(f"  {done}/{total} compiled, {time.time() - start:.0f} s", flush=True)

    results = ct.compile_jobs(jobs, workers=args.workers, progress=progress)
    import triton

    sweep = "CI (covering)" if args.ci else "full, as recorded too" if args.unaligned else "full (aligned)"
    if args.kernel:
        sweep += ", kernels matching " + " or ".join(args.kernel) + " only,"
    meta = dict(triton=triton.__version__, sweep=sweep,
                seconds=round(time.time() - start, 1))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = version_suffix(triton.__version__) if args.suffix is None else args.suffix
    status = 0
    lines = []
    # Every target compiled for, sm_89 included (the fp8 launches of an sm_80 sweep).
    for cap in sorted({r["capability"] for r in results} | set(caps)):
        mine = [r for r in results if r["capability"] == cap]
        rows, summary = ct.rows(mine), ct.summary(mine)
        problems = ct.problems(mine)
        summary["over_shared"] = sum(1 for r in mine if r["ok"] and r["shared"] > ct.SHARED_LIMIT[cap])
        line = summary_line(cap, summary, triton.__version__)
        (out / f"compile-sm{cap}{suffix}.json").write_text(json.dumps(
            dict(meta, capability=cap, summary=summary, summary_line=line, problems=problems, variants=rows),
            indent=1))
        (out / f"compile-sm{cap}{suffix}.md").write_text(_markdown(cap, rows, summary, ct.SHARED_LIMIT[cap], meta))
        lines.append(line)
        for p in problems[:20]:
            print("  " + p.splitlines()[0])
        if len(problems) > 20:
            print(f"  ... {len(problems) - 20} more in compile-sm{cap}{suffix}.json")
        status |= bool(problems)
    print("\n".join(lines))
    print(f"done in {time.time() - start:.0f} s; tables compile-sm*{suffix}.json/.md in {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
