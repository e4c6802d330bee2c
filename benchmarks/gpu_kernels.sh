#!/usr/bin/env bash
# One device run for the GKA GPU kernels: install the carried wheels (.whl: jax-triton, fla 0.4.1 and
# transformers 5.3.0 for the reference), run the kernel tests (Pallas and Gluon) compiled on the GPU, then
# benchmarks/kernels.py (ours vs the XLA path vs the reference's Triton kernels from .ref/). Logs in $OUT.
# (transformers 5.3.0 in .whl is not installed: it would shadow the machine's 5.17.)
# Usage (device tool, carry [".whl", ".ref", ".golden"]): [TUNE="tune_kernels.py args"] [SKIP_TESTS=1]
#   [TESTS="pytest paths or ids" (default: the seven kernel test files, about 5 minutes compiled on an H200)]
#   bash benchmarks/gpu_kernels.sh [kernels.py args]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla*.whl .whl/flash_linear*.whl .whl/jax_triton*.whl \
  > "$OUT/pip.txt" 2>&1 || { echo "wheel install failed"; tail -5 "$OUT/pip.txt"; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 GKA_GOLDEN_DIR=${GKA_GOLDEN_DIR:-$PWD/.golden}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/versions.txt"
git log -1 --format=%h 2>/dev/null | tee -a "$OUT/versions.txt"
TESTS=${TESTS:-"tests/test_gluon_decode.py tests/test_gluon_solve.py tests/test_pallas_decode.py tests/test_pallas_chunk.py tests/test_pallas_solve.py tests/test_pallas_prefill.py tests/test_dispatch.py"}
[ -n "${SKIP_TESTS:-}" ] || JAX_PLATFORMS=cuda timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider $TESTS \
  > "$OUT/tests_gpu.txt" 2>&1
[ -n "${SKIP_TESTS:-}" ] || { echo "gpu kernel tests: $(tail -1 "$OUT/tests_gpu.txt")";
  grep -E "^(FAILED|ERROR)|Error" "$OUT/tests_gpu.txt" | head -5; }
if [ -n "${TUNE:-}" ]; then   # e.g. TUNE="--kernels solve,gla,decode": the tunables sweep first
  timeout ${TUNE_TIMEOUT:-240} python3 benchmarks/tune_kernels.py $TUNE > "$OUT/tune.txt" 2>&1
  echo "tune_kernels.py exit $?"; sed -n '/^### /,$p' "$OUT/tune.txt" | grep -v "^$"
fi
timeout ${BENCH_TIMEOUT:-420} python3 benchmarks/kernels.py --out "$OUT" "$@" > "$OUT/kernels.txt" 2>&1
echo "kernels.py exit $?"
grep -E "^#|failed|Error" "$OUT/kernels.txt" | head -20
sed -n '/^### /,$p' "$OUT/kernels.txt"
