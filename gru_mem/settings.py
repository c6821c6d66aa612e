"""Config -> the settings objects the code runs with, and the checks that run before any work.

The config tree (`gru_mem.defaults`, overridden by `configs/*.py` and the command line) is the
only place a value is chosen. Each function here reads one part of it:

  learner_settings(config)      optim.* and rl.* (loss)      -> rl.learner.LearnerSettings (RL)
  sft_learner_settings(config)  sft.* and optim.adam_*      -> LearnerSettings (stage 1)
  rollout_settings(config)      agent.*, rl.group_size      -> agent.rollout.RolloutSettings
  sampling_settings(config, t)  sampling.*, agent budgets   -> sampling.SamplingSettings
  rollout_layout(config, m, mesh) sampling.param_dtype, .mesh, .kv_cache_dtype -> RolloutLayout
  script_settings(config)       sft.* noise and think       -> agent.scripted.ScriptSettings

`validate(config)` (RL) and `validate_sft(config)` fail with what to fix before a model is built,
data is read or anything is compiled.
"""

from __future__ import annotations

import os
from typing import Optional

from gru_mem import defaults, parallel, rollout_weights, sampling
from gru_mem.agent import modes, prompts
from gru_mem.agent.rollout import RolloutSettings
from gru_mem.agent.scripted import ScriptSettings
from gru_mem.buckets import DEFAULT_LENGTH_BUCKETS, check_buckets
from gru_mem.data import sources
from gru_mem.model.kv_cache import check_kv_cache_dtype
from gru_mem.rl import learner

# Padded lengths of SFT batches: multiples of 32 keep the padding of short scripted turns small.
SFT_LENGTH_BUCKETS = tuple(range(32, 1024 + 1, 32)) + tuple(2 ** i for i in range(11, 16))
SFT_INITS = ("model", "fan_in")


def parse_length_buckets(text, key: str = "optim.length_buckets") -> tuple[int, ...]:
  """optim.length_buckets "64,128,256" -> (64, 128, 256); the learner checks the order."""
  try:
    return tuple(int(b) for b in str(text).split(","))
  except ValueError:
    raise ValueError(f"{key}={text!r}: give increasing row lengths separated by "
                     "commas, e.g. '64,128,256', or '' for powers of two") from None


def sampling_length_buckets(config) -> tuple[int, ...]:
  """sampling.length_buckets as a checked tuple ("": `buckets.DEFAULT_LENGTH_BUCKETS`)."""
  text = config.sampling.get("length_buckets", "")
  if not text:
    return DEFAULT_LENGTH_BUCKETS
  return check_buckets(parse_length_buckets(text, "sampling.length_buckets"),
                       "sampling.length_buckets")


def learner_settings(config) -> learner.LearnerSettings:
  """The RL learner's optimizer and loss settings."""
  optim, rl = config.optim, config.rl
  buckets = ({"length_buckets": parse_length_buckets(optim.length_buckets)}
             if optim.length_buckets else {})
  return learner.LearnerSettings(
      learning_rate=optim.learning_rate, warmup_steps=optim.warmup_steps,
      lr_schedule=optim.lr_schedule, decay_steps=optim.decay_steps,
      final_lr_fraction=optim.final_lr_fraction, weight_decay=optim.weight_decay,
      adam_b1=optim.adam_b1, adam_b2=optim.adam_b2, adam_eps=optim.adam_eps,
      max_grad_norm=optim.max_grad_norm, clip_eps_low=rl.clip_eps_low,
      clip_eps_high=rl.clip_eps_high, clip_ratio_c=rl.clip_ratio_c,
      log_ratio_clamp=rl.log_ratio_clamp, kl_clamp=rl.kl_clamp, kl_beta=rl.kl_beta,
      micro_batch_rows=optim.micro_batch_rows, compute_entropy=rl.compute_entropy, **buckets)


def sft_learner_settings(config) -> learner.LearnerSettings:
  """Stage 1's optimizer: its own rate, warmup and cosine decay over sft.steps, no KL."""
  sft, optim = config.sft, config.optim
  return learner.LearnerSettings(
      learning_rate=sft.learning_rate, warmup_steps=sft.warmup_steps, lr_schedule="cosine",
      decay_steps=max(sft.steps - sft.warmup_steps, 1), final_lr_fraction=sft.final_lr_fraction,
      weight_decay=sft.weight_decay, adam_b1=optim.adam_b1, adam_b2=optim.adam_b2,
      adam_eps=optim.adam_eps, max_grad_norm=optim.max_grad_norm, kl_beta=0.0,
      micro_batch_rows=sft.micro_batch_rows, length_buckets=SFT_LENGTH_BUCKETS,
      compute_entropy=False)


