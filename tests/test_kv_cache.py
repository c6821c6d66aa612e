"""The int8 KV cache (`sampling.kv_cache_dtype="int8"`, gru_mem/model/kv_cache.py): the quantizer
against a hand computation, int8 decoding against the float cache (static and continuous
samplers, xla and chunked attention), the compiled decode loop's buffers read from its HLO text,
and the clear error for a bad key value."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gru_mem import continuous, defaults, sampling, settings
from gru_mem.model import kv_cache, transformer
from gru_mem.model.config import ModelConfig
from gru_mem.sampling import SamplingSettings

BUCKETS = dict(length_buckets=(8, 16, 32), batch_buckets=(1, 2, 4, 8))
# Log-prob tolerance of int8 against the float cache. Each stored entry is off by at most
# max|x| / 254 of its (token, kv head) vector (0.4% of the peak, see the round-trip test); through
# the two layers of this tiny model that moved the chosen tokens' log-probs by at most 4.1e-4
# (measured over the 6 rows x 12 tokens below, both samplers), so 3e-3 leaves a margin of ~7x and
# still fails for a real bug (a scale missing or applied to the wrong slot or head moves
# log-probs by O(0.1-1)).
LOGPROB_TOLERANCE = 3e-3


@pytest.fixture(scope="module")
def model():
  config = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
                       max_position_embeddings=256)
  return config, jax.jit(transformer.init_params, static_argnums=0)(config, jax.random.PRNGKey(2))


def test_quantize_round_trip_matches_hand_computation():
  """scale = max|x| / 127 per (row, slot, kv head); values round(x / scale); |x - q s| <= s / 2."""
  x = np.array([[1.27, -0.635, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0], [-2.54, 1.0, 0.5, -0.01]],
               np.float32)
  values, scale = kv_cache.quantize(jnp.asarray(x))
  np.testing.assert_allclose(scale[:, 0], [0.01, 1.0, 0.02], rtol=1e-6)  # zero vector: scale 1
  np.testing.assert_array_equal(values, [[127, -64, 0, 30], [0, 0, 0, 0], [-127, 50, 25, -0]])
  assert values.dtype == jnp.int8

  rng = np.random.RandomState(0)
  x = rng.normal(0, 1, (3, 5, 2, 16)) * rng.uniform(0.01, 30, (3, 5, 2, 1))  # scales per group
  values, scale = kv_cache.quantize(jnp.asarray(x, jnp.float32))
  peak = np.abs(x).max(axis=-1, keepdims=True)
  np.testing.assert_allclose(scale, peak / 127, rtol=1e-6)
  error = np.abs(np.asarray(kv_cache.dequantize(values, scale)) - x)
  assert (error <= peak / 254 * (1 + 1e-5) + 1e-7).all()
  assert np.abs(np.asarray(values)).max() == 127


def _prompts(vocab, rows=6, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(1, vocab, n).tolist() for n in rng.randint(3, 30, rows)]


@pytest.mark.parametrize("attention,slots", [("xla", 0), ("chunked", 4)])
def test_int8_cache_decodes_like_the_float_cache(model, attention, slots):
  """Greedy: the same tokens, stop reasons and lengths; log-probs within LOGPROB_TOLERANCE
  (and not bit-equal: the int8 path really ran). slots > 0: the continuous sampler."""
  config, params = model
  prompts = _prompts(config.vocab_size)
  spec = SamplingSettings(max_new_tokens=12, temperature=0.0, eos_id=None, slots=slots,
                          prefill_chunk_tokens=8, **BUCKETS)
  run = continuous.generate if slots else sampling.generate
  outs = [run(config.replace(attention=attention, kv_cache_dtype=dtype), params, prompts,
              jax.random.PRNGKey(0), spec) for dtype in ("auto", "int8")]
  np.testing.assert_array_equal(outs[1].tokens, outs[0].tokens)
  np.testing.assert_array_equal(outs[1].lengths, outs[0].lengths)
  np.testing.assert_array_equal(outs[1].stop_reason, outs[0].stop_reason)
  gap = np.abs(outs[1].logprobs - outs[0].logprobs).max()
  assert 0 < gap < LOGPROB_TOLERANCE, gap


def test_int8_cache_prefill_stores_quantized_keys(model):
  """After a prefill the cache holds int8 values (prefill writes quantized too): layer 0's, whose
  k / v depend on the embeddings alone, dequantize to the float cache's within the round-trip
  bound; later layers' inputs went through int8 attention, so they are only close."""
  config, params = model
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 1, config.vocab_size)
  caches = []
  for dtype in ("auto", "int8"):
    c = config.replace(kv_cache_dtype=dtype)
    _, cache = transformer.forward(c, params, tokens, cache=transformer.init_cache(c, 2, 16))
    caches.append(cache)
  for name in ("k", "v"):
    assert caches[1][name].dtype == jnp.int8 and caches[1][f"{name}_scale"].shape == (
        config.num_layers, 2, 16, config.num_kv_heads, 1)
    want = np.asarray(caches[0][name])
    got = np.asarray(kv_cache.dequantize(caches[1][name], caches[1][f"{name}_scale"]))
    peak = np.abs(want[0]).max(axis=-1, keepdims=True)
    assert (np.abs(got[0] - want[0]) <= peak / 254 * (1 + 1e-4) + 1e-7).all()
    np.testing.assert_allclose(got[1:], want[1:], atol=1e-2)


