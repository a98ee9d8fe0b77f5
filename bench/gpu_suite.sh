#!/usr/bin/env bash
# One GPU session's work in one call: tune block sizes, time every kernel beside its peer, run
# the whole test suite (bf16/fp16 included) and a pytest-benchmark subset. Full logs go to
# $OUT (default ./out; tuned configs as one tarball); the short tables are printed last.
#   bash bench/gpu_suite.sh [tune|notune] [pytest -k expression for the benchmark subset]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
if [ "${1:-tune}" = tune ]; then
    python -m bench.tune_kernels > "$OUT/tune.txt" 2>&1
    tar -cf "$OUT/configs.tar" kernels/configs
fi
python -m bench.kernels --output "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1
python -m pytest -q -p no:cacheprovider tests > "$OUT/pytest.txt" 2>&1
python -m pytest -q -p no:cacheprovider bench --benchmark-only -k "${2:-H256}" --benchmark-columns=median,iqr,rounds \
    > "$OUT/benchmark.txt" 2>&1
grep -v "^ \|^$" "$OUT/tune.txt" 2>/dev/null | grep -E "^(matmul|swiglu|attention):" | cut -c1-400
tail -n 25 "$OUT/benchmark.txt"
tail -n 12 "$OUT/pytest.txt"
cat "$OUT/kernels.txt"
