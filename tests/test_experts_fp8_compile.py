"""The fp8 expert kernels (kernels/experts_fp8.py) in the operand layouts the compile sweep
does not record, compiled for sm_90: fp8 wgmma with e4m3 operands, no spill, shared memory
within the limit.

tests/test_compile_targets.py compiles every fp8 launch of ``compile_targets.default_workload``
(bf16 x, w2 the transposed view of a checkpoint's down_proj, GLU and plain, every row padding;
sm_90, sm_89 in place of sm_80, sm_100) with the configs ``_common``'s "fp8" tables give, and
checks the MMA instruction and spills. What is left for here, on sm_90, through the same
recorder and compiler (compile_targets.record / jobs / compile_jobs):

* w2 N-major, a contiguous ``[E, F, H]`` (H, the output columns, contiguous): fp8 wgmma reads
  both operands K-major only, so Triton transposes the W2 tile in registers on its way to
  shared memory; it must still be fp8 wgmma (not an f16 fallback) and not spill.
* fp16 x (the sweep's fp8 calls are bf16): h, y and the bias tiles in fp16.

Each at b = 16 (the transposed product) and b = 128 (the plain one), every config of the
sm_90 table. ~24 compiles, ~1 minute on 2 cores: marked slow.
"""

import re

import pytest
import torch

import compile_targets as ct
from blocksparse_moe import backend

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not backend.interpreter_enabled(), reason="the recorder needs TRITON_INTERPRET=1")]
FP8 = ("_up_fp8_kernel", "_down_fp8_kernel")
WGMMA_E4M3 = r"^wgmma\.mma_async\.\S*\.e4m3\.e4m3$"
BLOCK_SIZES = (16, 128)


def _workload():
    from blocksparse_moe import expert_mlp
    from blocksparse_moe.fp8 import quantize_weight_blockwise

    g = torch.Generator().manual_seed(0)
    H, F, T, E, K = 160, 128, 6, 2, 2
    ids = torch.randint(0, E, (T, K), generator=g)
    for dtype, n_major in ((torch.float16, False), (torch.bfloat16, True)):
        x = torch.randn(T, H, generator=g).to(dtype)
        w1, s1 = quantize_weight_blockwise(torch.randn(E, 2 * F, H, generator=g))
        if n_major:  # a contiguous [E, F, H]
            w2, s2 = quantize_weight_blockwise(torch.randn(E, F, H, generator=g))
        else:  # the checkpoint layout, as the sweep records it
            w2t, s2t = quantize_weight_blockwise(torch.randn(E, H, F, generator=g))
            w2, s2 = w2t.transpose(1, 2), s2t.transpose(1, 2)
        b1 = torch.randn(E, 2 * F, generator=g).to(dtype)
        b2 = torch.randn(E, H, generator=g).to(dtype)
        for b in BLOCK_SIZES:
            expert_mlp(x, ids, torch.rand(T, K, generator=g), w1, w2, b1, b2, activation="gelu_tanh", glu=True,
                       block_size=b, w1_scale=s1, w2_scale=s2)


def _unit_strides(launch):
    return {name for name, kind, value in launch.args if kind == "int" and value == 1}


@pytest.fixture(scope="module")
def launches():
    out = []
    for launch in ct.record(_workload):
        if launch.qualname not in FP8:
            continue
        fp16 = any(kind == "ptr" and value == "torch.float16" for _, kind, value in launch.args)
        # bf16 with a K-major w2 is the sweep's; the bf16 up kernel here is the sweep's too.
        if fp16 or (launch.qualname == "_down_fp8_kernel" and "stride_wn" in _unit_strides(launch)):
            out.append(launch)
    return out


@pytest.fixture(scope="module")
def results(launches):
    return ct.compile_jobs(ct.jobs(launches, [90]))


def test_the_layouts_are_recorded(launches):
    # What this file is for: both kernels in fp16 at both orientations, and the down kernel
    # reading an N-major w2 (W2's N stride the constant 1, its K stride not).
    seen = {(l.qualname, "fp16" if any(v == "torch.float16" for _, k, v in l.args if k == "ptr") else "n-major",
             dict((n, v) for n, _, v in l.args)["BLOCK"]) for l in launches}
    want = {(k, "fp16", b) for k in FP8 for b in BLOCK_SIZES} | {("_down_fp8_kernel", "n-major", b)
                                                                    for b in BLOCK_SIZES}
    assert seen == want
    for launch in launches:
        if launch.qualname == "_down_fp8_kernel" and "stride_wn" in _unit_strides(launch):
            assert "stride_wf" not in _unit_strides(launch)


def test_fp8_wgmma_without_spills(results):
    assert len(results) >= 4 * len(BLOCK_SIZES) * 3  # every config of the sm_90 table
    for r in results:
        assert r["ok"], f"{ct.label(r)}: {r.get('error')}"
        assert re.search(WGMMA_E4M3, r["mma_instruction"]), f"{ct.label(r)}: {r['mma_instruction']}"
        assert r["spill_bytes"] == 0, f"{ct.label(r)}: spills {r['spill_bytes']} bytes ({r['regs']} registers)"
        assert r["shared"] <= ct.SHARED_LIMIT[90], f"{ct.label(r)}: {r['shared']} bytes of shared memory"
