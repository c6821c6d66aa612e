"""Rewards against a hand-computed table: one group of G=4 rollouts over a 4-chunk document."""

import numpy as np
import pytest

from gru_mem import gates
from gru_mem.rl import rewards

Y, N, X = gates.UPDATE_YES, gates.UPDATE_NO, gates.INVALID

# Evidence in chunks 1 and 2, so the last evidence chunk is 2.
#   g0: says `end` at turn 2 (exact exit), correct, every turn parsed.
#   g1: says `end` at turn 0 (early), wrong, parsed.
#   g2: never says `end`, reads all 4 chunks (late), correct, turn 3 unparseable.
#   g3: says `end` at turn 1 (early), wrong, answer turn has no \boxed{} answer.
ALIVE = np.array([[1, 1, 1, 0],
                  [1, 0, 0, 0],
                  [1, 1, 1, 1],
                  [1, 1, 0, 0]], bool)
CHUNK_HAS_EVIDENCE = np.array([False, True, True, False])
LAST_EVIDENCE_CHUNK = 2
CORRECT = np.array([True, False, True, False])
MEMORY_FORMAT_OK = np.array([[1, 1, 1, 0],  # turn 3 is not alive: its value is ignored
                             [1, 0, 0, 0],
                             [1, 1, 1, 0],
                             [1, 1, 1, 1]], bool)
ANSWER_FORMAT_OK = np.array([True, True, True, False])
UPDATE_DECISION = np.array([[N, Y, Y, X],  # dead turns hold anything
                            [Y, N, N, N],
                            [X, Y, N, N],
                            [N, N, Y, Y]])

# Hand computation.
#   r_out  = [1, 0, 1, 0]
#   r_fmt  = [1, 1, 0, 0]            (g2: turn 3 failed; g3: no boxed answer)
#   exit chunk = T_g - 1 = [2, 0, 3, 1] vs last evidence 2: exact, early, late, early
#   r_exit = [0, -0.75, -0.5, -0.75]
#   r_traj = [1+1+0, 0+1-0.75, 1+0-0.5, 0+0-0.75] = [2, 0.25, 0.5, -0.75]
#   r_upd: evidence per chunk (F, T, T, F), so the right gate is (no, yes, yes, no):
#     g0: no  yes yes   -> +1 +1 +1
#     g1: yes           -> -1
#     g2: inv yes no no -> -1 +1 -1 +1
#     g3: no  no        -> +1 -1
EXPECTED_R_OUT = [1.0, 0.0, 1.0, 0.0]
EXPECTED_R_FMT = [1.0, 1.0, 0.0, 0.0]
EXPECTED_EXIT_CHUNK = [2, 0, 3, 1]
EXPECTED_R_EXIT = [0.0, -0.75, -0.5, -0.75]
EXPECTED_R_TRAJ = [2.0, 0.25, 0.5, -0.75]
EXPECTED_R_UPD = [[1, 1, 1, 0],
                  [-1, 0, 0, 0],
                  [-1, 1, -1, 1],
                  [1, -1, 0, 0]]


def _group_rewards(**kwargs):
  return rewards.group_rewards(
      CORRECT, MEMORY_FORMAT_OK, ANSWER_FORMAT_OK, ALIVE, UPDATE_DECISION,
      np.broadcast_to(CHUNK_HAS_EVIDENCE, ALIVE.shape), LAST_EVIDENCE_CHUNK, **kwargs)


def test_gru_mem_rewards_match_hand_table():
  out = {k: np.asarray(v) for k, v in _group_rewards().items()}
  np.testing.assert_array_equal(out["r_out"], EXPECTED_R_OUT)
  np.testing.assert_array_equal(out["r_fmt"], EXPECTED_R_FMT)
  np.testing.assert_array_equal(out["exit_chunk"], EXPECTED_EXIT_CHUNK)
  np.testing.assert_array_equal(
      out["exit_timing"], [rewards.EXIT_EXACT, rewards.EXIT_EARLY, rewards.EXIT_LATE,
                           rewards.EXIT_EARLY])
  np.testing.assert_array_equal(out["r_exit"], EXPECTED_R_EXIT)
  np.testing.assert_array_equal(out["r_traj"], EXPECTED_R_TRAJ)
  np.testing.assert_array_equal(out["r_upd"], EXPECTED_R_UPD)


def test_memagent_mode_has_no_gate_rewards():
  out = _group_rewards(use_exit_reward=False, use_update_reward=False)
  np.testing.assert_array_equal(out["r_exit"], 0.0)
  np.testing.assert_array_equal(out["r_upd"], 0.0)
  # r_traj = r_out + r_fmt = [2, 1, 1, 0]
  np.testing.assert_array_equal(out["r_traj"], [2.0, 1.0, 1.0, 0.0])


def test_weights_and_penalties_are_parameters():
  out = _group_rewards(exit_early_penalty=-1.0, exit_late_penalty=-0.25, outcome_reward_weight=2.0,
                       format_reward_weight=0.5, exit_reward_weight=1.0,
                       update_correct_reward=0.5, update_wrong_reward=-2.0)
  # r_traj = 2 r_out + 0.5 r_fmt + r_exit with r_exit = [0, -1, -0.25, -1]
  np.testing.assert_array_equal(out["r_traj"], [2.5, -0.5, 1.75, -1.0])
  np.testing.assert_array_equal(out["r_upd"][2], [-2.0, 0.5, -2.0, 0.5])


def test_batch_of_groups_and_shape_errors():
  stack = lambda a: np.stack([a, a])
  out = rewards.group_rewards(
      stack(CORRECT), stack(MEMORY_FORMAT_OK), stack(ANSWER_FORMAT_OK), stack(ALIVE),
      stack(UPDATE_DECISION), np.broadcast_to(CHUNK_HAS_EVIDENCE, (2,) + ALIVE.shape),
      np.full((2, 4), LAST_EVIDENCE_CHUNK))
  np.testing.assert_array_equal(out["r_traj"], [EXPECTED_R_TRAJ] * 2)
  with pytest.raises(ValueError, match="update_decision has shape"):
    rewards.group_rewards(CORRECT, MEMORY_FORMAT_OK, ANSWER_FORMAT_OK, ALIVE,
                          UPDATE_DECISION[:, :3], CHUNK_HAS_EVIDENCE, LAST_EVIDENCE_CHUNK)
