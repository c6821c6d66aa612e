"""A quiet start: library start-up noise off, before the libraries are imported.

Every entry point calls `quiet_startup()` first. What it silences, and how:
  * transformers: "PyTorch was not found ..." and tokenizer length advisories (its logger set to
    errors through TRANSFORMERS_VERBOSITY, which it reads at import; a user's own value wins).
  * TensorFlow, which seqio and clu import: its C++ start-up lines ("oneDNN custom operations are
    on", "Could not find cuda drivers", the absl pre-init banner) ignore TF_CPP_MIN_LOG_LEVEL in
    TF 2.21, so TensorFlow is imported here once with the process's stderr (file descriptor 2)
    pointed at /dev/null, and it is told to use no GPU (it would otherwise grab GPU memory that
    JAX needs). An import error still raises, with its traceback, after stderr is restored.
  * absl (orbax writes a line per file at INFO): WARNING and above only; and orbax's two
    warnings that a read-only manager (export, evaluation, infer reading a run) is read-only.
Warnings of gru_mem itself, and Python warnings of the libraries, are left as they are.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import os
import sys

_DONE = False


@contextlib.contextmanager
def native_stderr_silenced():
  """Points file descriptor 2 at /dev/null for the block (C/C++ writes too), then restores it."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def quiet_startup(import_tensorflow: bool = True) -> None:
  """Silences the start-up noise described in the module doc (idempotent)."""
  global _DONE
  if _DONE:
    return
  _DONE = True
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  if import_tensorflow and "tensorflow" not in sys.modules:
    try:
      with native_stderr_silenced():
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        tf.config.set_visible_devices([], "GPU")
    except ImportError:
      pass  # seqio / clu will say what is missing when they are used
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  pylogging.getLogger("absl").addFilter(_drop_orbax_read_only_notices)


def _drop_orbax_read_only_notices(record) -> bool:
  """False (drop) for orbax's notices that a manager opened read-only is read-only."""
  message = record.getMessage()
  return not ("orbax" in record.pathname and ("read_only=True" in message
                                              or "directory is read only" in message))
