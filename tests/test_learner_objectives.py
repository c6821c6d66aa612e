"""The learner's seams: the NLL objective against a plain forward, the DAPO step bit-identical to
the pre-issue-19 formula with the safety clamps off and the NLL step to the SFT step of before the
shared step, non-finite steps skipped and counted, and the jitted step the dry run lowers being
the one training runs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import test_learner as T
from gru_mem.rl import batch as batch_lib
from gru_mem.model import logprobs
from gru_mem.rl import learner, loss, optim

UNSAFE = dataclasses.replace(T.SETTINGS, clip_ratio_c=0.0, log_ratio_clamp=0.0, kl_clamp=0.0)


def old_step(state, batch, config, settings):
  """The DAPO step as written before issue 19 (no clamps, no dual-clip, no non-finite guard)."""
  def terms_of(params, micro):
    logits = learner.response_logits(config, params, micro)
    logits32 = logits.astype(jnp.float32)
    # the picked logit as the learner takes it (a masked sum; a gather differs in the last bit
    # of a few gradients, model/logprobs.py)
    picked = logprobs.pick(logits32, micro.response_tokens)
    logp = picked - jax.nn.logsumexp(logits32, axis=-1)
    mask = micro.response_mask
    log_ratio = jnp.where(mask, logp - micro.old_logprobs, 0.0)
    ratio = jnp.exp(log_ratio)
    adv = micro.advantages[..., None]
    policy = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - settings.clip_eps_low,
                                                1 + settings.clip_eps_high) * adv)
    r = jnp.where(mask, micro.ref_logprobs, 0.0) - jnp.where(mask, logp, 0.0)
    kl = jnp.exp(r) - r - 1.0
    total = jnp.sum(jnp.where(mask, policy + settings.kl_beta * kl, 0.0))
    return total, {"loss_sum": total, "token_count": jnp.sum(mask, dtype=jnp.float32)}

  grad_fn = jax.value_and_grad(terms_of, has_aux=True)
  zero = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
          {"loss_sum": jnp.zeros(()), "token_count": jnp.zeros(())})

  def body(index, carry):
    (_, terms), grads = grad_fn(state.params, batch.micro_batch(index))
    return (jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry[0], grads),
            jax.tree.map(jnp.add, carry[1], terms))

  grad_sum, terms = jax.lax.fori_loop(0, learner.num_micro_batches(batch), body, zero)
  tokens = terms["token_count"]
  grads = jax.tree.map(lambda g, p: (g / jnp.maximum(tokens, 1.0)).astype(p.dtype), grad_sum,
                       state.params)
  updates, opt_state = optim.make_optimizer(settings).update(grads, state.opt_state, state.params)
  return (learner.TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1),
          {"loss": terms["loss_sum"] / jnp.maximum(tokens, 1.0),
           "grad_norm": optax.global_norm(grads)})


def test_dapo_step_without_the_safety_clamps_is_bit_identical_to_the_old_formula():
  batch = batch_lib.pack_rows(T.make_rows(7, num_rows=11), T.BUCKETS, 4)
  settings = dataclasses.replace(UNSAFE, micro_batch_rows=4)
  step = learner.make_train_step(T.CONFIG, settings)
  metrics = assert_steps_bit_identical(step, old_step, settings, batch)
  assert all(float(m["nonfinite"]) == 0.0 for m in metrics)


def assert_steps_bit_identical(step, reference_step, settings, batch, steps=3):
  """Runs `step` and the jitted reference from the same fresh state for a few steps: every
  metric of the reference and the final state equal to the last bit; returns step's metrics."""
  new_state, old_state = T.fresh_state(settings), T.fresh_state(settings)
  old = jax.jit(functools.partial(reference_step, config=T.CONFIG, settings=settings))
  history = []
  for _ in range(steps):
    new_state, new_metrics = step(new_state, batch)
    old_state, old_metrics = old(old_state, batch)
    for name in old_metrics:
      np.testing.assert_array_equal(new_metrics[name], old_metrics[name], err_msg=name)
    history.append(new_metrics)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state), jax.device_get(old_state))
  return history


