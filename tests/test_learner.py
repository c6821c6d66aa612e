"""Learner: exact micro-batching, the loss against a hand computation, learning direction,
on-policy ratios, bounded compiles, non-finite steps skipped, the NLL objective, and a sharded
step equal to the single-device one."""

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gru_mem.model import config as model_config
from gru_mem.model import transformer
from gru_mem.rl import batch as batch_lib
from gru_mem.rl import learner, loss, optim

CONFIG = model_config.preset("tiny", vocab_size=64)
BUCKETS = (16, 32, 48)
# kl_beta large enough that the KL term visibly moves the loss. adam_eps 1e-4 keeps Adam's update
# g / (|g| + eps) smooth in g, so float rounding in a near-zero gradient cannot flip a weight's
# step from -lr to +lr and two equal-up-to-rounding gradients give equal parameters.
SETTINGS = learner.LearnerSettings(learning_rate=1e-3, kl_beta=0.05, micro_batch_rows=8,
                                   length_buckets=BUCKETS, max_grad_norm=1.0, adam_eps=1e-4)


@functools.lru_cache(maxsize=None)
def params_of(seed, config=CONFIG):
  return transformer.init_params(config, jax.random.PRNGKey(seed))


@functools.lru_cache(maxsize=None)
def step_fn(settings, config=CONFIG):
  return learner.make_train_step(config, settings)


