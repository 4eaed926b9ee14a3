#!/usr/bin/env bash
# Download the wheels the lent GPU image lacks (device tool, KINDS.md's package list) that medjax
# imports at run time, for that image's python3 3.12 on x86-64, into .whl/ (ignored; at most
# 64 MiB travel with a device call). The GPU check itself imports none of them (they are lazy
# imports: data pipeline, GGUF, TensorBoard), so a check runs without them; they are here so the
# rest of medjax (training from data, GGUF load/export, TensorBoard logs) runs there too.
# tensorflow-datasets (and importlib_resources, which only tfds uses) stay behind: medjax imports
# tfds only to build datasets (medjax/data/tfds_builders.py), which the image never does.
# Versions: the ones this project's venv resolves (../shared/FACTS.md); dependencies the image
# already has (absl-py, cloudpickle, etils, numpy, protobuf, psutil, pyyaml, requests, tqdm,
# packaging) are not fetched, so nothing on the image is shadowed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PY:-python3}
WHEELS=(
  grain==0.2.18          # medjax.data.pipeline
  array_record==0.8.6    # grain's record files
  portpicker==1.6.0      # grain's multiprocessing
  gguf==0.19.0           # medjax.hf.gguf / gguf_export, tokenizer from a .gguf
  tensorboardX==2.6.5    # medjax.train.metrics
)
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"/*.whl
du -cb "$DEST"/*.whl | awk 'END { printf "total %.2f MiB in %s\n", $1 / 1048576, "'"$DEST"'" }'
