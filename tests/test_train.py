"""The RL training loop end to end on a tiny model: metrics, checkpoints, exact resume."""

import json
import os

import jax
import numpy as np

from configs import tiny
from gru_mem import checkpoint, train


def small_config(steps):
  c = tiny.get_config()
  c.data.train_tasks = "niah_single_1"
  c.data.context_tokens = 200
  c.agent.chunk_tokens = 64
  c.agent.memory_tokens = 16
  c.agent.max_response_tokens = 24
  c.agent.max_answer_tokens = 8
  c.rl.group_size = 2
  c.rl.prompts_per_step = 2
  c.rl.dynamic_sampling = False  # a random model's groups are all zero-advantage: train anyway
  c.optim.micro_batch_rows = 8
  c.train.steps = steps
  c.train.save_every = 1
  return c


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_train_writes_metrics_and_checkpoints_and_resumes_exactly(tmp_path):
  straight = str(tmp_path / "straight")
  metrics = train.train(small_config(3), straight)
  for key in ("reward/trajectory", "gate/update_acc_evidence", "gate/exit_exact",
              "agent/chunks_read", "learner/loss", "learner/kl", "learner/clip_fraction",
              "learner/entropy", "time/step_s"):
    assert key in metrics, key
  records = read_jsonl(os.path.join(straight, "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3]
  assert os.listdir(os.path.join(straight, "tensorboard"))
  assert os.path.isfile(os.path.join(straight, "tokenizer", "tokenizer.json"))

  resumed = str(tmp_path / "resumed")
  train.train(small_config(2), resumed)
  train.train(small_config(3), resumed)  # picks up at step 2
  final_straight, _ = checkpoint.load_params_for_export(straight)
  final_resumed, _ = checkpoint.load_params_for_export(resumed)
  for a, b in zip(jax.tree.leaves(final_straight), jax.tree.leaves(final_resumed)):
    np.testing.assert_array_equal(a, b)
  manager = checkpoint.CheckpointManager(resumed, read_only=True)
  _, position, _ = manager.restore()
  manager.close()
  assert position["examples_consumed"] == 3 * 2
