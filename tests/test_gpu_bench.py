"""benchmarks/gpu/bench.py --cpu-smoke: the prepared accelerator check runs its code tiny on CPU
and writes the figures it will write on the GPU, each consistent with its own definition."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_smoke(out_dir, parts):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
      [sys.executable, "benchmarks/gpu/bench.py", "--cpu-smoke", "--parts", parts, "--name",
       "smoke", "--out_dir", str(out_dir)], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  with open(out_dir / "smoke.json") as f:
    return json.load(f)


def test_cpu_smoke_decode_prefill_learner(tmp_path):
  figures = run_smoke(tmp_path, "decode,prefill,learner")
  assert figures["errors"] == {} and figures["cpu_smoke"]
  for row in figures["decode"]:
    # the limit is batch / (bytes per step / bandwidth): recompute it from the row
    limit = row["batch"] * figures["hbm_bytes_per_s"] / row["bytes_per_step"]
    assert row["bandwidth_limit_tokens_per_s"] == pytest.approx(limit)
    assert 0 < row["fraction_of_limit"] < 1 and row["tokens_per_s"] > 0
    assert len(row["times_s"]["one"]) == len(row["times_s"]["all"]) == 3
  assert figures["prefill"]["tokens_per_s"] > 0
  learner = figures["learner"]
  assert learner["mfu"] == pytest.approx(
      learner["model_flop"] / learner["step_s"] / figures["peak_flop_per_s"])
  assert 0 < learner["mfu"] < 1.5
  assert figures["protocol"]["repeats_alternate_within_one_process"]


@pytest.mark.slow  # one RL step of the smoke config (compiles the rollout and the learner)
def test_cpu_smoke_rl_step(tmp_path):
  split = run_smoke(tmp_path, "rl_step")["rl_step"]
  assert sum(split["seconds"].values()) == pytest.approx(split["step_s"], rel=0.05)
