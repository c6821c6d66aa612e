"""The default job shrunk to a few minutes: SFT -> RL -> evaluation in one process, RL raising the
update-gate reward above where it started, the report and curves on disk, and re-runs skipping."""

import json
import os

import numpy as np

from configs import tiny
from gru_mem import default_job, logs


def shrunk_config():
  """5-chunk documents of one task, gated trajectories only, noisy gates after SFT."""
  c = tiny.get_config()
  c.data.train_tasks = "niah_single_word"
  c.data.context_tokens = 160
  c.agent.memory_tokens = 24
  c.agent.max_response_tokens = 48
  c.agent.max_answer_tokens = 12
  c.sft.steps = 260
  c.sft.copy_steps = 60
  c.sft.copy_rows = 16
  c.sft.copy_tokens = 12
  c.sft.examples_per_step = 2
  c.sft.memagent_fraction = 0.0
  c.sft.update_noise, c.sft.update_noise_non_evidence = 0.3, 0.5  # stage 1 says no often: RL picks
  c.sft.exit_noise, c.sft.exit_noise_complete = 0.0, 0.0
  c.sft.save_every = 1000
  c.sft.log_every = 50
  c.rl.group_size = 4
  c.rl.prompts_per_step = 2
  c.rl.kl_beta = 0.0  # no reference copy: a faster test (the KL term has its own tests)
  c.optim.learning_rate = 1e-3
  c.train.steps = 8
  c.train.save_every = 8
  c.eval.tasks, c.eval.lengths, c.eval.evidence_depths = "niah_single_word", "160", "1.0"
  c.eval.examples, c.eval.batch_size = 2, 2
  return c


def test_shrunk_default_job_learns_the_update_gate_and_writes_its_report(tmp_path):
  workdir = str(tmp_path / "job")
  results = default_job.run(shrunk_config(), workdir)

  rows = logs.read_metrics(os.path.join(workdir, "rl", logs.METRICS_FILE))
  assert [r["step"] for r in rows] == list(range(1, 9))
  update_reward = np.array([r["reward/update"] for r in rows])
  # Mean r_upd per turn: -1 + 2 * (gate accuracy). From stage 1's noisy gates, RL lifts it.
  assert update_reward[-3:].mean() > update_reward[:2].mean() + 0.2, update_reward
  for name in ("rl_curves.png", "eval/report.md", "eval/accuracy_vs_length.png",
               "eval/memory_vs_step.png", "timings.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert {(c["model"], c["mode"]) for c in results["cells"]} == {
      ("gru_mem", "gru_mem"), ("stage1", "memagent"), ("stage1", "gru_mem")}
  assert set(results["checks"]) == {"update_acc_evidence", "update_acc_non_evidence", "exit_exact",
                                    "accuracy_drop_vs_memagent"}  # no 32-chunk cell: no speed-up
  with open(os.path.join(workdir, "timings.json")) as f:
    timings = json.load(f)
  assert timings["total_cpu_s"] > 0 and timings["rl_cpu_s"] > 0

  with open(os.path.join(workdir, "eval", "results.json")) as f:
    written = json.load(f)
  again = default_job.run(shrunk_config(), workdir)  # every stage is found done
  assert again["cells"] == written["cells"]
  assert len(logs.read_metrics(os.path.join(workdir, "rl", logs.METRICS_FILE))) == 8


def test_a_stage_stopped_early_stops_the_job(tmp_path, monkeypatch):
  """SFT that stops before its last step (SIGTERM) must not hand its weights to RL."""
  calls = []
  monkeypatch.setattr(default_job.sft, "train_sft", lambda config, folder: calls.append("sft"))
  monkeypatch.setattr(default_job.train, "train", lambda config, folder: calls.append("rl"))
  assert default_job.run(shrunk_config(), str(tmp_path / "job")) is None
  assert calls == ["sft"]
