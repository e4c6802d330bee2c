#!/usr/bin/env bash
# One device run: the test suite under the device's jax (CPU platform, 8 fake devices), the numerics
# tests on the GPU itself, and the whole-model forward benchmark. Logs go to $OUT; a table is printed last.
# Usage (device tool, repo root): bash benchmarks/device_check.sh   (GKA_GOLDEN_DIR must point at goldens)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c 'import jax, flax, orbax.checkpoint as o, safetensors; print("jax", jax.__version__, "flax", flax.__version__, "orbax", o.__version__, "safetensors", safetensors.__version__, jax.devices())' 2>&1 | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/versions.txt"
JAX_PLATFORMS=cpu timeout 420 python3 -m pytest -q -n 8 -p no:cacheprovider tests > "$OUT/tests_cpu.txt" 2>&1
echo "cpu-platform tests: $(tail -1 "$OUT/tests_cpu.txt")"
JAX_PLATFORMS=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_model_golden.py tests/test_gka_golden.py tests/test_kernels.py -k "not num_iter_zero" > "$OUT/tests_gpu.txt" 2>&1
echo "gpu tests: $(tail -1 "$OUT/tests_gpu.txt")"
timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/forward.py --batch ${BENCH_BATCH:-1,8} --context ${BENCH_CONTEXT:-4096} --num-iter 30,10 --steps 16 --repeats 2 2>&1 | tee "$OUT/forward.txt" | tail -12
