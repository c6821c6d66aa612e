"""One device mesh, one table of logical-axis rules, and multi-host data feeding.

The mesh has three axes, `('data', 'fsdp', 'tensor')`:
  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters and optimizer state sharded over their `embed` dim,
  tensor  model parallelism over heads / mlp / vocab.

The model only names its dims (`vocab`, `embed`, `heads`, ...); `RULES` below is the single place
that says which mesh axis each name goes to. Rules are tried in order and a mesh axis is used at
most once per array, so for activations `[batch, length, embed]` the batch takes `fsdp` first and
`embed` stays replicated, while for parameters (which have no batch dim) `embed` gets `fsdp`.

A dim whose size is not divisible by its mesh axes is replicated instead (e.g. 2 kv heads on a
tensor axis of 4); `fit_spec_to_shape` does this for every sharding computed for a concrete shape.

Typical use (`model.shardings.param_shardings(config, mesh)` reads the model's axis names):
  mesh = make_mesh(data=-1, fsdp=2, tensor=1)
  shardings = boxed_shardings(transformer.abstract_params(model_config), mesh)
  params = shard_params(params, shardings)
  with activate(mesh):               # activation constraints in the model now apply
    logits = jax.jit(step)(params, shard_batch(batch, mesh))
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical dim name -> mesh axes. Order matters: earlier rules claim mesh axes first.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("head_dim", None),
    ("length", None),
    ("norm", None),
    ("layers", None),
)


# ----------------------------------------------------------------------------- mesh


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A `('data', 'fsdp', 'tensor')` mesh over `devices` (default: all). One size may be -1: it
  takes whatever the others leave."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = _fill_mesh_sizes({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_from_config(mesh_config: Mapping[str, int],
                     devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """`make_mesh` from a dict / ml_collections ConfigDict with keys data, fsdp, tensor."""
  unknown = set(mesh_config.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh config has unknown keys {sorted(unknown)}: use only {MESH_AXES}")
  return make_mesh(**{a: int(mesh_config.get(a, 1)) for a in MESH_AXES}, devices=devices)


def _fill_mesh_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  """Replaces the one -1 by num_devices / product(others); checks the product equals num_devices."""
  bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
  if bad:
    raise ValueError(f"mesh sizes {bad}: each must be >= 1, or -1 for 'the rest'")
  wildcards = [a for a, s in sizes.items() if s == -1]
  if len(wildcards) > 1:
    raise ValueError(f"mesh sizes {sizes}: at most one axis may be -1, got {wildcards}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if wildcards:
    if num_devices % fixed:
      raise ValueError(
          f"mesh sizes {sizes}: the fixed axes multiply to {fixed}, which does not divide the "
          f"{num_devices} devices; choose sizes whose product divides {num_devices}")
    sizes = {**sizes, wildcards[0]: num_devices // fixed}
  elif fixed != num_devices:
    raise ValueError(
        f"mesh sizes {sizes} multiply to {fixed} but there are {num_devices} devices; make the "
        f"product equal {num_devices} or set one axis to -1")
  return sizes


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES) -> Iterator[Mesh]:
  """Makes `mesh` and `rules` current, so `nn.with_logical_constraint` in the model applies
  when a function is traced (jit) inside this block. Without it those constraints are no-ops.

  Note: the old `with mesh:` is not enough. Flax looks for the mesh that `jax.set_mesh` sets and
  silently skips every constraint under a bare `with mesh:` (jax 0.10, flax 0.12).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh


# ----------------------------------------------------------------------------- shardings


