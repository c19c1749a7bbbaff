#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call (fits in ~10 minutes on an
# H100/H200): build _C in place, the -m gpu tests, a layer on cuda:1 against cuda:0 when two
# GPUs are visible, compute-sanitizer over every CUDA op, the compile sweep for this GPU's
# capability (every kernel variant and config; no spills, shared memory within the device's
# limit), the decode benchmark and ncu's DRAM bytes of the fused kernels (bench/ncu_experts.py,
# to set beside bench/traffic.py's model), the main job and both benchmarks. Logs and results go to $OUT (or bench/results/gpu-run).
#
#   bash bench/gpu_session.sh            # on the GPU machine, from the repository root
#
# The GPU image has torch, triton, pybind11 and pytest but no package registry, so the
# build runs without isolation or dependency resolution.
set -uo pipefail
out="${OUT:-bench/results/gpu-run}"
mkdir -p "$out"
step() { echo; echo "== $* =="; }
status=0

step build
python3 -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
grep "blocksparse_moe build:" "$out/build.log"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import blocksparse_moe, json; print(json.dumps(blocksparse_moe.native_status()))" | tee "$out/native_status.json"
export BLOCKSPARSE_MOE_REQUIRE_NATIVE=1

step "pytest -m gpu (CUDA graph capture of decode steps, fp8, ...)"
timeout 240 python3 -m pytest tests -q -m gpu -x -p no:cacheprovider >"$out/pytest-gpu.log" 2>&1 || status=1
tail -5 "$out/pytest-gpu.log"

step "decode benchmark (HBM share of the hit experts' weights) and ncu DRAM bytes vs the traffic model"
timeout 150 python3 bench/decode.py --out-dir "$out" | tail -32 || status=1
for shape in qwen3 mixtral; do
    timeout 120 ncu --profile-from-start off --csv \
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
        python3 bench/ncu_experts.py --shape "$shape" >"$out/ncu-$shape.csv" 2>"$out/ncu-$shape.log" || status=1
    grep -cE "_up_kernel|_down_kernel|_act_bwd_kernel|_wgrad_kernel" "$out/ncu-$shape.csv" || true
done

step "two GPUs"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
    timeout 120 python3 -m pytest tests/test_gpu_support.py -q -m gpu -p no:cacheprovider >"$out/two-gpus.log" 2>&1 \
        || status=1
    tail -3 "$out/two-gpus.log"
else
    echo "$gpus GPU visible: the cuda:1 check needs two (skipped)"
fi

step "compile sweep for this GPU"
timeout 300 python3 bench/compile_report.py --capability auto --out-dir "$out" >"$out/compile.log" 2>&1 || status=1
tail -4 "$out/compile.log"

step compute-sanitizer
for tool in memcheck racecheck; do
    timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 3 python3 bench/sanitize_ops.py \
        >"$out/sanitizer-$tool.log" 2>&1 || status=1
    tail -3 "$out/sanitizer-$tool.log"
done

step "main job"
timeout 120 python3 -m blocksparse_moe --json "$out/main.json" 2>/dev/null | tee "$out/main.txt" || status=1

step benchmarks
timeout 150 python3 bench/kernels.py --out-dir "$out" | tail -20 || status=1
timeout 150 python3 bench/layer.py --out-dir "$out" | tail -12 || status=1
echo; echo "gpu_session status $status (logs in $out)"
exit $status
