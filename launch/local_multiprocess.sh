#!/usr/bin/env bash
# Run N cooperating JAX processes on this host (jax.distributed over localhost).
# Each process gets DEVICES simulated CPU devices (or, with --gpus-per-process, its own GPUs).
#
#   launch/local_multiprocess.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] \
#       [--gpus-per-process G] -- COMMAND [ARGS...]
#
# e.g. launch/local_multiprocess.sh -n 2 -d 4 -- python -m medjax.train --config configs/melt_llama2_lora.yaml model=tiny mesh.preset=fsdp train.batch_size=8
#
# Every process runs COMMAND with MEDJAX_COORDINATOR / MEDJAX_NUM_PROCESSES / MEDJAX_PROCESS_ID
# set, which medjax.distributed.initialize() reads. Output lines are prefixed with [pI] and
# shown as they come (launch/prefix_output.py); only process 0 shows progress bars, and gloo's
# "Rank N is connected" lines are dropped.
# If any process fails, the others are stopped and the script exits with that status.
set -euo pipefail

NUM=2
DEVICES=4
PORT="${MEDJAX_PORT:-}"
GPUS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) NUM="$2"; shift 2 ;;
    -d) DEVICES="$2"; shift 2 ;;
    -p) PORT="$2"; shift 2 ;;
    --gpus-per-process) GPUS="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) echo "local_multiprocess.sh: unknown option $1 (use -- before the command)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then echo "local_multiprocess.sh: no command given (… -- python -m …)" >&2; exit 2; fi
if [[ -z "$PORT" ]]; then  # a free port chosen by the OS
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < NUM; i++)); do
  (
    export MEDJAX_COORDINATOR="127.0.0.1:${PORT}" MEDJAX_NUM_PROCESSES="$NUM" MEDJAX_PROCESS_ID="$i"
    export PYTHONUNBUFFERED=1                     # lines as they are printed, not when the pipe fills
    if [[ "$i" -gt 0 ]]; then export TQDM_DISABLE=1; fi   # one progress display: process 0's
    if [[ "$GPUS" -gt 0 ]]; then
      export CUDA_VISIBLE_DEVICES=$(seq -s, $((i * GPUS)) $((i * GPUS + GPUS - 1)))
    else
      export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES}"
    fi
    exec "$@"
  ) > >(python3 -u "$HERE/prefix_output.py" "[p$i] " $([[ "$i" -eq 0 ]] && echo --progress)) 2>&1 &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  rc=0
  wait "$pid" || rc=$?
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; cleanup; fi
done
wait  # let the output prefixers flush
exit $status