def rollout_settings(config, group_size: Optional[int] = None,
                     mode: Optional[str] = None) -> RolloutSettings:
  """The agent's budgets; `group_size` defaults to rl.group_size, `mode` to agent.mode."""
  agent = config.agent
  return RolloutSettings(mode=mode or agent.mode, memory_tokens=agent.memory_tokens,
                         max_response_tokens=agent.max_response_tokens,
                         max_answer_tokens=agent.max_answer_tokens,
                         samples_per_example=group_size or config.rl.group_size)


def sampling_settings(config, tokenizer, temperature: Optional[float] = None
                      ) -> sampling.SamplingSettings:
  """The sampler's settings: rollout temperature (or `temperature`), the memory turn's budget,
  the tokenizer's stop and pad ids, batch buckets up to sampling.max_batch_rows."""
  s = config.sampling
  return sampling.SamplingSettings(
      max_new_tokens=config.agent.max_response_tokens,
      temperature=s.temperature if temperature is None else temperature,
      top_p=s.top_p, top_k=s.top_k, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
      prefill_chunk_tokens=s.prefill_chunk_tokens, slots=s.slots,
      length_buckets=sampling_length_buckets(config),
      batch_buckets=tuple(b for b in sampling.SamplingSettings.batch_buckets if b < s.max_batch_rows)
      + (s.max_batch_rows,))


def rollout_layout(config, model_config, learner_mesh) -> rollout_weights.RolloutLayout:
  """The rollout copy's dtype and mesh (`sampling.param_dtype`, `sampling.mesh`) beside the
  learner's; raises a ValueError when the mesh does not fit the devices or the heads."""
  s = config.sampling
  return rollout_weights.rollout_layout(model_config, learner_mesh, s.param_dtype,
                                        rollout_weights.mesh_sizes(s.mesh),
                                        s.kv_cache_dtype)


def recompute_old_logprobs(config, layout: rollout_weights.RolloutLayout) -> bool:
  """`rl.recompute_old_logprobs`, None resolved: on when the rollout differs from the learner."""
  setting = config.rl.recompute_old_logprobs
  return (not layout.same_as_learner) if setting is None else bool(setting)


def script_settings(config) -> ScriptSettings:
  """How stage 1 scripts its trajectories (noise by chunk kind, think style)."""
  sft = config.sft
  return ScriptSettings(update_noise=sft.update_noise, exit_noise=sft.exit_noise,
                        update_noise_non_evidence=sft.get("update_noise_non_evidence"),
                        exit_noise_complete=sft.get("exit_noise_complete"),
                        memagent_fraction=sft.memagent_fraction,
                        memory_tokens=config.agent.memory_tokens,
                        keep_non_evidence_turns=sft.keep_non_evidence_turns, think=sft.think)


def prompt_set(config, tokenizer) -> prompts.PromptSet:
  """agent.prompt / agent.prompt_file for this tokenizer (auto: compact for the built-in one)."""
  agent = config.agent
  return prompts.choose_prompt_set(tokenizer, agent.get("prompt", "auto"),
                                   agent.get("prompt_file", ""))


def check_prompt(config) -> None:
  """agent.prompt is a known set and agent.prompt_file (if given) reads cleanly."""
  agent = config.agent
  if agent.get("prompt", "auto") not in prompts.PROMPT_CHOICES:
    raise ValueError(f"agent.prompt={agent.prompt!r}: use one of {prompts.PROMPT_CHOICES}")
  if agent.get("prompt_file", ""):
    prompts.read_prompt_file(agent.prompt_file)


def agent_defaults() -> dict:
  """The agent keys `infer` falls back to when a run's config does not give them."""
  agent = defaults.get_config().agent
  return {name: agent[name] for name in ("mode", "chunk_tokens", "memory_tokens",
                                         "max_response_tokens", "max_answer_tokens")}


# ----------------------------------------------------------------------------- checks


