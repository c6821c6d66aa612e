"""Attention implementations against the einsum reference (`xla`) and transformers.

`chunked` and `splash` (Pallas interpret mode) must give xla's numbers on every query that is a
real token: float32 forward within 1e-5, gradients within 1e-4, with left and right padding,
query/kv head ratios 1, 2, 4, an odd head_dim, a KV cache whose rows hold different lengths, and
block sizes that do and do not divide the lengths. Then through the model: a learner step, the
sampler's prefill + decode, and transformers parity with `auto` at a length where it picks
`chunked`.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import REPO
from gru_mem.model import attention, hf, transformer
from gru_mem.model import config as model_config
from gru_mem.rl import batch as batch_lib
from gru_mem.rl import learner


def _qkv(batch, q_len, k_len, heads, kv_heads, head_dim, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, q_len, heads, head_dim))
  k = rng.normal(size=(batch, k_len, kv_heads, head_dim))
  v = rng.normal(size=(batch, k_len, kv_heads, head_dim))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _padded_mask(batch, length):
  """Row 0 full, row 1 left-padded by 5, row 2 right-padded from 3/4 of the way, ..."""
  mask = np.ones((batch, length), bool)
  mask[1 % batch, :5] = False
  if batch > 2:
    mask[2, 3 * length // 4:] = False
  return jnp.asarray(mask)


def _loss(out, weights):
  """A loss whose gradient reaches every real query's output: sum(sin(out) * weights)."""
  return jnp.sum(jnp.sin(out) * weights)


def _jit_grad(fn, weights):
  """d _loss(fn(q, k, v)) / d (q, k, v), jitted."""
  return jax.jit(jax.grad(lambda *a: _loss(fn(*a), weights), argnums=(0, 1, 2)))


CASES = [  # (heads, kv_heads, head_dim, length, block): ratios 1/2/4, an odd head_dim, blocks
    (4, 4, 8, 37, 8),  # that do not divide the length,
    (4, 2, 5, 37, 16),
    (8, 2, 6, 32, 8),  # and blocks that divide it.
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,length,block", CASES)
def test_chunked_equals_xla_forward_and_gradients(heads, kv_heads, head_dim, length, block):
  q, k, v = _qkv(3, length, length, heads, kv_heads, head_dim, seed=heads + head_dim)
  key_valid = _padded_mask(3, length)
  visible = attention.visibility(key_valid, 0, length)
  sees_a_key = np.asarray(visible.any(-1))  # [batch, q_len]: every query but left padding
  weights = jnp.asarray(sees_a_key, jnp.float32)[..., None, None]

  def xla(q, k, v):
    return attention.xla_attention(q, k, v, visible)

  def chunked(q, k, v):
    return attention.chunked_attention(q, k, v, key_valid, block_size=block)

  ref, out = jax.jit(xla)(q, k, v), jax.jit(chunked)(q, k, v)
  assert np.isfinite(np.asarray(out)).all()  # left-padding queries see nothing: 0, not NaN
  np.testing.assert_allclose(np.asarray(out)[sees_a_key], np.asarray(ref)[sees_a_key], atol=1e-5,
                             rtol=0)
  assert np.abs(np.asarray(ref)[sees_a_key]).max() > 0.1
  grads_ref = _jit_grad(xla, weights)(q, k, v)
  grads = _jit_grad(chunked, weights)(q, k, v)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert np.isfinite(np.asarray(g)).all(), name
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=0, err_msg=f"d loss / d {name}")


