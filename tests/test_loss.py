"""Multi-Conv DAPO loss against hand-computed numbers (eps_low 0.2, eps_high 0.28)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gru_mem.rl import loss

# One row per advantage sign, one token per ratio rho in (0.5, 1, 2); old_logp = 0.
RATIOS = np.array([0.5, 1.0, 2.0])
LOGP = np.log(np.stack([RATIOS, RATIOS])).astype(np.float32)  # [2 rows, 3 tokens]
OLD_LOGP = np.zeros_like(LOGP)
ADVANTAGES = np.array([2.0, -2.0], np.float32)
MASK = np.ones_like(LOGP, bool)
# loss = -min(rho A, clip(rho, 0.8, 1.28) A):
#   A=+2: rho .5 -> -min(1.0, 1.6) = -1.0   rho 1 -> -2   rho 2 -> -min(4, 2.56) = -2.56 (clipped)
#   A=-2: rho .5 -> -min(-1.0, -1.6) = 1.6 (clipped)   rho 1 -> 2   rho 2 -> -min(-4, -2.56) = 4
EXPECTED_TOKEN_LOSS = np.array([[-1.0, -2.0, -2.56], [1.6, 2.0, 4.0]])
# d loss / d logp = -A rho where unclipped, 0 where clipped.
EXPECTED_GRAD = np.array([[-1.0, -2.0, 0.0], [0.0, 2.0, 4.0]])


def _terms(logp, **kwargs):
  kwargs.setdefault("kl_beta", 0.0)
  return loss.policy_loss_terms(logp, OLD_LOGP, None, ADVANTAGES, MASK, **kwargs)


def test_clipped_surrogate_both_signs():
  token_loss, clipped = loss.clipped_surrogate(LOGP, ADVANTAGES[:, None])
  np.testing.assert_allclose(token_loss, EXPECTED_TOKEN_LOSS, rtol=1e-6)
  np.testing.assert_array_equal(clipped, [[False, False, True], [True, False, False]])
  terms = _terms(LOGP)
  np.testing.assert_allclose(terms["loss_sum"], 2.04, rtol=1e-6)
  assert float(terms["token_count"]) == 6.0
  assert float(terms["clipped_token_count"]) == 2.0
  np.testing.assert_allclose(loss.token_means(terms)["loss"], 2.04 / 6, rtol=1e-6)


def test_gradient_is_zero_exactly_where_clipped():
  grad = jax.grad(lambda logp: _terms(logp)["loss_sum"])(jnp.asarray(LOGP))
  np.testing.assert_allclose(grad, EXPECTED_GRAD, rtol=1e-6)
  assert grad[0, 2] == 0.0 and grad[1, 0] == 0.0


def test_k3_kl():
  np.testing.assert_array_equal(loss.k3_kl(LOGP, LOGP), 0.0)
  # ref - logp = ln 2: 2 - ln 2 - 1;  ref - logp = -ln 2: 0.5 + ln 2 - 1
  np.testing.assert_allclose(loss.k3_kl(0.0, math.log(2.0)), 1 - math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(loss.k3_kl(0.0, -math.log(2.0)), math.log(2.0) - 0.5, rtol=1e-6)
  # In the loss: policy == reference gives kl_sum 0 and loss_sum unchanged.
  terms = loss.policy_loss_terms(LOGP, OLD_LOGP, LOGP, ADVANTAGES, MASK, kl_beta=0.001)
  assert float(terms["kl_sum"]) == 0.0
  np.testing.assert_allclose(terms["loss_sum"], 2.04, rtol=1e-6)
  # A reference shifted by ln 2 on all 6 tokens adds beta * 6 * (1 - ln 2).
  terms = loss.policy_loss_terms(LOGP, OLD_LOGP, LOGP + math.log(2.0), ADVANTAGES, MASK,
                                 kl_beta=0.1)
  np.testing.assert_allclose(terms["loss_sum"], 2.04 + 0.1 * 6 * (1 - math.log(2.0)), rtol=1e-5)
  with pytest.raises(ValueError, match="needs ref_logp"):
    loss.policy_loss_terms(LOGP, OLD_LOGP, None, ADVANTAGES, MASK, kl_beta=0.001)


def test_micro_batches_add_up_and_padding_is_ignored():
  rng = np.random.default_rng(0)
  rows, length = 6, 5
  logp = rng.normal(-2, 0.5, (rows, length)).astype(np.float32)
  old_logp = logp + rng.normal(0, 0.3, (rows, length)).astype(np.float32)
  ref_logp = logp + rng.normal(0, 0.3, (rows, length)).astype(np.float32)
  adv = rng.normal(0, 1, rows).astype(np.float32)
  mask = rng.random((rows, length)) < 0.7
  # Garbage on padding must not leak into sums or gradients.
  logp = np.where(mask, logp, 80.0).astype(np.float32)

  def terms(rows_slice):
    s = rows_slice
    return loss.policy_loss_terms(logp[s], old_logp[s], ref_logp[s], adv[s], mask[s], kl_beta=0.01)

  whole = terms(slice(None))
  halves = loss.add_terms(terms(slice(0, 3)), terms(slice(3, None)))
  for key in whole:
    np.testing.assert_allclose(halves[key], whole[key], rtol=1e-5, err_msg=key)
  assert float(whole["token_count"]) == mask.sum()
  assert np.isfinite(float(whole["loss_sum"]))

  # Gradient of the summed micro-batch losses / total count == gradient of the whole-batch mean.
  def whole_mean(lp):
    t = loss.policy_loss_terms(lp, old_logp, ref_logp, adv, mask, kl_beta=0.01)
    return t["loss_sum"] / t["token_count"]

  def half_sum(lp, s):
    return loss.policy_loss_terms(lp, old_logp[s], ref_logp[s], adv[s], mask[s],
                                  kl_beta=0.01)["loss_sum"]

  grad_whole = jax.grad(whole_mean)(jnp.asarray(logp))
  grad_parts = jnp.concatenate([jax.grad(half_sum)(jnp.asarray(logp[s]), s)
                                for s in (slice(0, 3), slice(3, None))]) / mask.sum()
  assert np.all(np.isfinite(grad_whole))
  np.testing.assert_array_equal(np.asarray(grad_whole)[~mask], 0.0)
  np.testing.assert_allclose(grad_parts, grad_whole, rtol=1e-5, atol=1e-8)


def test_entropy_and_token_log_probs():
  # Token 0: uniform over 4 -> ln 4.  Token 1: p = (1/4, 3/4) (+ two -inf-like logits) ->
  # -(1/4 ln 1/4 + 3/4 ln 3/4).  Token 2 is masked out.
  logits = np.array([[[0.0, 0.0, 0.0, 0.0],
                      [0.0, math.log(3.0), -1e9, -1e9],
                      [5.0, 0.0, 0.0, 0.0]]], np.float32)
  mask = np.array([[True, True, False]])
  expected = math.log(4.0) - (0.25 * math.log(0.25) + 0.75 * math.log(0.75))
  np.testing.assert_allclose(loss.entropy_sum(logits, mask), expected, rtol=1e-6)
  np.testing.assert_allclose(loss.token_log_probs(logits, np.array([[2, 1, 0]]))[0, :2],
                             [math.log(0.25), math.log(0.75)], rtol=1e-6)
