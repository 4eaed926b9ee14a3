#!/usr/bin/env bash
# Create, set up, run on, and tear down a Cloud TPU VM pod slice with gcloud.
#
#   launch/tpu_pod.sh [--dry-run] create|setup|run|ssh|status|delete|all [-- ARGS...]
#
#   create         gcloud compute tpus tpu-vm create (one VM per host of the slice)
#   setup          copy this checkout (git archive HEAD) to every worker, make a venv there,
#                  pip install medjax + jax[tpu]
#   run -- ARGS    on every worker at once (--worker=all): python -m medjax.train ARGS
#                  (jax.distributed finds the other hosts from the TPU metadata)
#   ssh -- CMD     run CMD on every worker
#   status         describe the TPU
#   delete         delete the TPU VMs (stops billing)
#   all -- ARGS    create, setup, run ARGS, delete (delete runs even if run fails)
#
# Settings (environment): TPU_NAME=medjax-pod ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64
#   RUNTIME_VERSION=<by chip: v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5litepod,
#   v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4> PROJECT=<gcloud default> SPOT=0 (1: --spot)
#   REMOTE_DIR=medjax PYTHON=python3
# --dry-run prints every command (shell-quoted) instead of running it.
set -euo pipefail

TPU_NAME="${TPU_NAME:-medjax-pod}"
ZONE="${ZONE:-us-east5-a}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-64}"
case "$ACCELERATOR_TYPE" in   # the TPU VM image that matches the chip generation
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v5litepod-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$default_runtime}"
PROJECT="${PROJECT:-}"
SPOT="${SPOT:-0}"
REMOTE_DIR="${REMOTE_DIR:-medjax}"
PYTHON="${PYTHON:-python3}"
ARCHIVE="${ARCHIVE:-/tmp/medjax-${TPU_NAME}.tar.gz}"
DRY_RUN=0

usage() { sed -n '2,22p' "$0"; }

if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
ACTION="${1:-}"
[[ -n "$ACTION" ]] || { usage >&2; exit 2; }
shift
if [[ "${1:-}" == "--" ]]; then shift; fi
ARGS=("$@")

shquote() {  # one argument as the shell would need it, single-quoted only when necessary
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() { local out="" a; for a in "$@"; do out+="$(shquote "$a") "; done; echo "${out% }"; }
run() {  # print (dry run) or execute one command
  if [[ $DRY_RUN -eq 1 ]]; then show "$@"; else echo "+ $(show "$@")" >&2; "$@"; fi
}

common=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && common+=(--project="$PROJECT")


create() {
  local extra=()
  [[ "$SPOT" == "1" ]] && extra+=(--spot)
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${common[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
}

setup() {
  local root
  root="$(cd "$(dirname "$0")/.." && pwd)"
  run git -C "$root" archive --format=tar.gz -o "$ARCHIVE" HEAD
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:~/medjax.tar.gz" "${common[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${common[@]}" --worker=all --command "\
mkdir -p ~/$REMOTE_DIR && tar -xzf ~/medjax.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && \
$PYTHON -m venv .venv && .venv/bin/pip install -q -U pip && \
.venv/bin/pip install -q -e . 'jax[tpu]'"
}

remote() {  # run a shell command on every worker
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${common[@]}" --worker=all --command "$1"
}

train() {
  remote "cd ~/$REMOTE_DIR && MEDJAX_DISTRIBUTED=auto .venv/bin/python -m medjax.train${ARGS[*]:+ $(show "${ARGS[@]}")}"
}

delete() { run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${common[@]}" --quiet; }

case "$ACTION" in
  create) create ;;
  setup) setup ;;
  run) train ;;
  ssh) [[ ${#ARGS[@]} -gt 0 ]] || { echo "tpu_pod.sh ssh -- CMD" >&2; exit 2; }; remote "${ARGS[*]}" ;;
  status) run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${common[@]}" ;;
  delete) delete ;;
  all)
    create
    setup
    status=0
    train || status=$?
    delete
    exit $status ;;
  -h|--help|help) usage ;;
  *) echo "tpu_pod.sh: unknown action $ACTION" >&2; usage >&2; exit 2 ;;
esac
