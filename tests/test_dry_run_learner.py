"""The dry run's learner pieces (gru_mem/dry_run_learner.py): attention's share of the train
step's temporaries against whole compiled train steps (xla vs chunked) and a hand count of the
score tensor. One CPU device, a one-layer tiny model: seconds."""

import jax

from gru_mem import dry_run, dry_run_learner, parallel
from gru_mem.model import config as model_config
from gru_mem.rl import learner

ROWS, LENGTH = 2, 1024


def test_attention_share_against_whole_train_steps_and_the_score_tensor():
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  settings = learner.LearnerSettings(kl_beta=0.0, micro_batch_rows=ROWS)
  dims = dry_run.DryRunShapes(rows=ROWS, length=LENGTH, response=64, sampler_batch=ROWS,
                              sampler_prompt=64, sampler_new_tokens=8)
  base = model_config.preset("tiny").replace(num_layers=1, scan_layers=True, remat_policy="full")
  steps, reports = {}, {}
  for implementation in ("xla", "chunked"):
    config = base.replace(attention=implementation)
    steps[implementation] = dry_run_learner.learner_memory(config, settings, mesh, dims)
    reports[implementation] = dry_run_learner.attention_report(
        config, mesh, ROWS, LENGTH, steps[implementation]["temp_bytes"])
  xla, chunked = reports["xla"], reports["chunked"]
  assert (xla["resolved"], chunked["resolved"]) == ("xla", "chunked")
  assert xla["xla_attention_temp_bytes"] == chunked["xla_attention_temp_bytes"] == (
      xla["attention_temp_bytes"])
  # Hand count: xla's forward + backward hold the [rows, heads, L, L] float32 scores at least
  # twice (the probabilities and their gradient); here they are most of the step's temporaries.
  scores = ROWS * base.num_heads * LENGTH * LENGTH * 4
  assert xla["attention_temp_bytes"] >= 2 * scores
  assert 0.5 < xla["share_of_learner_temp"] <= 1.0
  assert 0.0 < chunked["share_of_learner_temp"] < xla["share_of_learner_temp"]
  # Independent: what chunked saves in whole train steps is what it saves in attention alone.
  saved_in_steps = steps["xla"]["temp_bytes"] - steps["chunked"]["temp_bytes"]
  saved_in_attention = xla["attention_temp_bytes"] - chunked["attention_temp_bytes"]
  assert saved_in_steps > scores
  assert abs(saved_in_attention - saved_in_steps) <= 0.15 * saved_in_steps
  # The learner's peak adds up from the compiler's figures.
  step = steps["xla"]
  assert step["learner_peak_bytes_per_device"] == (step["argument_bytes"] + step["output_bytes"]
                                                   - step["alias_bytes"] + step["temp_bytes"])
  summary = dry_run_learner.compare_implementations(
      [{"attention": name, "length": LENGTH, **steps[name]} for name in steps], ROWS)
  assert summary[LENGTH]["share_of_xla_temp_saved"] == round(
      saved_in_steps / steps["xla"]["temp_bytes"], 3)
