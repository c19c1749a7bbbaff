"""The fp8 expert kernels (kernels/experts_fp8.py) compile for real GPUs: fp8 tensor-core
MMAs with e4m3 operands, no spill, shared memory within the target's limit.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the whole GPU
pipeline and Triton's bundled ptxas without a GPU (as tests/compile_targets.py does for the
recorded launches; the fp8 kernels are listed here by hand because they need fp8 pointer
types, which the recorder's table has no entry for, and because each variant's PTX is
checked, not only its MMA kind). Registers and spills come from the cubin through
``compile_targets._resources`` (cuobjdump -res-usage).

What must hold, per target (those this Triton supports of sm_89, sm_90, sm_100):
* sm_90: ``wgmma.mma_async ... .e4m3.e4m3`` (fp8 wgmma, both operands fp8: an operand that
  is not K-major would be upcast and the MMA would be f16/bf16); sm_89: ``mma.sync ...
  .e4m3.e4m3``; sm_100: ``tcgen05.mma ... kind::f8f6f4``. Row tiles under 64 (b = 16, 32)
  on sm_90/sm_100: Triton 3.9 uses mma.sync there, with the fp8 operands converted to f16
  (exact), which is what the test then requires (see SMALL_TILE_MMA).
* no local memory (spills), shared memory within the per-block limit.

Variants: every config of the target's table (``experts_fp8.CONFIGS``) at b = 128 for the
heaviest flags (up: GLU + bias; down: GLU on the load with gelu_tanh, bias, weights), the
smallest tiles (b = 16), the plain-MLP flags, and on sm_90 the down kernel with a w2 that is
N-major (a contiguous [E, F, H], not the transposed checkpoint view) and with fp16 data.
Arguments specialised as a real launch on those tensors specialises them (unit strides
become the constant 1; pointers and the other strides/sizes 16-divisible, the scales'
strides and TOP_K / NUM_EXPERTS not). Two worker processes, ~1-2 minutes: marked slow.
"""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MMA_PATTERN = {89: r"mma\.sync\.aligned\.\S*\.e4m3\.e4m3", 90: r"wgmma\.mma_async\.\S*\.e4m3\.e4m3",
               100: r"tcgen05\.mma\.\S*kind::f8f6f4"}
# Below 64 rows a tile is too short for wgmma / tcgen05 (64-row instructions) and Triton 3.9
# takes mma.sync, where sm_90/sm_100 get the fp8 operands converted to f16 (exactly: every
# e4m3 value is an f16 value, and their products are exact in the fp32 accumulator).
SMALL_TILE_MMA = r"cvt\.rn\.f16x2\.e4m3x2[\s\S]*mma\.sync\.aligned\.\S*\.f32\.f16\.f16\.f32"
FFN = 768  # Qwen3-30B-A3B's expert width: the up kernel's BLOCK_N is not clipped by F
NOT_ALIGNED = {"TOP_K", "NUM_EXPERTS", "stride_gt", "stride_se", "stride_sc", "stride_sh", "stride_sf",
               "stride_sn"}
POINTERS = {"row_slots_ptr": "*i32", "block_expert_ptr": "*i32", "w1_ptr": "*fp8e4nv", "w2_ptr": "*fp8e4nv",
            "w1s_ptr": "*fp32", "w2s_ptr": "*fp32", "gw_ptr": "*fp32"}
UP_UNIT = {"stride_xh", "stride_wh", "stride_sh", "stride_bc", "stride_hc"}
DOWN_UNIT_K_MAJOR = {"stride_hc", "stride_wf", "stride_sn", "stride_bn", "stride_gj", "stride_yn"}
DOWN_UNIT_N_MAJOR = DOWN_UNIT_K_MAJOR - {"stride_wf"} | {"stride_wn"}
UP_FLAGS = {"glu-bias": dict(GLU=True, HAS_BIAS=True), "plain": dict(GLU=False, HAS_BIAS=False)}
DOWN_FLAGS = {"glu-gelu_tanh-bias-weights": dict(GLU=True, ACT=2, HAS_BIAS=True, HAS_WEIGHTS=True),
              "plain-silu": dict(GLU=False, ACT=0, HAS_BIAS=False, HAS_WEIGHTS=False)}


def _targets():
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    return [c for c in (89, 90, 100) if CUDABackend.supports_target(GPUTarget("cuda", c, 32))]