def unknown_keys(config, reference=None) -> list[str]:
  """Dotted keys of `config` that `gru_mem.defaults` does not define (typos in experiments)."""
  reference = defaults.get_config() if reference is None else reference
  unknown = []
  for key, value in config.items():
    if key not in reference:
      unknown.append(key)
    elif hasattr(value, "items") and hasattr(reference[key], "items"):
      unknown += [f"{key}.{sub}" for sub in unknown_keys(value, reference[key])]
  return unknown


def check_known_keys(config) -> None:
  unknown = unknown_keys(config)
  if unknown:
    raise ValueError(f"config keys {unknown} are not defined in gru_mem/defaults.py: check the "
                     "spelling, or add the key there with its default and a comment")


def check_model_source(config) -> None:
  hf_path = config.model.hf_path
  if hf_path and not os.path.isfile(os.path.join(hf_path, "config.json")):
    raise FileNotFoundError(
        f"model.hf_path={hf_path!r} has no config.json: download the HF model (e.g. "
        "Qwen2.5-7B-Instruct) to a local folder and pass --config.model.hf_path=/that/folder")


def check_tokenizer_source(config) -> None:
  name = config.tokenizer
  if name and name != "builtin" and not os.path.isdir(name):
    raise FileNotFoundError(f"tokenizer={name!r} does not exist: pass a local HF tokenizer folder "
                            "(or 'builtin', or '' for the model's folder)")


def validate(config) -> None:
  """RL training's settings (see the module doc)."""
  check_known_keys(config)
  rl, train = config.rl, config.train
  if rl.group_size < 2:
    raise ValueError(f"rl.group_size={rl.group_size}: must be >= 2 (advantages are "
                     "relative to the group, a group of one never learns)")
  if rl.prompts_per_step < 1:
    raise ValueError(f"rl.prompts_per_step={rl.prompts_per_step}: must be >= 1")
  if not 0.0 <= rl.alpha <= 1.0:
    raise ValueError(f"rl.alpha={rl.alpha}: must be in [0, 1] (weight of A_traj)")
  if train.steps < 0 or train.save_every < 1:
    raise ValueError(f"train.steps={train.steps} must be >= 0 and train.save_every="
                     f"{train.save_every} >= 1")
  modes.check_mode(config.agent.mode)
  check_prompt(config)
  rollout_settings(config)  # checks the budgets
  learner_settings(config)  # checks the optimizer and loss settings
  sampling_length_buckets(config)
  check_model_source(config)
  check_tokenizer_source(config)
  learner_mesh = parallel.mesh_from_config(config.mesh)  # the mesh must match the devices
  rollout_weights.resolve_param_dtype(config.sampling.param_dtype)
  check_kv_cache_dtype(config.sampling.kv_cache_dtype)
  # sampling.mesh must fit the devices; its heads are checked once the model shape is known
  # (`rollout_layout`, in train and the dry run, still before anything is compiled).
  rollout_weights.make_rollout_mesh(rollout_weights.mesh_sizes(config.sampling.mesh), learner_mesh)
  sources.check_data_config(config.data)


def validate_sft(config) -> None:
  """Stage 1's settings (see the module doc)."""
  check_known_keys(config)
  sft = config.sft
  if sft.steps < 1:
    raise ValueError(f"sft.steps={sft.steps}: must be >= 1 to run the SFT stage")
  if sft.examples_per_step < 1 or sft.micro_batch_rows < 1:
    raise ValueError(f"sft.examples_per_step={sft.examples_per_step} and "
                     f"sft.micro_batch_rows={sft.micro_batch_rows}: both must be >= 1")
  if not 0 <= sft.copy_steps < sft.steps:
    raise ValueError(f"sft.copy_steps={sft.copy_steps}: must be in [0, sft.steps={sft.steps}) "
                     "(the copy warm-up comes first, then the trajectories)")
  if sft.init not in SFT_INITS:
    raise ValueError(f"sft.init={sft.init!r}: use one of {SFT_INITS}")
  if sft.save_every < 1 or sft.log_every < 1:
    raise ValueError(f"sft.save_every={sft.save_every} and sft.log_every={sft.log_every}: both "
                     "must be >= 1")
  script_settings(config)
  check_prompt(config)
  sft_learner_settings(config)
  check_model_source(config)
  check_tokenizer_source(config)
  sources.check_data_config(config.data)
