#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call on an H100/H200: build _C in
# place, then (each a step, in this order) the -m gpu tests; the layer benchmark at full-size
# Mixtral-8x7B and Qwen3-30B-A3B (useful TFLOP/s forward and forward+backward against
# torch._grouped_mm, transformers and the peers installed); ncu's DRAM bytes of the fused
# kernels (bench/ncu_experts.py, to set beside bench/traffic.py's model); the decode
# benchmark; the compile sweep for this GPU's capability (every kernel variant and config:
# no spills, shared memory within the device's limit); compute-sanitizer over every CUDA op;
# a layer on cuda:1 against cuda:0 when two GPUs are visible; the main job; the kernel
# benchmark. Logs and results go to $OUT (or bench/results/gpu-run).
#
#   bash bench/gpu_session.sh                  # every step, from the repository root
#   bash bench/gpu_session.sh ncu compile      # the build, then only these steps
#
# One device call may run 10 minutes: the steps share a deadline (GPU_SESSION_SECONDS, 570 s
# by default) and each one's timeout is cut to what is left, so a slow step costs the later
# ones, never the results already written. Steps that got no time say so; rerun them by name.
#
# The GPU image has torch, triton, pybind11 and pytest but no package registry, so the
# build runs without isolation or dependency resolution.
set -uo pipefail
out="${OUT:-bench/results/gpu-run}"
mkdir -p "$out"
deadline=$((SECONDS + ${GPU_SESSION_SECONDS:-570}))
status=0
ALL_STEPS="pytest layer ncu decode compile sanitizer two_gpus main kernels"
steps="${*:-$ALL_STEPS}"
for s in $steps; do
    case " $ALL_STEPS " in *" $s "*) ;; *) echo "unknown step '$s' (steps: $ALL_STEPS)"; exit 2 ;; esac
done

# The timeout of a step that wants $1 seconds: at most what is left before the deadline.
budget() { local left=$((deadline - SECONDS)); echo $(( $1 < left ? $1 : left )); }
# run STEP: its banner, then the step, unless it was not asked for or the time is spent.
run() {
    case " $steps " in *" $1 "*) ;; *) return ;; esac
    echo; echo "== $1 ($((deadline - SECONDS)) s left) =="
    if [ "$((deadline - SECONDS))" -lt 15 ]; then echo "skipped: no time left (rerun: bash bench/gpu_session.sh $1)"
        status=1; return; fi
    "step_$1" || status=1
}

echo "== build =="
python3 -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
grep "blocksparse_moe build:" "$out/build.log"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import blocksparse_moe, json; print(json.dumps(blocksparse_moe.native_status()))" | tee "$out/native_status.json"
export BLOCKSPARSE_MOE_REQUIRE_NATIVE=1

step_pytest() {  # CUDA graph capture of decode steps, fp8, autocast, ...
    timeout "$(budget 240)" python3 -m pytest tests -q -m gpu -x -p no:cacheprovider >"$out/pytest-gpu.log" 2>&1
    local rc=$?; tail -5 "$out/pytest-gpu.log"; return $rc
}
step_layer() {
    timeout "$(budget 150)" python3 bench/layer.py --out-dir "$out" | tail -12; return "${PIPESTATUS[0]}"
}
step_ncu() {
    local rc=0 shape
    for shape in qwen3 mixtral; do
        timeout "$(budget 120)" ncu --profile-from-start off --csv \
            --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
            python3 bench/ncu_experts.py --shape "$shape" >"$out/ncu-$shape.csv" 2>"$out/ncu-$shape.log" || rc=1
        grep -cE "_up_kernel|_down_kernel|_act_bwd_kernel|_wgrad_kernel" "$out/ncu-$shape.csv" || true
    done
    return $rc
}
step_decode() {  # HBM share of the hit experts' weights at T = 1..64
    timeout "$(budget 150)" python3 bench/decode.py --out-dir "$out" | tail -32; return "${PIPESTATUS[0]}"
}
step_compile() {
    timeout "$(budget 300)" python3 bench/compile_report.py --capability auto --out-dir "$out" >"$out/compile.log" 2>&1
    local rc=$?; tail -4 "$out/compile.log"; return $rc
}
step_sanitizer() {
    local rc=0 tool
    for tool in memcheck racecheck; do
        timeout "$(budget 120)" compute-sanitizer --tool "$tool" --error-exitcode 3 python3 bench/sanitize_ops.py \
            >"$out/sanitizer-$tool.log" 2>&1 || rc=1
        tail -3 "$out/sanitizer-$tool.log"
    done
    return $rc
}
step_two_gpus() {
    local gpus
    gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
    if [ "$gpus" -lt 2 ]; then echo "$gpus GPU visible: the cuda:1 check needs two (skipped)"; return 0; fi
    timeout "$(budget 120)" python3 -m pytest tests/test_gpu_support.py -q -m gpu -p no:cacheprovider \
        >"$out/two-gpus.log" 2>&1
    local rc=$?; tail -3 "$out/two-gpus.log"; return $rc
}
step_main() {
    timeout "$(budget 120)" python3 -m blocksparse_moe --json "$out/main.json" 2>/dev/null | tee "$out/main.txt"
    return "${PIPESTATUS[0]}"
}
step_kernels() {
    timeout "$(budget 150)" python3 bench/kernels.py --out-dir "$out" | tail -20; return "${PIPESTATUS[0]}"
}

for s in $ALL_STEPS; do run "$s"; done
echo; echo "gpu_session status $status ($((deadline - SECONDS)) s left; logs in $out)"
exit $status