@pytest.mark.parametrize("scan_layers,attention", [(True, "chunked"), (False, "xla")])
def test_compiled_decode_loop_carries_an_int8_cache_and_no_float_copy(scan_layers, attention):
  """The compiled slot decode loop (as the dry run compiles it): its cache buffers are s8
  [layers, rows, columns, kv, d] plus f32 scales [.., 1]; the only loop ops with either shape are
  the per-slot scatters that write them (4 per layer), and no f32 or bf16 buffer of the cache's
  shape appears anywhere in the program (no dequantized copy of the cache)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from gru_mem import dry_run_sampler, hlo_text, parallel, rollout_weights  # pylint: disable=import-outside-toplevel
  from gru_mem.model import config as model_config  # pylint: disable=import-outside-toplevel
  config = model_config.preset("tiny").replace(scan_layers=scan_layers, attention=attention)
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  layout = rollout_weights.rollout_layout(config, mesh, "float32", None, "int8")
  assert layout.shares_learner_params and not layout.same_as_learner
  params = dry_run_sampler.abstract(nn.meta.unbox(transformer.abstract_params(layout.config)),
                                    layout.shardings())
  rows, prompt, new_tokens = 4, 640, 384
  spec = dry_run_sampler.decode_spec(new_tokens, 128)
  state = dry_run_sampler.abstract_decode_state(layout.config, spec, rows, prompt, mesh, True)
  compiled, _ = dry_run_sampler.compile_decode(layout.config, params, state, mesh, spec, True)
  text = compiled.as_text()
  layers, kv, d = config.num_layers, config.num_kv_heads, config.head_dim
  dims = f"{layers},{rows},{prompt + new_tokens},{kv}"
  assert re.search(rf"\bs8\[{dims},{d}\]", text)
  for dtype in ("f32", "bf16", "f16"):
    assert not re.search(rf"\b{dtype}\[{dims},{d}\]", text), dtype
  cache_ops = hlo_text.loop_arrays_of_shape(text, (layers, rows, prompt + new_tokens, kv, d))
  scale_ops = hlo_text.loop_arrays_of_shape(text, (layers, rows, prompt + new_tokens, kv, 1))
  assert cache_ops == {"fusion(scatter)": 2 * layers}, cache_ops
  assert scale_ops == {"fusion(scatter)": 2 * layers}, scale_ops


def test_bad_kv_cache_dtype_is_a_clear_error_before_any_compile():
  config = defaults.get_config()
  config.sampling.kv_cache_dtype = "fp8"
  with pytest.raises(ValueError, match=r"sampling.kv_cache_dtype='fp8': use one of \('auto', "
                                       r"'int8'\)"):
    settings.validate(config)
  with pytest.raises(ValueError, match="ModelConfig.kv_cache_dtype='int4'"):
    ModelConfig(kv_cache_dtype="int4")
