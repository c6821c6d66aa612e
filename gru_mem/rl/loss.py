"""Multi-Conv DAPO loss: clipped surrogate + k3 KL, token-mean over every response token of a batch.

Rows are turns: each (prompt, response) turn of each trajectory is one row of `[rows, length]`
token arrays, `mask [rows, length]` marks its response tokens, and the turn's advantage
`[rows]` is broadcast over them. The loss is one mean over all response tokens of the whole batch,
so it is returned as sums and a token count: for micro-batches, differentiate each `loss_sum`, add
the gradients and the counts, and divide by the total count once. That equals the gradient of
`loss_sum / token_count` over the whole batch exactly (the count does not depend on parameters).

Safety (each 0 disables it; issue 19): dual-clip caps the loss of a negative-advantage token at
-c * A (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL"), the log-ratios
are clamped to [-r, r] before exp, and the per-token k3 KL is clamped to [-k, k].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gru_mem.model.logprobs import pick

SUM_KEYS = ("loss_sum", "policy_loss_sum", "kl_sum", "clipped_token_count",
            "dual_clipped_token_count", "ratio_sum")


def clipped_surrogate(log_ratio, advantage, *, clip_eps_low=0.2, clip_eps_high=0.28,
                      clip_ratio_c=0.0):
  """Per-token l = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A), rho = exp(log_ratio).

  The min is taken after multiplying by A, so for A < 0 the lower clip is the one that binds:
  the gradient stops at rho > 1 + eps_high when A > 0 and at rho < 1 - eps_low when A < 0.
  Dual-clip (clip_ratio_c = c > 1): for A < 0, l = min(l, -c * A), which bounds the loss (and
  zeroes the gradient) of a token whose ratio has grown past c; A >= 0 is untouched.
  Returns (loss, clipped, dual_clipped): `clipped` where the clipped term won, `dual_clipped`
  where the cap -c * A won (both have zero gradient).
  """
  ratio = jnp.exp(log_ratio)
  unclipped = ratio * advantage
  clipped = jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantage
  loss = -jnp.minimum(unclipped, clipped)
  if not clip_ratio_c:
    return loss, clipped < unclipped, jnp.zeros(jnp.shape(loss), bool)
  cap = -clip_ratio_c * advantage
  dual_clipped = (advantage < 0) & (cap < loss)
  return jnp.where(advantage < 0, jnp.minimum(loss, cap), loss), clipped < unclipped, dual_clipped


def k3_kl(logp, ref_logp, *, log_ratio_clamp=0.0, kl_clamp=0.0):
  """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(r) - r - 1 (>= 0), r = ref - logp.

  log_ratio_clamp = c clamps r to [-c, c] before exp; kl_clamp = k clamps the result to [-k, k].
  """
  log_ratio = ref_logp - logp
  if log_ratio_clamp:
    log_ratio = jnp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
  kl = jnp.exp(log_ratio) - log_ratio - 1.0
  return jnp.clip(kl, -kl_clamp, kl_clamp) if kl_clamp else kl


def policy_loss_terms(logp, old_logp, ref_logp, advantages, mask, *, clip_eps_low=0.2,
                      clip_eps_high=0.28, kl_beta=0.001, clip_ratio_c=0.0, log_ratio_clamp=0.0,
                      kl_clamp=0.0):
  """Sums of the Multi-Conv DAPO loss over the response tokens of a (micro-)batch.

  logp, old_logp, ref_logp: [rows, length] log-probs of the response tokens under the current,
  the sampling and the reference policy (ref_logp may be None when kl_beta = 0);
  advantages: [rows] (or [rows, length]); mask: [rows, length], True on response tokens.
  Per token i: loss_i = -min(rho_i A, clip(rho_i, 1-eps_low, 1+eps_high) A) + beta * k3_i,
  rho_i = exp(clamp(logp_i - old_logp_i)), capped at -c A where A < 0 (see `clipped_surrogate`,
  `k3_kl`). Returns a dict of sums over masked tokens: loss_sum, token_count, policy_loss_sum,
  kl_sum, clipped_token_count, dual_clipped_token_count, ratio_sum; the batch loss is
  loss_sum / token_count (see `token_means`). kl_beta and the clamps are static Python numbers
  (config values), not traced arrays; each 0 disables its term.
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
  if log_ratio_clamp:
    log_ratio = jnp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
  policy_loss, clipped, dual_clipped = clipped_surrogate(
      log_ratio, advantages, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
      clip_ratio_c=clip_ratio_c)
  if ref_logp is None:
    kl = jnp.zeros_like(logp)
  else:
    kl = k3_kl(jnp.where(mask, logp, 0.0), jnp.where(mask, ref_logp, 0.0),
               log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp)
  token_loss = policy_loss + kl_beta * kl if kl_beta else policy_loss

  def masked_sum(x):
    return jnp.sum(jnp.where(mask, x, 0.0))

  return {
      "loss_sum": masked_sum(token_loss),
      "token_count": jnp.sum(mask, dtype=jnp.float32),
      "policy_loss_sum": masked_sum(policy_loss),
      "kl_sum": masked_sum(kl),
      "clipped_token_count": masked_sum(clipped.astype(jnp.float32)),
      "dual_clipped_token_count": masked_sum(dual_clipped.astype(jnp.float32)),
      "ratio_sum": masked_sum(jnp.exp(log_ratio)),
  }


def add_terms(a, b):
  """Adds two dicts of sums (e.g. from two micro-batches)."""
  return jax.tree.map(jnp.add, a, b)


def at_least_one(count):
  """max(count, 1), the divisor of a token mean: jnp on device arrays, Python on host numbers."""
  return jnp.maximum(count, 1.0) if isinstance(count, jax.Array) else max(count, 1.0)


def token_means(terms):
  """Token means of a dict of sums: loss, policy_loss, kl, clip_fraction, dual_clip_fraction,
  ratio_mean."""
  count = at_least_one(terms["token_count"])
  return {
      "loss": terms["loss_sum"] / count,
      "policy_loss": terms["policy_loss_sum"] / count,
      "kl": terms["kl_sum"] / count,
      "clip_fraction": terms["clipped_token_count"] / count,
      "dual_clip_fraction": terms["dual_clipped_token_count"] / count,
      "ratio_mean": terms["ratio_sum"] / count,
  }


def token_log_probs(logits, tokens):
  """log pi(token | context) = logits[token] - logsumexp(logits), logits [rows, length, vocab]
  predicting tokens [rows, length]; float32.

  Equal to log_softmax(logits)[token] but no [rows, length, vocab] log-softmax is kept for the
  backward pass: 30% less temporary memory for the learner step (2.8 vs 4.0 GiB with 152k vocab,
  4 x 256 response slots, measured with XLA's memory analysis on CPU). logits[token] is a masked
  sum (`model.logprobs.pick`), not a gather whose gradient would be a scatter.
  """
  logits = logits.astype(jnp.float32)
  return pick(logits, tokens) - jax.nn.logsumexp(logits, axis=-1)


def log_softmax_at(logits, tokens):
  """log_softmax(logits)[token] through a gather, float32: the supervised loss's form
  (`learner.NLL`), kept so stage 1 computes the numbers it had before it shared the RL step. It
  keeps a [rows, length, vocab] log-softmax for the backward pass and its gradient is a scatter,
  which `token_log_probs` avoids (the same values up to the last bit)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


def entropy_sum(logits, mask):
  """Sum over masked tokens of H = -sum_v p_v log p_v, p = softmax(logits [rows, length, vocab])."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
  return jnp.sum(jnp.where(mask, entropy, 0.0))
