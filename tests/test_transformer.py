"""The Flax decoder: KV cache against the full forward, scan/remat against the plain layer loop.

Parity with transformers itself lives in test_hf.py; here the reference is our own uncached,
unscanned forward, which that file pins to transformers.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gru_mem.model import transformer
from gru_mem.model.config import ModelConfig

CONFIG = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=10, rope_theta=1e4,
                     tie_word_embeddings=False, max_position_embeddings=256)
PAD_PER_ROW = (0, 2, 5)  # left padding of each row of the prompt


def _random_params(config, seed=0):
  """Random parameters of the right shapes (numpy-drawn: no compile), biases and norms not 0 / 1."""
  shapes = nn.meta.unbox(transformer.abstract_params(config))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), shapes)


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens, positions, mask, cache=None):
  return transformer.forward(config, params, tokens, positions, mask, cache)


def _prompt_and_continuation(prompt_len, new_tokens, seed=0):
  """tokens [B, prompt_len + new_tokens], left-padded prompt then all-real continuation."""
  rng = np.random.RandomState(seed)
  batch = len(PAD_PER_ROW)
  tokens = rng.randint(1, CONFIG.vocab_size, (batch, prompt_len + new_tokens)).astype(np.int32)
  mask = np.ones(tokens.shape, bool)
  for row, pad in enumerate(PAD_PER_ROW):
    mask[row, :pad] = False
  return jnp.asarray(np.where(mask, tokens, 0)), jnp.asarray(mask)


def _full_logits(params, tokens, mask):
  logits, cache = _forward(CONFIG, params, tokens, transformer.positions_from_mask(mask), mask)
  assert cache is None
  return np.asarray(logits)


def test_positions_from_mask():
  mask = jnp.array([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(transformer.positions_from_mask(mask),
                                [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 0, 0]])


@pytest.mark.parametrize("tied", [False, True])
def test_param_shapes_and_count(tied):
  config = CONFIG.replace(tie_word_embeddings=tied)
  params = nn.meta.unbox(transformer.abstract_params(config))
  assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params()
  q = params["layers_1"]["self_attn"]["q_proj"]
  assert q["kernel"].shape == (32, 4, 10) and q["bias"].shape == (4, 10)
  assert params["layers_0"]["self_attn"]["o_proj"]["kernel"].shape == (4, 10, 32)
  assert ("lm_head" in params) == (not tied)


def test_init_params_matches_abstract_params():
  params = transformer.init_params(CONFIG, jax.random.PRNGKey(0))
  abstract = nn.meta.unbox(transformer.abstract_params(CONFIG))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
      lambda x: (x.shape, x.dtype), abstract)
  np.testing.assert_array_equal(params["norm"]["weight"], np.ones(CONFIG.hidden_size))
  assert 0.015 < float(params["embed_tokens"].std()) < 0.025  # normal(0.02)


def test_prefill_then_decode_matches_full_forward():
  prompt_len, steps = 7, 5
  params = _random_params(CONFIG)
  tokens, mask = _prompt_and_continuation(prompt_len, steps)
  full = _full_logits(params, tokens, mask)
  batch = tokens.shape[0]

  cache = transformer.init_cache(CONFIG, batch, capacity=prompt_len + steps + 3)
  prompt_mask = mask[:, :prompt_len]
  logits, cache = _forward(CONFIG, params, tokens[:, :prompt_len],
                           transformer.positions_from_mask(prompt_mask), prompt_mask, cache)
  real_prompt = np.asarray(prompt_mask)
  np.testing.assert_allclose(np.asarray(logits)[real_prompt], full[:, :prompt_len][real_prompt],
                             atol=1e-5, rtol=0)
  np.testing.assert_array_equal(cache["lengths"], [prompt_len - pad for pad in PAD_PER_ROW])
  assert int(cache["index"]) == prompt_len

  for step in range(steps):
    column = prompt_len + step
    positions = cache["lengths"][:, None]
    logits, cache = _forward(CONFIG, params, tokens[:, column:column + 1], positions,
                             jnp.ones((batch, 1), bool), cache)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, column], atol=1e-5, rtol=0,
                               err_msg=f"decode step {step}")
  assert int(cache["index"]) == prompt_len + steps
  np.testing.assert_array_equal(cache["lengths"], np.asarray(mask).sum(1))
  np.testing.assert_array_equal(cache["valid"][:, :prompt_len + steps], mask)
  assert not cache["valid"][:, prompt_len + steps:].any()  # unused capacity stays invisible


def test_chunked_prefill_matches_full_forward():
  """Two prefill calls (the first one fully padding for the last row) equal one forward."""
  params = _random_params(CONFIG, seed=2)
  tokens, mask = _prompt_and_continuation(prompt_len=7, new_tokens=4, seed=3)
  full = _full_logits(params, tokens, mask)
  cache = transformer.init_cache(CONFIG, tokens.shape[0], capacity=tokens.shape[1])
  outputs = []
  for start, stop in ((0, 5), (5, tokens.shape[1])):
    chunk_mask = mask[:, start:stop]
    positions = cache["lengths"][:, None] + transformer.positions_from_mask(chunk_mask)
    logits, cache = _forward(CONFIG, params, tokens[:, start:stop], positions, chunk_mask, cache)
    outputs.append(np.asarray(logits))
  chunked = np.concatenate(outputs, axis=1)
  assert np.isfinite(chunked).all()  # a row that is all padding in a chunk stays finite
  real = np.asarray(mask)
  np.testing.assert_allclose(chunked[real], full[real], atol=1e-5, rtol=0)


def test_fully_padded_row_is_finite_and_isolated():
  params = _random_params(CONFIG, seed=4)
  tokens, mask = _prompt_and_continuation(prompt_len=6, new_tokens=0, seed=4)
  mask = mask.at[2].set(False)
  logits = _full_logits(params, tokens, mask)
  assert np.isfinite(logits).all()
  alone = _full_logits(params, tokens[:2], mask[:2])
  np.testing.assert_allclose(logits[:2][np.asarray(mask[:2])], alone[np.asarray(mask[:2])],
                             atol=1e-6, rtol=0)


def test_return_hidden_then_logits_method():
  params = _random_params(CONFIG, seed=5)
  tokens, mask = _prompt_and_continuation(prompt_len=6, new_tokens=0, seed=5)
  hidden, _ = transformer.forward(CONFIG, params, tokens, mask=mask, return_hidden=True)
  assert hidden.shape == (*tokens.shape, CONFIG.hidden_size)
  logits = transformer.Transformer(CONFIG).apply({"params": params}, hidden,
                                                 method=transformer.Transformer.logits)
  np.testing.assert_allclose(logits, _full_logits(params, tokens, mask), atol=1e-6, rtol=0)


def _loss_and_grads(config, params, tokens, mask):
  """Mean next-token cross-entropy over real tokens and its gradient."""
  def loss_fn(p):
    logits, _ = transformer.forward(config, p, tokens, mask=mask)
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
    return -(picked * weight).sum() / weight.sum(), logits
  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return loss, logits, grads


@pytest.fixture(scope="module")
def plain_run():
  """The reference: loss, logits and grads of the unscanned, un-rematerialised model."""
  params = _random_params(CONFIG, seed=6)
  tokens, mask = _prompt_and_continuation(prompt_len=9, new_tokens=0, seed=6)
  return params, tokens, mask, _loss_and_grads(CONFIG, params, tokens, mask)


@pytest.mark.parametrize("scan,remat", [(False, "full"), (True, "none"), (True, "full"),
                                        (True, "dots_saveable")])
def test_scan_and_remat_match_plain_layers(plain_run, scan, remat):
  params, tokens, mask, (loss, logits, grads) = plain_run
  variant = CONFIG.replace(scan_layers=scan, remat_policy=remat)
  variant_params = transformer.stack_layers(params, CONFIG.num_layers) if scan else params
  variant_loss, variant_logits, variant_grads = _loss_and_grads(variant, variant_params, tokens,
                                                                mask)
  if scan:
    assert variant_grads["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == CONFIG.num_layers
    variant_grads = transformer.unstack_layers(variant_grads, CONFIG.num_layers)
  np.testing.assert_allclose(variant_loss, loss, atol=1e-6, rtol=0)
  np.testing.assert_allclose(variant_logits, logits, atol=1e-5, rtol=0)
  assert jax.tree.structure(variant_grads) == jax.tree.structure(grads)
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    other = functools.reduce(lambda tree, key: tree[key.key], path, variant_grads)
    np.testing.assert_allclose(other, grad, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # not trivially 0


def test_scanned_cache_decode_matches_unscanned():
  params = _random_params(CONFIG, seed=7)
  scanned = CONFIG.replace(scan_layers=True)
  stacked = transformer.stack_layers(params, CONFIG.num_layers)
  tokens, mask = _prompt_and_continuation(prompt_len=6, new_tokens=2, seed=7)
  results = []
  for config, p in ((CONFIG, params), (scanned, stacked)):
    cache = transformer.init_cache(config, tokens.shape[0], capacity=8)
    _, cache = _forward(config, p, tokens[:, :6], transformer.positions_from_mask(mask[:, :6]),
                        mask[:, :6], cache)
    logits, cache = _forward(config, p, tokens[:, 6:7], cache["lengths"][:, None],
                             mask[:, 6:7], cache)
    results.append((np.asarray(logits), cache))
  np.testing.assert_allclose(results[1][0], results[0][0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(results[1][1]["k"], results[0][1]["k"], atol=1e-6, rtol=0)


def test_bfloat16_compute_stays_close_to_float32():
  params = _random_params(CONFIG, seed=8)
  tokens, mask = _prompt_and_continuation(prompt_len=8, new_tokens=0, seed=8)
  reference = _full_logits(params, tokens, mask)
  bf16 = CONFIG.replace(dtype="bfloat16")
  logits, _ = _forward(bf16, params, tokens, transformer.positions_from_mask(mask), mask)
  assert logits.dtype == jnp.float32
  real = np.asarray(mask)
  error = np.abs(np.asarray(logits)[real] - reference[real]).max()
  assert 0 < error < 0.05 * np.abs(reference[real]).max()