def fit_spec_to_shape(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes a dim cannot be split over evenly.

  For each dim, keeps the longest prefix of its mesh axes whose size product divides the dim
  (so a dim of 2 on `('data', 'fsdp')` of sizes (2, 2) keeps 'data'); the rest is replicated.
  """
  fitted = []
  for dim, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None or axes is P.UNCONSTRAINED:
      fitted.append(axes)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for name in names:
      if shape[dim] % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]):
        break
      kept.append(name)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def logical_sharding(logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                     rules: Sequence[tuple[str, Any]] = RULES) -> NamedSharding:
  """The sharding of one array of `shape` whose dims are named `logical_axes`
  (e.g. a KV cache `('layers', 'batch', 'length', 'kv_heads', 'head_dim')`)."""
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} name {len(logical_axes)} dims but the "
                     f"shape {tuple(shape)} has {len(shape)}")
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  return NamedSharding(mesh, fit_spec_to_shape(spec, shape, mesh))


def boxed_shardings(boxed_tree: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = RULES) -> Any:
  """Shardings for a tree boxed with `nn.with_logical_partitioning` metadata (abstract or real);
  the result has the structure of the unboxed tree. Leaves without names are replicated."""
  logical_specs = nn.get_partition_spec(boxed_tree)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  shapes = nn.meta.unbox(boxed_tree)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, fit_spec_to_shape(spec, x.shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda s: isinstance(s, P))


def shard_params(params: Any, shardings: Any) -> Any:
  """Places each parameter according to its sharding."""
  return jax.device_put(params, shardings)


def optimizer_state_shardings(tx, abstract_params: Any, param_shardings_tree: Any) -> Any:
  """Shardings for `tx.init(params)`: a state leaf that mirrors a parameter (Adam's mu and nu, ...)
  gets that parameter's sharding; everything else (counts, scalars, factored stats) is replicated.

  A state leaf mirrors a parameter when the tail of its tree path is the parameter's path and the
  shapes agree.
  """
  abstract_params = nn.meta.unbox(abstract_params)
  state_shapes = jax.eval_shape(tx.init, abstract_params)
  mesh = jax.tree.leaves(param_shardings_tree)[0].mesh
  replicated = NamedSharding(mesh, P())
  by_path = {}
  for (path, shape), (_, sharding) in zip(
      jax.tree_util.tree_flatten_with_path(abstract_params)[0],
      jax.tree_util.tree_flatten_with_path(param_shardings_tree)[0]):
    by_path[tuple(path)] = (shape.shape, sharding)

  def sharding_of(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      match = by_path.get(path[start:])
      if match is not None and match[0] == leaf.shape:
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(sharding_of, state_shapes)


# ----------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Dim `batch_axis` split over `('data', 'fsdp')`, the other dims replicated."""
  return NamedSharding(mesh, P(*(None,) * batch_axis, BATCH_AXES))


def _check_batch_divisible(tree: Any, mesh: Mesh, what: str, batch_axis: int = 0) -> None:
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  for leaf in jax.tree.leaves(tree):
    if np.ndim(leaf) == 0 and batch_axis > 0:
      continue  # a scalar (e.g. a row count) is replicated
    if np.ndim(leaf) <= batch_axis or np.shape(leaf)[batch_axis] % shards:
      raise ValueError(
          f"{what}: dim {batch_axis} of shape {np.shape(leaf)} is not divisible by data*fsdp = "
          f"{shards}; use a batch size that is a multiple of {shards}")


def shard_batch(tree: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
  """Puts a batch on the mesh with dim `batch_axis` of every array split over the batch axes.

  batch_axis=0: a tree of [batch, ...] arrays (the sampler's). batch_axis=1: the learner's
  [micro, rows, ...] arrays, rows split; there 0-d leaves (a row count) are replicated.
  """
  _check_batch_divisible(tree, mesh, "shard_batch", batch_axis)
  split = batch_sharding(mesh, batch_axis)
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.device_put(x, split if np.ndim(x) else replicated), tree)


# ----------------------------------------------------------------------------- multi-host


def _cluster_env_processes() -> int:
  """How many processes a launcher's environment announces (1 when none does)."""
  for name in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if os.environ.get(name, "").isdigit():
      return int(os.environ[name])
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len(hosts.split(",")) if hosts else 1


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
  """Calls `jax.distributed.initialize` when a multi-host run is asked for, by arguments or by the
  launcher's environment (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID for
  a hand-made launch, SLURM, Open MPI, TPU pod). Must run before any other JAX call. Returns
  whether it initialised; a single-host run does nothing."""
  if jax.distributed.is_initialized():
    return True
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES", "").isdigit():
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID", "").isdigit():
    process_id = int(os.environ["JAX_PROCESS_ID"])
  wanted = (coordinator_address is not None or (num_processes or 1) > 1
            or os.environ.get("JAX_COORDINATOR_ADDRESS") or _cluster_env_processes() > 1)
  if not wanted:
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def host_local_batch_slice(global_batch_size: int, mesh: Optional[Mesh] = None) -> slice:
  """The rows of the global batch this process must load.

  With a mesh: exactly the rows the batch sharding places on this process's devices. Without:
  an even split by process index.
  """
  processes = jax.process_count()
  if mesh is None:
    if global_batch_size % processes:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                       f"{processes} processes; use a multiple of {processes}")
    per_process = global_batch_size // processes
    return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  _check_batch_divisible(np.zeros((global_batch_size,)), mesh, "host_local_batch_slice")
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  rows = sorted({(idx[0].start or 0, idx[0].stop or global_batch_size)
                 for idx in index_map.values()})
  for (_, stop), (start, _) in zip(rows, rows[1:]):
    if stop != start:
      raise ValueError(f"this process's batch rows {rows} are not contiguous: order the mesh "
                       f"devices so each host holds one block of the batch")
  return slice(rows[0][0], rows[-1][1])


def make_global_array(host_local_batch: Any, mesh: Mesh) -> Any:
  """Assembles each host's rows (`host_local_batch_slice`) into global arrays split over the
  batch. On one process this is `shard_batch`."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(x)),
      host_local_batch)


def to_host(tree: Any) -> Any:
  """numpy copies of the arrays in `tree` on this host, whole even where they span other hosts'
  devices (`process_allgather`: every host then holds the same values and runs the same host
  logic, as a multi-host rollout needs). One host: `jax.device_get`."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)