def make_rows(seed, num_rows=8, with_ref=True, max_prompt=20, max_response=12):
  """Rows of different prompt and response lengths with random pi_old / pi_ref log-probs."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(num_rows):
    prompt = rng.integers(1, CONFIG.vocab_size, rng.integers(2, max_prompt + 1))
    response = rng.integers(1, CONFIG.vocab_size, rng.integers(1, max_response + 1))
    old = rng.normal(np.log(1 / CONFIG.vocab_size), 0.3, len(response)).astype(np.float32)
    ref = rng.normal(np.log(1 / CONFIG.vocab_size), 0.3, len(response)).astype(np.float32)
    rows.append(batch_lib.LearnerRow(prompt, response, float(rng.normal()), old,
                                   ref if with_ref else None))
  return rows


def fresh_state(settings, seed=0):
  return learner.create_train_state(params_of(seed), settings)


def teacher_forced_log_probs(params, rows, with_entropy=False):
  """log pi of every response token, concatenated over rows, from one plain forward (and the
  entropy -sum_v p_v log p_v of the distribution that scores each token).

  Each row is prompt + response padded on the right to a common length; the logits over the full
  vocabulary at every position come from `transformer.forward`, and response token j of a row with
  a prompt of P tokens is scored by the logits at position P - 1 + j.
  """
  length = max(len(r.prompt_ids) + len(r.response_ids) for r in rows)
  tokens = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), bool)
  row_index, position, target = [], [], []
  for i, row in enumerate(rows):
    sequence = np.concatenate([row.prompt_ids, row.response_ids])
    tokens[i, :len(sequence)], mask[i, :len(sequence)] = sequence, True
    prompt_len, response_len = len(row.prompt_ids), len(row.response_ids)
    row_index += [i] * response_len
    position += list(range(prompt_len - 1, prompt_len - 1 + response_len))
    target += list(row.response_ids)
  logp, entropy = _score(params, tokens, mask, np.array(row_index), np.array(position),
                         np.array(target))
  return (logp, entropy) if with_entropy else logp


@jax.jit
def _score(params, tokens, mask, row_index, position, target):
  logits, _ = transformer.forward(CONFIG, params, tokens, mask=mask)  # [rows, length, vocab]
  log_probs = jax.nn.log_softmax(logits, axis=-1)[row_index, position]  # [tokens, vocab]
  entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
  return log_probs[jnp.arange(len(target)), target], entropy


def reference_loss(params, rows, eps_low, eps_high, beta):
  """mean over all response tokens of -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) + beta k3."""
  logp = teacher_forced_log_probs(params, rows)
  old, ref = (np.concatenate([getattr(r, name) for r in rows])
              for name in ("old_logprobs", "ref_logprobs"))
  advantage = np.concatenate([np.full(len(r.response_ids), r.advantage) for r in rows])
  rho = jnp.exp(logp - old)
  surrogate = -jnp.minimum(rho * advantage, jnp.clip(rho, 1 - eps_low, 1 + eps_high) * advantage)
  k3 = jnp.exp(ref - logp) - (ref - logp) - 1
  return jnp.mean(surrogate + beta * k3)


def test_pack_rows_layout():
  rows = make_rows(0, num_rows=5)
  batch = batch_lib.pack_rows(rows, BUCKETS, micro_batch_rows=2, pad_id=0)
  # 5 rows -> 3 micro-batches of 2 -> rounded up to 4.
  assert batch.tokens.shape[:2] == (4, 2) and int(batch.num_rows) == 5
  row, flat = rows[3], jax.tree.map(lambda x: x.reshape(8, *x.shape[2:]), batch.replace(num_rows=None))
  prompt_len, response_len = len(row.prompt_ids), len(row.response_ids)
  np.testing.assert_array_equal(flat.tokens[3, :prompt_len + response_len],
                                np.concatenate([row.prompt_ids, row.response_ids]))
  # The hidden state at predict_positions[j] predicts the token right after it: response j.
  positions = flat.predict_positions[3, :response_len]
  np.testing.assert_array_equal(flat.tokens[3, positions + 1], row.response_ids)
  np.testing.assert_array_equal(flat.old_logprobs[3, :response_len], row.old_logprobs)
  assert flat.response_mask[3].sum() == response_len and not flat.response_mask[5:].any()
  assert flat.advantages[3] == np.float32(row.advantage)
  for values, row in zip(batch_lib.response_values(batch, batch.ref_logprobs), rows):
    np.testing.assert_array_equal(values, row.ref_logprobs)
  with pytest.raises(ValueError, match="exceeds the largest length bucket 48"):
    batch_lib.pack_rows(make_rows(0, max_prompt=60), BUCKETS, 2)
  with pytest.raises(ValueError, match="row 1: give ref_logprobs for every row or for none"):
    batch_lib.pack_rows([rows[0], make_rows(1, with_ref=False)[0]], BUCKETS, 2)
  with pytest.raises(ValueError, match="row 0: old_logprobs has shape"):
    bad = make_rows(2, num_rows=1)[0]
    batch_lib.pack_rows([batch_lib.LearnerRow(bad.prompt_ids, bad.response_ids, 1.0, np.zeros(99))],
                      BUCKETS, 2)


def test_micro_batches_give_the_same_update_as_one_batch():
  rows = make_rows(1)
  results = []
  for micro_rows in (8, 2):
    settings = dataclasses.replace(SETTINGS, micro_batch_rows=micro_rows)
    batch = batch_lib.pack_rows(rows, BUCKETS, micro_rows)
    assert batch.tokens.shape[:2] == (8 // micro_rows, micro_rows)
    state, step = fresh_state(settings), step_fn(settings)
    history = []
    for _ in range(2):  # a second Adam step depends on gradient magnitudes, not just signs
      state, metrics = step(state, batch)
      history.append(jax.device_get(metrics))
    results.append((jax.device_get(state.params), history))
  (params_a, history_a), (params_b, history_b) = results
  for metrics_a, metrics_b in zip(history_a, history_b):
    assert metrics_a.keys() == metrics_b.keys()
    for name in metrics_a:
      np.testing.assert_allclose(metrics_a[name], metrics_b[name], rtol=1e-5, atol=1e-7,
                                 err_msg=name)
  assert history_a[0]["tokens"] == sum(len(r.response_ids) for r in rows)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params_a, params_b)
  moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), params_a,
                                           jax.device_get(params_of(0)))))
  assert moved > 1e-4  # the steps did change the parameters


def test_loss_and_gradient_match_a_hand_computation():
  rows = make_rows(2)
  params = params_of(0)
  batch = batch_lib.pack_rows(rows, BUCKETS, SETTINGS.micro_batch_rows)
  new_state, metrics = step_fn(SETTINGS)(fresh_state(SETTINGS), batch)
  expected_loss, expected_grad = jax.value_and_grad(reference_loss)(
      params, rows, SETTINGS.clip_eps_low, SETTINGS.clip_eps_high, SETTINGS.kl_beta)
  np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
  _, entropy = teacher_forced_log_probs(params, rows, with_entropy=True)
  np.testing.assert_allclose(metrics["entropy"], entropy.mean(), rtol=1e-5)
  grad_norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(expected_grad)))
  np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-4)
  # The first Adam step moves each weight by about -lr * sign(gradient).
  step_sign = jax.tree.map(lambda new, old: np.sign(new - old), new_state.params, params)
  for sign, grad in zip(jax.tree.leaves(step_sign), jax.tree.leaves(expected_grad)):
    large = np.abs(grad) > 1e-6
    np.testing.assert_array_equal(sign[large], -np.sign(grad[large]))
  # Only the KL term changes with beta: kl_beta * kl is the gap between loss and policy_loss.
  np.testing.assert_allclose(metrics["loss"] - metrics["policy_loss"],
                             SETTINGS.kl_beta * metrics["kl"], rtol=1e-4, atol=1e-8)


def test_on_policy_ratio_is_one_and_kl_to_itself_is_zero():
  rows = make_rows(3)
  params = params_of(0)
  batch = batch_lib.pack_rows(rows, BUCKETS, SETTINGS.micro_batch_rows)
  current = learner.policy_log_probs(CONFIG, params, batch)
  np.testing.assert_allclose(np.concatenate(batch_lib.response_values(batch, current)),
                             teacher_forced_log_probs(params, rows), atol=1e-5)
  batch = batch.replace(old_logprobs=current,
                        ref_logprobs=learner.reference_log_probs(CONFIG, params, batch))
  _, metrics = step_fn(SETTINGS)(fresh_state(SETTINGS), batch)
  np.testing.assert_allclose(metrics["ratio_mean"], 1.0, atol=1e-6)
  assert float(metrics["clip_fraction"]) == 0.0
  assert abs(float(metrics["kl"])) < 1e-10
  # On policy the surrogate is -A per token: its mean is the token-weighted mean advantage.
  adv = np.concatenate([np.full(len(r.response_ids), -r.advantage) for r in rows])
  np.testing.assert_allclose(metrics["policy_loss"], adv.mean(), rtol=1e-5)


def test_steps_raise_positive_and_lower_negative_responses():
  settings = learner.LearnerSettings(learning_rate=3e-3, kl_beta=0.0, micro_batch_rows=8,
                                     length_buckets=BUCKETS, compute_entropy=False)
  rows = make_rows(4, with_ref=False)
  for i, row in enumerate(rows):
    row.advantage = 1.0 if i % 2 == 0 else -1.0
  batch = batch_lib.pack_rows(rows, BUCKETS, settings.micro_batch_rows)
  state, step = fresh_state(settings), step_fn(settings)
  before = learner.policy_log_probs(CONFIG, state.params, batch)
  current = before
  for _ in range(4):  # on-policy: pi_old is the policy that starts each step
    state, metrics = step(state, batch.replace(old_logprobs=current))
    current = learner.policy_log_probs(CONFIG, state.params, batch)
  assert "entropy" not in metrics
  change = [after.sum() - start.sum() for start, after in zip(
      batch_lib.response_values(batch, before), batch_lib.response_values(batch, current))]
  for i, delta in enumerate(change):
    assert (delta > 0.05) if i % 2 == 0 else (delta < -0.05), (i, change)


def test_compiles_are_bounded_by_buckets():
  settings = dataclasses.replace(SETTINGS, micro_batch_rows=2)
  step, state = step_fn(settings), fresh_state(settings)
  # (rows, longest prompt, longest response): row counts 5..8 all round up to 4 micro-batches,
  # prompt + response lengths fall into the 16 and 32 buckets, responses into 16.
  shapes = [(7, 10, 8), (8, 12, 10), (5, 8, 5), (6, 20, 12), (5, 9, 6), (8, 18, 13), (7, 7, 7)]
  signatures = set()
  for seed, (num_rows, max_prompt, max_response) in enumerate(shapes):
    batch = batch_lib.pack_rows(make_rows(seed, num_rows, True, max_prompt, max_response), BUCKETS,
                              2)
    signature = (batch.tokens.shape, batch.response_tokens.shape)
    traces = learner.TRACE_COUNTS["train_step"]
    state, _ = step(state, batch)
    new_traces = learner.TRACE_COUNTS["train_step"] - traces
    # A signature seen before in this test never retraces; a new one traces at most once (it may
    # already be compiled by another test of this file).
    assert new_traces == 0 if signature in signatures else new_traces <= 1, (signature, signatures)
    signatures.add(signature)
  assert signatures == {((4, 2, 16), (4, 2, 16)), ((4, 2, 32), (4, 2, 16))}, signatures


def test_settings_and_step_errors():
  with pytest.raises(ValueError, match="micro_batch_rows=0: must be >= 1"):
    learner.LearnerSettings(micro_batch_rows=0)
  with pytest.raises(ValueError, match="lr_schedule='cosine' needs decay_steps"):
    learner.LearnerSettings(lr_schedule="cosine")
  batch = batch_lib.pack_rows(make_rows(0, with_ref=False), BUCKETS, 8)
  with pytest.raises(ValueError, match="kl_beta=0.05 needs batch.ref_logprobs"):
    step_fn(SETTINGS)(fresh_state(SETTINGS), batch)


def test_learning_rate_schedule():
  warm = learner.LearnerSettings(learning_rate=1.0, warmup_steps=4)
  np.testing.assert_allclose([optim.learning_rate_at(warm, t) for t in range(6)],
                             [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
  cosine = learner.LearnerSettings(learning_rate=1.0, warmup_steps=2, lr_schedule="cosine",
                                   decay_steps=4, final_lr_fraction=0.2)
  # after warmup: 0.2 + 0.8 * (1 + cos(pi * s / 4)) / 2 for s = 0..4, then flat.
  expected = [0.5, 1.0] + [0.2 + 0.4 * (1 + np.cos(np.pi * s / 4)) for s in range(5)] + [0.2]
  np.testing.assert_allclose([optim.learning_rate_at(cosine, t) for t in range(8)], expected,
                             rtol=1e-6)


_SHARDED = """
import jax, numpy as np
from gru_mem import parallel
from gru_mem.model import config as model_config, transformer
from gru_mem.rl import batch as batch_lib, learner
import test_learner as T
assert jax.device_count() == 8, jax.devices()
settings = T.SETTINGS
batch = batch_lib.pack_rows(T.make_rows(5), T.BUCKETS, settings.micro_batch_rows)

