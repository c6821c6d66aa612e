"""The rollout's own copy of the policy: its dtype and its mesh layout, refreshed on device.

Why. The learner keeps float32 master weights sharded over `fsdp` (good for the update). A
sampler that decodes with them inside `lax.while_loop` makes XLA hoist the parameter
all-gathers out of the loop: every device then holds the whole float32 model and reads all of
it at every token step for its few rows. The rollout copy instead has

  * its own dtype, `sampling.param_dtype` ("auto": bfloat16 on accelerators, float32 on CPU),
  * its own layout, `sampling.mesh` (data / fsdp / tensor sizes over the same devices; e.g.
    tensor within a node or a TPU host, data across; fsdp=1 leaves nothing to gather), and
  * a KV cache in that dtype and layout (kv heads over tensor when they divide, rows over data),
    or 8-bit with a scale per token and kv head (`sampling.kv_cache_dtype="int8"`, kv_cache.py;
    with the learner's dtype and layout the sampler then still reads the learner's parameters).

After every learner step `RolloutWeights.refresh(state.params)` casts the new parameters and
reshards them into the copy in one jitted call whose outputs carry the rollout shardings; the
old copy is donated, so its buffers are reused and memory does not double; nothing goes through
the host. With the learner's dtype and layout (the CPU default) there is no copy at all: the
sampler reads the learner's parameters, as before.

  layout = rollout_layout(model_config, learner_mesh, "bfloat16", {"data": -1, "tensor": 4})
  weights = RolloutWeights(layout, state.params)    # first copy
  with weights.activate():                          # the model's constraints use the rollout mesh
    out = continuous.generate(layout.config, weights.params, prompts, rng, settings,
                              batch_sharding=weights.batch_sharding)
  state, _ = train_step(state, batch)
  weights.refresh(state.params)                     # cast + reshard, old copy donated
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
from jax.sharding import Mesh

from gru_mem import parallel
from gru_mem.model import shardings as model_shardings
from gru_mem.model.config import DTYPES, ModelConfig
from gru_mem.model.kv_cache import check_kv_cache_dtype

PARAM_DTYPES = ("auto",) + tuple(DTYPES)


def resolve_param_dtype(name: str, backend: Optional[str] = None) -> str:
  """`sampling.param_dtype` as a dtype name: "auto" is bfloat16 on an accelerator and float32
  on CPU (so CPU runs and tests stay exact); `backend` defaults to JAX's default backend."""
  if name not in PARAM_DTYPES:
    raise ValueError(f"sampling.param_dtype={name!r}: use one of {PARAM_DTYPES}")
  if name != "auto":
    return name
  return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def mesh_sizes(sampling_mesh: Mapping[str, int]) -> Optional[dict]:
  """`sampling.mesh` as mesh sizes, or None when every size is 0 (= the learner's mesh).
  Otherwise a size left 0 counts as 1."""
  unknown = set(sampling_mesh.keys()) - set(parallel.MESH_AXES)
  if unknown:
    raise ValueError(f"sampling.mesh has unknown keys {sorted(unknown)}: use only "
                     f"{parallel.MESH_AXES}")
  sizes = {axis: int(sampling_mesh.get(axis, 0)) for axis in parallel.MESH_AXES}
  if not any(sizes.values()):
    return None
  return {axis: size or 1 for axis, size in sizes.items()}


def check_heads(config: ModelConfig, tensor: int, what: str = "sampling.mesh") -> None:
  """The tensor axis must split the attention heads evenly (kv heads that it does not divide
  stay replicated, as in the learner's layout)."""
  if config.num_heads % tensor:
    fits = [t for t in range(1, config.num_heads + 1) if config.num_heads % t == 0 and t <= 8]
    raise ValueError(
        f"{what}.tensor={tensor} does not divide the model's {config.num_heads} attention heads: "
        f"use a tensor size that divides {config.num_heads} (one of {fits})")


def make_rollout_mesh(sizes: Optional[Mapping[str, int]], learner_mesh: Mesh) -> Mesh:
  """The rollout mesh over the learner mesh's devices (None: the learner mesh itself). Raises
  a ValueError naming `sampling.mesh` when the sizes do not fill those devices."""
  if sizes is None:
    return learner_mesh
  devices = list(learner_mesh.devices.flat)
  try:
    return parallel.make_mesh(**sizes, devices=devices)
  except ValueError as error:
    raise ValueError(f"sampling.mesh={dict(sizes)} does not fit the {len(devices)} devices of "
                     f"the run: {error}") from None


