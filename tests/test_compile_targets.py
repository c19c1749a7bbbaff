"""Every Triton kernel variant the package launches compiles for real GPUs, without a GPU.

tests/compile_targets.py records the launches that the public ops and ``DroplessMoE``
(forward and backward) make on small CPU tensors under the interpreter, then compiles
each with ``triton.compile(..., target=GPUTarget("cuda", cap, 32))`` and Triton's bundled
ptxas, with the autotune configs the launcher would try on that target. A variant fails on
a compile error (a Python global read inside ``@triton.jit`` code passes the interpreter
and nothing else), on any register spill, and on shared memory over the per-block limit.

The default (CI) sweep compiles for sm_90, sm_80 and sm_100 (those this Triton supports) a
covering subset: every config of every (kernel, dtype, block size) and every recorded
launch of it at least once (``compile_targets.covering``). ``BLOCKSPARSE_MOE_COMPILE_SWEEP=full``
compiles every launch with every config, aligned and as recorded; bench/compile_report.py
writes that table to bench/results/.
"""

import os
import re

import pytest
import torch
import triton
import triton.language as tl

import compile_targets as ct
from blocksparse_moe import backend
from blocksparse_moe.kernels import _common

# The recorder runs the launchers under the interpreter, which conftest.py turns on only
# on machines without a GPU (bench/compile_report.py does the same sweep on a GPU machine).
needs_interpreter = pytest.mark.skipif(not backend.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")
pytestmark = needs_interpreter
FULL = os.environ.get("BLOCKSPARSE_MOE_COMPILE_SWEEP", "") == "full"
PRODUCTS = ("_sdd_kernel", "_sdd_merged_kernel", "_dsd_kernel")
FP8 = ("_up_fp8_kernel", "_down_fp8_kernel")  # the fp8 expert forward (kernels/experts_fp8.py)


@pytest.fixture(scope="module")
def launches():
    return ct.record()


@pytest.fixture(scope="module")
def results(launches):
    return ct.compile_jobs(ct.jobs(launches, ct.targets(), full=True) if FULL else ct.ci_jobs(launches))


def _values(launches, qualname, name):
    return {v for l in launches if l.qualname == qualname for n, _, v in l.args if n == name}


def test_recorder_sees_every_variant(launches):
    # The workload reaches every variant the issue lists; if a launcher stops being called
    # (or a flag is never set) the sweep would silently lose it.
    kernels = {l.qualname for l in launches}
    assert set(PRODUCTS) | {"_glu_fwd_kernel", "_glu_bwd_kernel", "_gather_kernel", "_scatter_kernel",
                            "_scatter_wgrad_kernel", "_invert_rows_kernel"} <= kernels
    # Blocks of 16 and 32 run the merged sdd kernel, 64 and 128 the per-block one.
    assert _values(launches, "_sdd_merged_kernel", "BLOCK") == {16, 32}
    assert _values(launches, "_sdd_kernel", "BLOCK") == {64, 128}
    assert _values(launches, "_dsd_kernel", "BLOCK") == {16, 32, 64, 128}
    for kernel in PRODUCTS:
        assert {l.plan.dtype for l in launches if l.qualname == kernel} == {torch.float32, torch.float16,
                                                                             torch.bfloat16}
    for kernel in ("_sdd_kernel", "_sdd_merged_kernel"):
        assert _values(launches, kernel, "HAS_A_ROWS") == {True, False}  # with and without the row gather
    # The layer's fused expert kernels, every block size and both forms of the MLP.
    assert {"_up_kernel", "_down_kernel", "_act_bwd_kernel", "_wgrad_kernel"} <= kernels
    for kernel in ("_up_kernel", "_down_kernel", "_act_bwd_kernel"):
        assert _values(launches, kernel, "BLOCK") == {16, 32, 64, 128}, kernel
    assert _values(launches, "_up_kernel", "GLU") == {True, False}
    # The weight gradient with and without split row ranges, and the split's second pass
    # (kernels/expert_wgrad.py), with the bias sums of either side.
    assert "_wgrad_sum_kernel" in kernels
    assert _values(launches, "_wgrad_kernel", "SPLIT") == {True, False}
    for flag in ("SUM_L", "SUM_R"):
        assert True in _values(launches, "_wgrad_sum_kernel", flag), flag
    assert _values(launches, "_up_kernel", "ACT") == {0, 1, 2, 3}  # each activation in the up epilogue
    assert _values(launches, "_dsd_kernel", "HAS_BLOCK_INDEX") == {True, False}  # S and S^T (dds, dW)
    for kernel in ("_glu_fwd_kernel", "_glu_bwd_kernel"):
        assert _values(launches, kernel, "ACT") == {0, 1, 2, 3}  # silu, gelu, gelu_tanh, relu
        assert _values(launches, kernel, "HAS_UP") == {True, False}  # GLU and plain MLP
    # The fp8 forward: both kernels, GLU and plain, every row padding, both orientations.
    for kernel in FP8:
        assert _values(launches, kernel, "BLOCK") == {16, 32, 64, 128}, kernel
        assert _values(launches, kernel, "GLU") == {True, False}, kernel
        assert _values(launches, kernel, "SWAP") == {True, False}, kernel  # b < 64 transposed
        assert {l.plan.dtype for l in launches if l.qualname == kernel} == {torch.float8_e4m3fn}


def test_every_launch_is_device_guarded(launches):
    # A launch that bypasses _common.launch runs on the current device, not its tensors'.
    assert ct.unguarded(launches) == [], "launched without blocksparse_moe.kernels._common.launch"


def test_fp32_compiles_with_and_without_tf32(results):
    products = [r for r in results if r["qualname"] in PRODUCTS]
    assert {r["constexprs"]["INPUT_PRECISION"] for r in products} == {"ieee", "tf32"}
    assert all(r["constexprs"]["INTERPRET"] is False for r in products)


def test_every_variant_compiles_without_spills_within_shared_memory(results):
    # Every target of the sweep; fp8 launches compile for sm_89 in place of sm_80.
    assert {r["capability"] for r in results} - {89} == set(ct.targets())
    found = ct.problems(results)
    assert not found, f"{len(found)} of {len(results)} variants fail:\n" + "\n".join(found[:40])


def test_tensor_cores_for_every_tensor_core_dtype(results):
    # fp16/bf16/TF32 products run wgmma on sm_90 (blocks of 16 and 32 too: transposed and
    # merged tiles) and mma.sync on sm_80; true fp32 (torch's default) runs on the CUDA cores.
    checked = 0
    for r in results:
        if r["qualname"] not in PRODUCTS or not r["ok"] or r["capability"] not in (80, 90):
            continue
        want = "none" if ct.dtype_of(r) == "fp32" else "wgmma" if r["capability"] == 90 else "mma.sync"
        assert r["mma"] == want, ct.label(r)
        checked += 1
    assert checked


FUSED = ("_up_kernel", "_down_kernel", "_act_bwd_kernel", "_wgrad_kernel")


def test_fused_expert_kernels_run_wgmma_at_every_block_size(results):
    # fp16/bf16 on sm_90: wgmma at every row padding b. Below 64 rows the row-tiled kernels
    # compute the product transposed (experts.swap_rows: the rows on the MMA's N side); the
    # weight gradient's rows are its K, which wgmma takes in steps of 16.
    checked = set()
    for r in results:
        if r["qualname"] in FUSED and r["ok"] and r["capability"] == 90 and ct.dtype_of(r) in ("fp16", "bf16"):
            assert r["mma"] == "wgmma", ct.label(r)
            checked.add((r["qualname"], r["constexprs"].get("BLOCK")))
    assert {16, 128} <= {b for k, b in checked if k == "_up_kernel"}, checked  # transposed and plain


# The MMA of an fp8 product, both operands e4m3 (an operand Triton upcast would show f16/bf16).
FP8_MMA = {89: r"^mma\.sync\.aligned\.\S*\.e4m3\.e4m3\.", 90: r"^wgmma\.mma_async\.\S*\.e4m3\.e4m3$",
           100: r"^tcgen05\.mma\S*\.kind::f8f6f4$"}


def test_fp8_kernels_run_fp8_tensor_cores_at_every_block_size(results):
    # sm_90: fp8 wgmma at every row padding b (16 and 32 through the transposed product,
    # the rows on wgmma's N side), without spills; sm_89 (sm_80 has no fp8 tensor cores):
    # fp8 mma.sync; sm_100: tcgen05 kind::f8f6f4.
    checked = set()
    for r in results:
        if r["qualname"] not in FP8:
            continue
        assert r["ok"], ct.label(r)
        assert re.search(FP8_MMA[r["capability"]], r["mma_instruction"]), f"{ct.label(r)}: {r['mma_instruction']}"
        assert r["spill_bytes"] == 0, f"{ct.label(r)}: spills {r['spill_bytes']} bytes ({r['regs']} registers)"
        checked.add((r["qualname"], r["capability"], r["constexprs"]["BLOCK"]))
    caps = {89 if c < 89 else c for c in ct.targets()}
    for kernel in FP8:
        assert {(kernel, 90, b) for b in (16, 32, 64, 128)} <= checked, checked
        assert {(kernel, c, b) for c in caps for b in (16, 128)} <= checked, checked


def test_products_pipeline_num_stages_deep(results):
    # Every tensor-core product keeps num_stages shared-memory tiles in flight (read from
    # the TTGIR). The dsd kept 1-3 for num_stages 3-5 while it loaded its block column in
    # the same iteration as the tiles that column addresses.
    checked = 0
    for r in results:
        if r["qualname"] in PRODUCTS and r["ok"] and r["mma"] in ("wgmma", "mma.sync") and r["capability"] == 90:
            assert r["buffers"] == r["options"]["num_stages"], ct.label(r)
            checked += 1
    assert checked


def test_weight_gradient_pipelines_num_stages_deep(results):
    # The weight gradient keeps num_stages shared-memory tiles of L and R in flight, split or
    # not (issue 18): the slots of the next step are loaded one step ahead, so no operand
    # load depends on a load of its own iteration.
    checked = set()
    for r in results:
        if r["qualname"] == "_wgrad_kernel" and r["ok"] and r["mma"] in ("wgmma", "mma.sync") \
                and r["capability"] == 90:
            assert r["buffers"] == r["options"]["num_stages"], ct.label(r)
            checked.add(r["constexprs"]["SPLIT"])
    assert checked == {True, False}, checked


# -- the checks themselves can fail ---------------------------------------------------------

_SCALE = 0.5  # a plain Python float: readable by the interpreter, not by the GPU compiler


@triton.jit
def _reads_a_global(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * _SCALE)


def _launch_probe():
    x = torch.ones(16)
    _common.launch(_reads_a_global, (1,), x, device=x.device, BLOCK=16)
    assert torch.equal(x, torch.full((16,), 0.5))  # the interpreter runs it happily


def test_sweep_catches_a_python_global_in_a_kernel():
    # The class of bug that made gelu/gelu_tanh uncompilable for any GPU.
    launches = ct.record(_launch_probe, execute=True)
    assert [l.qualname for l in launches] == ["_reads_a_global"]
    (result,) = ct.compile_jobs(ct.jobs(launches, [90]))
    assert not result["ok"] and "_SCALE" in result["error"]
    assert ct.problems([result])


def test_sweep_catches_spills(launches):
    # A real variant squeezed into few registers (ptxas's maxnreg) must spill, and the
    # check must say so (a check that never fires proves nothing). ptxas refuses some
    # wgmma tiles outright at such limits: take the variants it compiles.
    candidates = [l for l in launches if l.qualname in ("_sdd_kernel", "_up_kernel") and l.plan.dtype == torch.float32]
    jobs = [dict(job, options={**job["options"], "maxnreg": 48}) for job in ct.jobs(candidates, [90])[:6]]
    results = [r for r in ct.compile_jobs(jobs) if r["ok"]]
    spilled = [r for r in results if r["spill_bytes"] > 0]
    assert spilled, results
    assert "spills" in ct.problems(spilled[:1])[0]
