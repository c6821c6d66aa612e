"""The rollout copy's layout against the learner's, for the paper configs: dry-run figures.

For each target the dry run (`python -m gru_mem.dry_run --nolearner`, a fresh process with as
many fake CPU devices as the target has chips) compiles the sampler's decode loop twice: with the
rollout copy (bfloat16, `sampling.mesh`) and with the learner's float32 fsdp parameters as they
are. Per layout it records, per device: weight bytes, KV cache bytes, the bytes the decode loop
carries (what a token step reads), the collectives per token step and outside the loop, weight
all-gathers, the sampler's peak with the train state, and the roofline decode tokens/s of the
config's chip. Counts and bytes come from the compiled programs and do not depend on the machine.

Variants per config and slot count (`--variants`): "config" (as the config says: the paper 7B
config's rollout stores its KV cache in int8), "auto_cache" (the rollout with the bfloat16
cache, `sampling.kv_cache_dtype=auto`) and "learner_int8" (no rollout copy: the learner's
parameters and mesh with the int8 cache, as training samples when the copy is off; its
"rollout" entry is that layout, its "learner_layout" the learner's with the cache as today).

  python benchmarks/rollout_layout.py       # -> benchmarks/results/rollout_layout.json
  python benchmarks/rollout_layout.py --configs qwen2p5_7b_hotpotqa.py:h100x8 --slots 64 \
      --variants config
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("mesh", "param_dtype", "kv_cache_dtype", "rows", "cache_columns", "weight_bytes", "kv_cache_bytes",
        "decode_carry_bytes", "bytes_per_token_step", "loop_weight_bytes", "collectives_per_token_step",
        "collectives_outside_loop", "weight_gathers", "sampler_peak_bytes", "roofline",
        "decode_compile_s", "decode_memory", "cache_dims_per_device", "loop_ops_of_cache_shape")

NO_COPY = ["--config.sampling.param_dtype=float32", "--config.sampling.mesh.data=0",
           "--config.sampling.mesh.fsdp=0", "--config.sampling.mesh.tensor=0"]
VARIANTS = {"config": [], "auto_cache": ["--config.sampling.kv_cache_dtype=auto"],
            "learner_int8": NO_COPY + ["--config.sampling.kv_cache_dtype=int8"]}


def dry_run(config: str, extra: list) -> dict:
  with tempfile.TemporaryDirectory() as folder:
    out = os.path.join(folder, "report.json")
    command = [sys.executable, "-m", "gru_mem.dry_run", "--config", f"configs/{config}",
               "--nolearner", "--out", out, *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(result.stderr[-3000:])
    print(result.stdout, flush=True)
    with open(out) as f:
      return json.load(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="qwen2p5_7b_hotpotqa.py:h100x8,"
                      "qwen2p5_7b_hotpotqa.py:tpu_v5p_64")
  parser.add_argument("--slots", default="", help="comma-separated sampling.slots to add "
                      "beside the config's (e.g. 64)")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated, of {sorted(VARIANTS)}")
  parser.add_argument("--name", default="rollout_layout")
  args = parser.parse_args()
  runs = []
  for config in args.configs.split(","):
    for slots, variant in itertools.product(
        [None] + [int(s) for s in args.slots.split(",") if s], args.variants.split(",")):
      extra = ([] if slots is None else [f"--config.sampling.slots={slots}"]) + VARIANTS[variant]
      report = dry_run(config, extra)
      runs.append({
          "config": config, "variant": variant, "overrides": extra, "model_source": report["model_source"],
          "shapes": report["shapes"], "train_state_bytes_per_device":
              report["params_bytes_per_device"] + report["optimizer_bytes_per_device"]
              + report["reference_bytes_per_device"],
          "rollout": {k: report["rollout"].get(k) for k in KEYS},
          "learner_layout": {k: report["learner_layout"].get(k) for k in KEYS},
          "rollout_vs_learner_layout_decode_tokens_per_s":
              report.get("rollout_vs_learner_layout_decode_tokens_per_s"),
          "dry_run_environment": report["environment"]})
  path = common.save_results(args.name, {"runs": runs})
  print(f"saved {path}")


if __name__ == "__main__":
  main()