@dataclasses.dataclass(frozen=True)
class RolloutLayout:
  """The rollout copy's model config (its param_dtype) and mesh, beside the learner's."""
  config: ModelConfig
  mesh: Mesh
  learner_config: ModelConfig
  learner_mesh: Mesh

  @property
  def same_as_learner(self) -> bool:
    """Same config (KV cache storage included) and layout: the sampler computes the learner's
    numbers (else `rl.recompute_old_logprobs` turns on)."""
    return self.config == self.learner_config and self.shares_learner_params

  @property
  def shares_learner_params(self) -> bool:
    """Same weight dtype and the same layout: the sampler can read the learner's parameters
    (an int8 KV cache changes the sampler's cache, not its weights)."""
    return (self.config.replace(kv_cache_dtype=self.learner_config.kv_cache_dtype)
            == self.learner_config and self.mesh.shape == self.learner_mesh.shape
            and list(self.mesh.devices.flat) == list(self.learner_mesh.devices.flat))

  @property
  def batch_sharding(self):
    """Sampler rows split over the rollout mesh's data / fsdp axes."""
    return parallel.batch_sharding(self.mesh)

  def shardings(self) -> Any:
    """NamedShardings of the rollout copy (the model's logical axes on the rollout mesh)."""
    return model_shardings.param_shardings(self.config, self.mesh)


def rollout_layout(learner_config: ModelConfig, learner_mesh: Mesh, param_dtype: str,
                   sizes: Optional[Mapping[str, int]], kv_cache_dtype: str = "auto"
                   ) -> RolloutLayout:
  """The layout of `sampling.param_dtype` (resolved or "auto") and `sampling.mesh` sizes (None:
  the learner's mesh), its KV cache stored as `sampling.kv_cache_dtype`. Checks the devices and
  the heads before anything is compiled."""
  check_kv_cache_dtype(kv_cache_dtype)
  mesh = make_rollout_mesh(sizes, learner_mesh)
  if sizes is not None:
    check_heads(learner_config, int(mesh.shape["tensor"]))
  config = learner_config.replace(param_dtype=resolve_param_dtype(param_dtype),
                                  kv_cache_dtype=kv_cache_dtype)
  return RolloutLayout(config, mesh, learner_config, learner_mesh)


def _cast(old_copy, new_params, *, dtype):
  del old_copy  # donated: its buffers hold the result
  return jax.tree.map(lambda x: x.astype(dtype), new_params)


@functools.lru_cache(maxsize=None)
def refresh_jit(layout: RolloutLayout):
  """jit(old copy, learner params) -> new copy: cast to the rollout dtype, out_shardings = the
  rollout shardings, the old copy donated (its buffers are reused for the new one; keep_unused,
  or jit would drop the unread argument and its donation with it)."""
  return jax.jit(functools.partial(_cast, dtype=layout.config.jnp_param_dtype),
                 donate_argnums=0, keep_unused=True, out_shardings=layout.shardings())


@functools.lru_cache(maxsize=None)
def first_copy_jit(layout: RolloutLayout):
  """jit(learner params) -> the first copy (nothing to donate yet)."""
  return jax.jit(functools.partial(_cast, None, dtype=layout.config.jnp_param_dtype),
                 out_shardings=layout.shardings())


class RolloutWeights:
  """The rollout copy of a policy, refreshed from the learner's parameters (see module doc)."""

  def __init__(self, layout: RolloutLayout, learner_params: Any):
    self.layout = layout
    self.params = (learner_params if layout.shares_learner_params
                   else first_copy_jit(layout)(learner_params))

  @property
  def config(self) -> ModelConfig:
    return self.layout.config

  @property
  def batch_sharding(self):
    return self.layout.batch_sharding

  def activate(self):
    """`parallel.activate(rollout mesh)`: trace the sampler with the rollout layout's rules."""
    return parallel.activate(self.layout.mesh)

  def refresh(self, learner_params: Any) -> Any:
    """The copy <- cast(learner_params), resharded on device; the old copy's buffers donated."""
    if self.layout.shares_learner_params:
      self.params = learner_params
    else:
      self.params = refresh_jit(self.layout)(self.params, learner_params)
    return self.params
