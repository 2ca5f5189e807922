#!/usr/bin/env bash
# One pass on a machine with a GPU (and a CUDA build of torch already installed): build the
# extension against that torch, record how it was built, run the CUDA tests and the GPU
# benchmark (cuDNN baseline), then the quick benchmark on the CPU.
# Everything lands in $OUT (default: ./gpu-check). Offline machines: WHEELS=DIR installs the
# test-only dependencies (hypothesis) from a directory of wheels first. TESTS="tests/test_a.py
# tests/test_b.py -k cuda" replaces the default test selection (the CUDA suite and the CUDA cases
# elsewhere); CUDA_SHAPES="T,B,I,H ..." the GPU preset's shapes; TEST_SECONDS, BENCH_SECONDS (GPU)
# and CPU_BENCH_SECONDS bound each stage (CPU_BENCH_SECONDS=0 skips the CPU benchmark);
# TARBALL=FILE packs $OUT into one .tar.gz at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/steps.txt"; }

step environment
{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())";
  cmake --version | head -1; nproc; } > "$OUT/environment.txt" 2>&1
if [ -n "${WHEELS:-}" ]; then "$PY" -m pip install --no-index --find-links "$WHEELS" hypothesis > "$OUT/wheels.log" 2>&1; fi

step build
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
myrnn-fast info > "$OUT/info.txt" 2>&1

step tests
# TESTS narrows the run: the whole suite does not fit the time a borrowed GPU host gives.
# Default: the CUDA suite and the CUDA cases of the shared odd-input tests (CI runs the rest).
timeout "${TEST_SECONDS:-300}" "$PY" -m pytest -q -p no:cacheprovider -rfE --durations=15 \
  ${TESTS:-tests/test_cuda.py tests/test_odd_inputs.py -k cuda} > "$OUT/pytest.log" 2>&1
echo "pytest exit $?" | tee -a "$OUT/steps.txt"
tail -n 1 "$OUT/pytest.log"

# CUDA: the shapes the GPU goals are set on (the article's, cuDNN's persistent-kernel case, fastrnns').
step "bench cuda"
timeout "${BENCH_SECONDS:-150}" myrnn-fast bench --device cuda --preset gpu --backends torch,cpp --out "$OUT/bench-cuda" \
  ${CUDA_SHAPES:+--shapes $CUDA_SHAPES} > "$OUT/bench-cuda.log" 2>&1
echo "bench cuda exit $?" | tee -a "$OUT/steps.txt"
if [ "${CPU_BENCH_SECONDS:-150}" != 0 ]; then
  step "bench cpu"
  timeout "${CPU_BENCH_SECONDS:-150}" myrnn-fast bench --preset quick --device cpu --out "$OUT/bench-cpu" \
    > "$OUT/bench-cpu.log" 2>&1
  echo "bench cpu exit $?" | tee -a "$OUT/steps.txt"
fi
step done
# TARBALL=FILE packs everything into one file (the device tool returns only a few files).
if [ -n "${TARBALL:-}" ]; then tar czf "$TARBALL" -C "$(dirname "$OUT")" "$(basename "$OUT")"; fi
