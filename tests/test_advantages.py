"""Advantages against hand-computed tables; rollouts exit at different turns (alive set shrinks)."""

import math

import jax
import numpy as np

from gru_mem.rl import advantages

# The group of tests/test_rewards.py: g0 reads turns 0-2, g1 turn 0, g2 turns 0-3, g3 turns 0-1.
ALIVE = np.array([[1, 1, 1, 0],
                  [1, 0, 0, 0],
                  [1, 1, 1, 1],
                  [1, 1, 0, 0]], bool)
R_TRAJ = np.array([2.0, 0.25, 0.5, -0.75])
R_UPD = np.array([[1, 1, 1, 0],
                  [-1, 0, 0, 0],
                  [-1, 1, -1, 1],
                  [1, -1, 0, 0]], np.float32)

# A_traj = r_traj - mean(r_traj) = r_traj - 0.5 = [1.5, -0.25, 0, -1.25]
EXPECTED_A_TRAJ = [1.5, -0.25, 0.0, -1.25]
# A_turn, baseline = mean over the rollouts alive at t:
#   t0: alive g0-g3, r = (1, -1, -1, 1), mean 0     -> (1, -1, -1, 1)
#   t1: alive g0, g2, g3, r = (1, 1, -1), mean 1/3  -> (2/3, ., 2/3, -4/3)
#   t2: alive g0, g2, r = (1, -1), mean 0           -> (1, ., -1, .)
#   t3: alive g2 only, r = 1, mean 1                -> (., ., 0, .)
EXPECTED_A_TURN = [[1, 2 / 3, 1, 0],
                   [-1, 0, 0, 0],
                   [-1, 2 / 3, -1, 0],
                   [1, -4 / 3, 0, 0]]
# A = 0.9 A_traj + 0.1 A_turn on alive turns:
#   g0: 1.35 + (0.1, 0.0667, 0.1)     g1: -0.225 - 0.1
#   g2: 0 + (-0.1, 0.0667, -0.1, 0)   g3: -1.125 + (0.1, -0.1333)
EXPECTED_A_MEMORY = [[1.45, 1.35 + 0.2 / 3, 1.45, 0],
                     [-0.325, 0, 0, 0],
                     [-0.1, 0.2 / 3, -0.1, 0],
                     [-1.025, -1.125 - 0.4 / 3, 0, 0]]


def test_trajectory_advantages():
  np.testing.assert_allclose(advantages.trajectory_advantages(R_TRAJ), EXPECTED_A_TRAJ, atol=1e-6)
  # population std: sqrt((1.5^2 + 0.25^2 + 0 + 1.25^2) / 4) = sqrt(0.96875)
  std = math.sqrt(0.96875)
  np.testing.assert_allclose(
      advantages.trajectory_advantages(R_TRAJ, normalize_advantage_std=True, advantage_std_eps=0.0),
      [1.5 / std, -0.25 / std, 0.0, -1.25 / std], rtol=1e-6)


def test_turn_advantages_use_only_alive_rollouts():
  np.testing.assert_allclose(advantages.turn_advantages(R_UPD, ALIVE), EXPECTED_A_TURN, atol=1e-6)


def test_group_advantages_mix_and_answer_turn():
  memory, answer = advantages.group_advantages(R_TRAJ, R_UPD, ALIVE)
  np.testing.assert_allclose(memory, EXPECTED_A_MEMORY, atol=1e-6)
  np.testing.assert_allclose(answer, EXPECTED_A_TRAJ, atol=1e-6)
  # MemAgent: alpha = 1 gives every alive memory turn its trajectory's advantage.
  memory, _ = advantages.group_advantages(R_TRAJ, R_UPD, ALIVE, alpha=1.0)
  np.testing.assert_allclose(memory, np.where(ALIVE, np.array(EXPECTED_A_TRAJ)[:, None], 0),
                             atol=1e-6)


def test_under_jit_on_a_batch_of_groups():
  # Group 1: two identical rollouts (same rewards, same alive turns): every advantage is 0.
  same_alive = np.array([[1, 1, 0, 0]] * 2 + [[1, 0, 0, 0]] * 2, bool)
  same_upd = np.where(same_alive, np.array([[1.0, -1.0, 0, 0]] * 2 + [[1.0, 0, 0, 0]] * 2), 0.0)
  r_traj = np.stack([R_TRAJ, np.full(4, 1.25)])
  r_upd = np.stack([R_UPD, same_upd]).astype(np.float32)
  alive = np.stack([ALIVE, same_alive])

  @jax.jit
  def run(r_traj, r_upd, alive):
    memory, answer = advantages.group_advantages(r_traj, r_upd, alive, alpha=0.9)
    return memory, answer, advantages.zero_advantage_groups(memory, answer)

  memory, answer, drop = run(r_traj, r_upd, alive)
  np.testing.assert_allclose(memory[0], EXPECTED_A_MEMORY, atol=1e-6)
  np.testing.assert_allclose(answer[0], EXPECTED_A_TRAJ, atol=1e-6)
  np.testing.assert_array_equal(memory[1], 0.0)
  np.testing.assert_array_equal(drop, [False, True])


def test_zero_advantage_groups_keeps_a_group_with_only_turn_signal():
  # Same r_traj (A_traj = 0) but different gate rewards at turn 0: A = 0.1 * (+-1).
  alive = np.ones((1, 2, 1), bool)
  memory, answer = advantages.group_advantages(np.ones((1, 2)), np.array([[[1.0], [-1.0]]]), alive)
  np.testing.assert_allclose(memory[0, :, 0], [0.1, -0.1], atol=1e-6)
  np.testing.assert_array_equal(advantages.zero_advantage_groups(memory, answer), [False])
