#!/usr/bin/env bash
# GRU-Mem on a Cloud TPU VM slice: create it, copy the code to every worker and install it, run
# training on all workers at once, follow the logs, delete it.
#
#   launch/tpu_vm.sh create | setup | run [--config.key=value ...] | logs | status | delete
#   launch/tpu_vm.sh all [--config.key=value ...]         # create, setup, run
#   DRY_RUN=1 launch/tpu_vm.sh all                        # print the commands, run nothing
#
# Environment (defaults): TPU_NAME (gru-mem), ZONE (us-east5-a), PROJECT (gcloud's default),
# ACCELERATOR (v5p-64: 64 TensorCores = 32 chips on 8 hosts), RUNTIME (v2-alpha-tpuv5), SPOT=1
# for a spot slice, CONFIG (configs/qwen2p5_7b_hotpotqa.py:tpu_v5p_64), BUCKET (a GCS bucket that
# `setup` mounts with gcsfuse at /mnt/gcs on every worker), WORKDIR (a folder every worker sees:
# each writes its part of every checkpoint there; default /mnt/gcs/gru_mem/$TPU_NAME), MODEL_DIR
# and HOTPOTQA (paths on the workers, e.g. under /mnt/gcs, passed as --config.model.hf_path and
# --config.data.hotpotqa_path), HOSTS (worker count; default cores / 8, right for v4 and v5p),
# LOG_WORKER (the worker `logs` follows, default 0).
#
# Logs: each worker writes ~/gru_mem_logs/train.log; `logs` follows one of them (only worker 0
# prints metrics). Multi-host: every worker runs the same command; gru_mem.train calls
# parallel.initialize_distributed(), which sees JAX_NUM_PROCESSES > 1 and lets
# jax.distributed.initialize() find the slice's coordinator from the TPU metadata.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
TPU_NAME="${TPU_NAME:-gru-mem}"
ZONE="${ZONE:-us-east5-a}"
ACCELERATOR="${ACCELERATOR:-v5p-64}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
CONFIG="${CONFIG:-configs/qwen2p5_7b_hotpotqa.py:tpu_v5p_64}"
WORKDIR="${WORKDIR:-/mnt/gcs/gru_mem/$TPU_NAME}"
CORES="${ACCELERATOR##*-}"
HOSTS="${HOSTS:-$(( CORES >= 8 ? CORES / 8 : 1 ))}"
REMOTE_DIR="gru_mem"  # relative to each worker's home
TARBALL="${TMPDIR:-/tmp}/gru_mem_${TPU_NAME}.tgz"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$ZONE")
[ -n "${PROJECT:-}" ] && where+=("--project=$PROJECT")

run() {
  if [ "$DRY_RUN" = "1" ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

on_all_workers() {  # on_all_workers "shell command"
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

create() {
  local spot=()
  [ "${SPOT:-0}" = "1" ] && spot=(--spot)
  run "${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" "--accelerator-type=$ACCELERATOR" \
      "--version=$RUNTIME" "${spot[@]}"
}

setup() {
  # The tracked and new (not ignored) files of this checkout, so local edits travel too.
  if [ "$DRY_RUN" = "1" ]; then
    printf '+ (cd %q && git ls-files -z --cached --others --exclude-standard | tar --null -czf %q -T -)\n' \
        "$REPO" "$TARBALL"
  else
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null -czf "$TARBALL" -T -)
  fi
  run "${gcloud_tpu[@]}" scp "$TARBALL" "$TPU_NAME:~/gru_mem.tgz" "${where[@]}" --worker=all
  on_all_workers "mkdir -p ~/$REMOTE_DIR ~/gru_mem_logs && tar -xzf ~/gru_mem.tgz -C ~/$REMOTE_DIR \
&& cd ~/$REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate \
&& pip install --quiet --upgrade pip && pip install --quiet -e . 'jax[tpu]'"
  if [ -n "${BUCKET:-}" ]; then
    on_all_workers "sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs \
&& (mountpoint -q /mnt/gcs || gcsfuse --implicit-dirs $BUCKET /mnt/gcs)"
  else
    echo "[tpu_vm] BUCKET is not set: make sure WORKDIR=$WORKDIR is shared by all workers" >&2
  fi
}

train_command() {  # the shell command each worker runs, with "$@" as extra config overrides
  local args=(--config "$CONFIG" --workdir "$WORKDIR")
  [ -n "${MODEL_DIR:-}" ] && args+=("--config.model.hf_path=$MODEL_DIR")
  [ -n "${HOTPOTQA:-}" ] && args+=("--config.data.hotpotqa_path=$HOTPOTQA")
  args+=("$@")
  local quoted
  quoted="$(printf ' %q' "${args[@]}")"
  echo "cd ~/$REMOTE_DIR && . .venv/bin/activate && export JAX_NUM_PROCESSES=$HOSTS \
TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=\$HOME/$REMOTE_DIR && nohup python -m gru_mem.train$quoted \
> ~/gru_mem_logs/train.log 2>&1 < /dev/null &"
}

train() {
  echo "[tpu_vm] $ACCELERATOR '$TPU_NAME': $HOSTS workers run $CONFIG -> $WORKDIR"
  on_all_workers "$(train_command "$@")"
}

logs() {
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" "--worker=${LOG_WORKER:-0}" \
      --command="tail -n 100 -F ~/gru_mem_logs/train.log"
}

status() {
  run "${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format="value(state,health)"
  on_all_workers "pgrep -af gru_mem.train || echo 'not running'; tail -n 2 ~/gru_mem_logs/train.log"
}

delete() {
  run "${gcloud_tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
}

action="${1:-}"
[ "$#" -gt 0 ] && shift
case "$action" in
  create) create ;;
  setup) setup ;;
  run) train "$@" ;;
  logs) logs ;;
  status) status ;;
  delete) delete ;;
  all) create; setup; train "$@" ;;
  *)
    echo "usage: $0 create|setup|run|logs|status|delete|all [--config.key=value ...]" \
         "(DRY_RUN=1 prints the commands)" >&2
    exit 2 ;;
esac
