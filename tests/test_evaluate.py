"""The evaluator: its numbers against hand counts of scripted trajectories, the default job's
checks, held-out data, and one small end-to-end run that writes the report and plots."""

import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from gru_mem import eval_report, evaluate, gates
from gru_mem.agent.rollout import AgentExample, Trajectory, Turn
from gru_mem.data import sources
from gru_mem.agent.chunking import chunk_token_ids
from gru_mem.data.tokenizer import builtin_tokenizer
from gru_mem.model import transformer

Y, N, BAD = gates.UPDATE_YES, gates.UPDATE_NO, gates.INVALID
C, E = gates.EXIT_CONTINUE, gates.EXIT_END


def agent_example(num_chunks, evidence_chunks, answer="7"):
  spans = [(c * 2, c * 2 + 1) for c in evidence_chunks]
  chunks = chunk_token_ids(np.arange(1, 2 * num_chunks + 1), 2, spans)
  return AgentExample(np.array([5], np.int32), chunks, answers=(answer,))


def trajectory(example, decisions, answer, memory_lengths):
  """decisions: (update, exit) per chunk read."""
  turns = [Turn(np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.float32), t,
                t in example.chunks.evidence_chunks, u, e, u != BAD, m)
           for t, ((u, e), m) in enumerate(zip(decisions, memory_lengths))]
  answer_turn = Turn(np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.float32), -1,
                     False, format_ok=True)
  return Trajectory(0, 0, turns, answer_turn, answer, last_chunk_read=len(turns) - 1,
                    num_chunks=example.chunks.num_chunks,
                    last_evidence_chunk=example.chunks.last_evidence_chunk)


def test_summary_counts_match_a_hand_count():
  examples = [agent_example(4, (1,)), agent_example(4, (0, 2)), agent_example(4, (3,))]
  trajectories = [
      # exact exit after chunk 1; gates: no, yes -> all right; correct
      trajectory(examples[0], [(N, C), (Y, E)], "7", [0, 3]),
      # early exit after chunk 1 (last evidence is 2); gates yes(right), yes(wrong); wrong answer
      trajectory(examples[1], [(Y, C), (Y, E)], "8", [4, 6]),
      # read all 4, late never (last evidence is 3: exact); gates no,BAD,no,yes; correct
      trajectory(examples[2], [(N, C), (BAD, C), (N, C), (Y, C)], "7", [0, 0, 0, 5]),
  ]
  summary = evaluate.summarize(trajectories, examples, tiny.get_config(), "gru_mem", seconds=3.0)
  assert summary["accuracy"] == pytest.approx(2 / 3)
  assert summary["chunks_read"] == pytest.approx(8 / 3)
  assert (summary["exit_early"], summary["exit_exact"], summary["exit_late"]) == pytest.approx(
      (1 / 3, 2 / 3, 0.0))
  # evidence chunks read: ex0 c1 (yes), ex1 c0 (yes), ex2 c3 (yes) -> 3/3
  assert summary["evidence_chunks"] == 3 and summary["update_acc_evidence"] == 1.0
  # non-evidence read: ex0 c0 (no), ex1 c1 (yes: wrong), ex2 c0 (no), c1 (invalid), c2 (no)
  assert summary["non_evidence_chunks"] == 5
  assert summary["update_acc_non_evidence"] == pytest.approx(3 / 5)
  assert summary["memory_tokens_by_step"] == pytest.approx([4 / 3, 9 / 3, 0.0, 5.0])
  assert summary["examples_alive_by_step"] == [3, 3, 1, 1]
  assert summary["seconds_per_example"] == pytest.approx(1.0)
  assert summary["format_ok"] == pytest.approx(7 / 8)
  # every turn's prompt and response are 1 token: (2 + 2 + 4 memory turns + 3 answer turns) / 3
  assert summary["prompt_tokens"] == summary["generated_tokens"] == pytest.approx(11 / 3)
  assert summary["work_tokens"] == pytest.approx(22 / 3)


