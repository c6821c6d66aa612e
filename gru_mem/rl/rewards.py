"""GRU-Mem rewards: per-trajectory outcome, format and exit rewards, per-turn update rewards.

Layout. A group is the G rollouts of one question; a batch of groups adds leading axes, so every
function takes `[..., G]` per-trajectory arrays and `[..., G, T]` per-turn arrays (T = T_max, the
most memory turns any rollout of the batch took). Memory turn t reads chunk t (0-based) of the
document, and the turns of a rollout are a prefix: `alive[..., g, t]` is True for t < T_g. After its
T_g memory turns each rollout has one answer turn.

Inputs are already-parsed arrays (strings stay out of rl/):
  correct           [..., G] bool   the boxed answer matches a gold answer (data/metrics.py)
  memory_format_ok  [..., G, T] bool  the memory turn's response parsed (agent/parse.py decides
                                       what that means for the mode); ignored where not alive
  answer_format_ok  [..., G] bool   the answer turn holds a `\\boxed{...}` answer
  update_decision   [..., G, T] int  gates.UPDATE_YES / UPDATE_NO / INVALID
  chunk_has_evidence [..., G, T] bool  chunk t overlaps an evidence span (broadcast per group)
  last_evidence_chunk [..., G] int  index of the last chunk holding evidence (-1: none)

All functions are jnp, jit-able, and accept numpy arrays. The reward weights and penalties are
keyword arguments whose defaults are the paper's values; configs/base.py holds them as `rl.*`.
"""

from __future__ import annotations

import jax.numpy as jnp

from gru_mem import gates

EXIT_EARLY, EXIT_EXACT, EXIT_LATE = -1, 0, 1


def outcome_reward(correct):
  """r_out[g] = 1 if the boxed answer of rollout g matches a gold answer, else 0.  [..., G]"""
  return jnp.asarray(correct).astype(jnp.float32)


def format_reward(memory_format_ok, answer_format_ok, alive):
  """r_fmt[g] = 1 iff every turn of rollout g parsed, else 0.  [..., G]

  r_fmt = 1[ all_{t < T_g} memory_format_ok[g, t]  and  answer_format_ok[g] ]; the answer turn is
  well-formed iff it holds a `\\boxed{...}` answer. Turns past T_g (not alive) do not count.
  """
  memory_ok = jnp.all(jnp.logical_or(memory_format_ok, jnp.logical_not(alive)), axis=-1)
  return jnp.logical_and(memory_ok, answer_format_ok).astype(jnp.float32)


def exit_chunk_from_alive(alive):
  """exit_chunk[g] = T_g - 1: the chunk after which rollout g stopped reading.  [..., G] int32

  Covers both ways to stop: saying `end` at turn t (T_g = t + 1) and running out of chunks
  without ever saying `end` (the exit chunk is then the last chunk read).
  """
  return jnp.sum(jnp.asarray(alive, jnp.int32), axis=-1) - 1


def exit_timing(exit_chunk, last_evidence_chunk):
  """sign(exit_chunk - last_evidence_chunk): EXIT_EARLY (-1), EXIT_EXACT (0) or EXIT_LATE (+1)."""
  return jnp.sign(jnp.asarray(exit_chunk, jnp.int32) - jnp.asarray(last_evidence_chunk, jnp.int32))


def exit_reward(exit_chunk, last_evidence_chunk, *, exit_early_penalty=-0.75,
                exit_late_penalty=-0.5):
  """r_exit[g] = 0 if exit_chunk == last_evidence_chunk, -0.75 if earlier, -0.5 later. [..., G]"""
  timing = exit_timing(exit_chunk, last_evidence_chunk)
  return jnp.where(timing < 0, exit_early_penalty,
                   jnp.where(timing > 0, exit_late_penalty, 0.0)).astype(jnp.float32)


def trajectory_reward(r_out, r_fmt, r_exit, *, outcome_reward_weight=1.0, format_reward_weight=1.0,
                      exit_reward_weight=1.0):
  """r_traj[g] = w_out * r_out[g] + w_exit * r_exit[g] + w_fmt * r_fmt[g] (paper: w = 1) [..., G]"""
  return (outcome_reward_weight * r_out + exit_reward_weight * r_exit
          + format_reward_weight * r_fmt).astype(jnp.float32)


