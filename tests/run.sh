#!/usr/bin/env bash
# Runs the test suite: creates or reuses .venv, installs gru_mem[test], runs pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -m slow`, `bash tests/run.sh tests/test_hf.py`).
source "$(dirname "${BASH_SOURCE[0]}")/../launch/_venv.sh" test
python -m pytest "$@"
