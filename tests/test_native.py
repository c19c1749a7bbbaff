"""The native extension blocksparse_moe._C: what it reports, its torch fallback, and (on a
GPU) its CUDA ops, every result against ``reference.routing_reference`` /
``reference.topology_reference`` (never one implementation against another).

The package always builds _C's CPU ops, so a missing extension fails
test_native_status_with_extension (and, under CI's BLOCKSPARSE_MOE_REQUIRE_NATIVE=1,
test_native_ops_present). The fallback is tested by hiding the extension: the torch
routing and topology that then run must give the reference's fields on the same cases as
tests/test_routing.py.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

import blocksparse_moe as bm
from blocksparse_moe import reference
from routing_cases import CASES, ID_DTYPES, Case


def _loader():
    """The native loader module. PRIVATE HOOK, the only one in this file: these tests hide the
    extension and fake its build info through the loader's state. Repoint this line when the
    loader moves."""
    from blocksparse_moe import native as _native

    return _native


_native = _loader()
ROUTE_FIELDS = reference.ROUTING_FIELDS
TOPOLOGY_FIELDS = reference.TOPOLOGY_FIELDS
MANIFEST = Path(__file__).resolve().parents[1] / "third_party" / "manifest.json"


def _vtuple(v: str):
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


# -- what was built ---------------------------------------------------------------------------

STATUS_KEYS = {"extension", "cpu_ops", "cuda_ops", "cuda_archs", "cuda_version", "cccl_version", "cudart",
               "pybind11_version", "reason"}


def _require_extension():
    # setup.py always builds the CPU ops: a missing _C is a broken build, not a reason to skip.
    s = bm.native_status()
    if not s["extension"]:
        pytest.fail(f"blocksparse_moe._C is missing ({s['reason']}): build it with `pip install -e .` or "
                    "`python setup.py build_ext --inplace`")


def test_native_status_with_extension():
    _require_extension()
    s = bm.native_status()
    assert set(s) == STATUS_KEYS
    assert s["extension"] is True and s["cpu_ops"] is True
    assert re.fullmatch(r"\d+\.\d+\.\d+", s["pybind11_version"])
    assert _vtuple(s["pybind11_version"]) >= _vtuple(json.loads(MANIFEST.read_text())["pybind11"]["min_version"])
    if s["cuda_ops"]:
        assert s["reason"] is None
        assert s["cuda_archs"] and all(re.fullmatch(r"\d+[af]?", a) for a in s["cuda_archs"])
        assert re.fullmatch(r"\d+\.\d+\.\d+", s["cccl_version"])
        assert _vtuple(s["cccl_version"]) >= _vtuple(json.loads(MANIFEST.read_text())["cccl"]["min_version"])
        assert re.fullmatch(r"\d+\.\d+", s["cuda_version"])
        assert s["cudart"] == "static"
    else:
        assert s["cuda_archs"] == [] and s["reason"].startswith("CUDA ops not built")


def test_native_ops_present():
    """The installed package must carry _C where the build promises it (CI sets the variable)."""
    if os.environ.get("BLOCKSPARSE_MOE_REQUIRE_NATIVE", "0") in ("", "0"):
        pytest.skip("BLOCKSPARSE_MOE_REQUIRE_NATIVE is not set")
    s = bm.native_status()
    assert s["extension"] and s["cpu_ops"], s["reason"]


def test_import_does_not_load_extension():
    # Loading _C (and anything that could probe a device) waits for the first call.
    import subprocess

    code = ("import sys, blocksparse_moe; "
            "assert 'blocksparse_moe._C' not in sys.modules, 'imported eagerly'; "
            "blocksparse_moe.native_status(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# -- fallback -----------------------------------------------------------------------------------

@pytest.fixture
def fresh_native(monkeypatch):
    """Forget the loaded extension and the warnings given; undone after the test."""
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_load_attempted", False)
    monkeypatch.setattr(_native, "_load_error", None)
    monkeypatch.setattr(_native, "_cuda_unusable", None)
    monkeypatch.setattr(_native, "_warned", set())
    monkeypatch.delenv("BLOCKSPARSE_MOE_REQUIRE_NATIVE", raising=False)
    return monkeypatch


def _hide_extension(monkeypatch):
    # A None entry in sys.modules makes `from . import _C` raise ImportError: the real code
    # path. The package attribute set by an earlier import must go too, or the import finds it.
    monkeypatch.setitem(sys.modules, "blocksparse_moe._C", None)
    monkeypatch.delattr(bm, "_C", raising=False)
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_load_attempted", False)


@pytest.fixture
def missing_extension(fresh_native):
    _hide_extension(fresh_native)
    return fresh_native


def _check_against_reference(r: bm.Routing, ids: torch.Tensor, num_experts: int, block_size: int, ffn=None):
    """Every routing field (and the topology's, when built) equals the reference's."""
    want = reference.routing_reference(ids.cpu(), num_experts, block_size)
    for name in ROUTE_FIELDS:
        got = getattr(r, name)
        assert got.dtype == torch.int32 and got.device == ids.device, name
        assert torch.equal(got.cpu(), want[name]), f"{name} differs from reference.routing_reference"
    if ffn is not None:
        _check_topology(r.topology, want["padded_bins"], num_experts, ffn, block_size)


def _check_topology(topo: bm.Topology, padded_bins, num_experts: int, ffn: int, block_size: int):
    want = reference.topology_reference(padded_bins, num_experts, ffn, block_size)
    assert topo.shape == want["shape"]
    for name in TOPOLOGY_FIELDS:
        got = getattr(topo, name)
        assert got.dtype == torch.int32, name
        assert torch.equal(got.cpu(), want[name]), f"{name} differs from reference.topology_reference"


def test_native_status_without_extension(missing_extension):
    s = bm.native_status()
    assert set(s) == STATUS_KEYS
    assert s["extension"] is False and s["cpu_ops"] is False and s["cuda_ops"] is False
    assert s["cuda_archs"] == [] and "_C" in s["reason"] and "could not be imported" in s["reason"]


def test_fallback_matches_reference_and_warns_once(missing_extension):
    case = Case(40, 2, 6, 16, "even-experts")
    ids = case.ids()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r1 = bm.route(ids, 6, 16, ffn_hidden_size=32)
        r2 = bm.route(ids.to(torch.int32), 6, 16)
        topo = bm.make_topology(r1.padded_bins, 6, 32, 16)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in runtime]
    assert "runs in torch" in str(runtime[0].message) and "_C" in str(runtime[0].message)
    _check_against_reference(r1, ids, 6, 16, ffn=32)
    _check_against_reference(r2, ids.to(torch.int32), 6, 16)
    _check_topology(topo, reference.routing_reference(ids, 6, 16)["padded_bins"], 6, 32, 16)


@pytest.mark.parametrize("case", CASES)
def test_fallback_cases_match_reference(missing_extension, case: Case):
    # The torch fallback on every named routing case (empty experts, one expert takes all,
    # k = E, T*k not a multiple of the block, each block size), as test_routing.py runs _C.
    with pytest.warns(RuntimeWarning, match="runs in torch"):
        r = bm.route(case.ids(), case.num_experts, case.block_size, ffn_hidden_size=2 * case.block_size)
    _check_against_reference(r, case.ids(), case.num_experts, case.block_size, ffn=2 * case.block_size)


def test_native_matches_reference_with_and_without_extension(fresh_native):
    """The same input through _C and through the fallback: each equals the reference."""
    _require_extension()
    ids = Case(30, 3, 7, 32).ids(torch.int32)
    _check_against_reference(bm.route(ids, 7, 32, ffn_hidden_size=64), ids, 7, 32, ffn=64)
    _hide_extension(fresh_native)
    with pytest.warns(RuntimeWarning, match="runs in torch"):
        fallback = bm.route(ids, 7, 32, ffn_hidden_size=64)
    _check_against_reference(fallback, ids, 7, 32, ffn=64)


@pytest.mark.parametrize("padded_bins", [[32, 16], [16, 40], [-16, 16]], ids=["decreasing", "odd", "negative"])
def test_fallback_topology_rejects_bad_padded_bins(missing_extension, padded_bins):
    # The argument checks of make_topology read no data; the build validates padded_bins,
    # and the torch fallback must do so like the C++ op.
    with pytest.raises(ValueError, match="padded_bins"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            bm.make_topology(torch.tensor(padded_bins), 2, 32, 16)


def test_require_native_raises_instead_of_falling_back(missing_extension):
    missing_extension.setenv("BLOCKSPARSE_MOE_REQUIRE_NATIVE", "1")
    with pytest.raises(RuntimeError, match="BLOCKSPARSE_MOE_REQUIRE_NATIVE"):
        bm.route(torch.zeros(3, 1, dtype=torch.int64), 2, 16)


class _FakeExtension:
    """Stands in for _C to exercise the CUDA dispatch decisions without a GPU."""

    def __init__(self, cuda: bool, runtime: int = 13000, driver: int = 13000):
        self._cuda, self._versions = cuda, (runtime, driver)
        if cuda:
            self.route_cuda = object()

    def build_info(self):
        return {"cpu_ops": True, "cuda_ops": self._cuda, "cuda_reason": None if self._cuda else "nvcc not found",
                "cuda_archs": "90" if self._cuda else ""}

    def cuda_versions(self):
        return self._versions


@pytest.mark.parametrize("fake, needle", [
    pytest.param(_FakeExtension(cuda=False), "without CUDA ops", id="cuda-ops-not-built"),
    pytest.param(_FakeExtension(cuda=True, runtime=13000, driver=12080), "driver", id="driver-too-old"),
])
def test_cuda_fallback_warns_once(fresh_native, fake, needle):
    fresh_native.setattr(_native, "_C", fake)
    fresh_native.setattr(_native, "_load_attempted", True)
    cuda = torch.device("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _native._ops_for(cuda, "route") is None
        assert _native._ops_for(cuda, "make_topology") is None
        assert _native._ops_for(torch.device("cpu"), "route") is fake  # CPU ops still used
    assert len(caught) == 1 and caught[0].category is RuntimeWarning and needle in str(caught[0].message)


@pytest.mark.parametrize("capability, usable", [
    pytest.param((9, 0), True, id="sm90-sass"),
    pytest.param((10, 0), True, id="sm100-ptx-jit"),
    pytest.param((8, 0), False, id="sm80-no-kernels"),
])
def test_cuda_dispatch_by_architecture(fresh_native, capability, usable):
    fake = _FakeExtension(cuda=True, runtime=13000, driver=13010)
    fresh_native.setattr(_native, "_C", fake)
    fresh_native.setattr(_native, "_load_attempted", True)
    fresh_native.setattr(_native, "_arch_problem", {})
    fresh_native.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            got = _native._ops_for(torch.device("cuda", 0), "route")
            assert got is (fake if usable else None)
    assert len(caught) == (0 if usable else 1)
    if not usable:
        assert "sm_80" in str(caught[0].message) and "BLOCKSPARSE_MOE_CUDA_ARCHS=80" in str(caught[0].message)


@pytest.mark.parametrize("arch, capability, has_ptx, runs", [
    ("90", 90, False, True), ("90", 89, True, False), ("90", 100, True, True), ("90", 100, False, False),
    ("80", 86, False, True), ("90a", 90, True, True), ("90a", 100, True, False), ("100f", 103, True, True),
    ("100f", 120, True, False),
])
def test_arch_compatibility_rule(arch, capability, has_ptx, runs):
    assert _native._arch_runs_on(arch, capability, has_ptx) is runs


# -- CUDA ops against the reference (GPU machines; run with -m gpu) -------------------------------

def _needs_cuda_ops():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not bm.native_status()["cuda_ops"]:
        pytest.fail(f"CUDA ops missing on a GPU machine: {bm.native_status()['reason']}")


def _check_cuda(ids: torch.Tensor, num_experts: int, block_size: int, ffn: int):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CUDA ops must run, not the fallback
        gpu = bm.route(ids.cuda(), num_experts, block_size, ffn_hidden_size=ffn)
    assert all(getattr(gpu, name).is_cuda for name in ROUTE_FIELDS)
    _check_against_reference(gpu, ids.cuda(), num_experts, block_size, ffn=ffn)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ID_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_cuda_route_matches_reference(case: Case, dtype):
    _needs_cuda_ops()
    _check_cuda(case.ids(dtype), case.num_experts, case.block_size, 2 * case.block_size)


@pytest.mark.gpu
@pytest.mark.parametrize("t, k, e, b", [
    pytest.param(4096, 8, 256, 16, id="multi-tile-sort"),           # many CUB tiles, many grid blocks
    pytest.param(3000, 2, 1500, 32, id="E-over-scan-block"),       # bins scan runs in 2 chunks
    pytest.param(2000, 4, 10000, 16, id="E-over-shared-histogram"),  # global-atomic histogram path
    pytest.param(1, 1, 1, 128, id="one-slot"),
])
def test_cuda_route_large(t, k, e, b):
    _needs_cuda_ops()
    _check_cuda(torch.randint(0, e, (t, k), generator=torch.Generator().manual_seed(1)), e, b, 2 * b)


@pytest.mark.gpu
def test_cuda_route_on_side_stream():
    """Work goes to torch's current stream, not the default one."""
    _needs_cuda_ops()
    ids = Case(500, 4, 16, 16, "distinct").ids()
    ids_gpu = ids.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gpu = bm.route(ids_gpu, 16, 16, ffn_hidden_size=64)
    stream.synchronize()
    _check_against_reference(gpu, ids_gpu, 16, 16, ffn=64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cuda_topology_matches_cpu(dtype):
    _needs_cuda_ops()
    pb = torch.tensor([32, 32, 96, 112, 112], dtype=dtype)  # empty experts 1 and 4
    gpu = bm.make_topology(pb.cuda(), 5, 48, 16)
    assert gpu.row_indices.is_cuda
    _check_topology(gpu, pb, 5, 48, 16)
    zero = bm.make_topology(torch.zeros(3, dtype=dtype, device="cuda"), 3, 32, 16)
    assert zero.nnz == 0 and zero.offsets_t.tolist() == [0] * 7


@pytest.mark.gpu
@pytest.mark.parametrize("padded_bins", [[32, 16], [16, 40], [-16, 16]], ids=["decreasing", "odd", "negative"])
def test_cuda_topology_rejects_bad_padded_bins(padded_bins):
    _needs_cuda_ops()
    with pytest.raises(ValueError, match="padded_bins"):
        bm.make_topology(torch.tensor(padded_bins, device="cuda"), 2, 32, 16)


@pytest.mark.gpu
def test_cuda_route_rejects_out_of_range():
    _needs_cuda_ops()
    with pytest.raises(ValueError, match="expert_indices"):
        bm.route(torch.tensor([[0, 7]], device="cuda"), 4, 16)