@pytest.mark.parametrize("block", [3, 4])
def test_chunked_against_a_cache_with_rows_of_different_lengths(block):
  """Queries at slots 6..9 of a 13-slot cache whose rows hold 2, 6 and 9 real tokens (left
  padding, a gap, and unused capacity at the end); the offset is traced, as in the sampler."""
  q, k, v = _qkv(3, 4, 13, 4, 2, 8, seed=7)
  valid = np.zeros((3, 13), bool)
  valid[0, 4:6] = True
  valid[1, [0, 1, 2, 6, 7, 8]] = True
  valid[2, 1:10] = True
  valid = jnp.asarray(valid)
  offset = jnp.int32(6)
  ref = attention.xla_attention(q, k, v, attention.visibility(valid, offset, 4))
  out = jax.jit(lambda q, k, v, offset: attention.chunked_attention(
      q, k, v, valid, offset, block_size=block))(q, k, v, offset)
  sees_a_key = np.asarray(attention.visibility(valid, offset, 4).any(-1))
  assert sees_a_key.all()
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 8), (4, 1, 6)])
def test_splash_interpret_mode_equals_xla(monkeypatch, heads, kv_heads, head_dim):
  """The TPU kernel run by Pallas' interpreter on CPU, on real queries (padding queries attend
  to padding under splash's segment ids, so they are left out); forward and gradients."""
  monkeypatch.setattr(attention, "SPLASH_INTERPRET", True)
  length = 40  # padded to splash's 128-token blocks inside
  q, k, v = _qkv(2, length, length, heads, kv_heads, head_dim, seed=3)
  key_valid = _padded_mask(2, length)
  real = np.asarray(key_valid)
  weights = jnp.asarray(real, jnp.float32)[..., None, None]
  visible = attention.visibility(key_valid, 0, length)

  def splash(q, k, v):
    return attention.attention(q, k, v, key_valid, implementation="splash")

  ref, out = attention.xla_attention(q, k, v, visible), jax.jit(splash)(q, k, v)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=0)
  grads_ref = _jit_grad(lambda *a: attention.xla_attention(*a, visible), weights)(q, k, v)
  grads = _jit_grad(splash, weights)(q, k, v)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=0, err_msg=f"d loss / d {name}")
  # Under a mesh it runs in shard_map (one CPU device here: the wrapping, not the split).
  mesh = jax.make_mesh((1,), ("data",))
  with jax.set_mesh(mesh):
    sharded = jax.jit(splash)(q, k, v)
  np.testing.assert_allclose(np.asarray(sharded)[real], np.asarray(ref)[real], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- through the model


TINY = model_config.preset("tiny", vocab_size=64)


def test_prefill_and_decode_with_chunked_equal_xla(monkeypatch):
  """The sampler's path: a left-padded prompt prefilled in two chunks into the cache, then
  one-token decode steps, with chunked attention in blocks of 3 slots."""
  monkeypatch.setattr(attention, "DEFAULT_BLOCK", 3)
  params = transformer.init_params(TINY, jax.random.PRNGKey(1))
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(1, TINY.vocab_size, (3, 14)), jnp.int32)
  mask = np.ones((3, 14), bool)
  mask[1, :4], mask[2, :9] = False, False  # rows hold 10 and 5 real tokens
  mask = jnp.asarray(mask)
  logits = {}
  for name in ("xla", "chunked"):
    config = TINY.replace(attention=name)
    cache = transformer.init_cache(config, 3, capacity=17)
    outputs = []
    for start, stop in ((0, 5), (5, 10)) + tuple((i, i + 1) for i in range(10, 14)):
      chunk_mask = mask[:, start:stop]
      positions = cache["lengths"][:, None] + transformer.positions_from_mask(chunk_mask)
      out, cache = jax.jit(transformer.forward, static_argnums=0)(
          config, params, tokens[:, start:stop], positions, chunk_mask, cache)
      outputs.append(np.asarray(out))
    logits[name] = np.concatenate(outputs, axis=1)
  real = np.asarray(mask)
  assert np.isfinite(logits["chunked"]).all()
  np.testing.assert_allclose(logits["chunked"][real], logits["xla"][real], atol=1e-5, rtol=0)