single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
params = jax.device_put(T.params_of(0), single)
expected_logp = np.asarray(learner.policy_log_probs(T.CONFIG, params, batch))
state, metrics = learner.make_train_step(T.CONFIG, settings)(
    learner.create_train_state(params, settings), jax.device_put(batch, single))
expected = jax.device_get((state.params, metrics))

mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
shardings = learner.state_shardings(T.CONFIG, settings, mesh)
sharded_state = learner.create_train_state(T.params_of(0), settings, shardings)
sharded_batch = batch_lib.pack_rows(T.make_rows(5), T.BUCKETS, settings.micro_batch_rows, mesh=mesh)
assert sharded_batch.tokens.sharding.spec[1] == ("data", "fsdp")
np.testing.assert_allclose(
    learner.policy_log_probs(T.CONFIG, sharded_state.params, sharded_batch, mesh), expected_logp,
    atol=1e-5)
sharded_state, sharded_metrics = learner.make_train_step(T.CONFIG, settings, mesh)(
    sharded_state, sharded_batch)
leaves = jax.tree.leaves(sharded_state.params)
assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
           for leaf in leaves)
jax.tree.map(lambda got, want: np.testing.assert_equal(got.sharding, want),
             sharded_state, shardings)
got = jax.device_get((sharded_state.params, sharded_metrics))
for name, value in expected[1].items():
  np.testing.assert_allclose(got[1][name], value, rtol=1e-5, atol=1e-7, err_msg=name)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got[0], expected[0])
print("sharded step matches")
"""


def test_sharded_step_equals_single_device_step():
  try:
    from gru_mem import parallel  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pytest.skip("gru_mem/parallel.py is missing: the sharded learner step needs it")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([os.path.dirname(__file__),
                                         os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(_SHARDED)], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "sharded step matches" in result.stdout
