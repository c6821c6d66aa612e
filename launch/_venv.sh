# Sourced by launch/local.sh and tests/run.sh: create or reuse .venv and install gru_mem into it.
# Usage: source launch/_venv.sh [extra]   (extra: "test" installs the test dependencies too)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
  echo "gru_mem needs Python >= 3.11; found $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x "$REPO/.venv/bin/python" ]; then
  echo "[gru_mem] creating $REPO/.venv"
  "$PYTHON" -m venv "$REPO/.venv"
fi
# shellcheck disable=SC1091
source "$REPO/.venv/bin/activate"
target="$REPO"
[ "${1:-}" = "test" ] && target="$REPO[test]"
stamp="$REPO/.venv/.gru_mem-installed-${1:-base}"
if [ ! -f "$stamp" ] || [ "$REPO/setup.py" -nt "$stamp" ]; then
  echo "[gru_mem] installing ${target} into .venv (first time: several minutes, TensorFlow comes with seqio)"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e "$target"
  touch "$stamp"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
cd "$REPO"
