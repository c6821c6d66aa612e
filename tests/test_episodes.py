"""episodes.score_rollout against a hand computation: rewards, advantages, metrics and learner rows
of two groups of two hand-built trajectories (mode gru_mem, the paper's defaults)."""

import types

import numpy as np
import pytest

from gru_mem import gates
from gru_mem.agent import modes
from gru_mem.agent.rollout import Trajectory, Turn
from gru_mem.rl import episodes

RL = types.SimpleNamespace(
    alpha=0.9, normalize_advantage_std=False, advantage_std_eps=1e-6, exit_early_penalty=-0.75,
    exit_late_penalty=-0.5, outcome_reward_weight=1.0, format_reward_weight=1.0,
    exit_reward_weight=1.0, update_correct_reward=1.0, update_wrong_reward=-1.0,
    answer_match="exact", dynamic_sampling_atol=1e-6)


def turn(chunk, evidence, update, exit_gate, response_len=3):
  return Turn(prompt_ids=np.arange(1, 5), response_ids=np.arange(1, response_len + 1),
              logprobs=np.full(response_len, -1.0, np.float32), chunk_index=chunk,
              has_evidence=evidence, update_gate=update, exit_gate=exit_gate, memory_length=4)


def trajectory(example, sample, turns, answer):
  return Trajectory(example, sample, turns, answer_turn=turn(-1, False, gates.INVALID,
                                                             gates.INVALID, 2),
                    answer=answer, last_chunk_read=len(turns) - 1, num_chunks=2, last_evidence_chunk=0)


def rollout():
  yes, no, go, end = gates.UPDATE_YES, gates.UPDATE_NO, gates.EXIT_CONTINUE, gates.EXIT_END
  return [
      # Group 0. g0: reads both chunks (evidence in chunk 0 only), gates right, answers right,
      # exits one chunk late. g1: exits on time after chunk 0, answers wrong.
      trajectory(0, 0, [turn(0, True, yes, go), turn(1, False, no, end)], "Paris"),
      trajectory(0, 1, [turn(0, True, yes, end)], "London"),
      # Group 1: two identical right trajectories -> all advantages zero.
      trajectory(1, 0, [turn(0, True, yes, end)], "7"),
      trajectory(1, 1, [turn(0, True, yes, end)], "7"),
  ]


EXAMPLES = [types.SimpleNamespace(answers=("paris",), answer_mode="any"),
            types.SimpleNamespace(answers=("7",), answer_mode="any")]


def test_score_rollout_matches_a_hand_computation():
  scored = episodes.score_rollout(rollout(), EXAMPLES, 2, RL, "gru_mem")
  # r_traj = r_out + r_fmt + r_exit: g0 1 + 1 - 0.5 (late) = 1.5, g1 0 + 1 + 0 = 1; group 1: 2, 2.
  np.testing.assert_allclose(scored.signal["r_traj"], [[1.5, 1.0], [2.0, 2.0]])
  np.testing.assert_allclose(scored.signal["r_upd"], [[[1, 1], [1, 0]], [[1, 0], [1, 0]]])
  # A_traj = r_traj - 1.25 = (0.25, -0.25); A_turn is 0 (every alive turn got r_upd = 1), so
  # memory turns get 0.9 * A_traj, answer turns A_traj.
  np.testing.assert_allclose(scored.signal["memory_advantage"][0], [[0.225, 0.225], [-0.225, 0]],
                             rtol=1e-6)
  np.testing.assert_allclose(scored.signal["answer_advantage"][0], [0.25, -0.25], rtol=1e-6)
  np.testing.assert_array_equal(scored.zero_advantage_group, [False, True])
  assert scored.metrics["reward/outcome"] == 0.75
  assert scored.metrics["reward/exit"] == -0.125
  assert scored.metrics["gate/update_acc_evidence"] == 1.0
  assert scored.metrics["gate/update_acc_non_evidence"] == 1.0
  assert scored.metrics["gate/exit_late"] == 0.25 and scored.metrics["gate/exit_exact"] == 0.75
  assert scored.metrics["agent/chunks_read"] == 1.25
  # Kept groups only: group 0's 3 memory turns and 2 answer turns, in trajectory order.
  rows = scored.learner_rows(~scored.zero_advantage_group)
  np.testing.assert_allclose([r.advantage for r in rows], [0.225, 0.225, 0.25, -0.225, -0.25],
                             rtol=1e-6)
  assert [len(r.response_ids) for r in rows] == [3, 3, 2, 3, 2]
  assert len(scored.learner_rows()) == 5 + 4  # every group


def test_memagent_mode_has_no_gate_rewards_and_alpha_one():
  scored = episodes.score_rollout(rollout(), EXAMPLES, 2, RL, "memagent")
  np.testing.assert_array_equal(scored.signal["r_upd"], 0.0)
  np.testing.assert_array_equal(scored.signal["r_exit"], 0.0)
  # r_traj = (2, 1) -> A_traj = (0.5, -0.5), alpha = 1: every turn of a rollout gets it.
  np.testing.assert_allclose(scored.signal["memory_advantage"][0], [[0.5, 0.5], [-0.5, 0.0]])


def test_modes():
  assert modes.MODES == ("memagent", "gru_mem", "gru_mem_no_exit")
  assert [modes.is_gated(m) for m in modes.MODES] == [False, True, True]
  assert [modes.exit_enabled(m) for m in modes.MODES] == [False, True, False]
  with pytest.raises(ValueError, match="mode='gru': use one of"):
    modes.is_gated("gru")


def test_examples_without_evidence_train_on_outcome_and_format_only():
  """Group 0's example has no known evidence (a MemAgent record nothing could be recovered
  for): no exit or update reward, left out of the gate metrics; group 1 is unchanged."""
  trajectories = rollout()
  for t in trajectories[:2]:
    t.last_evidence_chunk = -1
    for memory_turn in t.turns:
      memory_turn.has_evidence = False
  scored = episodes.score_rollout(trajectories, EXAMPLES, 2, RL, "gru_mem")
  # r_traj = r_out + r_fmt: g0 1 + 1 = 2, g1 0 + 1 = 1 (no late-exit penalty); group 1: 2, 2.
  np.testing.assert_allclose(scored.signal["r_traj"], [[2.0, 1.0], [2.0, 2.0]])
  np.testing.assert_allclose(scored.signal["r_exit"], 0.0)
  np.testing.assert_allclose(scored.signal["r_upd"][0], 0.0)
  np.testing.assert_allclose(scored.signal["r_upd"][1], [[1, 0], [1, 0]])
  # A_traj = (0.5, -0.5), A_turn = 0: memory turns 0.9 * A_traj, answer turns A_traj.
  np.testing.assert_allclose(scored.signal["memory_advantage"][0], [[0.45, 0.45], [-0.45, 0]],
                             rtol=1e-6)
  assert scored.metrics["data/examples_with_evidence"] == 1.0
  # Gate metrics from group 1 only: both exit exactly after its evidence chunk 0.
  assert scored.metrics["gate/exit_exact"] == 1.0 and scored.metrics["gate/exit_late"] == 0.0
  assert scored.metrics["gate/update_acc_evidence"] == 1.0
  assert np.isnan(scored.metrics["gate/update_acc_non_evidence"])  # group 1 has none
