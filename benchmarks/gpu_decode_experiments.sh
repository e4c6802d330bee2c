#!/usr/bin/env bash
# One device run for decode experiments: install the carried jax-triton wheel (.whl), run the named Gluon
# decode GPU tests under a timeout (a register or barrier-phase deadlock hangs rather than fails), then, only if
# they pass, time the what-if variants (benchmarks/decode_whatif.py) and trace the chosen ones
# (benchmarks/decode_timeline.py). Full logs in $OUT; the tables last.
# Usage (device tool, carry [".whl"] and ".bench" for default@PATH variants):
#   [TEST_FILTER="value or options"] [VARIANTS="default,value partition"] [TIMELINE="default,value partition"]
#   [BATCHES=32,128] [NUM_ITER=30,10] [ROUNDS=1 (decode_whatif.py --rounds)] bash benchmarks/gpu_decode_experiments.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/jax_triton*.whl \
  > "$OUT/pip.txt" 2>&1 || { echo "jax-triton install failed"; tail -3 "$OUT/pip.txt"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/versions.txt"
if [ -n "${TEST_FILTER:-}" ]; then   # pytest -k expression over tests/test_gluon_decode.py
  JAX_PLATFORMS=cuda timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/test_gluon_decode.py \
    -k "$TEST_FILTER" --timeout ${TEST_CASE_TIMEOUT:-200} --timeout-method thread > "$OUT/tests_gpu.txt" 2>&1
  status=$?
  echo "gluon decode tests (exit $status): $(tail -1 "$OUT/tests_gpu.txt")"
  grep -E "^(FAILED|ERROR)|Timeout" "$OUT/tests_gpu.txt" | head -5
  [ $status -eq 0 ] || { echo "tests did not pass: no timing"; exit 1; }
fi
if [ -n "${VARIANTS:-}" ]; then
  timeout ${WHATIF_TIMEOUT:-300} python3 benchmarks/decode_whatif.py --variants "$VARIANTS" --rounds ${ROUNDS:-1} \
    --batches "${BATCHES:-32,128}" --num-iter "${NUM_ITER:-30,10}" > "$OUT/whatif.txt" 2>&1
  echo "decode_whatif.py exit $?"
fi
if [ -n "${TIMELINE:-}" ]; then
  timeout ${TIMELINE_TIMEOUT:-200} python3 benchmarks/decode_timeline.py --variants "$TIMELINE" --batches 32 \
    --num-iter 30 --out "$OUT" > "$OUT/timeline.txt" 2>&1
  echo "decode_timeline.py exit $?"
fi
[ -f "$OUT/whatif.txt" ] && grep "^|" "$OUT/whatif.txt"
[ -f "$OUT/timeline.txt" ] && { echo; grep "^|" "$OUT/timeline.txt"; }
exit 0
