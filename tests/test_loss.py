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
  token_loss, clipped, dual_clipped = loss.clipped_surrogate(LOGP, ADVANTAGES[:, None])
  np.testing.assert_allclose(token_loss, EXPECTED_TOKEN_LOSS, rtol=1e-6)
  np.testing.assert_array_equal(clipped, [[False, False, True], [True, False, False]])
  assert not np.any(dual_clipped)
  terms = _terms(LOGP)
  np.testing.assert_allclose(terms["loss_sum"], 2.04, rtol=1e-6)
  assert float(terms["token_count"]) == 6.0
  assert float(terms["clipped_token_count"]) == 2.0
  np.testing.assert_allclose(loss.token_means(terms)["loss"], 2.04 / 6, rtol=1e-6)


def test_gradient_is_zero_exactly_where_clipped():
  grad = jax.grad(lambda logp: _terms(logp)["loss_sum"])(jnp.asarray(LOGP))
  np.testing.assert_allclose(grad, EXPECTED_GRAD, rtol=1e-6)
  assert grad[0, 2] == 0.0 and grad[1, 0] == 0.0


def test_dual_clip_caps_negative_advantage_losses_at_minus_c_a():
  # rho = (0.5, 1, 2, 4, 8), c = 3:  A = -2: l = -min(rho A, clip(rho, .8, 1.28) A) =
  # (1.6, 2, 4, 8, 16) (rho .5 clipped), capped at -c A = 6 -> (1.6, 2, 4, 6, 6);
  # A = +2: (-1, -2, -2.56, -2.56, -2.56), untouched by the cap.
  ratios = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
  log_ratio = np.log(np.stack([ratios, ratios])).astype(np.float32)
  advantages = np.array([[-2.0], [2.0]], np.float32)
  token_loss, _, dual = loss.clipped_surrogate(log_ratio, advantages, clip_ratio_c=3.0)
  np.testing.assert_allclose(token_loss, [[1.6, 2, 4, 6, 6], [-1, -2, -2.56, -2.56, -2.56]],
                             rtol=1e-6)
  np.testing.assert_array_equal(dual, [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
  # With c = 0 the A < 0 losses grow with rho: 8 and 16.
  np.testing.assert_allclose(loss.clipped_surrogate(log_ratio, advantages)[0][0],
                             [1.6, 2, 4, 8, 16], rtol=1e-6)
  # In the sums: loss_sum = (1.6 + 2 + 4 + 6 + 6) + (-1 - 2 - 3 * 2.56); the capped tokens give
  # no gradient (d l / d log rho = -A rho = 2 rho only on the unclipped, uncapped A < 0 tokens).
  mask = np.ones_like(log_ratio, bool)
  terms_of = lambda lp: loss.policy_loss_terms(lp, np.zeros(lp.shape, np.float32), None,
                                               advantages[:, 0], mask, kl_beta=0.0,
                                               clip_ratio_c=3.0)
  terms = terms_of(log_ratio)
  np.testing.assert_allclose(terms["loss_sum"], 19.6 - 3 - 7.68, rtol=1e-6)
  assert float(terms["dual_clipped_token_count"]) == 2.0
  np.testing.assert_allclose(loss.token_means(terms)["dual_clip_fraction"], 0.2, rtol=1e-6)
  grad = jax.grad(lambda lp: terms_of(lp)["loss_sum"])(jnp.asarray(log_ratio))
  np.testing.assert_allclose(grad, [[0, 2, 4, 0, 0], [-1, -2, 0, 0, 0]], rtol=1e-6, atol=1e-7)


def test_log_ratio_and_kl_clamps():
  # log rho = 30 with A = +1 is clipped anyway (loss -1.28); with A = -1 and no dual-clip the
  # loss is rho = e^30 unclamped, e^20 with log_ratio_clamp 20; ratio_sum sees the clamp too.
  log_ratio = np.array([[30.0], [30.0]], np.float32)
  mask = np.ones_like(log_ratio, bool)
  adv = np.array([1.0, -1.0], np.float32)
  free = loss.policy_loss_terms(log_ratio, np.zeros_like(log_ratio), None, adv, mask, kl_beta=0.0)
  clamped = loss.policy_loss_terms(log_ratio, np.zeros_like(log_ratio), None, adv, mask,
                                   kl_beta=0.0, log_ratio_clamp=20.0)
  np.testing.assert_allclose(free["loss_sum"], math.exp(30) - 1.28, rtol=1e-6)
  np.testing.assert_allclose(clamped["loss_sum"], math.exp(20) - 1.28, rtol=1e-6)
  np.testing.assert_allclose(clamped["ratio_sum"], 2 * math.exp(20), rtol=1e-6)
  # k3 with r = ref - logp = 3: e^3 - 3 - 1 = 16.09 -> 10 with kl_clamp 10; r = 25 -> e^20 - 21
  # with log_ratio_clamp 20 alone, 10 with both. r = -3: e^-3 + 2 = 2.05, under the clamp.
  np.testing.assert_allclose(loss.k3_kl(0.0, 3.0), math.exp(3) - 4, rtol=1e-6)
  np.testing.assert_allclose(loss.k3_kl(0.0, 3.0, kl_clamp=10.0), 10.0)
  np.testing.assert_allclose(loss.k3_kl(0.0, 25.0, log_ratio_clamp=20.0), math.exp(20) - 21,
                             rtol=1e-6)
  np.testing.assert_allclose(loss.k3_kl(0.0, 25.0, log_ratio_clamp=20.0, kl_clamp=10.0), 10.0)
  np.testing.assert_allclose(loss.k3_kl(0.0, -3.0, kl_clamp=10.0), math.exp(-3) + 2, rtol=1e-6)
  # A clamped KL gives no gradient: d/d logp of k3 = 1 - e^r, 0 where the clamp binds.
  grad = jax.grad(lambda lp: jnp.sum(loss.k3_kl(lp, jnp.array([3.0, 1.0]), kl_clamp=10.0)))(
      jnp.zeros(2))
  np.testing.assert_allclose(grad, [0.0, 1 - math.e], rtol=1e-6)


def test_with_the_safety_terms_off_the_loss_is_the_old_formula_bit_for_bit():
  rng = np.random.default_rng(1)
  logp = rng.normal(-2, 0.5, (4, 6)).astype(np.float32)
  old = logp + rng.normal(0, 0.4, (4, 6)).astype(np.float32)
  ref = logp + rng.normal(0, 0.4, (4, 6)).astype(np.float32)
  adv = rng.normal(0, 1, 4).astype(np.float32)
  mask = rng.random((4, 6)) < 0.8

  @jax.jit
  def old_loss_sum(lp):  # loss.py before issue 19
    log_ratio = jnp.where(mask, lp - old, 0.0)
    ratio = jnp.exp(log_ratio)
    a = adv[:, None]
    policy = -jnp.minimum(ratio * a, jnp.clip(ratio, 0.8, 1.28) * a)
    r = jnp.where(mask, ref, 0.0) - jnp.where(mask, lp, 0.0)
    return jnp.sum(jnp.where(mask, policy + 0.01 * (jnp.exp(r) - r - 1.0), 0.0))

  new_loss_sum = jax.jit(lambda lp: loss.policy_loss_terms(lp, old, ref, adv, mask,
                                                           kl_beta=0.01)["loss_sum"])
  np.testing.assert_array_equal(new_loss_sum(logp), old_loss_sum(logp))
  np.testing.assert_array_equal(jax.grad(new_loss_sum)(logp), jax.grad(old_loss_sum)(logp))


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
