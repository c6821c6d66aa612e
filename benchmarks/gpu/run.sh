#!/bin/bash
# The prepared accelerator check (issue 20): one H200 (about 140 GB), under 8 minutes, one JSON.
#   bash benchmarks/gpu/run.sh [OUT_DIR]      # default benchmarks/results -> gpu_h200.json
# Checks that jax sees the GPU and the packages import, then runs the four parts
# of benchmarks/gpu/bench.py (decode, prefill, learner MFU, one RL step), each under its own limit
# so that a slow part cannot take the others' time; the JSON is rewritten after every part.
set -u
cd "$(dirname "$0")/../.."
out="${1:-benchmarks/results}"
py="${PYTHON:-python3}"
# A machine without network: packages its image lacks travel as wheels in .whl/ (e.g.
# ml-collections, seqio; see the device notes) and are installed beside it, not over it.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
"$py" - <<'PY' || exit 1
import importlib, sys
missing = [m for m in ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "transformers")
           if importlib.util.find_spec(m.split(".")[0]) is None]
if missing:
  sys.exit(f"missing packages {missing}: carry their wheels in .whl/ (pip download --no-deps ...)")
import jax
if jax.default_backend() != "gpu":
  sys.exit(f"jax sees no GPU (backend {jax.default_backend()!r}): install a CUDA jax")
print("jax", jax.__version__, jax.devices())
PY
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=3
status=0
for part in decode:150 prefill:60 learner:120 rl_step:150; do
  name="${part%%:*}"; limit="${part##*:}"
  timeout "$limit" "$py" benchmarks/gpu/bench.py --chip h200 --parts "$name" \
    --name "gpu_h200_$name" --out_dir "$out" || { echo "part $name: exit $? (limit ${limit}s)"; status=1; }
done
"$py" - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
merged = {}
for path in sorted(glob.glob(os.path.join(out, "gpu_h200_*.json"))):
  with open(path) as f:
    merged[os.path.basename(path)[len("gpu_h200_"):-5]] = json.load(f)
with open(os.path.join(out, "gpu_h200.json"), "w") as f:
  json.dump(merged, f, indent=2)
print("saved", os.path.join(out, "gpu_h200.json"))
PY
exit $status
