#!/usr/bin/env bash
# The GPU run, for a machine with one CUDA GPU (e.g. the lent H100/H200), in two phases that each
# fit a 10-minute call. Writes everything under $OUT (default ./gpu-out), archived, so that few
# files come back:
#
#   bash benchmarks/gpu_run.sh tests      # build the CUDA extension, pytest -m gpu tests/, layer smoke
#   bash benchmarks/gpu_run.sh sanitize   # compute-sanitizer memcheck over the GPU kernel tests (slow: run after tests)
#   bash benchmarks/gpu_run.sh bench      # pytest benchmarks/ on the default "gpu" grid, ≤ 15 min (+ pytest-benchmark JSON, plots, report)
#
# Then copy $OUT/bench/* into benchmarks/results/<device>-<date>/ and commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE="${1:-tests}"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTMOE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export FASTMOE_CACHE_DIR="$PWD/.fastmoe-cache" TRITON_CACHE_DIR="$PWD/.triton-cache"
python3 - <<'PY' | tee "$OUT/env-$PHASE.txt"
import torch, triton, platform
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "python", platform.python_version())
PY
if [ "$PHASE" = "tests" ]; then
  ( time python3 -m pip install --no-build-isolation --no-deps -e . ) > "$OUT/build.log" 2>&1
  tail -3 "$OUT/build.log"
  python3 -c "import fastmoe_kernels._C as C; print('extension with_cuda =', C.with_cuda)" 2>&1 | tee -a "$OUT/build.log"
  # --maxfail, not -x: the first run on a GPU should report every failing kernel, not only the first.
  python3 -m pytest -m gpu tests/ -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" --maxfail=20 2>&1 | tee "$OUT/gpu-tests.log" | tail -30
  python3 -c "import fastmoe_kernels as fm; print(fm.backends.format_describe('cuda')); print(fm.backends.format_describe('cuda', dtype=__import__('torch').bfloat16))" 2>&1 | tee "$OUT/backends.txt"
  python3 -m fastmoe_kernels.bench --grid smoke --out "$OUT/smoke" --quiet 2>&1 | tail -20
  tar czf "$OUT/smoke.tgz" -C "$OUT" smoke && rm -rf "$OUT/smoke"
elif [ "$PHASE" = "sanitize" ]; then
  # Every kernel's reads and writes checked by compute-sanitizer (memcheck), on the kernel tests' small
  # shapes; the extension must be built (the tests phase does it).
  SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
  if [ ! -x "$SANITIZER" ]; then
    echo "compute-sanitizer not found (no CUDA toolkit on this machine): sanitize phase skipped" | tee "$OUT/sanitize.log"
  else
    "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 20 \
      python3 -m pytest -m gpu tests/kernels tests/test_gpu.py -q -p no:cacheprovider --maxfail=5 \
      -k "not autotuning and not cuda_graph" 2>&1 | tee "$OUT/sanitize.log" | tail -30
  fi
else
  # The device tool cuts a call at 10 minutes: the budget (default 14 min) is held to BENCH_MINUTES, and
  # every row is appended to results.partial.csv as it is measured, so a cut run still brings its rows back.
  python3 -m pytest benchmarks/ --grid gpu --bench-budget-minutes "${BENCH_MINUTES:-8}" --bench-out "$OUT/bench" \
    --benchmark-json "$OUT/bench/pytest-benchmark.json" -q -p no:cacheprovider 2>&1 | tee "$OUT/bench.log" | tail -15
  cat "$OUT/bench/report.md" 2>/dev/null | head -60
  tar czf "$OUT/bench.tgz" -C "$OUT" bench
fi
