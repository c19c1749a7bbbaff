"""Build of blocksparse_moe and its native extension ``blocksparse_moe._C``.

``_C`` holds the routing and topology ops (csrc/). It links pybind11 and, for the CUDA ops,
the CUDA runtime; it does not link libtorch (Python passes data pointers, sizes and the
stream), so the build needs no torch and one build works with any torch version.

* C++ CPU ops: always built.
* CUDA ops: built when nvcc is found ($CUDA_HOME or $CUDA_PATH, /usr/local/cuda, nvcc on
  PATH). The .cu files are compiled by nvcc here (build_ext below) and linked into the same
  module with the static CUDA runtime (libcudart_static.a): the installed .so then needs only
  the NVIDIA driver (libcuda.so, loaded lazily on the first CUDA call), not the toolkit, and
  imports on machines without any CUDA at all.

Environment:
    BLOCKSPARSE_MOE_CUDA=0            build the CPU ops only
    BLOCKSPARSE_MOE_CUDA=1            fail the build unless the CUDA ops build
    BLOCKSPARSE_MOE_CUDA_ARCHS=90     SM architectures, ';' or ',' separated (default 90:
                                      sm_90 SASS + compute_90 PTX for newer GPUs)
    CUDA_HOME / CUDA_PATH             toolkit location

The build prints one line saying whether the CUDA ops were built (visible with pip -v);
``blocksparse_moe.native_status()`` reports the same at run time. In auto mode a failing
nvcc leaves a CPU-only build (with the reason recorded) rather than no build.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Tuple

from pybind11.setup_helpers import Pybind11Extension
from pybind11.setup_helpers import build_ext as Pybind11BuildExt
from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
MANIFEST = json.loads((ROOT / "third_party" / "manifest.json").read_text())


def _version() -> str:
    text = (ROOT / "blocksparse_moe" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _vtuple(v: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _say(msg: str) -> None:
    print(f"blocksparse_moe build: {msg}", flush=True)


# -- CUDA toolkit discovery --------------------------------------------------------------------

def _find_nvcc() -> Tuple[Optional[Path], Optional[Path], str]:
    """(cuda_home, nvcc, reason): cuda_home is None when no usable toolkit was found."""
    candidates: List[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]))
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        nvcc = home / "bin" / "nvcc"
        if nvcc.is_file():
            return home, nvcc, ""
    on_path = shutil.which("nvcc")
    if on_path:
        # nvcc may be a wrapper script; ask it where its toolkit is (_HERE_ is <home>/bin).
        try:
            out = subprocess.run([on_path, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
            if m:
                home = Path(m.group(1).strip()).resolve().parent
                if (home / "bin" / "nvcc").is_file():
                    return home, home / "bin" / "nvcc", ""
        except (OSError, subprocess.SubprocessError):
            pass
    return None, None, "nvcc not found (set CUDA_HOME, or put nvcc on PATH)"


def _cccl(home: Path) -> Tuple[Optional[Path], str]:
    """(include dir holding cub/, version 'M.m.p') of the toolkit's CCCL."""
    header = MANIFEST["cccl"]["version_header"]
    for inc in (home / "include" / "cccl", home / "include",
                home / "targets" / "x86_64-linux" / "include" / "cccl", home / "targets" / "x86_64-linux" / "include"):
        path = inc / header
        if path.is_file():
            m = re.search(r"#define\s+CUB_VERSION\s+(\d+)", path.read_text())
            if m:  # CUB_VERSION is MMMmmmpp
                v = int(m.group(1))
                return inc, f"{v // 100000}.{v // 100 % 1000}.{v % 100}"
    return None, ""


