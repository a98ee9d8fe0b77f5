#!/usr/bin/env bash
# The GPU work of a session in one call, step by step; full logs go to $OUT (default ./out),
# tuned configs as one tarball, and short tables are printed last.
#   bash bench/gpu_suite.sh STEP...   with STEP in: tune-dense tune-moe tune-moe-fp8 tune-routing kernels moe fp8
#                                     fp8-quality trace calibrate accuracy meter router overhead compile tests
#                                     benchmark ep
#   (fp8-quality trains the deployment MoE first, about 2 minutes)
#   (meter needs Zeus: carry its wheels and put them on PYTHONPATH first)
#   (ep: the all_to_all curve and the expert-parallel benchmark on NGPUS GPUs, default 2)
#   (GPU=H100 names the cost table that calibrate writes and accuracy reads)
#   BENCH_K='-k "H256 or mixtral"' selects the pytest-benchmark subset (default: all of them).
#   ACCURACY_FLAGS / METER_FLAGS add flags to those steps, e.g. ACCURACY_FLAGS="--trials 1 --forwards none"
#   (one >= 1 s energy window per held-out point, no forwards) and METER_FLAGS="--trials 2 --window_s 2".
# Pass GIT_COMMIT=<sha> when the tree was copied without .git, so results name their commit.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # keeps carried wheels (e.g. Zeus) importable
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
for step in "$@"; do
    case $step in
        tune-dense) python -m bench.tune_kernels > "$OUT/tune_dense.txt" 2>&1 ;;
        tune-moe) python -m bench.tune_moe > "$OUT/tune_moe.txt" 2>&1 ;;
        tune-moe-fp8) python -m bench.tune_moe --weights fp8 --shapes mixtral,qwen3 > "$OUT/tune_moe_fp8.txt" 2>&1 ;;
        fp8) python -m bench.fp8_moe --output "$OUT/fp8_moe.json" > "$OUT/fp8.txt" 2>&1 ;;
        fp8-quality) python -m bench.train --preset deployment --models moe --output_dir "$OUT/checkpoints" \
                > "$OUT/fp8_quality.txt" 2>&1 &&
            python -m bench.fp8_quality --preset deployment --checkpoint_dir "$OUT/checkpoints" \
                --output "$OUT/fp8_quality.json" >> "$OUT/fp8_quality.txt" 2>&1 ;;
        tune-routing) python -m bench.tune_routing --write --output "$OUT/tune_routing.json" > "$OUT/tune_routing.txt" 2>&1 ;;
        kernels) python -m bench.kernels --output "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1 ;;
        moe) python -m bench.moe --output "$OUT/moe.json" > "$OUT/moe.txt" 2>&1 ;;
        trace) python -m calibration.trace --seconds 10 --output "$OUT/trace_${GPU:-H100}.json" > "$OUT/trace.txt" 2>&1 ;;
        calibrate) python -m bench.calibrate --gpu "${GPU:-H100}" --output "$OUT/${GPU:-H100}.json" \
            --trace "$OUT/trace_calibrate_${GPU:-H100}.json" > "$OUT/calibrate.txt" 2>&1 ;;
        accuracy) python -m bench.kcm_accuracy --gpu "${GPU:-H100}" --table "$OUT/${GPU:-H100}.json" \
            --output "$OUT/kcm_accuracy.json" ${ACCURACY_FLAGS:-} > "$OUT/accuracy.txt" 2>&1 ;;
        meter) python -m bench.meter_check --output "$OUT/meter_check.json" ${METER_FLAGS:-} > "$OUT/meter.txt" 2>&1 ;;
        router) python -m bench.router_energy --output "$OUT/router.json" > "$OUT/router.txt" 2>&1 ;;
        overhead) python -m bench.router_overhead --output "$OUT/router_overhead.json" > "$OUT/overhead.txt" 2>&1 ;;
        compile) python -m bench.compile_decode --output "$OUT/compile_decode.json" > "$OUT/compile.txt" 2>&1 ;;
        tests) python -m pytest -q -p no:cacheprovider tests ${TESTS_K:-} > "$OUT/pytest.txt" 2>&1 ;;
        benchmark) eval python -m pytest -q -p no:cacheprovider bench --benchmark-only "${BENCH_K:-}" \
            --benchmark-columns=median,iqr,rounds > "$OUT/benchmark.txt" 2>&1 ;;
        ep) torchrun --standalone --nproc_per_node "${NGPUS:-2}" -m bench.calibrate_comm --gpu "${GPU:-H100}" \
                --output "$OUT/${GPU:-H100}_comm.json" > "$OUT/ep.txt" 2>&1 &&
            torchrun --standalone --nproc_per_node "${NGPUS:-2}" -m bench.ep_benchmark --gpu "${GPU:-H100}" \
                --cost_table "$OUT/${GPU:-H100}_comm.json" --output "$OUT/ep_${NGPUS:-2}gpu.json" >> "$OUT/ep.txt" 2>&1 ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
    echo "== $step done (rc $?)"
done
case " $* " in *" tune-"*) tar -cf "$OUT/configs.tar" kernels/configs ;; esac
for f in tune_dense tune_moe tune_moe_fp8 tune_routing fp8 fp8_quality calibrate accuracy meter router overhead \
         compile benchmark pytest kernels moe ep; do
    [ -f "$OUT/$f.txt" ] && { echo "== $f"; grep -v "^\s*$" "$OUT/$f.txt" | grep -v "^ " | tail -n 30 | cut -c1-240; }
done
exit 0
