"""Metric logging: TensorBoard events, JSONL, console progress with rates and ETA, plots."""

import glob
import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from gru_mem import logs


class FakeClock:
  def __init__(self, times):
    self.times = list(times)

  def __call__(self):
    return self.times.pop(0)


def read_tensorboard_scalars(logdir):
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  assert files, f"no event file in {logdir}"
  accumulator = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
  accumulator.Reload()
  scalars = {}
  for tag in accumulator.Tags()["tensors"]:
    scalars[tag] = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                    for e in accumulator.Tensors(tag)]
  return scalars


def test_format_duration():
  assert logs.format_duration(0) == "0s"
  assert logs.format_duration(42.4) == "42s"
  assert logs.format_duration(185) == "3m05s"
  assert logs.format_duration(3725) == "1h02m05s"
  assert logs.format_duration(2 * 86400 + 3 * 3600 + 59) == "2d03h"
  assert logs.format_duration(None) == "?"
  assert logs.format_duration(float("inf")) == "?"


def test_scalar_metrics_keeps_only_numbers():
  got = logs.scalar_metrics({"loss": jnp.float32(0.5), "n": 3, "ok": np.bool_(True),
                             "one": np.ones((1, 1)), "vec": np.arange(3), "name": "x"})
  assert got == {"loss": 0.5, "n": 3.0, "ok": 1.0, "one": 1.0}


def test_logger_writes_tensorboard_jsonl_and_progress(tmp_path):
  stream = io.StringIO()
  # Construction at t=0, then steps 1..3 at t=2, 4, 6: 0.5 steps/s, 100 tokens per step.
  clock = FakeClock([0.0, 2.0, 4.0, 6.0])
  logger = logs.MetricLogger(str(tmp_path), total_steps=10, console_keys=["loss"],
                             stream=stream, clock=clock)
  losses = [2.0, 1.5, 1.25]
  for step, loss in enumerate(losses, start=1):
    record = logger.log(step, {"loss": jnp.asarray(loss), "reward/outcome": 0.1 * step,
                               "per_turn": np.arange(4)}, tokens=100)
  logger.close()

  assert record["perf/steps_per_sec"] == pytest.approx(0.5)
  assert record["perf/tokens_per_sec"] == pytest.approx(50.0)
  lines = stream.getvalue().strip().splitlines()
  assert len(lines) == 3
  # 7 steps left at 0.5 steps/s -> 14 s.
  assert lines[-1] == "step 3/10 | 0.5 it/s 50 tok/s ETA 14s | loss 1.25"

  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert [r["loss"] for r in rows] == losses
  assert rows[1]["reward/outcome"] == pytest.approx(0.2)
  assert "per_turn" not in rows[0]

  scalars = read_tensorboard_scalars(str(tmp_path / "tensorboard"))
  assert scalars["loss"] == [(1, 2.0), (2, 1.5), (3, 1.25)]
  assert [s for s, _ in scalars["reward/outcome"]] == [1, 2, 3]
  assert scalars["perf/steps_per_sec"][-1][1] == pytest.approx(0.5)


def test_rates_use_a_window_and_resume_from_start_step(tmp_path):
  # Resumed at step 100; a slow first step (compile) then fast steps: the window forgets it.
  clock = FakeClock([0.0, 30.0, 31.0, 32.0, 33.0])
  logger = logs.MetricLogger(str(tmp_path), total_steps=200, start_step=100, rate_window=2,
                             stream=io.StringIO(), clock=clock)
  first = logger.log(101, {"loss": 1.0})
  assert first["perf/steps_per_sec"] == pytest.approx(1 / 30)
  for step in (102, 103, 104):
    record = logger.log(step, {"loss": 1.0})
  assert record["perf/steps_per_sec"] == pytest.approx(1.0)
  assert "perf/tokens_per_sec" not in record
  logger.close()


def test_nan_metrics_stay_valid_json_and_plot(tmp_path):
  path = tmp_path / "metrics.jsonl"
  logger = logs.MetricLogger(str(tmp_path), total_steps=4, stream=io.StringIO())
  for step, loss in enumerate([1.0, float("nan"), 0.5, 0.25], start=1):
    logger.log(step, {"loss": loss, "reward": step / 4})
  logger.log(4, {"eval/accuracy": 0.75})  # eval metrics of the same step, logged apart
  logger.close()
  for line in open(path):
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
  rows = logs.read_metrics(str(path))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert rows[-1]["loss"] == 0.25 and rows[-1]["eval/accuracy"] == 0.75
  assert np.isnan(float(rows[1]["loss"]))

  out = logs.plot_metrics(str(path), ["loss", "reward", "eval/accuracy"],
                          str(tmp_path / "plots" / "curves.png"))
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(out) > 5000
  with pytest.raises(ValueError, match="no values for \\['entropy'\\]"):
    logs.plot_metrics(str(path), ["entropy"], str(tmp_path / "x.png"))


def test_bad_arguments():
  with pytest.raises(ValueError, match="total_steps=0"):
    logs.MetricLogger("/tmp/unused", total_steps=0)


def test_the_rl_progress_line_fits_a_120_column_terminal(tmp_path):
  from gru_mem import train  # pylint: disable=import-outside-toplevel
  clock = FakeClock([0.0, 3900.0, 3906.0])
  logger = logs.MetricLogger(str(tmp_path), total_steps=1000, start_step=998,
                             console_keys=train.CONSOLE_KEYS, show_token_rate=False,
                             stream=io.StringIO(), clock=clock)
  worst = {"reward/trajectory": -1.484, "gate/update_acc_evidence": 0.9093,
           "gate/update_acc_non_evidence": 0.7331, "gate/exit_exact": 0.5938,
           "agent/chunks_read": 14.06, "agent/accuracy": 0.8438, "time/step_s": 1234.5,
           "learner/kl": 0.01, "reward/outcome": 0.8}
  logger.log(999, worst, tokens=5000)
  logger.log(1000, worst, tokens=5000)
  line = logger._stream.getvalue().splitlines()[-1]  # pylint: disable=protected-access
  logger.close()
  assert len(line) <= 120, (len(line), line)
  assert line == ("step 1000/1000 | 0.000512 it/s ETA 0s | reward -1.48 upd+ 0.91 upd- 0.73 "
                  "exact 0.59 chunks 14.1 acc 0.84 s/step 1.23e+03")
  assert "kl" not in line and "outcome" not in line
