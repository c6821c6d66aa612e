"""The one reader of a run folder (a training or SFT run's `workdir`).

  workdir/checkpoints/<step>/   orbax: params, train_state, data_position, config (see checkpoint)
  workdir/tokenizer/            the run's tokenizer (HF files)
  workdir/metrics.jsonl, tensorboard/

The checkpoint's config item records the experiment config and the exact `ModelConfig`, so a run
is rebuilt from its folder alone. `resolve_step` picks the step (explicit or latest) with an error
that names what is there; `read_run` reads everything but the weights (cheap: `infer` checks its
command line with it before reading weights); `load_params` reads only the weights.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import numpy as np

from gru_mem import checkpoint
from gru_mem.data.tokenizer import Tokenizer, builtin_tokenizer, load_tokenizer
from gru_mem.model import transformer
from gru_mem.model.config import ModelConfig

TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass
class RunInfo:
  """What a run folder says about checkpoint `step`, weights aside."""
  step: int
  model_config: ModelConfig
  tokenizer: Tokenizer
  experiment: dict  # the experiment config as saved (a plain dict)


def _manager(workdir: str, what: str) -> checkpoint.CheckpointManager:
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    raise FileNotFoundError(f"{what} {workdir} has no checkpoints/ folder: pass the folder of a "
                            "training run (or --hf_model for an HF folder)")
  return checkpoint.CheckpointManager(workdir, read_only=True)


def completed_steps(workdir: str) -> Optional[int]:
  """The latest complete checkpoint step of `workdir`, or None when it has none."""
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    return None
  with checkpoint.CheckpointManager(workdir, read_only=True) as manager:
    return manager.latest_step()


def _resolve(manager: checkpoint.CheckpointManager, workdir: str, step: Optional[int],
             what: str) -> int:
  steps = manager.all_steps()
  if step is not None and step not in steps:
    raise FileNotFoundError(f"{what} {workdir} has no checkpoint for step {step}; available: "
                            f"{steps}")
  if step is None and not steps:
    raise FileNotFoundError(f"{what} {workdir}: no complete checkpoint in "
                            f"{checkpoint.checkpoint_dir(workdir)} yet")
  return int(manager.resolve_step(step))


def resolve_step(workdir: str, step: Optional[int] = None, what: str = "--workdir") -> int:
  """`step` if the run has it, else (None) its latest complete checkpoint."""
  with _manager(workdir, what) as manager:
    return _resolve(manager, workdir, step, what)


def read_run(workdir: str, step: Optional[int] = None, what: str = "--workdir") -> RunInfo:
  """Model config, tokenizer and experiment config of checkpoint `step`; reads no weights."""
  with _manager(workdir, what) as manager:
    step = _resolve(manager, workdir, step, what)
    metadata = manager.restore_json(checkpoint.CONFIG, step)
  if "model_config" not in metadata:
    raise ValueError(f"{what} {workdir}: the checkpoint's config item has no model_config")
  tokenizer_dir = os.path.join(workdir, TOKENIZER_DIR)
  tokenizer = load_tokenizer(tokenizer_dir) if os.path.isdir(tokenizer_dir) else builtin_tokenizer()
  return RunInfo(step, ModelConfig(**metadata["model_config"]), tokenizer,
                 dict(metadata.get("experiment", {})))


def load_params(workdir: str, step: Optional[int] = None,
                model_config: Optional[ModelConfig] = None, what: str = "--workdir") -> Any:
  """The params of checkpoint `step` (default: the latest) as host numpy arrays, nothing else
  read. With `model_config` their shapes are checked against that model's."""
  with _manager(workdir, what) as manager:
    params = jax.tree.map(np.asarray,
                          manager.restore_params(_resolve(manager, workdir, step, what)))
  if model_config is not None:
    want = jax.tree.map(lambda x: x.shape, jax.eval_shape(
        lambda: transformer.init_params(model_config, jax.random.PRNGKey(0))))
    got = jax.tree.map(lambda x: x.shape, params)
    if want != got:
      raise ValueError(f"{what} {workdir} holds params of another model shape than this "
                       "config's model: use the same model settings as the run that made them")
  return params


def load_run(workdir: str, step: Optional[int] = None) -> tuple[RunInfo, Any]:
  """(RunInfo, params as jax arrays) of checkpoint `step` of a run."""
  info = read_run(workdir, step)
  params = load_params(workdir, info.step)
  return info, jax.tree.map(jax.numpy.asarray, params)
