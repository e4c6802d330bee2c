#!/usr/bin/env bash
# Prepares the git-ignored inputs of benchmarks/reference_gka.py (run from the repo root):
#   .ref/hybrid-model-factory/  the reference source tree (awslabs/hybrid-model-factory), extracted from a
#                               bare git mirror of it at COMMIT (default HEAD)
#   .whl/                       wheels the GPU machine lacks: flash-linear-attention + fla-core 0.4.1 and
#                               transformers 5.3.0 (the reference's pins), plus jax-triton
# Usage: bash tools/fetch_reference.sh MIRROR_GIT_DIR [COMMIT]
#   e.g. MIRROR_GIT_DIR=/work/.mirror/awslabs+hybrid-model-factory/repo (the search tool's `fetch` of
#   github:awslabs/hybrid-model-factory). Snapshot used so far: 04b6242b8a87e4496e4ade65eb2ec6a8b23b262a.
# SKIP_WHEELS=1 skips the wheel download; WHEEL_TOOL overrides the path of device-wheels.sh.
# On the GPU machine (device tool, carry [".ref", ".whl"]), install the wheels before importing the module:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
mirror=${1:?usage: $0 MIRROR_GIT_DIR [COMMIT]}
commit=${2:-HEAD}
root=$(git rev-parse --show-toplevel)
dest="$root/.ref/hybrid-model-factory"

rm -rf "$dest"
mkdir -p "$dest"
git --git-dir="$mirror" archive "$commit" | tar -x -C "$dest"
git --git-dir="$mirror" rev-parse "$commit" > "$dest/.commit"
echo "reference tree at $(cat "$dest/.commit") in $dest"

if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  tool=${WHEEL_TOOL:-$root/../shared/tools/device-wheels.sh}
  (cd "$root" && DEST=.whl bash "$tool" --reference)
fi
