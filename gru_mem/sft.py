r"""Stage 1 of the default job: a supervised warm start on scripted memory-agent trajectories.

  python -m gru_mem.sft --config configs/tiny.py --workdir runs/default/sft

The first `sft.copy_steps` steps train on the copy warm-up (`agent.scripted.CopyRows`), the rest
on scripted trajectories (`agent.scripted.ScriptedRows`; see that module for what is scripted
and why). The loss is the token mean of -log pi(response token) over all response tokens of the
batch (`learner.NLL`), taken by the same exact micro-batched step as RL's
(`learner.make_train_step`). A from-scratch preset starts from `sft.init` ("fan_in":
`model.init.fan_in_params`). The run folder has the layout of an RL run, so `model.init_workdir`
and every reader of run folders (`run_folder`) take it.
"""

from __future__ import annotations

from gru_mem import console

console.quiet_startup()  # before the libraries below are imported

import os
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from gru_mem import runtime, run_folder, settings, stage
from gru_mem.agent.scripted import CopyRows, ScriptedRows
from gru_mem.rl import batch as rl_batch
from gru_mem.rl import learner

CONSOLE_KEYS = {"loss": "loss", "token_accuracy": "token_acc"}


def sft_rows(pairs) -> list[rl_batch.LearnerRow]:
  """(prompt ids, response ids) pairs -> learner rows (the NLL objective reads no advantage)."""
  return [rl_batch.LearnerRow(prompt, response, 1.0, np.zeros(len(response), np.float32))
          for prompt, response in pairs]


def train_sft(config, workdir: str,
              on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
  """Runs (or resumes) stage 1 in `workdir`; returns the last logged metrics (the mean over the
  last `sft.log_every` steps). `on_step(step, metrics)` is called after every step."""
  settings.validate_sft(config)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = runtime.build_tokenizer(config)
  model_config = runtime.model_config_from(config, tokenizer)
  tokenizer.save(os.path.join(workdir, run_folder.TOKENIZER_DIR))
  learner_settings = settings.sft_learner_settings(config)
  params = runtime.initial_params(config, model_config, jax.random.PRNGKey(config.seed),
                                  init_scheme=config.sft.init)
  state = learner.create_train_state(params, learner_settings)
  sft = config.sft
  run = stage.Stage("sft", workdir, sft.steps, sft.save_every, keep=2,
                    metadata=runtime.run_metadata(config, model_config),
                    console_keys=CONSOLE_KEYS, max_nonfinite_steps=config.train.max_nonfinite_steps,
                    nonfinite_metric="nonfinite")
  state, _, _, start_step = run.resume(state)
  trajectories = ScriptedRows(config.data, tokenizer, config.agent.chunk_tokens,
                              settings.script_settings(config), sft.examples_per_step, sft.seed,
                              prompt_set=settings.prompt_set(config, tokenizer))
  copies = CopyRows(tokenizer, sft.copy_rows, sft.copy_tokens, sft.seed)
  sft_step = learner.make_train_step(model_config, learner_settings, objective=learner.NLL)
  metrics: dict = {}
  window: list = []
  last_step = start_step
  try:
    for step in range(start_step, sft.steps):
      start = time.perf_counter()
      pairs = (copies.rows(step) if step < sft.copy_steps
               else trajectories.rows(step - sft.copy_steps))
      batch = rl_batch.pack_rows(sft_rows(pairs), learner_settings.length_buckets,
                                 learner_settings.micro_batch_rows, pad_id=tokenizer.pad_id)
      state, step_metrics = sft_step(state, batch)
      window.append(step_metrics)
      logged, tokens = None, None
      last_step = step + 1
      if last_step % sft.log_every == 0 or last_step == sft.steps:
        host = jax.device_get(window)
        metrics = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        metrics["time/step_s"] = time.perf_counter() - start
        logged, tokens, window = metrics, int(sum(m["tokens"] for m in host)), []
      if on_step is not None:
        on_step(last_step, metrics)
      if run.end_of_step(last_step, state, None,
                         {"examples_consumed": last_step * sft.examples_per_step},
                         logged, tokens):
        break
    run.finish(last_step, state, None, {"examples_consumed": last_step * sft.examples_per_step})
  finally:
    run.close()
  return metrics


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  train_sft(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "experiment config file")
  flags.DEFINE_string("workdir", None, "run folder of the SFT stage", required=True)
  app.run(main)
