"""Metrics: TensorBoard (through clu), a JSONL file to plot, and a console progress line.

  logger = MetricLogger(workdir, total_steps=1000)
  logger.log(step, {"loss": loss, "reward/outcome": r}, tokens=tokens_this_step)
  # console: step 120/1000 | 2.31 it/s 4.1k tok/s ETA 6m21s | loss 0.12
  logger.close()
  plot_metrics(f"{workdir}/metrics.jsonl", ["loss", "reward/outcome"], f"{workdir}/curves.png")

Every process may call `log`; only process 0 writes files and prints.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence, TextIO

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def format_duration(seconds: Optional[float]) -> str:
  """42 -> '42s', 185 -> '3m05s', 3725 -> '1h02m05s', 183600 -> '2d03h'; unknown -> '?'."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(round(seconds))
  days, rest = divmod(seconds, 86400)
  hours, rest = divmod(rest, 3600)
  minutes, secs = divmod(rest, 60)
  if days:
    return f"{days}d{hours:02d}h"
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The entries that are one number (Python, numpy or jax scalars, size-1 arrays) as floats;
  anything else (vectors, strings) is left out."""
  scalars = {}
  for name, value in metrics.items():
    if isinstance(value, (str, bytes)):
      continue
    try:
      array = np.asarray(value)
    except (TypeError, ValueError):
      continue
    if array.size == 1 and (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
      scalars[name] = float(array.reshape(()))
  return scalars


def _format_value(value: float) -> str:
  """3 significant digits (2 decimals for |v| < 1: rates and accuracies), e-notation when tiny
  or huge."""
  if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
    return f"{value:.2e}"
  if abs(value) < 1:
    return f"{value:.2f}"
  return f"{value:.3g}"


class MetricLogger:
  """Writes each `log(step, metrics)` to TensorBoard and `workdir/metrics.jsonl`, and prints
  `step 120/1000 | 2.31 it/s 4.1k tok/s ETA 6m21s | loss 0.12` (see `progress_line`).

  Rates are measured over the last `rate_window` calls; `tokens` passed to `log` are the tokens
  processed since the previous call. `console_keys` picks the metrics shown (default: all), as
  names or as a {name: short label} mapping that keeps the line within a terminal's width.
  `start_step` is the step a resumed run starts from, so its first rate is right.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0,
               console_keys: Optional[Mapping[str, str] | Sequence[str]] = None,
               show_token_rate: bool = True, rate_window: int = 20,
               stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic):
    if total_steps < 1:
      raise ValueError(f"total_steps={total_steps}: must be >= 1")
    if rate_window < 1:
      raise ValueError(f"rate_window={rate_window}: must be >= 1")
    from clu import metric_writers  # imports TensorFlow: only when a logger is made
    self.total_steps = total_steps
    if console_keys is not None and not isinstance(console_keys, Mapping):
      console_keys = {key: key for key in console_keys}
    self.console_keys = None if console_keys is None else dict(console_keys)
    self.show_token_rate = show_token_rate
    self.is_writer = jax.process_index() == 0
    self._stream = stream or sys.stdout
    self._clock = clock
    self._start_time = clock()
    self._tokens_seen = 0
    # (time, step, tokens seen) at the start and after each call, for windowed rates.
    self._history = collections.deque([(self._start_time, start_step, 0)], maxlen=rate_window + 1)
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, METRICS_FILE)
    self._writer = metric_writers.create_default_writer(
        os.path.join(workdir, TENSORBOARD_DIR), just_logging=not self.is_writer)
    self._jsonl = open(self.jsonl_path, "a") if self.is_writer else None

  def rates(self) -> tuple[Optional[float], Optional[float]]:
    """(steps/s, tokens/s) over the window; None before there is anything to measure."""
    (t0, step0, tokens0), (t1, step1, tokens1) = self._history[0], self._history[-1]
    if t1 <= t0 or step1 <= step0:
      return None, None
    return (step1 - step0) / (t1 - t0), (tokens1 - tokens0) / (t1 - t0)

  def log(self, step: int, metrics: Mapping[str, Any], tokens: Optional[int] = None) -> dict:
    """Records the scalar metrics of `step`; returns what was written (with the rates)."""
    now = self._clock()
    self._tokens_seen += int(tokens or 0)
    self._history.append((now, step, self._tokens_seen))
    steps_per_sec, tokens_per_sec = self.rates()
    scalars = scalar_metrics(metrics)
    timing = {"perf/elapsed_s": now - self._start_time}
    if steps_per_sec is not None:
      timing["perf/steps_per_sec"] = steps_per_sec
      if tokens is not None:
        timing["perf/tokens_per_sec"] = tokens_per_sec
    record = {**scalars, **timing}
    self._writer.write_scalars(step, record)
    if self.is_writer:
      self._write_jsonl(step, record)
      print(self.progress_line(step, scalars, steps_per_sec,
                               tokens_per_sec if tokens is not None else None, now),
            file=self._stream, flush=True)
    return record

  def _write_jsonl(self, step: int, record: Mapping[str, float]) -> None:
    # NaN / inf are written as strings so the file stays strict JSON; float() reads them back.
    row = {"step": int(step),
           **{k: (v if math.isfinite(v) else str(v)) for k, v in record.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def progress_line(self, step: int, scalars: Mapping[str, float], steps_per_sec: Optional[float],
                    tokens_per_sec: Optional[float], now: float) -> str:
    """`step 12/100 | 0.5 it/s 1.2k tok/s ETA 2m56s | loss 1.25`: one terminal line; the shown
    metrics are `console_keys` (a name -> label mapping, or names shown as they are). Elapsed
    time and every other metric go to TensorBoard and metrics.jsonl."""
    del now
    rate = "? it/s" if steps_per_sec is None else f"{steps_per_sec:.3g} it/s"
    if tokens_per_sec is not None and self.show_token_rate:
      rate += f" {_format_count(tokens_per_sec)} tok/s"
    eta = None if not steps_per_sec else max(self.total_steps - step, 0) / steps_per_sec
    parts = [f"step {step}/{self.total_steps}", f"{rate} ETA {format_duration(eta)}"]
    labels = self.console_keys if self.console_keys is not None else {k: k for k in scalars}
    shown = [f"{label} {_format_value(scalars[key])}" for key, label in labels.items()
             if key in scalars]
    if shown:
      parts.append(" ".join(shown))
    return " | ".join(parts)

  def write_config(self, config: Mapping[str, Any]) -> None:
    """Records the run's config as TensorBoard hparams (flattened `a.b` keys)."""
    self._writer.write_hparams(_flatten(config))

  def flush(self) -> None:
    self._writer.flush()
    if self._jsonl:
      self._jsonl.flush()

  def close(self) -> None:
    self._writer.close()
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None

  def __enter__(self) -> "MetricLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _format_count(value: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(value) >= scale:
      return f"{value / scale:.3g}{unit}"
  return f"{value:.3g}"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in (tree.to_dict() if hasattr(tree, "to_dict") else tree).items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
      flat.update(_flatten(value, name + "."))
    elif isinstance(value, (bool, int, float, str)):
      flat[name] = value
    else:
      flat[name] = str(value)
  return flat


def read_metrics(jsonl_path: str) -> list[dict]:
  """The rows of a metrics file, one per step in step order; a step logged more than once (a
  resumed run, or eval and train metrics logged apart) keeps the latest value of each key."""
  by_step: dict[int, dict] = {}
  with open(jsonl_path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        by_step.setdefault(row["step"], {}).update(row)
  return [by_step[s] for s in sorted(by_step)]


def plot_metrics(jsonl_path: str, keys: Sequence[str], out_png: str) -> str:
  """Renders one curve per key (metric value against step) into a PNG; returns its path."""
  import matplotlib
  matplotlib.use("Agg")  # no display needed
  import matplotlib.pyplot as plt

  rows = read_metrics(jsonl_path)
  missing = [k for k in keys if not any(k in row for row in rows)]
  if missing or not keys:
    available = sorted({k for row in rows for k in row} - {"step"})
    raise ValueError(f"no values for {missing or 'any key'} in {jsonl_path}; it has {available}")
  fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
  for ax, key in zip(axes[:, 0], keys):
    points = [(row["step"], float(row[key])) for row in rows if key in row]
    ax.plot([p[0] for p in points], [p[1] for p in points],
            marker="." if len(points) < 50 else None)
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  axes[-1, 0].set_xlabel("step")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return out_png
