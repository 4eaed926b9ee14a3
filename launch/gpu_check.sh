#!/usr/bin/env bash
# The GPU check on a lent H100/H200 (docs/GPU.md). The device tool runs, with carry [".whl"]:
#     bash launch/gpu_check.sh
# It installs the carried wheels (`make gpu-wheels`) beside the image's packages, prints the
# GPU, runs `python -m medjax.bench gpu` and leaves gpu_check.{json,md,log} in $OUT.
# Rehearsed on a CPU machine with PY=.venv/bin/python OUT=DIR (no CUDA plugin: the dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
SITE=$(mktemp -d /tmp/medjax_site.XXXX)
trap 'rm -rf "$SITE"' EXIT
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
command -v nvidia-smi >/dev/null && nvidia-smi -L
"$PY" -m medjax.bench gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
