"""One set of defaults: the settings objects built from `gru_mem.defaults` agree with the
dataclasses' own defaults, except for the fields the config does not own."""

import dataclasses

import pytest

from gru_mem import defaults, settings
from gru_mem.agent.rollout import RolloutSettings
from gru_mem.agent.scripted import ScriptSettings
from gru_mem.data.tokenizer import builtin_tokenizer
from gru_mem.rl.learner import LearnerSettings
from gru_mem.sampling import SamplingSettings

# Fields whose value comes from another part of the config or from the tokenizer, or whose
# low-level default means "off" for direct users of the sampler.
NOT_OWNED = {
    RolloutSettings: {"samples_per_example"},  # rl.group_size in training, 1 in evaluation
    SamplingSettings: {"max_new_tokens", "eos_id", "slots"},  # agent budgets, tokenizer, static
}


def built(config):
  return {LearnerSettings: settings.learner_settings(config),
          RolloutSettings: settings.rollout_settings(config),
          SamplingSettings: settings.sampling_settings(config, builtin_tokenizer()),
          ScriptSettings: settings.script_settings(config)}


@pytest.mark.parametrize("cls", [LearnerSettings, RolloutSettings, SamplingSettings,
                                 ScriptSettings])
def test_dataclass_defaults_equal_the_config_defaults(cls):
  from_config, plain = built(defaults.get_config())[cls], cls()
  differ = {f.name for f in dataclasses.fields(cls)
            if getattr(from_config, f.name) != getattr(plain, f.name)}
  assert differ == NOT_OWNED.get(cls, set())


def test_every_learner_setting_is_a_config_key():
  """A changed key reaches the settings (no LearnerSettings field is left to its default)."""
  config = defaults.get_config()
  base = settings.learner_settings(config)
  config.optim.adam_eps, config.optim.lr_schedule, config.optim.decay_steps = 1e-4, "cosine", 9
  config.rl.compute_entropy, config.rl.kl_clamp, config.optim.weight_decay = False, 2.0, 0.0
  changed = settings.learner_settings(config)
  assert {f.name for f in dataclasses.fields(LearnerSettings)
          if getattr(base, f.name) != getattr(changed, f.name)} == {
              "adam_eps", "lr_schedule", "decay_steps", "compute_entropy", "kl_clamp",
              "weight_decay"}


def test_unknown_keys_are_named():
  config = defaults.get_config()
  config.rl.alhpa = 0.5
  with pytest.raises(ValueError, match=r"\['rl.alhpa'\] are not defined in gru_mem/defaults.py"):
    settings.check_known_keys(config)


def test_sampling_length_buckets_reach_the_sampler_and_bad_ones_are_named():
  config = defaults.get_config()
  assert settings.sampling_length_buckets(config) == SamplingSettings().length_buckets
  config.sampling.length_buckets = "64,640,8192"
  assert settings.sampling_settings(config, builtin_tokenizer()).length_buckets == (64, 640, 8192)
  for bad, message in (("64,x", "give increasing row lengths"),
                       ("640,64", "must be a non-empty increasing tuple")):
    config.sampling.length_buckets = bad
    with pytest.raises(ValueError, match=f"sampling.length_buckets=.*{message}"):
      settings.sampling_length_buckets(config)
