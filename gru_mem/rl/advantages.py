"""Group-relative advantages of GRU-Mem: trajectory level, turn level, and their mix.

Layout as in rewards.py: per-trajectory arrays `[..., G]`, per-turn arrays `[..., G, T]` with an
`alive [..., G, T]` mask; leading axes are groups (e.g. `[num_groups, G, T]`). The group axis is
-1 for per-trajectory arrays and -2 for per-turn arrays, so a batch of groups needs no vmap.
Everything is jnp and runs under jit (flags such as `normalize_advantage_std` are static Python
values) on a batch sharded by group; numpy inputs work too (`np.asarray` the results).
"""

from __future__ import annotations

import jax.numpy as jnp


def trajectory_advantages(r_traj, *, normalize_advantage_std=False, advantage_std_eps=1e-6):
  """A_traj[g] = r_traj[g] - mean_g' r_traj[g'].  [..., G]

  With normalize_advantage_std, A_traj[g] = (r_traj[g] - mean) / (std + eps), std over the group
  (population std, ddof = 0).
  """
  r_traj = jnp.asarray(r_traj, jnp.float32)
  centred = r_traj - jnp.mean(r_traj, axis=-1, keepdims=True)
  if normalize_advantage_std:
    centred = centred / (jnp.std(r_traj, axis=-1, keepdims=True) + advantage_std_eps)
  return centred


def turn_advantages(r_upd, alive):
  """A_turn[g, t] = r_upd[g, t] - mean_{g' alive at t} r_upd[g', t]; 0 where g is not alive.

  r_upd, alive: [..., G, T] -> [..., G, T].

  The baseline of turn t averages only the rollouts that still read chunk t.
  """
  r_upd = jnp.asarray(r_upd, jnp.float32)
  alive = jnp.asarray(alive, jnp.bool_)
  alive_count = jnp.sum(alive, axis=-2, keepdims=True)  # [..., 1, T]
  alive_sum = jnp.sum(jnp.where(alive, r_upd, 0.0), axis=-2, keepdims=True)
  alive_mean = alive_sum / jnp.maximum(alive_count, 1)
  return jnp.where(alive, r_upd - alive_mean, 0.0)


def mix_advantages(traj_advantage, turn_advantage, alive, *, alpha=0.9):
  """A[g, t] = alpha * A_traj[g] + (1 - alpha) * A_turn[g, t] for memory turns; 0 where not alive.

  traj_advantage [..., G], turn_advantage and alive [..., G, T] -> [..., G, T].
  """
  mixed = alpha * traj_advantage[..., None] + (1.0 - alpha) * turn_advantage
  return jnp.where(alive, mixed, 0.0)


def group_advantages(r_traj, r_upd, alive, *, alpha=0.9, normalize_advantage_std=False,
                     advantage_std_eps=1e-6):
  """Advantages of every turn: (memory_advantage [..., G, T], answer_advantage [..., G]).

  memory_advantage[g, t] = alpha * A_traj[g] + (1 - alpha) * A_turn[g, t] (0 where not alive) and
  answer_advantage[g] = A_traj[g]. Every response token of a turn gets its turn's advantage.
  MemAgent: alpha = 1 (its r_upd is all zero anyway).
  """
  alive = jnp.asarray(alive, jnp.bool_)
  if alive.ndim < 2 or jnp.shape(r_upd) != alive.shape or jnp.shape(r_traj) != alive.shape[:-1]:
    raise ValueError(f"shapes r_traj {jnp.shape(r_traj)}, r_upd {jnp.shape(r_upd)}, alive "
                     f"{alive.shape}: expected [..., G], [..., G, T], [..., G, T]")
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha}: must be in [0, 1] (weight of the trajectory advantage)")
  answer_advantage = trajectory_advantages(r_traj, normalize_advantage_std=normalize_advantage_std,
                                           advantage_std_eps=advantage_std_eps)
  memory_advantage = mix_advantages(answer_advantage, turn_advantages(r_upd, alive), alive,
                                    alpha=alpha)
  return memory_advantage, answer_advantage


def zero_advantage_groups(memory_advantage, answer_advantage, *, dynamic_sampling_atol=1e-6):
  """Dynamic sampling: True for each group whose every advantage is zero (|A| <= atol): drop it.

  memory_advantage [..., G, T], answer_advantage [..., G] -> [...] bool. Such a group gives no
  gradient from the policy term; the trainer drops it and draws more prompts to refill the batch.
  """
  memory_zero = jnp.all(jnp.abs(memory_advantage) <= dynamic_sampling_atol, axis=(-2, -1))
  answer_zero = jnp.all(jnp.abs(answer_advantage) <= dynamic_sampling_atol, axis=-1)
  return jnp.logical_and(memory_zero, answer_zero)