def update_reward(update_decision, chunk_has_evidence, alive, *, update_correct_reward=1.0,
                  update_wrong_reward=-1.0):
  """r_upd[g, t] = +1 if U_t == 1[chunk t holds evidence], else -1; 0 where not alive.  [..., G, T]

  An INVALID (unparseable) gate matches neither and counts as wrong.
  """
  update_decision = jnp.asarray(update_decision)
  wanted = jnp.where(chunk_has_evidence, gates.UPDATE_YES, gates.UPDATE_NO)
  reward = jnp.where(update_decision == wanted, update_correct_reward, update_wrong_reward)
  return jnp.where(alive, reward, 0.0).astype(jnp.float32)


def group_rewards(correct, memory_format_ok, answer_format_ok, alive, update_decision,
                  chunk_has_evidence, last_evidence_chunk, *, use_exit_reward=True,
                  use_update_reward=True, exit_early_penalty=-0.75, exit_late_penalty=-0.5,
                  outcome_reward_weight=1.0, format_reward_weight=1.0, exit_reward_weight=1.0,
                  update_correct_reward=1.0, update_wrong_reward=-1.0, evidence_known=None):
  """Every reward of a batch of rollouts, as a dict of arrays (see the module docstring for inputs).

  Returns r_out, r_fmt, r_exit, r_traj [..., G] and r_upd [..., G, T], plus exit_chunk and
  exit_timing [..., G] for metrics. Modes: `gru_mem` uses both gate rewards; `gru_mem_no_exit`
  sets use_exit_reward=False (every rollout reads to the end); `memagent` sets both False
  (r_exit = 0, r_upd = 0; pair it with alpha = 1 in the advantages). `update_decision` and
  `chunk_has_evidence` are then ignored and may be None. `evidence_known` [..., G] bool (None:
  all known): where False (an example whose evidence could not be recovered) r_exit and r_upd
  are 0, so the example trains on outcome and format only.
  """
  alive = jnp.asarray(alive, jnp.bool_)
  if alive.ndim < 2:
    raise ValueError(f"alive has shape {alive.shape}: expected [..., G, T] "
                     "(rollouts x memory turns)")
  per_turn = {"memory_format_ok": memory_format_ok}
  if use_update_reward:
    per_turn.update(update_decision=update_decision, chunk_has_evidence=chunk_has_evidence)
  for name, value in per_turn.items():
    shape = jnp.shape(value)
    try:
      fits = jnp.broadcast_shapes(shape, alive.shape) == alive.shape
    except ValueError:
      fits = False
    if not fits:
      raise ValueError(f"{name} has shape {shape}: must broadcast to alive's {alive.shape} "
                       "[..., G, T]")

  exit_chunk = exit_chunk_from_alive(alive)
  r_out = outcome_reward(correct)
  r_fmt = format_reward(memory_format_ok, answer_format_ok, alive)
  if use_exit_reward:
    r_exit = exit_reward(exit_chunk, last_evidence_chunk, exit_early_penalty=exit_early_penalty,
                         exit_late_penalty=exit_late_penalty)
  else:
    r_exit = jnp.zeros_like(r_out)
  if use_update_reward:
    r_upd = update_reward(update_decision, chunk_has_evidence, alive,
                          update_correct_reward=update_correct_reward,
                          update_wrong_reward=update_wrong_reward)
  else:
    r_upd = jnp.zeros(alive.shape, jnp.float32)
  if evidence_known is not None:
    known = jnp.asarray(evidence_known, jnp.bool_)
    r_exit = jnp.where(known, r_exit, 0.0)
    r_upd = jnp.where(known[..., None], r_upd, 0.0)
  r_traj = trajectory_reward(r_out, r_fmt, r_exit, outcome_reward_weight=outcome_reward_weight,
                             format_reward_weight=format_reward_weight,
                             exit_reward_weight=exit_reward_weight)
  return {"r_out": r_out, "r_fmt": r_fmt, "r_exit": r_exit, "r_traj": r_traj, "r_upd": r_upd,
          "exit_chunk": exit_chunk,
          "exit_timing": exit_timing(exit_chunk, last_evidence_chunk)}