def test_learner_step_with_chunked_equals_xla(monkeypatch):
  """One whole train step (loss, gradients, AdamW) on right-padded rows of different lengths,
  chunked in blocks of 8 tokens (rows are 32)."""
  monkeypatch.setattr(attention, "DEFAULT_BLOCK", 8)
  settings = learner.LearnerSettings(learning_rate=1e-3, kl_beta=0.05, micro_batch_rows=4,
                                     length_buckets=(32,), adam_eps=1e-4)
  rng = np.random.default_rng(0)
  rows = []
  for prompt_len, response_len in ((5, 3), (20, 9), (12, 12), (3, 1)):
    response = rng.integers(1, TINY.vocab_size, response_len)
    rows.append(batch_lib.LearnerRow(
        rng.integers(1, TINY.vocab_size, prompt_len), response, float(rng.normal()),
        rng.normal(-4, 0.3, response_len).astype(np.float32),
        rng.normal(-4, 0.3, response_len).astype(np.float32)))
  batch = batch_lib.pack_rows(rows, settings.length_buckets, settings.micro_batch_rows)
  params = transformer.init_params(TINY, jax.random.PRNGKey(0))
  results = {}
  for name in ("xla", "chunked"):
    config = TINY.replace(attention=name)
    state = learner.create_train_state(params, settings)
    state, metrics = learner.make_train_step(config, settings)(state, batch)
    results[name] = jax.device_get((state.params, metrics))
  (params_x, metrics_x), (params_c, metrics_c) = results["xla"], results["chunked"]
  for key in ("loss", "grad_norm", "kl", "entropy"):
    np.testing.assert_allclose(metrics_c[key], metrics_x[key], atol=1e-5, rtol=0, err_msg=key)
  assert metrics_x["grad_norm"] > 1e-3  # the step moves the parameters
  for a, b in zip(jax.tree.leaves(params_c), jax.tree.leaves(params_x)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_transformers_parity_with_auto_at_a_chunked_length(hf_model_dir):
  """`auto` picks chunked for rows of CHUNKED_MIN_LENGTH tokens on CPU; logits still match
  transformers' Qwen2 (left-padded rows) within 1e-4."""
  length = attention.CHUNKED_MIN_LENGTH
  assert attention.resolve("auto", backend="cpu", k_len=length, dtype=jnp.float32, head_dim=8,
                           cached=False) == "chunked"
  folder, model = hf_model_dir(seed=11, max_position_embeddings=2 * length)
  config, params = hf.load_hf_checkpoint(folder)
  assert config.attention == "auto"
  rng = np.random.default_rng(2)
  tokens = rng.integers(1, 97, (2, length)).astype(np.int32)
  mask = np.ones((2, length), bool)
  mask[1, :700] = False
  tokens = np.where(mask, tokens, 0)
  ours = np.asarray(jax.jit(lambda p, t, m: transformer.forward(config, p, t, mask=m)[0])(
      params, tokens, mask))
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- choice and errors


def test_auto_choices():
  def pick(backend, k_len=512, dtype=jnp.bfloat16, head_dim=128, cached=False):
    return attention.resolve("auto", backend=backend, k_len=k_len, dtype=dtype,
                             head_dim=head_dim, cached=cached)
  threshold = attention.CHUNKED_MIN_LENGTH
  assert pick("cpu", k_len=threshold - 1) == "xla"  # the tiny default job's rows: unchanged
  assert pick("cpu", k_len=threshold) == "chunked"
  assert pick("gpu") == "cudnn"
  assert pick("gpu", dtype=jnp.float32, k_len=8192) == "chunked"  # cuDNN takes no float32
  assert pick("gpu", head_dim=100) == "xla"
  assert pick("gpu", cached=True, k_len=8192) == "chunked"  # sampler: cuDNN only when asked for
  assert pick("tpu") == "splash"
  assert pick("tpu", cached=True, k_len=8192) == "chunked"
  assert attention.resolve("splash", backend="tpu", k_len=1, dtype=jnp.float32, head_dim=8,
                           cached=True) == "chunked"  # no static mask for a traced cache index


def test_unusable_implementation_is_refused_before_compiling(monkeypatch):
  with pytest.raises(ValueError, match=r"ModelConfig.attention='flash'.*use one of"):
    TINY.replace(attention="flash")
  params = transformer.init_params(TINY, jax.random.PRNGKey(0))
  tokens = jnp.ones((1, 8), jnp.int32)

  def compile_refused(*args, **kwargs):
    raise AssertionError("compiled before the attention implementation was checked")

  for name, backend in (("cudnn", "gpu"), ("splash", "tpu")):
    config = TINY.replace(attention=name)
    lowered = jax.jit(lambda p, t: transformer.forward(config, p, t)[0])
    monkeypatch.setattr(jax.stages.Lowered, "compile", compile_refused)
    with pytest.raises(ValueError) as error:
      lowered.lower(params, tokens).compile()
    message = str(error.value)
    assert f"'{name}' needs a {backend} backend but this one is 'cpu'" in message
    assert "['auto', 'xla', 'chunked']" in message
  with pytest.raises(ValueError, match=r"cannot take dtype float32.*bfloat16"):
    attention.resolve("cudnn", backend="gpu", k_len=8, dtype=jnp.float32, head_dim=8,
                      cached=False)


def test_splash_in_shard_map_on_a_2x2_mesh():
  """Splash (interpret mode) on 4 fake CPU devices, rows over `data` and heads over `tensor`,
  equals xla on real queries and comes back split the same way (a fresh process: this one has
  one device)."""
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from gru_mem import parallel
      from gru_mem.model import attention
      attention.SPLASH_INTERPRET = True
      rng = np.random.default_rng(0)
      q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
                 for s in ((4, 40, 4, 8), (4, 40, 2, 8), (4, 40, 2, 8)))
      valid = np.ones((4, 40), bool); valid[1, :5] = False; valid[3, 30:] = False
      ref = attention.xla_attention(q, k, v, attention.visibility(jnp.asarray(valid), 0, 40))
      with parallel.activate(parallel.make_mesh(data=2, fsdp=1, tensor=2)):
        out = jax.jit(lambda *a: attention.attention(*a, implementation="splash"))(
            q, k, v, jnp.asarray(valid))
      assert tuple(out.sharding.spec)[:3] == ("data", None, "tensor"), out.sharding
      np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=1e-5)
      print("ok")
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