def _nvcc_version(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else ""


def _archs() -> List[str]:
    raw = os.environ.get("BLOCKSPARSE_MOE_CUDA_ARCHS", "90")
    # Accept "90", "9.0", "sm_90", "compute_90", "100a".
    archs = [re.sub(r"^(sm_?|compute_?)", "", a.strip()).replace(".", "") for a in re.split(r"[;, ]+", raw) if a.strip()]
    for a in archs:
        if not re.fullmatch(r"\d+[af]?", a):
            raise SystemExit(f"blocksparse_moe build: bad BLOCKSPARSE_MOE_CUDA_ARCHS entry {a!r} (e.g. '90;100a')")
    return archs


def _gencode(archs: List[str]) -> List[str]:
    """SASS for every arch, plus PTX of the last one so newer GPUs can JIT it."""
    flags = []
    for i, a in enumerate(archs):
        code = f"[sm_{a},compute_{a}]" if i == len(archs) - 1 else f"sm_{a}"
        flags.append(f"-gencode=arch=compute_{a},code={code}")
    return flags


class BuildExt(Pybind11BuildExt):
    """pybind11's build_ext, plus nvcc for csrc/cuda/*.cu when a toolkit is available."""

    def build_extension(self, ext):
        mode = os.environ.get("BLOCKSPARSE_MOE_CUDA", "").strip()
        cuda, reason = None, "disabled by BLOCKSPARSE_MOE_CUDA=0"
        if mode != "0":
            cuda, reason = self._build_cuda_objects()
            if cuda is None and mode == "1":
                raise SystemExit(f"blocksparse_moe build: BLOCKSPARSE_MOE_CUDA=1 but the CUDA ops cannot be built: "
                                 f"{reason}")
        if cuda is None:
            _say(f"CUDA ops NOT built ({reason}); building the C++ CPU ops only")
            ext.define_macros.append(("BSMOE_CUDA_REASON", _c_string(reason)))
        else:
            objects, libdir, archs, cuda_version, cccl_version = cuda
            ext.extra_objects.extend(objects)
            ext.define_macros.extend([
                ("BSMOE_WITH_CUDA", None),
                ("BSMOE_CUDA_ARCHS", _c_string(";".join(archs))),
                ("BSMOE_CUDA_VERSION", _c_string(cuda_version)),
                ("BSMOE_CCCL_VERSION", _c_string(cccl_version)),
            ])
            ext.library_dirs.append(str(libdir))
            # cudart_static needs the dynamic loader (it dlopens libcuda), threads and rt.
            ext.libraries.extend(["cudart_static", "dl", "pthread", "rt"])
        # setuptools relinks only when a C++ source is newer than the .so; an nvcc object or a
        # changed CUDA configuration (archs, on/off) must relink too.
        stamp = Path(self.build_temp) / "bsmoe-config.txt"
        config = repr((ext.define_macros, ext.extra_objects, [os.path.getmtime(o) for o in ext.extra_objects]))
        if not stamp.is_file() or stamp.read_text() != config:
            self.force = True
        super().build_extension(ext)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(config)
        _say("CUDA ops built" if cuda is not None else "CPU ops built; CUDA ops NOT built")

    def _build_cuda_objects(self):
        """((objects, libdir, archs, cuda_version, cccl_version), "") or (None, reason)."""
        home, nvcc, reason = _find_nvcc()
        if home is None:
            return None, reason
        cccl_inc, cccl_version = _cccl(home)
        minimum = MANIFEST["cccl"]["min_version"]
        if cccl_inc is None:
            return None, f"CUB ({MANIFEST['cccl']['version_header']}) not found under {home}"
        if _vtuple(cccl_version) < _vtuple(minimum):
            return None, f"CCCL {cccl_version} under {home} is older than {minimum}"
        libdir = next((d for d in (home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib")
                       if (d / "libcudart_static.a").is_file()), None)
        if libdir is None:
            return None, f"libcudart_static.a not found under {home}"
        archs = _archs()
        cuda_version = _nvcc_version(nvcc)
        _say(f"building CUDA ops with {nvcc} (CUDA {cuda_version}, CCCL {cccl_version} from {cccl_inc}) "
             f"for sm_{', sm_'.join(archs)}; CUDA runtime linked statically")
        cu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        try:
            objects = [self._nvcc(nvcc, src, archs, cccl_inc) for src in cu_sources]
        except subprocess.CalledProcessError as exc:
            return None, f"nvcc failed on {exc.cmd[2]} (exit {exc.returncode}; its output is above)"
        return (objects, libdir, archs, cuda_version, cccl_version), ""

    def _nvcc(self, nvcc: Path, src: str, archs: List[str], cccl_inc: Path) -> str:
        """Compile one .cu file to an object in build_temp (skipped when it is up to date)."""
        obj = Path(self.build_temp) / "cuda" / (Path(src).stem + ".o")
        obj.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(nvcc), "-c", src, "-o", str(obj), "-std=c++17", "-O3", "-DBSMOE_WITH_CUDA",
               "-Icsrc", "-isystem", str(cccl_inc), "-Xcompiler=-fPIC,-fvisibility=hidden",
               *_gencode(archs)]
        # Up to date: newer than its sources and built by the same command (archs included).
        stamp = obj.with_suffix(".cmd")
        deps = [ROOT / src, ROOT / "csrc" / "bsmoe.h"]
        if (obj.is_file() and not self.force and stamp.is_file() and stamp.read_text() == " ".join(cmd)
                and all(obj.stat().st_mtime >= d.stat().st_mtime for d in deps)):
            return str(obj)
        stamp.unlink(missing_ok=True)
        _say(" ".join(cmd))
        subprocess.run(cmd, check=True, cwd=ROOT)
        stamp.write_text(" ".join(cmd))
        return str(obj)


def _c_string(s: str) -> str:
    """A define value that the C preprocessor sees as a string literal (no shell in between)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


ext = Pybind11Extension(
    "blocksparse_moe._C",
    sources=["csrc/ops.cpp", "csrc/cpu/routing.cpp", "csrc/cpu/topology.cpp"],
    include_dirs=["csrc"],
    # Rebuild when the shared header or a .cu file changes (nvcc objects are extra_objects,
    # which setuptools does not track).
    depends=["csrc/bsmoe.h", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))],
    cxx_std=17,
)

setup(
    name="blocksparse_moe",
    version=_version(),
    description="Dropless Mixture-of-Experts on block-sparse products (MegaBlocks formulation)",
    python_requires=">=3.10",
    packages=find_packages(include=["blocksparse_moe", "blocksparse_moe.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
    # torch: any version (the extension does not link it). Install the wanted torch first,
    # e.g. `pip install torch==2.13.0`, or pip may pick a large CUDA build.
    install_requires=["torch", "triton; platform_system == 'Linux'", "numpy"],
    extras_require={"test": ["pytest", "hypothesis", "matplotlib"], "bench": ["matplotlib"],
                    "transformers": ["transformers"]},
    zip_safe=False,
)
