"""The default job's RL stage on a laptop CPU: a tiny Qwen2-shaped model, synthetic needles.

  python -m gru_mem.train --config configs/tiny.py --workdir runs/tiny
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.preset = "tiny"
  c.tokenizer = "builtin"
  c.data.train_tasks = "niah_single_1,niah_multihop"
  c.data.context_tokens = 512
  c.agent.chunk_tokens = 64
  c.agent.memory_tokens = 48
  c.agent.max_response_tokens = 96
  c.agent.max_answer_tokens = 24
  c.rl.group_size = 4
  c.rl.prompts_per_step = 4
  c.rl.kl_beta = 0.0
  c.optim.learning_rate = 3e-4
  c.optim.micro_batch_rows = 16
  c.train.steps = 20
  c.train.save_every = 10
  return c