def test_work_tokens_count_every_prompt_and_response_token_with_the_answer_turn():
  example = agent_example(4, (1,))
  turns = [Turn(np.zeros(p, np.int32), np.zeros(r, np.int32), np.zeros(r, np.float32), t, False)
           for t, (p, r) in enumerate([(10, 3), (12, 5)])]
  answer = Turn(np.zeros(7, np.int32), np.zeros(2, np.int32), np.zeros(2, np.float32), -1, False)
  read = Trajectory(0, 0, turns, answer, "7", num_chunks=example.chunks.num_chunks)
  assert evaluate.work_tokens(read) == (10 + 12 + 7, 3 + 5 + 2)


def cell(model, mode, accuracy, seconds, depth=1.0, chunks=8, **gates_and_exits):
  row = {"task": "t", "length": 256 if chunks == 8 else 1024, "evidence_depth": depth,
         "model": model, "mode": mode, "accuracy": accuracy, "seconds": seconds,
         "examples": 10, "num_chunks": chunks, "evidence_chunks": 10, "non_evidence_chunks": 70,
         "update_acc_evidence": 1.0, "update_acc_non_evidence": 0.0, "exit_exact": 0.0,
         "exit_early": 0.0, "exit_late": 1.0, "chunks_read": chunks,
         "work_tokens": 150.0 * chunks}
  row.update(gates_and_exits)
  return row


def test_default_job_checks_pool_cells_and_compare_with_the_baseline():
  config = tiny.get_config().eval
  cells = [
      cell("gru_mem", "gru_mem", 0.82, 2.0, update_acc_non_evidence=0.99, exit_exact=0.9),
      cell("gru_mem", "gru_mem", 0.91, 1.0, depth=0.2, chunks=32, update_acc_non_evidence=0.90,
           exit_exact=0.82, non_evidence_chunks=30, work_tokens=1200.0, chunks_read=5.0),
      cell("stage1", "memagent", 0.86, 4.0),
      cell("stage1", "memagent", 0.88, 5.0, depth=0.2, chunks=32),
  ]
  checks = eval_report.default_job_checks(cells, config)
  assert checks["update_acc_non_evidence"]["value"] == pytest.approx((0.99 * 70 + 0.9 * 30) / 100)
  assert checks["update_acc_non_evidence"]["passed"]
  assert checks["exit_exact"]["value"] == pytest.approx(0.86) and checks["exit_exact"]["passed"]
  assert checks["accuracy_drop_vs_memagent"]["value"] == pytest.approx(0.87 - 0.865)
  assert checks["accuracy_drop_vs_memagent"]["passed"]
  # work, not seconds: only the 32-chunk cell, 150 * 32 tokens / 1200 (the wall ratio is 5.0)
  assert checks["work_speedup_early_evidence"]["value"] == pytest.approx(4.0)
  assert "chunks read 32.0 vs 5.0 of 32" in checks["work_speedup_early_evidence"]["note"]
  before = eval_report.pooled_summary(cells, "stage1", "memagent")
  assert before["accuracy"] == pytest.approx(0.87) and before["seconds"] == pytest.approx(9.0)
  assert before["work_tokens"] == pytest.approx(150 * (8 + 32) / 2)
  after = eval_report.pooled_summary(cells, "gru_mem", "gru_mem")
  assert after["chunks_read"] == pytest.approx((8 + 5) / 2)
  assert eval_report.pooled_summary(cells, "stage1", "gru_mem") == {}
  cells[0]["accuracy"] = 0.7
  assert not eval_report.default_job_checks(cells, config)["accuracy_drop_vs_memagent"]["passed"]
  assert eval_report.default_job_checks(cells[:2], config) == {}  # no baseline: nothing to check


