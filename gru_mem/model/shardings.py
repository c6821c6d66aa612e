"""The model's parameter shardings on a mesh, from the logical axes each parameter is created with.

`parallel` (below the model) maps logical names to mesh axes for any boxed tree; this module
applies it to this model's parameters, so `parallel` never imports the model.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
from jax.sharding import Mesh

from gru_mem import parallel
from gru_mem.model import transformer
from gru_mem.model.config import ModelConfig


def param_shardings(config: ModelConfig, mesh: Mesh,
                    rules: Optional[Sequence[tuple[str, Any]]] = None) -> Any:
  """NamedShardings for `transformer.init_params(config, ...)` (rules default: parallel.RULES).
  Allocates nothing."""
  return parallel.boxed_shardings(transformer.abstract_params(config), mesh,
                                  parallel.RULES if rules is None else rules)


def init_sharded_params(config: ModelConfig, rng: jax.Array, mesh: Mesh,
                        rules: Optional[Sequence[tuple[str, Any]]] = None) -> Any:
  """Random parameters created directly in their shards (no full copy on one device)."""
  shardings = param_shardings(config, mesh, rules)
  return jax.jit(lambda r: transformer.init_params(config, r), out_shardings=shardings)(rng)
