"""The fused expert kernels compile for a real sm_90 GPU: no error, no spill, shared memory
within the 227 KiB an H100/H200 block may use.

``triton.compile`` with a ``GPUTarget`` runs the whole GPU pipeline (TTIR, TTGIR, LLVM,
PTX and Triton's bundled ptxas) without a GPU; ``cuobjdump --dump-resource-usage`` on the
cubin then reports the registers, the stack (spills) and local memory. The interpreter the
other tests use accepts code a GPU compiler rejects, so this is the check that the kernels
run on real hardware at all.

Arguments are specialised as a real launch on contiguous tensors specialises them: unit
strides become the constant 1, pointers and the other strides and sizes are known to be
multiples of 16. Variants: every constexpr branch on (GLU, biases, weights, router-weight
gradient, the gelu_tanh epilogues, the heaviest), bf16, at the largest tiles each launcher
can get on sm_90 (``_tiles``: 64 for the up and activation-backward kernels, 128 otherwise)
with 8 and with 4 warps, at a row padding of 128 and of 16 (the transposed product, SWAP);
each must run on wgmma. ~2 minutes of CPU: marked slow.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import triton


pytestmark = pytest.mark.slow

SM90_SHARED_LIMIT = 227 * 1024
# Strides that are 1 for the contiguous tensors the launchers see (real launches specialise
# an int argument equal to 1 into a constant).
UNIT_STRIDES = {"stride_xh", "stride_wh", "stride_bc", "stride_hc", "stride_ac", "stride_bn", "stride_gj",
                "stride_yn", "stride_dh", "stride_bh", "stride_dhc", "stride_ps", "stride_wn", "stride_lc",
                "stride_sn", "stride_dn", "stride_blc", "stride_brn", "stride_pc", "stride_plc", "stride_prn"}
NOT_ALIGNED = {"TOP_K", "NUM_EXPERTS", "stride_gt"}
INT32_POINTERS = {"row_slots_ptr", "block_expert_ptr", "expert_offsets_ptr"}
FP32_POINTERS = {"part_ptr", "gw_ptr", "ws_ptr", "wsl_ptr", "wsr_ptr"}  # ws: the weight gradient's partials


def _compile(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs or name in UNIT_STRIDES:
            signature[name] = "constexpr"
            consts[(i,)] = constexprs.get(name, 1)
        elif name.endswith("_ptr"):
            signature[name] = "*i32" if name in INT32_POINTERS else "*fp32" if name in FP32_POINTERS else dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name not in NOT_ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _resource_usage(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {k: int(v) for k, v in (field.split(":") for field in line.split() if field.split(":")[1].isdigit())}


VARIANTS = {}
for _warps, _stages in ((8, 3), (4, 4)):
    # b = 128 (rows on the MMA's M side) and b = 16 (SWAP: the product transposed, the 16 rows
    # on N, the column tile on M), with column tiles as wide as F allows whatever b is.
    for _b in (128, 16):
        _swap = dict(SWAP=_b < 64, E_POW2=128)  # E_POW2: the row kernels' expert vector (E <= 128)
        _capped = dict(BLOCK=_b, BLOCK_M=min(_b, 64), BLOCK_N=64, BLOCK_K=64)
        _full = dict(BLOCK=_b, BLOCK_M=min(_b, 128), BLOCK_N=128 if _warps == 8 else 64, BLOCK_K=64)
        _cases = [
            ("up", "_up_kernel", dict(**_capped, **_swap, GLU=True, HAS_BIAS=True, ACT=2, STORE_A=True)),
            ("down", "_down_kernel", dict(**_full, **_swap, HAS_BIAS=True, HAS_WEIGHTS=True)),
            ("act_bwd", "_act_bwd_kernel", dict(**_capped, **_swap, ACT=2, GLU=True, HAS_B2=True, HAS_WEIGHTS=True,
                                                DWEIGHTS=True, STORE_A=True, STORE_DH=True, PART=128)),
        ]
        if _b == 128:  # the weight gradient's row padding only bounds its K steps
            # The two uses' flags: dW2 (router weights, db2 = sums of R), dW1 (db1 = sums of L).
            for _use, _flags in (("dw2", dict(HAS_WEIGHTS=True, SUM_L=False, SUM_R=True)),
                                 ("dw1", dict(HAS_WEIGHTS=False, SUM_L=True, SUM_R=False))):
                _wg = dict({k: v for k, v in _full.items() if k != "BLOCK"}, **_flags, STORE_DW=True, EXPERTS_P2=128)
                _cases.append((f"wgrad-{_use}", "_wgrad_kernel", dict(_wg, SPLIT=False)))
                # Split row ranges (kernels/expert_wgrad.py): 32-row steps (its launcher caps BLOCK_K).
                _cases.append((f"wgrad-{_use}-split", "_wgrad_kernel", dict(_wg, SPLIT=True, BLOCK_K=32)))
        for _name, _kernel, _consts in _cases:
            if _warps < 8 and _name in ("up", "act_bwd"):
                continue  # their launchers ask for 8 warps (experts._tiles min_warps): 4 is never launched
            _tile = f"{_consts['BLOCK_M']}x{_consts['BLOCK_N']}x{_consts['BLOCK_K']}"
            VARIANTS[f"{_name}-b{_b}-{_tile}-w{_warps}"] = (
                _kernel, dict(_consts, INTERPRET=False, INPUT_PRECISION="ieee"), _warps, _stages)
# The split's second pass (elementwise fp32 sums, launched with its own fixed tile).
VARIANTS["wgrad-sum"] = ("_wgrad_sum_kernel", dict(BLOCK_C=32, BLOCK_N=128, EXPERTS_P2=128, STORE_DW=True, SUM_L=True,
                                                   SUM_R=True), 4, 1)
# The kernel's module (kernels/experts.py unless named here).
MODULES = {"_wgrad_kernel": "expert_wgrad", "_wgrad_sum_kernel": "expert_wgrad"}


def _compile_all() -> dict:
    """Run in a child process without TRITON_INTERPRET: the kernels must be JIT functions."""
    import importlib
    import re

    results = {}
    for vid, (kernel, consts, warps, stages) in VARIANTS.items():
        try:
            module = importlib.import_module(f"blocksparse_moe.kernels.{MODULES.get(kernel, 'experts')}")
            compiled = _compile(getattr(module, kernel), "*bf16", consts, warps, stages)
            buffers = [int(x) for x in re.findall(r"!ttg\.memdesc<(\d+)x\d+x\d+x", compiled.asm["ttgir"])]
            results[vid] = dict(_resource_usage(compiled.asm["cubin"]), shared=compiled.metadata.shared,
                                wgmma="wgmma.mma_async" in compiled.asm["ptx"], buffers=max(buffers, default=0),
                                stages=stages)
        except Exception as e:  # reported by the test of this variant
            results[vid] = dict(error=f"{type(e).__name__}: {e}"[-3000:])
    return results


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiles_for_sm90_without_spills(compiled, variant):
    usage = compiled[variant]
    assert "error" not in usage, usage.get("error")
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"spills: {usage}"
    assert usage["shared"] <= SM90_SHARED_LIMIT, f"shared memory {usage['shared']} B"
    if variant == "wgrad-sum":  # elementwise: no product
        return
    # bf16 on Hopper: wgmma at every row padding (b = 16 through the transposed product).
    assert usage["wgmma"], f"{variant} does not use wgmma"
    if variant.startswith("wgrad"):  # issue 18: L and R multi-buffered num_stages deep
        assert usage["buffers"] == usage["stages"], usage


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