def test_grid_and_held_out_data():
  config = tiny.get_config()
  config.eval.tasks, config.eval.lengths = "niah_single_1", "128,256"
  config.eval.evidence_depths = "1,0.2"
  grid = evaluate.cells(config.eval)
  assert [(c.length, c.evidence_depth) for c in grid] == [(128, 1.0), (128, 0.2), (256, 1.0),
                                                         (256, 0.2)]
  config.eval.examples = 3
  tokenizer = builtin_tokenizer()
  held_out = evaluate.held_out_examples(config, tokenizer, grid[1])
  training = [sources.example_at(config.data, tokenizer, i, seed)
              for seed in (config.seed, config.sft.seed) for i in range(50)]
  assert not {e.document for e in held_out} & {e.document for e in training}
  for example in held_out:  # evidence within the first 20% of the document's tokens
    chunks = AgentExample.from_example(example, tokenizer, 16).chunks
    assert chunks.evidence_token_spans[-1][1] <= 0.2 * chunks.num_tokens + 1
  config.eval.tasks = "niah_nope"
  with pytest.raises(ValueError, match="niah_nope"):
    evaluate.cells(config.eval)


def test_evaluate_writes_results_report_and_plots(tmp_path):
  config = tiny.get_config()
  config.agent.chunk_tokens, config.agent.memory_tokens = 32, 8
  config.agent.max_response_tokens, config.agent.max_answer_tokens = 6, 4
  config.eval.tasks, config.eval.lengths, config.eval.evidence_depths = "niah_single_1", "96", "1"
  config.eval.examples, config.eval.batch_size = 2, 2
  config.eval.modes, config.eval.baseline_modes = "gru_mem", "memagent"
  tokenizer = builtin_tokenizer()
  from gru_mem import runtime
  model_config = runtime.model_config_from(config, tokenizer)
  params = transformer.init_params(model_config, jax.random.PRNGKey(0))
  models = {label: evaluate.Model(label, model_config, params, tokenizer)
            for label in ("gru_mem", "stage1")}
  results = evaluate.evaluate(config, models, str(tmp_path), command="test")
  assert [(c["model"], c["mode"]) for c in results["cells"]] == [("gru_mem", "gru_mem"),
                                                                ("stage1", "memagent")]
  memagent = results["cells"][1]
  assert memagent["chunks_read"] == memagent["num_chunks"] == 3  # memagent reads everything
  assert memagent["update_acc_evidence"] == 1.0 and memagent["update_acc_non_evidence"] == 0.0
  assert set(results["checks"]) >= {"update_acc_evidence", "exit_exact"}
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["meta"]["command"] == "test"
  for name in ("report.md", "accuracy_vs_length.png", "time_vs_length.png", "memory_vs_step.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  report = (tmp_path / "report.md").read_text()
  assert "| niah_single_1 | 96 |" in report
  assert "| stage 1, memagent (the baseline) |" in report and "(after RL) |" in report


def test_answer_metrics_and_examples_without_evidence():
  """sub-EM, EM and F1 (SQuAD normalisation) of the boxed answers, by hand; an example without
  evidence counts in the answers but not in the gate and exit numbers."""
  examples = [agent_example(2, (0,), "the Eiffel Tower"), agent_example(2, (), "Paris"),
              agent_example(2, (1,), "1889")]
  trajectories = [trajectory(examples[0], [(Y, E)], "Eiffel Tower", [2]),  # EM 1 (article)
                  trajectory(examples[1], [(Y, C), (N, C)], "Paris, France", [2, 2]),
                  trajectory(examples[2], [(N, C), (Y, E)], "in 1890", [0, 2])]
  summary = evaluate.summarize(trajectories, examples, tiny.get_config(), "gru_mem", seconds=1.0)
  assert summary["examples_with_evidence"] == 2
  assert summary["exact_match"] == pytest.approx(1 / 3)
  # sub-EM: "paris" in "paris france" -> 1; "1889" vs "in 1890" -> 0
  assert summary["sub_exact_match"] == pytest.approx(2 / 3)
  # F1: 1; "paris france" vs "paris": P 1/2, R 1 -> 2/3; 0
  assert summary["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
  # exits of the two examples with evidence: exact (ex0), exact (ex2)
  assert summary["exit_exact"] == 1.0
  assert summary["evidence_chunks"] == 2 and summary["non_evidence_chunks"] == 1