def old_sft_step(state, batch, config, settings):
  """The SFT step as `sft._sft_step` wrote it before the shared step (commit 91f7337): the
  log-softmax gathered at the token, one divisor max(N, 1) for every leaf, no non-finite guard."""
  def terms_of(params, micro):
    logits = learner.response_logits(config, params, micro)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(log_probs, micro.response_tokens[..., None], axis=-1)[..., 0]
    nll = -jnp.sum(jnp.where(micro.response_mask, logp, 0.0))
    return nll, {"nll_sum": nll, "token_count": jnp.sum(micro.response_mask).astype(jnp.float32)}

  grad_fn = jax.grad(terms_of, has_aux=True)
  zero = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
          {"nll_sum": jnp.zeros(()), "token_count": jnp.zeros(())})

  def body(index, carry):
    grads, terms = grad_fn(state.params, batch.micro_batch(index))
    return (jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry[0], grads),
            jax.tree.map(jnp.add, carry[1], terms))

  grad_sum, terms = jax.lax.fori_loop(0, learner.num_micro_batches(batch), body, zero)
  tokens = jnp.maximum(terms["token_count"], 1.0)
  grads = jax.tree.map(lambda g, p: (g / tokens).astype(p.dtype), grad_sum, state.params)
  updates, opt_state = optim.make_optimizer(settings).update(grads, state.opt_state, state.params)
  return (learner.TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1),
          {"loss": terms["nll_sum"] / tokens, "grad_norm": optax.global_norm(grads)})


def test_nll_step_is_bit_identical_to_the_old_sft_step():
  """Stage 1 keeps its numbers: a per-leaf division by the token count would be compiled into a
  multiplication by its reciprocal, and the masked-sum pick rounds some gradients differently."""
  rows = [batch_lib.LearnerRow(r.prompt_ids, r.response_ids, 1.0, r.old_logprobs)
          for r in T.make_rows(8, num_rows=11)]
  settings = dataclasses.replace(T.SETTINGS, micro_batch_rows=4, kl_beta=0.0,
                                 compute_entropy=False, learning_rate=1e-2)
  batch = batch_lib.pack_rows(rows, T.BUCKETS, 4)
  step = learner.make_train_step(T.CONFIG, settings, objective=learner.NLL)
  assert_steps_bit_identical(step, old_sft_step, settings, batch)


@pytest.mark.parametrize("poison", ["advantage", "old_logprob", "param"])
def test_a_non_finite_step_is_skipped_counted_and_does_not_poison_adam(poison):
  settings = dataclasses.replace(T.SETTINGS, micro_batch_rows=4)
  step = learner.make_train_step(T.CONFIG, settings)
  good = batch_lib.pack_rows(T.make_rows(8, num_rows=6), T.BUCKETS, 4)
  state = T.fresh_state(settings)
  if poison == "advantage":  # packed past pack_rows's finiteness check
    bad = good.replace(advantages=np.where(np.arange(4) == 1, np.nan, good.advantages))
  elif poison == "old_logprob":  # NaN survives the log-ratio clamp (clip(NaN) is NaN)
    bad = good.replace(old_logprobs=good.old_logprobs.at[0, 2, 0].set(np.nan)
                       if isinstance(good.old_logprobs, jax.Array)
                       else np.where(np.indices(good.old_logprobs.shape)[2] == 0, np.nan,
                                     good.old_logprobs))
  else:
    bad = good
    leaves, treedef = jax.tree.flatten(state.params)
    leaves[3] = leaves[3].at[(0,) * leaves[3].ndim].set(jnp.nan)
    state = learner.TrainState(jax.tree.unflatten(treedef, leaves), state.opt_state, state.step)
  before = jax.device_get(state)
  state, metrics = step(state, bad)
  assert float(metrics["nonfinite"]) == 1.0
  assert not np.isfinite(float(metrics["loss"])) or not np.isfinite(float(metrics["grad_norm"]))
  after = jax.device_get(state)
  jax.tree.map(np.testing.assert_array_equal, after, before)  # params, Adam moments, count, step
  assert int(after.step) == 0
  if poison != "param":
    # The next good step is exactly the first good step of a fresh state.
    state, metrics = step(state, good)
    fresh, fresh_metrics = step(T.fresh_state(settings), good)
    assert float(metrics["nonfinite"]) == 0.0 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(fresh))


