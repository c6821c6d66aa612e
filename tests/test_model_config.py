"""ModelConfig: presets, HF config conversion, parameter counts against transformers."""

import pytest
import torch
import transformers

from gru_mem.model.config import PRESETS, ModelConfig, from_hf_config, preset, to_hf_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
  config = PRESETS[name]
  assert from_hf_config(to_hf_config(config)) == config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_transformers_reads_our_hf_config(name):
  """transformers' Qwen2Config built from our dict has the same shape, and converts back."""
  config = PRESETS[name]
  hf = transformers.Qwen2Config(**to_hf_config(config))
  assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size) == (
      config.vocab_size, config.hidden_size, config.intermediate_size)
  assert (hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (
      config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim)
  assert hf.tie_word_embeddings == config.tie_word_embeddings
  assert from_hf_config(hf.to_dict()) == config


def _transformers_param_count(config: ModelConfig) -> int:
  """Counts transformers' Qwen2ForCausalLM parameters on the meta device (allocates nothing)."""
  hf = transformers.Qwen2Config(**to_hf_config(config))
  with torch.device("meta"):
    model = transformers.Qwen2ForCausalLM(hf)
  return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-7b", "tiny"])
def test_num_params_matches_transformers(name):
  config = PRESETS[name]
  assert config.num_params() == _transformers_param_count(config)


def test_num_params_of_public_checkpoints():
  # Counts published with the Qwen2.5 models (embedding included).
  assert round(PRESETS["qwen2.5-0.5b"].num_params() / 1e6) == 494
  assert round(PRESETS["qwen2.5-7b"].num_params() / 1e6) == 7616


def test_hf_defaults_fill_missing_keys():
  hf = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4}
  config = from_hf_config(hf)
  assert (config.num_kv_heads, config.head_dim, config.rope_theta) == (4, 16, 10_000.0)
  assert not config.tie_word_embeddings
  assert from_hf_config(dict(hf, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
                        ).rope_theta == 5e5


def test_overrides_and_preset():
  assert preset("tiny", num_layers=3).num_layers == 3
  assert from_hf_config(to_hf_config(PRESETS["tiny"]), param_dtype="bfloat16").param_dtype == (
      "bfloat16")
  with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*tiny"):
    preset("huge")


@pytest.mark.parametrize("changes,message", [
    (dict(num_heads=6, num_kv_heads=4), r"num_heads=6 is not a multiple of num_kv_heads=4"),
    (dict(remat_policy="everything"), r"remat_policy='everything': use one of"),
    (dict(head_dim=15), r"head_dim=15: rotary embeddings need an even head_dim"),
    (dict(num_layers=0), r"num_layers=0: must be >= 1"),
    (dict(dtype="float64"), r"dtype='float64': use one of"),
])
def test_invalid_config_is_refused(changes, message):
  with pytest.raises(ValueError, match=message):
    PRESETS["tiny"].replace(**changes)


@pytest.mark.parametrize("hf,message", [
    ({"model_type": "llama"}, r"model_type='llama' is not supported"),
    ({"model_type": "qwen2", "vocab_size": 10}, r"missing \['hidden_size'"),
    ({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
      "num_hidden_layers": 1, "num_attention_heads": 2,
      "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     r"rope_type='yarn' is not supported"),
])
def test_invalid_hf_config_is_refused(hf, message):
  with pytest.raises(ValueError, match=message):
    from_hf_config(hf)

