"""Chaos: a 12-step tiny RL run SIGKILLed at 5 seeded random moments, restarted after each kill,
ends with the same parameters as a straight run (issue 19). Slow: about seven process start-ups."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gru_mem import run_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
KILLS = 5
SEED = 19


def start_training(workdir: str, log_path: str, cache_dir: str) -> subprocess.Popen:
  # One compilation cache for every start: a restart skips recompiling (as a preempted job would
  # with JAX_COMPILATION_CACHE_DIR set), which keeps the test to minutes; results are the same.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  with open(log_path, "w") as log:
    return subprocess.Popen(
        [sys.executable, "-m", "gru_mem.train", "--config", "configs/smoke.py", "--workdir",
         workdir, f"--config.train.steps={STEPS}", "--config.train.save_every=1"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def checkpoint_entries(workdir: str) -> list[str]:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def latest_complete(workdir: str) -> int:
  """The largest finished step folder (orbax renames `<step>.orbax-checkpoint-tmp-*` when done)."""
  return max((int(name) for name in checkpoint_entries(workdir) if name.isdigit()), default=0)


def kill_moments(rng: np.random.Generator) -> list[tuple[int, float]]:
  """(c, d): SIGKILL d seconds after checkpoint c is complete (c = 0: d seconds after start-up
  began). Distinct increasing c <= 10, so every restart makes progress and the run never ends
  before its kill; d spans about one step, so kills land in rollouts, updates and async saves."""
  after = np.sort(rng.choice(np.arange(0, STEPS - 1), KILLS, replace=False))
  delays = rng.uniform(0.0, 1.5, KILLS)
  return [(int(c), round(float(d), 3)) for c, d in zip(after, delays)]


def tail(path: str, lines: int = 15) -> str:
  with open(path) as f:
    return "".join(f.readlines()[-lines:])


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_a_straight_run(tmp_path):
  cache = str(tmp_path / "jax_cache")
  straight = str(tmp_path / "straight")
  process = start_training(straight, str(tmp_path / "straight.log"), cache)
  assert process.wait(timeout=900) == 0, tail(str(tmp_path / "straight.log"))

  moments = kill_moments(np.random.default_rng(SEED))
  chaos = str(tmp_path / "chaos")
  record = []  # one line per kill: what was asked for and what the folder held
  for attempt, (after, delay) in enumerate(moments):
    log = str(tmp_path / f"chaos_{attempt}.log")
    started = time.time()
    process = start_training(chaos, log, cache)
    while after > 0 and latest_complete(chaos) < after:
      assert process.poll() is None, f"{record}\nattempt {attempt} exited early:\n{tail(log)}"
      assert time.time() < started + 900, f"{record}\nno checkpoint {after} in 15 minutes"
      time.sleep(0.05)
    time.sleep(delay)
    alive = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    record.append({"kill": attempt, "after_checkpoint": after, "delay_s": delay,
                   "alive_at_kill": alive, "seconds_since_start": round(time.time() - started, 1),
                   "left_behind": checkpoint_entries(chaos)})
  message = f"seed {SEED}, kill moments (checkpoint, delay s) {moments}:\n" + "\n".join(
      json.dumps(r) for r in record)
  assert all(r["alive_at_kill"] for r in record), message

  log = str(tmp_path / "chaos_final.log")
  process = start_training(chaos, log, cache)
  assert process.wait(timeout=900) == 0, message + "\n" + tail(log)
  assert latest_complete(chaos) == STEPS, message
  expected, resumed = run_folder.load_params(straight), run_folder.load_params(chaos)
  assert jax.tree.structure(expected) == jax.tree.structure(resumed), message
  for path_and_leaf, leaf in zip(jax.tree_util.tree_leaves_with_path(expected),
                                 jax.tree.leaves(resumed)):
    path, want = path_and_leaf
    assert np.array_equal(want, leaf), f"{jax.tree_util.keystr(path)} differs\n{message}"
  print(message)
