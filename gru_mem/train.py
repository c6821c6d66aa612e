r"""GRU-Mem / MemAgent RL training.

  python -m gru_mem.train --config configs/tiny.py --workdir runs/tiny [--config.rl.alpha=0.5]

One step: draw prompts -> rollout with G samples each (one batched sampler call per chunk step,
with the rollout copy of the policy: `rollout_weights`, its own dtype and mesh) -> rewards
(outcome, format, exit, update) -> dynamic sampling (drop groups whose advantages are all zero,
draw more prompts to refill) -> advantages -> pi_old recomputed by the learner when the rollout
copy differs (`rl.old_logprobs`) -> one Multi-Conv DAPO update over every turn of every kept
trajectory -> the rollout copy refreshed from the new parameters on device -> metrics (TensorBoard, metrics.jsonl, console with ETA) -> checkpoint.
Restarting with the same workdir resumes from the latest checkpoint (params, optimizer, step,
rng and data position).
"""

from __future__ import annotations

from gru_mem import console

console.quiet_startup()  # before the libraries below are imported

import dataclasses
import os
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gru_mem import parallel, rollout_weights, runtime, run_folder, settings, stage
from gru_mem.agent.prompts import PromptBuilder
from gru_mem.agent.rollout import AgentExample, rollout, sampler_policy
from gru_mem.data import sources
from gru_mem.rl import batch as rl_batch
from gru_mem.rl import episodes, learner, old_logprobs

# What the console line shows of a step (everything goes to TensorBoard and metrics.jsonl).
CONSOLE_KEYS = {"reward/trajectory": "reward", "gate/update_acc_evidence": "upd+",
                "gate/update_acc_non_evidence": "upd-", "gate/exit_exact": "exact",
                "agent/chunks_read": "chunks", "agent/accuracy": "acc", "time/step_s": "s/step"}


@dataclasses.dataclass
class StepOutput:
  rows: list
  metrics: dict
  prompts_drawn: int


def collect_rows(config, policy, builder, tokenizer, stream: Iterator, rng: jax.Array
                 ) -> StepOutput:
  """Rollouts until `prompts_per_step` groups with a learning signal are kept (dynamic sampling).

  Groups whose every advantage is zero give no gradient; with rl.dynamic_sampling they are
  dropped and more prompts are drawn, at most rl.max_refill_rounds extra times.
  """
  rollout_settings = settings.rollout_settings(config)
  group_size = rollout_settings.samples_per_example
  needed, rows, drawn, round_index = config.rl.prompts_per_step, [], 0, 0
  metrics: dict[str, list] = {}
  kept_total, dropped_total = 0, 0
  while needed > 0 and round_index <= config.rl.max_refill_rounds:
    examples = [next(stream) for _ in range(needed)]
    drawn += len(examples)
    agent_examples = [AgentExample.from_example(e, tokenizer, config.agent.chunk_tokens)
                      for e in examples]
    result = rollout(policy, builder, tokenizer, agent_examples,
                     jax.random.fold_in(rng, round_index), rollout_settings)
    scored = episodes.score_rollout(result.trajectories, agent_examples, group_size, config.rl,
                                    config.agent.mode)
    keep = (~scored.zero_advantage_group if config.rl.dynamic_sampling
            else np.ones(len(examples), bool))
    rows += scored.learner_rows(keep)
    for key, value in scored.metrics.items():
      metrics.setdefault(key, []).append(value)
    metrics.setdefault("time/rollout_s", []).append(result.total_seconds)
    kept_total += int(keep.sum())
    dropped_total += int((~keep).sum())
    needed -= int(keep.sum())
    round_index += 1
    if not config.rl.dynamic_sampling:
      break
  summary = {k: float(np.nanmean(v)) if k != "time/rollout_s" else float(np.sum(v))
             for k, v in metrics.items()}
  summary.update({"data/groups_kept": kept_total, "data/groups_dropped": dropped_total,
                  "data/prompts_drawn": drawn})
  return StepOutput(rows, summary, drawn)


