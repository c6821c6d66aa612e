#!/usr/bin/env bash
# Alpha sweep (A = alpha * A_traj + (1 - alpha) * A_turn): one RL run per alpha, each in its own
# workdir SWEEP_DIR/alpha_<value>, then a summary table (printed, and written as
# SWEEP_DIR/summary.md and summary.json by gru_mem.sweep_summary).
#
#   launch/sweep_alpha.sh CONFIG SWEEP_DIR [--config.key=value ...]
#   launch/sweep_alpha.sh configs/qwen2p5_7b_hotpotqa.py:h100x8 runs/alpha \
#       --config.model.hf_path=/models/Qwen2.5-7B-Instruct --config.data.hotpotqa_path=/data/hp.json
#   ALPHAS="0.5 1.0" launch/sweep_alpha.sh configs/tiny.py /tmp/alpha --config.train.steps=2
#   DRY_RUN=1 launch/sweep_alpha.sh configs/tiny.py /tmp/alpha     # print the commands only
#
# Environment: ALPHAS (default "0.5 0.7 0.9 1.0"), PYTHON (default python3), SUMMARY_LAST (average
# the summary over each run's last N steps, default 1), RUN_PREFIX (put before each training
# command, e.g. "srun --ntasks=1"), DRY_RUN=1. Runs go one after another and share a persistent JAX
# compilation cache (SWEEP_DIR/.jax_cache unless JAX_COMPILATION_CACHE_DIR is set), so only the
# first run compiles. A run whose folder already has a checkpoint resumes (gru_mem.train's rule).
set -euo pipefail

if [ "$#" -lt 2 ]; then
  echo "usage: $0 CONFIG SWEEP_DIR [--config.key=value ...]   (DRY_RUN=1 prints the commands)" >&2
  exit 2
fi
CONFIG="$1"
SWEEP_DIR="$2"
shift 2
for arg in "$@"; do
  case "$arg" in
    --config.rl.alpha=*|--workdir=*|--workdir)
      echo "$0: $arg is set by the sweep itself; remove it" >&2
      exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
ALPHAS="${ALPHAS:-0.5 0.7 0.9 1.0}"
DRY_RUN="${DRY_RUN:-0}"
read -r -a RUN_PREFIX_WORDS <<< "${RUN_PREFIX:-}"

# `configs` is imported from the repository root; keep the caller's working directory for paths.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$SWEEP_DIR/.jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"

run() {
  if [ "$DRY_RUN" = "1" ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

[ "$DRY_RUN" = "1" ] || mkdir -p "$SWEEP_DIR"
for alpha in $ALPHAS; do
  echo "[sweep_alpha] alpha=$alpha -> $SWEEP_DIR/alpha_$alpha"
  run "${RUN_PREFIX_WORDS[@]}" "$PYTHON" -m gru_mem.train --config "$CONFIG" \
      --workdir "$SWEEP_DIR/alpha_$alpha" "--config.rl.alpha=$alpha" "$@"
done
run "$PYTHON" -m gru_mem.sweep_summary "$SWEEP_DIR" "--last=${SUMMARY_LAST:-1}"
