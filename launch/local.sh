#!/usr/bin/env bash
# The default job on a laptop CPU: SFT warm start -> GRU-Mem RL -> evaluation report.
#   bash launch/local.sh [WORKDIR] [extra flags, e.g. --config.train.steps=10]
# WORKDIR defaults to $GRU_MEM_WORKDIR or runs/default (in the repository). Re-running resumes an
# interrupted stage and skips finished ones; delete WORKDIR/eval/results.json to redo only the
# evaluation.
set -euo pipefail
WORKDIR="${1:-${GRU_MEM_WORKDIR:-}}"
[ $# -gt 0 ] && shift
[ -n "$WORKDIR" ] && WORKDIR="$(mkdir -p "$WORKDIR" && cd "$WORKDIR" && pwd)"  # before _venv.sh cds
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" base
WORKDIR="${WORKDIR:-runs/default}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
echo "[gru_mem] default job -> $WORKDIR (its time on 2 CPU cores: README; longer when other jobs share them)"
python -m gru_mem.default_job --config configs/tiny.py --workdir "$WORKDIR" "$@"