def train(config, workdir: str) -> dict:
  """Runs (or resumes) RL training in `workdir`; returns the last step's metrics.
  With train.dry_run it only compiles on fake devices and returns the memory report."""
  if config.train.dry_run:  # before anything starts a JAX backend or reads data
    from gru_mem import dry_run  # pylint: disable=import-outside-toplevel
    return dry_run.run(config, out_path=os.path.join(workdir, "dry_run.json"))
  settings.validate(config)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = runtime.build_tokenizer(config)
  model_config = runtime.model_config_from(config, tokenizer)
  tokenizer.save(os.path.join(workdir, run_folder.TOKENIZER_DIR))
  mesh = parallel.mesh_from_config(config.mesh)
  layout = settings.rollout_layout(config, model_config, mesh)  # the rollout copy's dtype, mesh
  recompute_old = settings.recompute_old_logprobs(config, layout)
  learner_settings = settings.learner_settings(config)
  shardings = learner.state_shardings(model_config, learner_settings, mesh)
  init_rng, rng = jax.random.split(jax.random.PRNGKey(config.seed))
  state = learner.create_train_state(runtime.initial_params(config, model_config, init_rng),
                                     learner_settings, shardings)
  reference_params = None
  if learner_settings.kl_beta:  # frozen pi_ref: the starting policy
    reference_params = jax.tree.map(jnp.copy, state.params)

  run = stage.Stage("train", workdir, config.train.steps, config.train.save_every,
                    config.train.keep_checkpoints, runtime.run_metadata(config, model_config),
                    console_keys=CONSOLE_KEYS, max_nonfinite_steps=config.train.max_nonfinite_steps,
                    show_token_rate=False)
  state, rng, data_position, start_step = run.resume(
      state, rng, {"examples_consumed": 0, "seed": config.seed})
  stream = sources.example_stream(config.data, tokenizer, seed=config.seed,
                                  start=data_position["examples_consumed"])
  builder = PromptBuilder(tokenizer, config.agent.mode, settings.prompt_set(config, tokenizer))
  train_step = learner.make_train_step(model_config, learner_settings, mesh)
  rollout_copy = rollout_weights.RolloutWeights(layout, state.params)  # no copy if same layout
  sample_settings = settings.sampling_settings(config, tokenizer)
  metrics: dict = {}
  last_step = start_step
  try:
    for step in range(start_step, config.train.steps):
      step_start = time.perf_counter()
      policy = sampler_policy(layout.config, rollout_copy.params, sample_settings,
                              batch_sharding=rollout_copy.batch_sharding)
      with rollout_copy.activate():  # rows split over the rollout mesh, constraints applied
        out = collect_rows(config, policy, builder, tokenizer, stream,
                           jax.random.fold_in(rng, step))
      data_position["examples_consumed"] += out.prompts_drawn
      metrics = dict(out.metrics)
      learner_start = time.perf_counter()
      if out.rows:
        batch = rl_batch.pack_rows(out.rows, learner_settings.length_buckets,
                                   learner_settings.micro_batch_rows, pad_id=tokenizer.pad_id,
                                   mesh=mesh)
        if reference_params is not None:
          batch = batch.replace(ref_logprobs=learner.reference_log_probs(
              model_config, reference_params, batch, mesh))
        if recompute_old:  # pi_old from the learner, before the update
          batch, gap = old_logprobs.recompute(model_config, state.params, batch, mesh)
          metrics.update(gap)
        state, learn_metrics = train_step(state, batch)
        rollout_copy.refresh(state.params)  # cast + reshard on device, the old copy donated
        metrics.update({f"learner/{k}": float(v) for k, v in jax.device_get(learn_metrics).items()})
      else:
        metrics["learner/skipped"] = 1.0  # every group had zero advantage
      seconds = time.perf_counter() - step_start
      metrics["time/learner_s"] = time.perf_counter() - learner_start  # device_get synchronised
      metrics["time/host_s"] = seconds - metrics["time/learner_s"] - metrics["time/rollout_s"]
      metrics["time/step_s"] = seconds
      metrics["throughput/tokens_per_s"] = metrics.get("learner/tokens", 0.0) / seconds
      last_step = step + 1
      if run.end_of_step(last_step, state, rng, data_position, metrics,
                         tokens=metrics.get("learner/tokens", 0.0)):
        break
    run.finish(last_step, state, rng, data_position)
  finally:
    run.close()
  return metrics


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.config.train.dry_run:
    parallel.initialize_distributed()  # multi-host (TPU pod, SLURM): before any other JAX call
  train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/base.py", "experiment config file")
  flags.DEFINE_string("workdir", None, "run folder: checkpoints, TensorBoard logs, metrics", required=True)
  app.run(main)
