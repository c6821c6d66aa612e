"""Training checkpoints with orbax: arrays, data position and config, saved atomically.

Layout, one folder per step under `workdir/checkpoints/<step>/`:
  params/          orbax arrays: state['params'], readable on its own (export)
  train_state/     orbax arrays: the rest of the state dict (`opt_state`, `rng`, `step`, ...)
  data_position/   JSON: where the input pipeline is (prompts consumed, epoch, seed, ...)
  config/          JSON: the experiment config

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>`
only once every item is written (on object stores it writes a commit marker instead). A crash
mid-save therefore leaves only a temporary folder, which `latest_step` ignores and the next start
deletes; the last complete step stays the latest.

Saves are asynchronous: `save` returns once arrays are copied off the device and the writing goes
on in the background. `close` (and a forced save with `wait=True`) waits for it to finish.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

PARAMS = "params"
TRAIN_STATE = "train_state"
DATA_POSITION = "data_position"
CONFIG = "config"
_METADATA_ITEMS = (DATA_POSITION, CONFIG)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def to_json_dict(value: Any) -> dict:
  """A JSON-safe dict from a dict, an ml_collections ConfigDict or a dataclass (nested ok)."""
  def default(obj):
    if hasattr(obj, "to_dict"):  # ml_collections ConfigDict / FrozenConfigDict
      return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
      return dataclasses.asdict(obj)
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
      return np.asarray(obj).tolist()
    if isinstance(obj, (set, frozenset)):
      return sorted(obj)
    return str(obj)  # dtypes, callables, paths: recorded by name
  if value is None:
    return {}
  result = json.loads(json.dumps(default(value) if not isinstance(value, Mapping) else dict(value),
                                 default=default))
  if not isinstance(result, dict):
    raise TypeError(f"expected a dict-like config or data position, got {type(value).__name__}")
  return result


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with their shardings) of the arrays in `tree`: a restore target."""
  def abstract(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
      return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
    return x
  return jax.tree.map(abstract, tree)


def _check_state(state: Mapping[str, Any]) -> None:
  if not isinstance(state, Mapping) or not state:
    raise ValueError("state must be a non-empty dict of pytrees, e.g. {'params': ..., "
                     "'opt_state': ..., 'rng': ...}")
  clashes = set(state) & {TRAIN_STATE, *_METADATA_ITEMS}
  if clashes:
    raise ValueError(f"state keys {sorted(clashes)} are reserved for metadata; rename them")
  for leaf in jax.tree.leaves(state):
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      raise TypeError("state holds a typed PRNG key: save jax.random.key_data(key) instead and "
                      "rebuild it with jax.random.wrap_key_data after restoring")


def _split_state(state: Mapping[str, Any]) -> dict[str, Any]:
  """{'params': params, 'train_state': everything else}: params alone can then be read back."""
  items = {}
  if PARAMS in state:
    items[PARAMS] = state[PARAMS]
  rest = {name: tree for name, tree in state.items() if name != PARAMS}
  if rest:
    items[TRAIN_STATE] = rest
  return items


class CheckpointManager:
  """Saves every `save_every` steps (and whenever forced), keeping the newest `keep`.

  `read_only` opens a run's checkpoints for reading (export, evaluation) without creating,
  cleaning or deleting anything.
  """

  def __init__(self, workdir: str, save_every: int = 1000, keep: Optional[int] = 3,
               async_save: bool = True, read_only: bool = False):
    if save_every < 1:
      raise ValueError(f"save_every={save_every}: must be >= 1")
    if keep is not None and keep < 1:
      raise ValueError(f"keep={keep}: must be >= 1 (or None to keep every checkpoint)")
    self.directory = checkpoint_dir(workdir)
    self.save_every = save_every
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
          cleanup_tmp_directories=True)  # removes what a crash mid-save left (in the background)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def should_save(self, step: int) -> bool:
    """True on multiples of `save_every`."""
    return step % self.save_every == 0

  def save(self, step: int, state: Mapping[str, Any], data_position: Mapping[str, Any],
           config: Any = None, force: bool = False, wait: bool = False) -> bool:
    """Writes `state` (a dict of array pytrees), the data position and the config at `step`.

    Saves only on multiples of `save_every` unless `force`; returns whether it saved. `wait`
    blocks until the files are complete (use it for the final save).
    """
    _check_state(state)
    if not (force or self.should_save(step)):
      return False
    items = {name: ocp.args.StandardSave(tree) for name, tree in _split_state(state).items()}
    items[DATA_POSITION] = ocp.args.JsonSave(to_json_dict(data_position))
    items[CONFIG] = ocp.args.JsonSave(to_json_dict(config))
    # The interval is decided above; orbax's own rule would also save the very first step.
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      self._manager.wait_until_finished()
    return saved

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint (None when there is none)."""
    return self._manager.latest_step()

  def _array_items(self, step: int) -> list[str]:
    step_dir = os.path.join(self.directory, str(step))
    return [name for name in (PARAMS, TRAIN_STATE) if os.path.isdir(os.path.join(step_dir, name))]

  def restore(self, step: Optional[int] = None, abstract_state: Optional[Mapping[str, Any]] = None
              ) -> tuple[dict, dict, dict]:
    """Returns (state, data_position, config) of `step` (default: the latest).

    `abstract_state` has the keys of the saved state (or only 'params'); its leaves (arrays, or
    ShapeDtypeStructs with shardings, see `abstract_like`) give each restored array its sharding
    and the tree its structure (optax namedtuples included). Without it every array is restored
    as saved, on its saved sharding, and custom nodes come back as dicts.
    """
    step = self.resolve_step(step)
    saved_items = self._array_items(step)
    if abstract_state is None:
      items = {name: ocp.args.StandardRestore() for name in saved_items}
    else:
      targets = _split_state(abstract_state)
      if PARAMS in targets and PARAMS not in saved_items:
        raise KeyError(f"checkpoint step {step} holds no params")
      items = {name: ocp.args.StandardRestore(abstract_like(tree))
               for name, tree in targets.items()}
    items[DATA_POSITION] = ocp.args.JsonRestore()
    items[CONFIG] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
      raise ValueError(f"restoring step {step} into abstract_state failed ({e}); its keys and "
                       f"tree structure must match the saved state") from e
    state = {}
    if PARAMS in items:
      state[PARAMS] = restored[PARAMS]
    if TRAIN_STATE in items:
      state.update(restored[TRAIN_STATE])
    return state, dict(restored[DATA_POSITION] or {}), dict(restored[CONFIG] or {})

  def restore_params(self, step: Optional[int] = None, abstract_params: Any = None) -> Any:
    """Only the parameters of `step` (nothing else is read)."""
    step = self.resolve_step(step)
    if PARAMS not in self._array_items(step):
      raise KeyError(f"checkpoint step {step} holds no params")
    target = None if abstract_params is None else abstract_like(abstract_params)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
    except ValueError:
      if target is not None:
        raise
      # Saved on other devices (another host count, e.g. a multi-host run read on a laptop):
      # restore every array whole on this process's first device.
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          PARAMS: ocp.args.StandardRestore(self.params_on_one_device(step))}))
    return restored[PARAMS]

  def params_on_one_device(self, step: int) -> Any:
    """The saved params' shapes and dtypes as ShapeDtypeStructs on this process's first device."""
    absl_logger = logging.getLogger("absl")  # it warns of every other item it does not read
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
      metadata = self._manager.item_metadata(step)[PARAMS]
    finally:
      absl_logger.setLevel(level)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata.tree if hasattr(metadata, "tree") else metadata)

  def restore_json(self, name: str, step: Optional[int] = None) -> dict:
    """A metadata item ('data_position' or 'config') of `step`."""
    if name not in _METADATA_ITEMS:
      raise ValueError(f"{name!r} is not a metadata item: use one of {_METADATA_ITEMS}")
    step = self.resolve_step(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
    return dict(restored[name] or {})

  def resolve_step(self, step: Optional[int] = None) -> int:
    """`step` if it is a complete checkpoint, else (None) the latest; FileNotFoundError naming
    the folder and the steps there otherwise."""
    self._manager.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    elif step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available: {self.all_steps()}")
    return step

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
