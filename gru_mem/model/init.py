"""Initialisations beyond the model's own (`transformer.init_params`, normal std 0.02)."""

from __future__ import annotations

import jax
import numpy as np

_RESIDUAL_OUTPUTS = ("o_proj", "down_proj")  # projections that write into the residual stream


def fan_in_params(params, num_layers: int, model_init_std: float = 0.02):
  """Rescales a fresh `transformer.init_params` draw (normal, std 0.02 everywhere, Qwen's
  choice for wide models) to std 1/sqrt(fan_in) for every kernel, further divided by
  sqrt(2 * num_layers) for the projections that write into the residual stream, and
  1/sqrt(hidden) for the embedding. At hidden 64, 0.02 is 6x below 1/sqrt(fan_in) and a model
  trained from scratch sits for hundreds of steps near that small-weight saddle before it learns
  to copy from its context; biases and norms keep their init.
  """
  def rescale(path, x):
    names = [str(getattr(p, "key", p)) for p in path]
    if names[-1] == "embed_tokens":
      return x * (1.0 / np.sqrt(x.shape[-1]) / model_init_std)
    if names[-1] != "kernel":
      return x
    residual = any(n in _RESIDUAL_OUTPUTS for n in names)
    fan_in = int(np.prod(x.shape[:-1])) if residual else int(x.shape[0])
    std = 1.0 / np.sqrt(fan_in) / (np.sqrt(2.0 * num_layers) if residual else 1.0)
    return x * (std / model_init_std)
  return jax.tree_util.tree_map_with_path(rescale, params)
