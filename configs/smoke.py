"""The smallest run that exercises every part of training (used by tests, a few seconds a step).

  python -m gru_mem.train --config configs/smoke.py --workdir /tmp/smoke
"""

from gru_mem import defaults as base


def get_config():
  c = base.get_config()
  c.model.preset = "tiny"
  c.tokenizer = "builtin"
  c.data.train_tasks = "niah_single_1"
  c.data.context_tokens = 160
  c.agent.chunk_tokens = 64
  c.agent.memory_tokens = 16
  c.agent.max_response_tokens = 16
  c.agent.max_answer_tokens = 8
  c.rl.group_size = 2
  c.rl.prompts_per_step = 2
  c.rl.dynamic_sampling = False  # a random model's groups are all zero-advantage: train anyway
  c.rl.kl_beta = 0.001
  c.optim.learning_rate = 1e-3
  c.optim.micro_batch_rows = 8
  c.train.steps = 6
  c.train.save_every = 1
  return c
