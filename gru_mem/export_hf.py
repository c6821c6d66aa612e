r"""Export a training run's checkpoint as a Hugging Face folder that transformers loads.

  python -m gru_mem.export_hf --workdir runs/tiny [--step 20] --out exports/tiny [--dtype bfloat16]

Writes config.json, model.safetensors (or shards with their index), generation_config.json and the
run's tokenizer files (`workdir/tokenizer`), atomically: the folder appears complete or not at all.
Then it loads the exported tokenizer back with `AutoTokenizer` and checks it gives the run's ids.
An existing `--out` is replaced only when it is empty or an earlier HF export, or with --overwrite.
"""

from __future__ import annotations

from gru_mem import console

console.quiet_startup(import_tensorflow=False)  # before the libraries below are imported

import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from gru_mem.model.config import DTYPES

EXPORT_DTYPES = ("float32", "bfloat16")

# Text the exported tokenizer must encode exactly as the run's: words, digits, punctuation,
# whitespace runs, non-ASCII and a tag of the agent's format.
TOKENIZER_PROBE = ("the magic number for amber falcon is 7302915.\n\nDocument 2:\n  "
                   "<check>yes</check> Ünïcödé — 東京 ok?  \t end")


def check_dtype(dtype: str) -> None:
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"--dtype={dtype!r}: use one of {EXPORT_DTYPES}")


def is_hf_export(path: str) -> bool:
  """A folder holding an HF model: config.json with a model_type, and safetensors weights."""
  config_path = os.path.join(path, "config.json")
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return False
  weights = any(os.path.exists(os.path.join(path, name))
                for name in ("model.safetensors", "model.safetensors.index.json"))
  return isinstance(config, dict) and "model_type" in config and weights


def check_out_dir(out: str, workdir: str, overwrite: bool) -> None:
  """Refuses an --out that would destroy something: the run itself, a file, or a non-empty folder
  that is not an HF export (unless `overwrite`)."""
  out_abs, workdir_abs = os.path.abspath(out), os.path.abspath(workdir)
  if os.path.commonpath([out_abs, workdir_abs]) == out_abs:
    raise ValueError(f"--out {out} holds the run --workdir {workdir}: exporting there would "
                     "replace the run; pick another folder")
  if not os.path.exists(out_abs):
    return
  if not os.path.isdir(out_abs):
    raise ValueError(f"--out {out} is a file: give a folder path")
  if os.listdir(out_abs) and not is_hf_export(out_abs) and not overwrite:
    raise ValueError(f"--out {out} is a non-empty folder that is not an HF export: pick an empty "
                     "or new folder, or pass --overwrite to replace it")


def check_tokenizer_roundtrip(out: str, tokenizer) -> None:
  """`AutoTokenizer.from_pretrained(out)` must give the run's ids (see DESIGN.md, Known traps)."""
  import transformers
  loaded = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  expected = tokenizer.encode(TOKENIZER_PROBE)
  found = list(loaded.encode(TOKENIZER_PROBE, add_special_tokens=False))
  if found != expected:
    raise ValueError(f"{out}: AutoTokenizer loads the exported tokenizer as "
                     f"{type(loaded).__name__}, which encodes a probe text differently from the "
                     f"run's tokenizer ({found[:12]} vs {expected[:12]}); the export is unusable "
                     "with transformers as it stands")


def export(workdir: str, out: str, step: Optional[int] = None, dtype: str = "float32",
           overwrite: bool = False) -> tuple[str, int]:
  """Writes checkpoint `step` (default: the latest) of `workdir` to the HF folder `out`, weights
  stored as `dtype`. Returns (the absolute folder, the step exported)."""
  from gru_mem import run_folder  # pylint: disable=import-outside-toplevel
  from gru_mem.model import hf  # pylint: disable=import-outside-toplevel
  check_dtype(dtype)
  step = run_folder.resolve_step(workdir, step)
  check_out_dir(out, workdir, overwrite)
  info, params = run_folder.load_run(workdir, step)
  model_config, tokenizer = info.model_config, info.tokenizer
  np_dtype = np.dtype(jnp.dtype(DTYPES[dtype]))
  params = jax.tree.map(lambda x: np.asarray(x).astype(np_dtype), params)
  model_config = model_config.replace(param_dtype=dtype)
  folder = hf.save_hf_checkpoint(model_config, params, out, tokenizer=tokenizer)
  check_tokenizer_roundtrip(folder, tokenizer)
  return folder, step


def main(argv):
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  F = flags.FLAGS
  try:
    folder, step = export(F.workdir, F.out, F.step, F.dtype, F.overwrite)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"exported step {step} of {F.workdir} ({F.dtype}) to {folder}")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "a training run folder", required=True)
  flags.DEFINE_integer("step", None, "the checkpoint step to export (default: the latest)")
  flags.DEFINE_string("out", None, "the HF folder to write", required=True)
  flags.DEFINE_enum("dtype", "float32", list(EXPORT_DTYPES), "how the weights are stored")
  flags.DEFINE_bool("overwrite", False, "replace a non-empty --out that is not an HF export")
  app.run(main)
