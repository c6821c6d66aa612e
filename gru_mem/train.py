r"""GRU-Mem / MemAgent RL training.

  python -m gru_mem.train --config configs/tiny.py --workdir runs/tiny [--config.rl.alpha=0.5]

One step: draw prompts -> rollout with G samples each (one batched sampler call per chunk step)
-> rewards (outcome, format, exit, update) -> dynamic sampling (drop groups whose advantages are
all zero, draw more prompts to refill) -> advantages -> one Multi-Conv DAPO update over every turn
of every kept trajectory -> metrics (TensorBoard, metrics.jsonl, console with ETA) -> checkpoint.
Restarting with the same workdir resumes from the latest checkpoint (params, optimizer, step,
rng and data position).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # seqio/clu import TensorFlow: keep it quiet

import dataclasses
import time
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gru_mem import checkpoint, logs, parallel, runtime, sampling
from gru_mem.agent.prompts import PromptBuilder
from gru_mem.agent.rollout import AgentExample, RolloutSettings, rollout, sampler_policy
from gru_mem.data import examples as data_examples
from gru_mem.rl import episodes, learner


def learner_settings(config) -> learner.LearnerSettings:
  o, rl = config.optim, config.rl
  return learner.LearnerSettings(
      learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, weight_decay=o.weight_decay,
      adam_b1=o.adam_b1, adam_b2=o.adam_b2, max_grad_norm=o.max_grad_norm,
      clip_eps_low=rl.clip_eps_low, clip_eps_high=rl.clip_eps_high, kl_beta=rl.kl_beta,
      micro_batch_rows=o.micro_batch_rows,
      **({"length_buckets": parse_length_buckets(o.length_buckets)} if o.get("length_buckets")
         else {}))


def parse_length_buckets(text) -> tuple[int, ...]:
  """optim.length_buckets "64,128,256" -> (64, 128, 256); the learner checks the order."""
  try:
    return tuple(int(b) for b in str(text).split(","))
  except ValueError:
    raise ValueError(f"optim.length_buckets={text!r}: give increasing row lengths separated by "
                     "commas, e.g. '64,128,256', or '' for powers of two") from None


def rollout_settings(config, group_size: Optional[int] = None) -> RolloutSettings:
  a = config.agent
  return RolloutSettings(mode=a.mode, memory_tokens=a.memory_tokens,
                         max_response_tokens=a.max_response_tokens,
                         max_answer_tokens=a.max_answer_tokens,
                         samples_per_example=group_size or config.rl.group_size)


def sampling_settings(config, tokenizer, temperature: Optional[float] = None
                      ) -> sampling.SamplingSettings:
  s = config.sampling
  return sampling.SamplingSettings(
      max_new_tokens=config.agent.max_response_tokens,
      temperature=s.temperature if temperature is None else temperature,
      top_p=s.top_p, top_k=s.top_k, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
      prefill_chunk_tokens=s.prefill_chunk_tokens, slots=s.slots,
      batch_buckets=tuple(b for b in sampling.SamplingSettings.batch_buckets if b < s.max_batch_rows)
      + (s.max_batch_rows,))


def unknown_keys(config, reference=None) -> list[str]:
  """Dotted keys of `config` that configs/base.py does not define (typos in experiment files)."""
  if reference is None:
    from configs import base
    reference = base.get_config()
  unknown = []
  for key, value in config.items():
    if key not in reference:
      unknown.append(key)
    elif hasattr(value, "items") and hasattr(reference[key], "items"):
      unknown += [f"{key}.{sub}" for sub in unknown_keys(value, reference[key])]
  return unknown


def validate(config) -> None:
  """Bad settings fail here with what to fix, before any model is built or compiled."""
  unknown = unknown_keys(config)
  if unknown:
    raise ValueError(f"config keys {unknown} are not defined in configs/base.py: check the "
                     "spelling, or add the key there with its default and a comment")
  if config.rl.group_size < 2:
    raise ValueError(f"rl.group_size={config.rl.group_size}: must be >= 2 (advantages are "
                     "relative to the group, a group of one never learns)")
  if config.rl.prompts_per_step < 1:
    raise ValueError(f"rl.prompts_per_step={config.rl.prompts_per_step}: must be >= 1")
  if not 0.0 <= config.rl.alpha <= 1.0:
    raise ValueError(f"rl.alpha={config.rl.alpha}: must be in [0, 1] (weight of A_traj)")
  if config.train.steps < 0 or config.train.save_every < 1:
    raise ValueError(f"train.steps={config.train.steps} must be >= 0 and train.save_every="
                     f"{config.train.save_every} >= 1")
  rollout_settings(config)  # checks the mode and budgets
  learner_settings(config)  # checks the optimizer and loss settings
  hf_path = config.model.hf_path
  if hf_path and not os.path.isfile(os.path.join(hf_path, "config.json")):
    raise FileNotFoundError(
        f"model.hf_path={hf_path!r} has no config.json: download the HF model (e.g. "
        "Qwen2.5-7B-Instruct) to a local folder and pass --config.model.hf_path=/that/folder")
  parallel.mesh_from_config(config.mesh)  # the mesh must match the devices
  data_examples.check_data_config(config.data)


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
  settings = rollout_settings(config)
  needed, rows, drawn, round_index = config.rl.prompts_per_step, [], 0, 0
  metrics: dict[str, list] = {}
  kept_total, dropped_total = 0, 0
  while needed > 0 and round_index <= config.rl.max_refill_rounds:
    examples = [next(stream) for _ in range(needed)]
    drawn += len(examples)
    agent_examples = [AgentExample.from_example(e, tokenizer, config.agent.chunk_tokens)
                      for e in examples]
    result = rollout(policy, builder, tokenizer, agent_examples,
                     jax.random.fold_in(rng, round_index), settings)
    arrays = episodes.group_arrays(result.trajectories, agent_examples, settings.samples_per_example,
                                   config.rl.answer_match)
    signal = episodes.compute_rewards_and_advantages(arrays, config.rl, config.agent.mode)
    keep = (~signal["zero_advantage_group"] if config.rl.dynamic_sampling
            else np.ones(len(examples), bool))
    rows += episodes.learner_rows(result.trajectories, signal, settings.samples_per_example, keep)
    for key, value in episodes.rollout_metrics(arrays, signal).items():
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
    from gru_mem import dry_run
    return dry_run.run(config, out_path=os.path.join(workdir, "dry_run.json"))
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = runtime.build_tokenizer(config)
  model_config = runtime.model_config_from(config, tokenizer)
  tokenizer.save(os.path.join(workdir, runtime.TOKENIZER_DIR))
  mesh = parallel.mesh_from_config(config.mesh)
  settings = learner_settings(config)
  shardings = learner.state_shardings(model_config, settings, mesh)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, rng = jax.random.split(rng)
  params = runtime.initial_params(config, model_config, init_rng)
  state = learner.create_train_state(params, settings, shardings)
  reference_params = state.params if settings.kl_beta else None
  if reference_params is not None:
    reference_params = jax.tree.map(jnp.copy, reference_params)  # frozen pi_ref

  manager = checkpoint.CheckpointManager(workdir, config.train.save_every,
                                         config.train.keep_checkpoints)
  data_position = {"examples_consumed": 0, "seed": config.seed}
  start_step = 0
  if manager.latest_step() is not None:
    restored, data_position, _ = manager.restore(
        abstract_state={"params": state.params, "opt_state": state.opt_state,
                        "step": state.step, "rng": rng})
    state = learner.TrainState(restored["params"], restored["opt_state"], restored["step"])
    rng = restored["rng"]
    start_step = int(state.step)
    print(f"[train] resumed from step {start_step} in {workdir}")

  stream = data_examples.example_stream(config.data, tokenizer, seed=config.seed,
                                        start=data_position["examples_consumed"])
  builder = PromptBuilder(tokenizer, config.agent.mode)
  train_step = learner.make_train_step(model_config, settings, mesh)
  sample_settings = sampling_settings(config, tokenizer)
  logger = logs.MetricLogger(workdir, config.train.steps)
  metrics: dict = {}
  try:
    for step in range(start_step, config.train.steps):
      step_start = time.perf_counter()
      policy = sampler_policy(model_config, state.params, sample_settings,
                              batch_sharding=parallel.batch_sharding(mesh))
      step_rng = jax.random.fold_in(rng, step)
      with parallel.activate(mesh):  # sampler rows split over data/fsdp, constraints applied
        out = collect_rows(config, policy, builder, tokenizer, stream, step_rng)
      data_position["examples_consumed"] += out.prompts_drawn
      metrics = dict(out.metrics)
      learner_start = time.perf_counter()
      if out.rows:
        batch = learner.pack(out.rows, settings, pad_id=tokenizer.pad_id, mesh=mesh)
        if reference_params is not None:
          batch = batch.replace(ref_logprobs=learner.reference_log_probs(
              model_config, reference_params, batch, mesh))
        state, learn_metrics = train_step(state, batch)
        metrics.update({f"learner/{k}": float(v) for k, v in jax.device_get(learn_metrics).items()})
      else:
        metrics["learner/skipped"] = 1.0  # every group had zero advantage
      seconds = time.perf_counter() - step_start
      metrics["time/learner_s"] = time.perf_counter() - learner_start  # device_get synchronised
      metrics["time/host_s"] = seconds - metrics["time/learner_s"] - metrics["time/rollout_s"]
      metrics["time/step_s"] = seconds
      metrics["throughput/tokens_per_s"] = metrics.get("learner/tokens", 0.0) / seconds
      logger.log(step + 1, metrics, tokens=metrics.get("learner/tokens", 0.0))
      manager.save(step + 1, {"params": state.params, "opt_state": state.opt_state,
                              "step": state.step, "rng": rng},
                   data_position, runtime.run_metadata(config, model_config))
    if config.train.steps > start_step and manager.latest_step() != config.train.steps:
      manager.save(config.train.steps, {"params": state.params, "opt_state": state.opt_state,
                                        "step": state.step, "rng": rng},
                   data_position, runtime.run_metadata(config, model_config), force=True)
  finally:
    manager.close()
    logger.close()
  return metrics


def main(argv):
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if not flags.FLAGS.config.train.dry_run:
    parallel.initialize_distributed()  # multi-host (TPU pod, SLURM): before any other JAX call
  train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/base.py", "experiment config file")
  flags.DEFINE_string("workdir", None, "run folder: checkpoints, TensorBoard logs, metrics", required=True)
  app.run(main)
