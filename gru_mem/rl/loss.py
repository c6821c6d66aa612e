"""Multi-Conv DAPO loss: clipped surrogate + k3 KL, token-mean over every response token of a batch.

Rows are turns: each (prompt, response) turn of each trajectory is one row of `[rows, length]`
token arrays, `mask [rows, length]` marks its response tokens, and the turn's advantage
`[rows]` is broadcast over them. The loss is one mean over all response tokens of the whole batch,
so it is returned as sums and a token count: for micro-batches, differentiate each `loss_sum`, add
the gradients and the counts, and divide by the total count once. That equals the gradient of
`loss_sum / token_count` over the whole batch exactly (the count does not depend on parameters).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUM_KEYS = ("loss_sum", "policy_loss_sum", "kl_sum", "clipped_token_count", "ratio_sum")


def clipped_surrogate(log_ratio, advantage, *, clip_eps_low=0.2, clip_eps_high=0.28):
  """Per-token loss -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A), rho = exp(log_ratio).

  The min is taken after multiplying by A, so for A < 0 the lower clip is the one that binds:
  the gradient stops at rho > 1 + eps_high when A > 0 and at rho < 1 - eps_low when A < 0.
  Returns (loss, clipped), `clipped` True where the clipped term won (its gradient is zero).
  """
  ratio = jnp.exp(log_ratio)
  unclipped = ratio * advantage
  clipped = jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantage
  return -jnp.minimum(unclipped, clipped), clipped < unclipped


def k3_kl(logp, ref_logp):
  """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
  log_ratio = ref_logp - logp
  return jnp.exp(log_ratio) - log_ratio - 1.0


def policy_loss_terms(logp, old_logp, ref_logp, advantages, mask, *, clip_eps_low=0.2,
                      clip_eps_high=0.28, kl_beta=0.001):
  """Sums of the Multi-Conv DAPO loss over the response tokens of a (micro-)batch.

  logp, old_logp, ref_logp: [rows, length] log-probs of the response tokens under the current,
  the sampling and the reference policy (ref_logp may be None when kl_beta = 0);
  advantages: [rows] (or [rows, length]); mask: [rows, length], True on response tokens.
  Per token i: loss_i = -min(rho_i A, clip(rho_i, 1-eps_low, 1+eps_high) A) + beta * k3_i,
  rho_i = exp(logp_i - old_logp_i). Returns a dict of sums over masked tokens:
  loss_sum, token_count, policy_loss_sum, kl_sum, clipped_token_count, ratio_sum;
  the batch loss is loss_sum / token_count (see `token_means`). kl_beta is a static Python
  number (a config value), not a traced array.
  """
  if kl_beta and ref_logp is None:
    raise ValueError(f"kl_beta={kl_beta} needs ref_logp; pass reference log-probs or set kl_beta=0")
  if jnp.shape(logp) != jnp.shape(old_logp) or jnp.shape(logp) != jnp.shape(mask):
    raise ValueError(f"logp {jnp.shape(logp)}, old_logp {jnp.shape(old_logp)} and mask "
                     f"{jnp.shape(mask)} must all be [rows, length]")
  mask = jnp.asarray(mask, jnp.bool_)
  logp = jnp.asarray(logp, jnp.float32)
  advantages = jnp.asarray(advantages, jnp.float32)
  if advantages.ndim == logp.ndim - 1:
    advantages = advantages[..., None]
  # Zero the log-ratios off the mask before exp, so padding garbage cannot put inf or NaN into
  # the sums or (through exp's derivative) into the gradient.
  log_ratio = jnp.where(mask, logp - old_logp, 0.0)
  policy_loss, clipped = clipped_surrogate(log_ratio, advantages, clip_eps_low=clip_eps_low,
                                           clip_eps_high=clip_eps_high)
  if ref_logp is None:
    kl = jnp.zeros_like(logp)
  else:
    kl = k3_kl(jnp.where(mask, logp, 0.0), jnp.where(mask, ref_logp, 0.0))
  token_loss = policy_loss + kl_beta * kl if kl_beta else policy_loss

  def masked_sum(x):
    return jnp.sum(jnp.where(mask, x, 0.0))

  return {
      "loss_sum": masked_sum(token_loss),
      "token_count": jnp.sum(mask, dtype=jnp.float32),
      "policy_loss_sum": masked_sum(policy_loss),
      "kl_sum": masked_sum(kl),
      "clipped_token_count": masked_sum(clipped.astype(jnp.float32)),
      "ratio_sum": masked_sum(jnp.exp(log_ratio)),
  }


def add_terms(a, b):
  """Adds two dicts of sums (e.g. from two micro-batches)."""
  return jax.tree.map(jnp.add, a, b)


def token_means(terms):
  """Token means of a dict of sums: loss, policy_loss, kl, clip_fraction, ratio_mean."""
  count = jnp.maximum(terms["token_count"], 1.0)
  return {
      "loss": terms["loss_sum"] / count,
      "policy_loss": terms["policy_loss_sum"] / count,
      "kl": terms["kl_sum"] / count,
      "clip_fraction": terms["clipped_token_count"] / count,
      "ratio_mean": terms["ratio_sum"] / count,
  }


def token_log_probs(logits, tokens):
  """log pi(token | context) from logits [rows, length, vocab] predicting tokens [rows, length]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


def entropy_sum(logits, mask):
  """Sum over masked tokens of H = -sum_v p_v log p_v, p = softmax(logits [rows, length, vocab])."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
  return jnp.sum(jnp.where(mask, entropy, 0.0))
