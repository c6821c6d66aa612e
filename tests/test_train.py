"""The RL training loop end to end on a tiny model: metrics, checkpoints, exact resume after a kill."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import smoke
from gru_mem import checkpoint, run_folder, settings, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def start_training(workdir, steps):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  return subprocess.Popen(
      [sys.executable, "-m", "gru_mem.train", "--config", "configs/smoke.py", "--workdir", workdir,
       f"--config.train.steps={steps}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def test_train_writes_metrics_and_resumes_exactly_after_sigkill(tmp_path):
  straight = str(tmp_path / "straight")
  metrics = train.train(smoke.get_config(), straight)
  for key in ("reward/trajectory", "reward/update", "gate/update_acc_evidence", "gate/exit_exact",
              "agent/chunks_read", "agent/memory_tokens", "learner/loss", "learner/kl",
              "learner/clip_fraction", "learner/entropy", "time/step_s"):
    assert key in metrics, key
  assert [r["step"] for r in read_jsonl(os.path.join(straight, "metrics.jsonl"))] == list(range(1, 7))
  assert os.listdir(os.path.join(straight, "tensorboard"))
  assert os.path.isfile(os.path.join(straight, "tokenizer", "tokenizer.json"))

  killed = str(tmp_path / "killed")
  process = start_training(killed, 6)
  deadline = time.time() + 600
  while not os.path.isdir(os.path.join(killed, "checkpoints", "3")):
    assert process.poll() is None, process.stdout.read()
    assert time.time() < deadline, "no checkpoint 3 within 10 minutes"
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  manager = checkpoint.CheckpointManager(killed, read_only=True)
  assert 3 <= manager.latest_step() < 6
  manager.close()

  train.train(smoke.get_config(), killed)  # resumes from the latest complete checkpoint
  final_straight = run_folder.load_params(straight)
  final_resumed = run_folder.load_params(killed)
  for a, b in zip(jax.tree.leaves(final_straight), jax.tree.leaves(final_resumed)):
    np.testing.assert_array_equal(a, b)
  manager = checkpoint.CheckpointManager(killed, read_only=True)
  _, position, _ = manager.restore()
  manager.close()
  assert position["examples_consumed"] == 6 * 2

  # SIGTERM (preemption): the step in flight finishes, a checkpoint of it is written, exit 0; a
  # restart resumes exactly.
  terminated = str(tmp_path / "terminated")
  process = start_training(terminated, 6)
  while not os.path.isdir(os.path.join(terminated, "checkpoints", "2")):
    assert process.poll() is None, process.stdout.read()
    assert time.time() < deadline + 600, "no checkpoint 2"
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=600)
  assert process.returncode == 0, output
  stopped = re.search(r"stopped after step (\d+) of 6: SIGTERM received; checkpoint (\d+)", output)
  assert stopped and stopped.group(1) == stopped.group(2), output
  assert 2 <= int(stopped.group(1)) < 6, output
  with checkpoint.CheckpointManager(terminated, read_only=True) as manager:
    assert manager.latest_step() == int(stopped.group(1))
  train.train(smoke.get_config(), terminated)
  for a, b in zip(jax.tree.leaves(final_straight),
                  jax.tree.leaves(run_folder.load_params(terminated))):
    np.testing.assert_array_equal(a, b)

  # The trained checkpoint exports to a folder transformers loads with the same logits.
  import torch
  import transformers
  from gru_mem import export_hf
  from gru_mem.model import transformer
  folder, step = export_hf.export(killed, str(tmp_path / "export"))
  assert step == 6
  info, params = run_folder.load_run(killed)
  model_config = info.model_config
  tokens = np.array([[3, 17, 256, 9, 1000, 44]])
  ours, _ = transformer.forward(model_config, params, tokens)
  with torch.no_grad():
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder)(torch.tensor(tokens)).logits
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5)


KILL_MID_SAVE = """
import os, signal, numpy as np
from gru_mem import checkpoint
manager = checkpoint.CheckpointManager({workdir!r}, save_every=1)
manager.save(1, {{"params": {{"w": np.ones(4, np.float32)}}}}, {{"examples_consumed": 1}}, wait=True)
manager.save(2, {{"params": {{"w": np.zeros((4096, 4096), np.float32)}}}}, {{"examples_consumed": 2}})
os.kill(os.getpid(), signal.SIGKILL)  # while step 2 is still being written
"""


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  subprocess.run([sys.executable, "-c", KILL_MID_SAVE.format(workdir=workdir)], cwd=REPO,
                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True)
  manager = checkpoint.CheckpointManager(workdir, read_only=True)
  assert manager.latest_step() == 1
  state, position, _ = manager.restore()
  manager.close()
  np.testing.assert_array_equal(state["params"]["w"], np.ones(4, np.float32))
  assert position == {"examples_consumed": 1}


@pytest.mark.parametrize("override, message", [
    ("rl.alpha=1.5", "rl.alpha=1.5: must be in [0, 1]"),
    ("rl.group_size=1", "rl.group_size=1: must be >= 2"),
    ("mesh.data=3", "mesh"),
    ("agent.mode='nope'", "mode='nope'"),
    ("optim.length_buckets='64;128'", "optim.length_buckets='64;128': give increasing"),
    ("optim.length_buckets='128,64'", "must be a non-empty increasing tuple"),
])
def test_bad_config_fails_before_any_compile(tmp_path, override, message):
  config = smoke.get_config()
  key, value = override.split("=")
  section, name = key.split(".")
  config[section][name] = eval(value)
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    settings.validate(config)


def test_unknown_config_key_is_named(tmp_path):
  config = smoke.get_config()
  config.rl.alhpa = 0.5
  with pytest.raises(ValueError, match=r"\['rl.alhpa'\]"):
    settings.validate(config)
  result = subprocess.run(
      [sys.executable, "-m", "gru_mem.train", "--config", "configs/smoke.py", "--workdir",
       str(tmp_path / "w"), "--config.rl.alhpa=0.5"], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode != 0 and "alhpa" in result.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")
