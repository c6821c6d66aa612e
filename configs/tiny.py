"""The default job on a laptop CPU: stage-1 SFT, GRU-Mem RL, evaluation, on a tiny model.

  bash launch/local.sh
  python -m gru_mem.default_job --config configs/tiny.py --workdir runs/default
  python -m gru_mem.train --config configs/tiny.py --workdir runs/tiny   # RL alone, from scratch

Work in progress (issue 7): the pipeline runs end to end but does not yet learn the gates.
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
  c.train.steps = 10
  c.train.save_every = 10

  c.sft.steps = 300  # stage 1 on scripted trajectories
  c.sft.save_every = 100
  c.sft.log_every = 10

  c.eval.tasks = "niah_single_1,niah_multihop"
  c.eval.lengths = "512"
  c.eval.evidence_depths = "1.0,0.2"
  c.eval.examples = 8
  c.eval.batch_size = 8
  return c
