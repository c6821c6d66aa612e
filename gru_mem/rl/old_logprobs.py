"""pi_old from the learner: one forward over the rollout's rows before the update.

The sampler's log-probs are pi_old only when it computes exactly what the learner computes.
A rollout copy in another dtype (bfloat16) or layout (other reductions) gives slightly
different numbers, and the importance ratio rho = pi_theta / pi_old of an unchanged policy
is then not 1: the clip acts on sampler noise. With `rl.recompute_old_logprobs` (what verl and
MemAgent do) the learner recomputes

  log pi_old(y_t) = log pi_theta_old(y_t | x, y_<t)     (learner params, before the update)

for every response token, and the step reports how far the sampler was from it:

  rollout/logprob_gap = sum_t |log pi_sampler(y_t) - log pi_old(y_t)| / (response tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gru_mem.rl import learner
from gru_mem.rl.batch import Batch


@jax.jit
def logprob_gap(sampler_logprobs, learner_logprobs, response_mask):
  """Mean over response tokens of |log pi_sampler - log pi_learner| ([micro, rows, response])."""
  gap = jnp.where(response_mask, jnp.abs(sampler_logprobs - learner_logprobs), 0.0)
  return jnp.sum(gap) / jnp.maximum(jnp.sum(response_mask), 1)


def recompute(config, params, batch: Batch, mesh=None) -> tuple[Batch, dict]:
  """(batch with old_logprobs = the learner's log-probs under `params`, {"rollout/logprob_gap"})."""
  learner_logprobs = learner.policy_log_probs(config, params, batch, mesh)
  if isinstance(batch.old_logprobs, jax.Array):  # keep the packed batch's placement
    learner_logprobs = jax.device_put(learner_logprobs, batch.old_logprobs.sharding)
  gap = logprob_gap(batch.old_logprobs, learner_logprobs, batch.response_mask)
  return batch.replace(old_logprobs=learner_logprobs), {"rollout/logprob_gap": float(gap)}
