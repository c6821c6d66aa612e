"""Training on two hosts (two JAX processes on this CPU, joined by jax.distributed): it runs, and
a SIGTERM to one host stops both after the same step with its checkpoint; a restart resumes
exactly. This is how a Slurm time limit or a spot VM's preemption reaches a multi-host job."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gru_mem import run_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_hosts(workdir: str, steps: int = STEPS) -> list:
  """Two processes of `gru_mem.train` (the smoke config), one CPU device each, one coordinator."""
  port = free_port()
  hosts = []
  for process_id in (0, 1):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process_id))
    env.pop("XLA_FLAGS", None)
    hosts.append(subprocess.Popen(
        [sys.executable, "-m", "gru_mem.train", "--config", "configs/smoke.py", "--workdir",
         workdir, f"--config.train.steps={steps}", "--config.train.save_every=100"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return hosts


def finish(hosts, timeout: float = 600) -> list[str]:
  outputs = [host.communicate(timeout=timeout)[0] for host in hosts]
  for host, output in zip(hosts, outputs):
    assert host.returncode == 0, output[-3000:]
  return outputs


def logged_steps(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if line.strip())


@pytest.mark.slow  # three two-host runs: ~2 min idle, 5+ min on a loaded 2-core machine
def test_sigterm_to_one_host_stops_both_at_one_step_and_the_restart_resumes_exactly(tmp_path):
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  finish(start_hosts(straight))

  hosts = start_hosts(stopped)
  deadline = time.time() + 600
  while logged_steps(stopped) < 1:  # step 1 done (compiled); now preempt host 1 only
    assert time.time() < deadline and all(h.poll() is None for h in hosts), "training ended early"
    time.sleep(0.5)
  hosts[1].send_signal(signal.SIGTERM)
  outputs = finish(hosts)
  stops = [re.search(r"stopped after step (\d+) of 3: SIGTERM received; checkpoint (\d+)", out)
           for out in outputs]
  assert all(stops), outputs[0][-2000:] + outputs[1][-2000:]
  stop_steps = {int(m.group(1)) for m in stops} | {int(m.group(2)) for m in stops}
  assert len(stop_steps) == 1, f"the hosts stopped at different steps: {stop_steps}"
  stop_step = stop_steps.pop()
  assert 1 <= stop_step < STEPS, stop_step
  assert run_folder.completed_steps(stopped) == stop_step

  outputs = finish(start_hosts(stopped))  # the same command again: both hosts resume
  assert all(f"resumed from step {stop_step}" in out for out in outputs), outputs[0][-2000:]
  for a, b in zip(jax.tree.leaves(run_folder.load_params(straight)),
                  jax.tree.leaves(run_folder.load_params(stopped))):
    np.testing.assert_array_equal(a, b)
