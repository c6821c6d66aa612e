"""model.logprobs: the gather-free token log-probabilities equal the gather, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np

from gru_mem.model import logprobs


def _logits(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * 4


def test_picked_log_prob_is_bit_equal_to_log_softmax_then_gather():
  logits = _logits((7, 1000))
  tokens = jnp.asarray([0, 999, 3, 500, 500, 17, 2], jnp.int32)
  reference = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], -1)[:, 0]
  np.testing.assert_array_equal(np.asarray(jax.jit(logprobs.picked_log_prob)(logits, tokens)),
                                np.asarray(reference))


def test_pick_matches_indexing_and_its_gradient_is_the_one_hot_mask():
  values = _logits((2, 3, 50), seed=1)
  tokens = jnp.asarray([[0, 49, 7], [7, 7, 1]], jnp.int32)
  picked = logprobs.pick(values, tokens)
  expected = np.take_along_axis(np.asarray(values), np.asarray(tokens)[..., None], -1)[..., 0]
  np.testing.assert_array_equal(np.asarray(picked), expected)
  weights = jnp.arange(6, dtype=jnp.float32).reshape(2, 3) + 1
  grad = jax.grad(lambda v: jnp.sum(weights * logprobs.pick(v, tokens)))(values)
  expected_grad = np.zeros(values.shape, np.float32)
  for i in range(2):
    for j in range(3):
      expected_grad[i, j, tokens[i, j]] = weights[i, j]
  np.testing.assert_array_equal(np.asarray(grad), expected_grad)
