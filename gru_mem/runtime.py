"""What every entry point builds from a config or a run folder: tokenizer, model config, params.

A training run's folder (`workdir`) holds `checkpoints/` (orbax), `tokenizer/` (HF files) and
`metrics.jsonl` / TensorBoard events. The checkpoint's config item records the experiment config
and the exact `ModelConfig`, so `load_run` can rebuild the model without the original config file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax

from gru_mem.data.tokenizer import Tokenizer, builtin_tokenizer, load_tokenizer
from gru_mem.model import hf, transformer
from gru_mem.model.config import ModelConfig, preset

TOKENIZER_DIR = "tokenizer"


def build_tokenizer(config) -> Tokenizer:
  """`config.tokenizer`: "builtin", or a local HF folder (defaults to the model's folder)."""
  name = config.tokenizer or (config.model.hf_path if config.model.hf_path else "builtin")
  return builtin_tokenizer() if name == "builtin" else load_tokenizer(name)


def model_config_from(config, tokenizer: Tokenizer) -> ModelConfig:
  """The ModelConfig of `config.model` (a preset, or the HF folder's config.json)."""
  m = config.model
  overrides = dict(param_dtype=m.param_dtype, dtype=m.dtype, scan_layers=m.scan_layers,
                   remat_policy=m.remat_policy)
  if m.hf_path:
    from gru_mem.model.config import from_hf_config
    return from_hf_config(hf.read_hf_config(m.hf_path), **overrides)
  model_config = preset(m.preset, **overrides)
  vocab = m.vocab_size or model_config.vocab_size
  if vocab < tokenizer.vocab_size:
    if m.vocab_size:
      raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                       f"{tokenizer.vocab_size} ids: raise it or set 0 to fit the tokenizer")
    vocab = -(-tokenizer.vocab_size // 64) * 64  # round up: friendlier matmul shapes
  return model_config.replace(vocab_size=vocab)


def initial_params(config, model_config: ModelConfig, rng: jax.Array) -> Any:
  """Params from `config.model.init_workdir` (a run's latest checkpoint, e.g. the SFT stage),
  `config.model.hf_path`, or random ones for a preset."""
  if config.model.get("init_workdir"):
    return params_from_run(config.model.init_workdir, model_config)
  if config.model.hf_path:
    _, params = hf.load_hf_checkpoint(config.model.hf_path, dtype=model_config.param_dtype,
                                      scan_layers=model_config.scan_layers)
    return params
  return transformer.init_params(model_config, rng)


def params_from_run(workdir: str, model_config: ModelConfig) -> Any:
  """The latest params of the run in `workdir`; they must have `model_config`'s shapes."""
  from gru_mem import checkpoint
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"model.init_workdir={workdir!r} has no checkpoints/ folder: point it "
                            "at a finished run (e.g. the SFT stage's folder)")
  params, _ = checkpoint.load_params_for_export(workdir)
  want = jax.tree.map(lambda x: x.shape, jax.eval_shape(
      lambda: transformer.init_params(model_config, jax.random.PRNGKey(0))))
  got = jax.tree.map(lambda x: x.shape, params)
  if want != got:
    raise ValueError(f"model.init_workdir={workdir!r} holds params of another model shape than "
                     "this config's model: use the same model settings as the run that made them")
  return jax.tree.map(jax.numpy.asarray, params)


def run_metadata(config, model_config: ModelConfig) -> dict:
  """What a checkpoint records besides arrays, enough to rebuild the model and tokenizer."""
  return {"experiment": config.to_dict() if hasattr(config, "to_dict") else dict(config),
          "model_config": dataclasses.asdict(model_config)}


def load_run(workdir: str, step: Optional[int] = None) -> tuple[ModelConfig, Any, Tokenizer, dict]:
  """(model config, params, tokenizer, experiment config dict) of a training run's checkpoint."""
  from gru_mem import checkpoint
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"{workdir} has no checkpoints/ folder: pass the --workdir of a "
                            "training run (or use --hf_model for an HF folder)")
  params, metadata = checkpoint.load_params_for_export(workdir, step)
  if "model_config" not in metadata:
    raise ValueError(f"{workdir}: the checkpoint's config item has no model_config")
  model_config = ModelConfig(**metadata["model_config"])
  tokenizer_dir = os.path.join(workdir, TOKENIZER_DIR)
  tokenizer = load_tokenizer(tokenizer_dir) if os.path.isdir(tokenizer_dir) else builtin_tokenizer()
  return model_config, jax.tree.map(jax.numpy.asarray, params), tokenizer, metadata.get("experiment", {})


def load_model(hf_model: Optional[str] = None, workdir: Optional[str] = None,
               step: Optional[int] = None, dtype: str = "float32"):
  """(model config, params, tokenizer) from an HF folder or a training run."""
  if bool(hf_model) == bool(workdir):
    raise ValueError("give exactly one of --hf_model DIR or --workdir DIR")
  if hf_model:
    model_config, params = hf.load_hf_checkpoint(hf_model, dtype=dtype)
    return model_config, params, load_tokenizer(hf_model)
  model_config, params, tokenizer, _ = load_run(workdir, step)
  return model_config, params, tokenizer