def variants():
    """``{id: (kernel, data dtype, unit strides, constexprs, options, capability)}``."""
    from blocksparse_moe.kernels import experts_fp8 as k8

    out = {}

    def add(cap, name, kernel, dtype, unit, flags, cfg, block):
        tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x128-w{cfg['num_warps']}-s{cfg['num_stages']}"
        consts = dict(flags, BLOCK=block, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], INTERPRET=False)
        options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        out[f"sm{cap}-{name}-b{block}-{tile}"] = (kernel, dtype, sorted(unit), consts, options, cap)

    for cap in _targets():
        capability = (cap // 10, cap % 10)
        for block in (128, 16):
            for cfg in k8.fp8_configs("up", block, capability, ffn=FFN):
                for fname, flags in UP_FLAGS.items():
                    if fname == "glu-bias" or (block == 128 and cap == 90):
                        add(cap, f"up-{fname}", "_up_fp8_kernel", "bf16", UP_UNIT, flags, cfg, block)
            for cfg in k8.fp8_configs("down", block, capability):
                for fname, flags in DOWN_FLAGS.items():
                    if fname.startswith("glu") or (block == 128 and cap == 90):
                        add(cap, f"down-{fname}", "_down_fp8_kernel", "bf16", DOWN_UNIT_K_MAJOR, flags, cfg, block)
        if cap == 90:
            big = k8.fp8_configs("down", 128, capability)[0]
            add(cap, "down-w2-N-major", "_down_fp8_kernel", "bf16", DOWN_UNIT_N_MAJOR,
                DOWN_FLAGS["glu-gelu_tanh-bias-weights"], big, 128)
            add(cap, "down-fp16", "_down_fp8_kernel", "fp16", DOWN_UNIT_K_MAJOR,
                DOWN_FLAGS["glu-gelu_tanh-bias-weights"], big, 128)
            add(cap, "up-fp16", "_up_fp8_kernel", "fp16", UP_UNIT, UP_FLAGS["glu-bias"],
                k8.fp8_configs("up", 128, capability, ffn=FFN)[0], 128)
    return out


def _compile_one(kernel_name, dtype, unit, consts, options, cap):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import compile_targets as ct
    from blocksparse_moe.kernels import experts_fp8 as k8

    kernel = getattr(k8, kernel_name)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts or name in unit:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts.get(name, 1)
        elif name.endswith("_ptr"):
            signature[name] = POINTERS.get(name, "*" + dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name not in NOT_ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    res = ct._resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    mma = re.search(MMA_PATTERN[cap], ptx)
    upcast = re.search(SMALL_TILE_MMA, ptx) is not None
    mma_lines = sorted(set(re.findall(r"(?:wgmma\.mma_async|tcgen05\.mma|mma\.sync)\S*", ptx)))
    return dict(regs=res["regs"], spill_bytes=res["stack"] + res["local"],
                shared=compiled.metadata.shared + res["static_shared"], mma=mma.group(0) if mma else None,
                upcast=upcast, mma_lines=mma_lines)


def _compile_shard(shard: int, shards: int) -> dict:
    results = {}
    for i, (vid, spec) in enumerate(sorted(variants().items())):
        if i % shards != shard:
            continue
        try:
            results[vid] = _compile_one(*spec)
        except Exception as e:  # reported by the test of this variant
            results[vid] = dict(error=f"{type(e).__name__}: {e}"[-3000:])
    return results


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    shards = max(1, min(4, os.cpu_count() or 1))

    def run(shard):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(shard), str(shards)], env=env,
                              capture_output=True, text=True, timeout=1800, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    out = {}
    with ThreadPoolExecutor(shards) as pool:
        for part in pool.map(run, range(shards)):
            out.update(part)
    return out


def _ids():
    # Collected under the interpreter (conftest): the kernels' arg_names are read only in
    # the workers, here only the ids are built (configs come from the table, no compile).
    return sorted(variants())


@pytest.mark.parametrize("variant", _ids())
def test_fp8_kernel_compiles_with_fp8_mma_and_no_spill(compiled, variant):
    import compile_targets as ct

    r = compiled[variant]
    assert "error" not in r, r.get("error")
    cap = int(variant.split("-")[0][2:])
    rows = int(re.search(r"-(\d+)x\d+x128-", variant).group(1))
    if cap in (90, 100) and rows < 64:
        assert r["mma"] or r["upcast"], f"neither fp8 MMA nor the exact f16 mma.sync: {r['mma_lines']}"
    else:
        assert r["mma"], f"no {MMA_PATTERN[cap]} in the PTX ({r['mma_lines']}): not an fp8 tensor-core product"
    assert r["spill_bytes"] == 0, f"spills {r['spill_bytes']} bytes ({r['regs']} registers)"
    assert r["shared"] <= ct.SHARED_LIMIT[cap], f"shared memory {r['shared']} B over {ct.SHARED_LIMIT[cap]}"


if __name__ == "__main__":
    shard, shards = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (0, 1)
    print(json.dumps(_compile_shard(shard, shards)))
