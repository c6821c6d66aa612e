"""What entry points build from a config: tokenizer, model config, initial params, metadata.

`load_model` gives (model config, params, tokenizer) from an HF folder or a run folder
(`run_folder` reads those).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from gru_mem import run_folder
from gru_mem.data.tokenizer import Tokenizer, builtin_tokenizer, load_tokenizer
from gru_mem.model import hf, init, transformer
from gru_mem.model.config import ModelConfig, from_hf_config, preset


def build_tokenizer(config) -> Tokenizer:
  """`config.tokenizer`: "builtin", or a local HF folder (defaults to the model's folder)."""
  name = config.tokenizer or (config.model.hf_path if config.model.hf_path else "builtin")
  return builtin_tokenizer() if name == "builtin" else load_tokenizer(name)


def model_config_from(config, tokenizer: Optional[Tokenizer] = None) -> ModelConfig:
  """The ModelConfig of `config.model`: the HF folder's config.json, else the preset (its vocab
  raised to fit `tokenizer` unless model.vocab_size is set). Dtypes, scan and remat from config."""
  m = config.model
  overrides = dict(param_dtype=m.param_dtype, dtype=m.dtype, scan_layers=m.scan_layers,
                   remat_policy=m.remat_policy, attention=m.get("attention", "auto"))
  if m.hf_path:
    return from_hf_config(hf.read_hf_config(m.hf_path), **overrides)
  model_config = preset(m.preset, **overrides)
  vocab = m.vocab_size or model_config.vocab_size
  if tokenizer is not None and vocab < tokenizer.vocab_size:
    if m.vocab_size:
      raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                       f"{tokenizer.vocab_size} ids: raise it or set 0 to fit the tokenizer")
    vocab = -(-tokenizer.vocab_size // 64) * 64  # round up: friendlier matmul shapes
  return model_config.replace(vocab_size=vocab)


def initial_params(config, model_config: ModelConfig, rng: jax.Array,
                   init_scheme: str = "model") -> Any:
  """Params from `config.model.init_workdir` (a run's latest checkpoint, e.g. the SFT stage),
  `config.model.hf_path`, or a random draw for a preset (`init_scheme` "fan_in": rescaled by
  `model.init.fan_in_params`)."""
  if config.model.get("init_workdir"):
    params = run_folder.load_params(config.model.init_workdir, model_config=model_config,
                                    what="model.init_workdir")
    return jax.tree.map(jax.numpy.asarray, params)
  if config.model.hf_path:
    _, params = hf.load_hf_checkpoint(config.model.hf_path, dtype=model_config.param_dtype,
                                      scan_layers=model_config.scan_layers)
    return params
  params = transformer.init_params(model_config, rng)
  if init_scheme == "fan_in":
    params = init.fan_in_params(params, model_config.num_layers)
  return params


def run_metadata(config, model_config: ModelConfig) -> dict:
  """What a checkpoint records besides arrays, enough to rebuild the model and tokenizer."""
  return {"experiment": config.to_dict() if hasattr(config, "to_dict") else dict(config),
          "model_config": dataclasses.asdict(model_config)}


def load_model(hf_model: Optional[str] = None, workdir: Optional[str] = None,
               step: Optional[int] = None, dtype: str = "float32"):
  """(model config, params, tokenizer) from an HF folder or a training run."""
  if bool(hf_model) == bool(workdir):
    raise ValueError("give exactly one of --hf_model DIR or --workdir DIR")
  if hf_model:
    model_config, params = hf.load_hf_checkpoint(hf_model, dtype=dtype)
    return model_config, params, load_tokenizer(hf_model)
  info, params = run_folder.load_run(workdir, step)
  return info.model_config, params, info.tokenizer
