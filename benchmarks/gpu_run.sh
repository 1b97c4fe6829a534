#!/usr/bin/env bash
# The GPU run, for a machine with one CUDA GPU (e.g. the lent H100/H200), in phases that each fit a
# 10-minute call. Writes everything under $OUT (default ./gpu-out), archived, so that few files come
# back (the device tool returns 8 at most):
#
#   bash benchmarks/gpu_run.sh check      # build, kernel tests (one autotune config per key), model-shape correctness
#   bash benchmarks/gpu_run.sh headline   # the model layers against the baselines, then the per-kernel profile
#   bash benchmarks/gpu_run.sh followup   # after fixes: fp8 tests, DeepSeek-V3 check, the model table, the profile
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
# The package from this checkout, also for what starts before the editable install is done (the
# parallel compiles did not find it on a fresh machine).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY' | tee "$OUT/env-$PHASE.txt"
import torch, triton, platform
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "python", platform.python_version())
PY
left() { echo $(( ${DEADLINE_S:-570} - SECONDS )); }  # seconds left of this call's budget
archive() {  # everything under $OUT into one archive $1: the device tool brings back 8 files at most
  (cd "$OUT" && tar czf "$1" --exclude="$1" . ; find . -mindepth 1 ! -name "$1" -delete)
}
build_extension() {  # the csrc extension, unless a build is already here (a warm machine)
  if ls fastmoe_kernels/_C*.so >/dev/null 2>&1; then echo "extension already built"; return; fi
  ( time python3 -m pip install --no-build-isolation --no-deps -e . ) > "$OUT/build.log" 2>&1
  tail -3 "$OUT/build.log"
}
if [ "$PHASE" = "check" ]; then
  # Everything runs at once where it can: the extension build and the Triton compiles of the model
  # shapes (CPU-bound), then the kernel tests (one autotune config per key, in turn: compiling all of
  # them for each small test shape took most of such a run) beside the model-shape check.
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version --format=csv | tee -a "$OUT/env-$PHASE.txt"
  build_extension > "$OUT/build.out" 2>&1 &
  BUILD=$!
  python3 benchmarks/gpu_prewarm.py > "$OUT/prewarm.log" 2>&1 &
  PREWARM=$!
  wait $BUILD; cat "$OUT/build.out"
  python3 -c "import fastmoe_kernels._C as C; print('extension with_cuda =', C.with_cuda)" 2>&1 | tee -a "$OUT/build.log"
  FASTMOE_AUTOTUNE=one timeout $(( $(left) - 30 )) python3 -m pytest -m gpu tests/ -q -p no:cacheprovider -n 6 \
    --junitxml="$OUT/gpu-tests.xml" --maxfail=40 > "$OUT/gpu-tests.log" 2>&1 &
  TESTS=$!
  wait $PREWARM; tail -3 "$OUT/prewarm.log"
  timeout $(( $(left) - 40 )) python3 benchmarks/gpu_check.py --json "$OUT/check.json" 2>&1 | tee "$OUT/check.log"
  wait $TESTS; echo "pytest exit status $?"
  grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | cut -c1-220 | head -40
  tail -4 "$OUT/gpu-tests.log"
  archive check-logs.tgz
  ls fastmoe_kernels/_C*.so >/dev/null 2>&1 && cp fastmoe_kernels/_C*.so "$OUT/"
elif [ "$PHASE" = "headline" ]; then
  # The model layers on our kernel backends against the baselines (the issue's table), then the
  # per-kernel profile. Kernels compile first, in parallel (already cached on a warm machine).
  build_extension > "$OUT/build.out" 2>&1 &
  BUILD=$!
  python3 benchmarks/gpu_prewarm.py 2>&1 | tail -2
  wait $BUILD; cat "$OUT/build.out"
  timeout $(( $(left) - 150 )) python3 -m fastmoe_kernels.bench --grid gpu --sweeps models --ops none --backends triton,cuda \
    --budget-minutes "${BENCH_MINUTES:-5}" --out "$OUT/headline" --quiet --no-plots 2>&1 | tee "$OUT/headline.log" | tail -40
  timeout $(( $(left) - 10 )) python3 benchmarks/gpu_profile.py --out "$OUT/profile" 2>&1 | tee "$OUT/profile.log" | tail -60
  archive headline.tgz
elif [ "$PHASE" = "followup" ]; then
  # A re-run after fixes (the first H100 run's third call): the fp8 tests, the DeepSeek-V3 check, the
  # model table and the profile of the current defaults.
  build_extension > "$OUT/build.out" 2>&1 &
  BUILD=$!
  python3 benchmarks/gpu_prewarm.py > "$OUT/prewarm.log" 2>&1 &
  PREWARM=$!
  FASTMOE_AUTOTUNE=one timeout 150 python3 -m pytest -m gpu tests/kernel_tests/test_fp8.py tests/test_fp8.py -q -p no:cacheprovider -n 8 \
    2>&1 | tee "$OUT/fp8-tests.log" | grep -E "^(FAILED|ERROR)|passed|failed" | cut -c1-200
  wait $BUILD $PREWARM; tail -1 "$OUT/prewarm.log"
  timeout 90 python3 benchmarks/gpu_check.py --cases DeepSeek-V3 --json "$OUT/check-deepseek.json" 2>&1 | tee "$OUT/check-deepseek.log"
  timeout $(( $(left) - 100 )) python3 -m fastmoe_kernels.bench --grid gpu --sweeps models --ops none --backends triton,cuda \
    --budget-minutes "${BENCH_MINUTES:-3.5}" --out "$OUT/headline" --quiet --no-plots > "$OUT/headline.log" 2>&1
  tail -16 "$OUT/headline.log"
  timeout $(( $(left) - 5 )) python3 benchmarks/gpu_profile.py --out "$OUT/profile" > "$OUT/profile.log" 2>&1
  grep -E "^(Step|## )" "$OUT/profile/profile.md"
  archive followup.tgz
elif [ "$PHASE" = "tests" ]; then
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
      python3 -m pytest -m gpu tests/kernel_tests tests/test_gpu.py -q -p no:cacheprovider --maxfail=5 \
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