def test_nll_objective_matches_a_plain_forward_and_micro_batching_is_exact():
  rows = [batch_lib.LearnerRow(r.prompt_ids, r.response_ids, 1.0, r.old_logprobs)
          for r in T.make_rows(9, num_rows=6, with_ref=False)]
  params = T.params_of(0)
  logp = np.asarray(T.teacher_forced_log_probs(params, rows))
  results = []
  for micro_rows in (2, 8):
    settings = learner.LearnerSettings(learning_rate=1e-2, kl_beta=0.0, micro_batch_rows=micro_rows,
                                       length_buckets=T.BUCKETS, compute_entropy=False,
                                       adam_eps=1e-4)
    batch = batch_lib.pack_rows(rows, T.BUCKETS, micro_rows)
    evaluated = learner.evaluate_objective(T.CONFIG, params, batch, learner.NLL)
    np.testing.assert_allclose(evaluated["loss"], -logp.mean(), rtol=1e-5)
    assert 0.0 <= evaluated["token_accuracy"] <= 1.0
    state, metrics = learner.make_train_step(T.CONFIG, settings, objective=learner.NLL)(
        learner.create_train_state(params, settings), batch)
    metrics = jax.device_get(metrics)
    assert set(metrics) == {"loss", "token_accuracy", "grad_norm", "tokens", "learning_rate",
                            "nonfinite"}
    np.testing.assert_allclose(metrics["loss"], -logp.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["token_accuracy"], evaluated["token_accuracy"])
    expected_grad = jax.grad(lambda p: -jnp.mean(T.teacher_forced_log_probs(p, rows)))(params)
    np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(expected_grad), rtol=1e-4)
    results.append(jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *results)


def test_greedy_token_accuracy_counts_argmax_hits():
  """The model's own greedy continuation scores 5 of 5; a random response scores what a plain
  forward's argmax says."""
  params = T.params_of(0)
  prompt = np.array([5, 9, 2, 7], np.int32)
  tokens = list(prompt)
  for _ in range(5):
    logits, _ = T.transformer.forward(T.CONFIG, params, jnp.asarray(tokens)[None])
    tokens.append(int(jnp.argmax(logits[0, -1])))
  greedy = np.array(tokens[len(prompt):], np.int32)
  other = np.random.default_rng(0).integers(1, T.CONFIG.vocab_size, 5).astype(np.int32)
  sequence = jnp.asarray(np.concatenate([prompt, other]))[None]
  logits, _ = T.transformer.forward(T.CONFIG, params, sequence)
  hits = int((np.argmax(np.asarray(logits[0, len(prompt) - 1:-1]), -1) == other).sum())
  rows = [batch_lib.LearnerRow(prompt, greedy, 1.0, np.zeros(5, np.float32)),
          batch_lib.LearnerRow(prompt, other, 1.0, np.zeros(5, np.float32))]
  batch = batch_lib.pack_rows(rows, T.BUCKETS, 2)
  assert learner.evaluate_objective(T.CONFIG, params, batch)["token_accuracy"] == (5 + hits) / 10


def test_the_dry_run_lowers_the_jit_that_training_runs():
  settings = dataclasses.replace(T.SETTINGS, micro_batch_rows=4)
  jitted = learner.train_step_jit(T.CONFIG, settings)
  assert jitted is learner.train_step_jit(T.CONFIG, settings)
  assert jitted is not learner.train_step_jit(T.CONFIG, settings, objective=learner.NLL)
  batch = batch_lib.pack_rows(T.make_rows(10, num_rows=4), T.BUCKETS, 4)
  state = T.fresh_state(settings)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), (state, batch))
  compiled = learner.lower_train_step(T.CONFIG, settings, None, *abstract).compile()
  want_state, want = learner.make_train_step(T.CONFIG, settings)(T.fresh_state(settings), batch)
  got_state, got = compiled(state, batch)
  np.testing.assert_array_equal(got["loss"], want["loss"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got_state.params),
               jax.device_get(want_state.params))


def test_safety_settings_errors():
  with pytest.raises(ValueError, match="clip_ratio_c=1.0: must be > 1"):
    learner.LearnerSettings(clip_ratio_c=1.0)
  with pytest.raises(ValueError, match="must be >= 0"):
    learner.LearnerSettings(kl_clamp=-1.0)
  assert loss.at_least_one(0.0) == 1.0
