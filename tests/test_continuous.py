"""Continuous batching against the static sampler (the reference): the same tokens, lengths, stop
reasons and log-probs for greedy and seeded sampling, with more rows than slots; bounded
compilations; a sharded run on 8 fake CPU devices equal to the unsharded one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_8_fake_devices

from gru_mem import continuous, sampling
from gru_mem.model import attention, transformer
from gru_mem.model.config import ModelConfig
from gru_mem.sampling import SamplingSettings

BUCKETS = dict(length_buckets=(8, 16, 32), batch_buckets=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def model():
  config = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
                       max_position_embeddings=256)
  return config, jax.jit(transformer.init_params, static_argnums=0)(config, jax.random.PRNGKey(2))


def _workload(vocab, rows=21, seed=0):
  """Prompts of 1..30 tokens (three length buckets) and per-row limits 0..12 (some 0)."""
  rng = np.random.RandomState(seed)
  prompts = [rng.randint(1, vocab, n).tolist() for n in rng.randint(1, 31, rows)]
  limits = rng.randint(0, 13, rows)
  limits[[2, 9]] = 0
  limits[[0, 5]] = 12
  return prompts, limits


def _assert_same(got, want):
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_array_equal(got.stop_reason, want.stop_reason)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
  np.testing.assert_allclose(got.sampling_logprobs, want.sampling_logprobs, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 10, 0.9)])
def test_continuous_equals_static_with_stops_eos_and_limits(model, temperature, top_k, top_p):
  config, params = model
  prompts, limits = _workload(config.vocab_size)
  base = SamplingSettings(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p,
                          **BUCKETS)
  free = sampling.generate(config, params, prompts, jax.random.PRNGKey(4), base)
  # An EOS id and two stop sequences taken from the unstopped outputs, so each really ends rows.
  eos_id = free.row(3)[6]
  stops = (tuple(free.row(0)[4:6]), tuple(free.row(5)[7:10]))
  settings = dataclasses.replace(base, eos_id=eos_id, stop_sequences=stops)
  static = sampling.generate(config, params, prompts, jax.random.PRNGKey(4), settings, limits)
  assert {"eos", "stop", "length"} <= set(static.stop_reason)
  assert (static.lengths > 0).sum() > 12  # more live rows than any slot count below
  for slots, refill in ((4, 1), (6, 0), (8, 3)):
    streamed = continuous.generate(
        config, params, prompts, jax.random.PRNGKey(4),
        dataclasses.replace(settings, slots=slots, refill_free_slots=refill), limits)
    _assert_same(streamed, static)
  assert np.array_equal(streamed.lengths[[2, 9]], [0, 0]) and streamed.stop_reason[2] == "length"
  other_key = continuous.generate(config, params, prompts, jax.random.PRNGKey(5),
                                  dataclasses.replace(settings, slots=4), limits)
  if temperature > 0:
    assert not np.array_equal(other_key.tokens, static.tokens)  # the key does matter


def test_a_row_does_not_depend_on_its_slot_or_neighbours(model):
  """The same prompts in another order land in other slots beside other rows: greedy rows agree."""
  config, params = model
  prompts, limits = _workload(config.vocab_size, rows=13, seed=1)
  settings = SamplingSettings(max_new_tokens=12, temperature=0.0, slots=4, refill_free_slots=1,
                              **BUCKETS)
  forward = continuous.generate(config, params, prompts, 0, settings, limits)
  order = np.random.RandomState(0).permutation(len(prompts))
  shuffled = continuous.generate(config, params, [prompts[i] for i in order], 0, settings,
                                 limits[order])
  np.testing.assert_array_equal(shuffled.tokens, forward.tokens[order])
  np.testing.assert_allclose(shuffled.logprobs, forward.logprobs[order], atol=1e-5)


@pytest.mark.parametrize("implementation,q_len", [("xla", 1), ("xla", 3), ("chunked", 1),
                                                  ("chunked", 3)])
def test_per_row_query_offsets_equal_one_row_at_a_time(implementation, q_len):
  """The slots' cache index: query_offset [batch] gives each row what its own scalar offset does."""
  rng = np.random.RandomState(0)
  batch, k_len = 4, 20
  q = rng.normal(size=(batch, q_len, 4, 8)).astype(np.float32)
  k, v = (rng.normal(size=(batch, k_len, 2, 8)).astype(np.float32) for _ in range(2))
  valid = rng.rand(batch, k_len) < 0.7
  offsets = np.array([0, 5, 11, 17])
  got = attention.attention(q, k, v, valid, jnp.asarray(offsets), implementation=implementation,
                            block_size=8)
  for b, offset in enumerate(offsets):
    want = attention.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], valid[b:b + 1],
                               jnp.int32(offset), implementation=implementation, block_size=8)
    np.testing.assert_allclose(got[b:b + 1], want, atol=1e-6, err_msg=f"row {b}")
  assert not np.allclose(got[1], got[2])  # offsets really differ


def test_compilations_are_bounded_by_slot_and_prompt_buckets(model):
  config, params = model
  settings = SamplingSettings(max_new_tokens=4, temperature=0.0, slots=4, refill_free_slots=2,
                              length_buckets=(8, 16), batch_buckets=(1, 2, 4))
  rng = np.random.RandomState(0)
  before = dict(sampling.TRACE_COUNTS)

  def traced():
    return {k: v - before.get(k, 0) for k, v in sampling.TRACE_COUNTS.items()}

  for call in range(30):
    rows = rng.randint(1, 13)
    prompts = [rng.randint(1, 48, n).tolist() for n in rng.randint(1, 17, rows)]
    continuous.generate(config, params, prompts, call, settings,
                        rng.randint(0, 5, rows))
  counts = traced()
  # slot counts {1, 2, 4} x prompt columns {8, 16}; groups {1, 2, 4} x group lengths {8, 16}
  assert counts["slot_decode"] == counts["slot_init"] <= 6, counts
  assert counts["prefill"] <= 6, counts
  assert counts["slot_insert"] <= 3 * 6, counts  # (group, its length) x (slots, columns) pairs
  assert counts.get("decode", 0) == 0  # the static decode loop is not used
  # 60 rows in one call: no new program (slot and group buckets are bounded, not rows).
  continuous.generate(config, params, [[1, 2, 3]] * 40 + [[4] * 15] * 20, 0, settings)
  assert traced() == counts


def test_bad_slot_settings_are_refused(model):
  config, params = model
  with pytest.raises(ValueError, match="slots=-1.*use >= 0"):
    SamplingSettings(slots=-1)
  with pytest.raises(ValueError, match="continuous.generate"):
    sampling.generate(config, params, [[1, 2]], 0, SamplingSettings(max_new_tokens=2, slots=4))


_SHARDED_SCRIPT = r"""
import dataclasses, json, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gru_mem import continuous, parallel, sampling
from gru_mem.model import shardings, transformer
from gru_mem.model.config import ModelConfig
assert jax.device_count() == 8
config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
                     max_position_embeddings=256)
params = transformer.init_params(config, jax.random.PRNGKey(0))
rng = np.random.RandomState(0)
prompts = [rng.randint(1, 64, n).tolist() for n in rng.randint(1, 20, 37)]
limits = rng.randint(0, 11, 37).tolist()
settings = sampling.SamplingSettings(max_new_tokens=10, temperature=1.0, top_k=20, slots=8,
                                     refill_free_slots=2, length_buckets=(16, 32),
                                     batch_buckets=(1, 2, 4, 8))
def run(p, sharding=None, s=settings):
  out = continuous.generate(config, p, prompts, jax.random.PRNGKey(1), s, limits,
                            batch_sharding=sharding)
  return out.tokens.tolist(), out.logprobs.tolist(), out.lengths.tolist()
results = {"unsharded": run(params),
           "static_unsharded": run(params, s=dataclasses.replace(settings, slots=0))}
mesh = Mesh(np.array(jax.devices()), ("data",))
results["data8"] = run(jax.device_put(params, NamedSharding(mesh, P())), NamedSharding(mesh, P("data")))
learner_mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
learner_params = parallel.shard_params(params, shardings.param_shardings(config, learner_mesh))
with parallel.activate(learner_mesh):  # the model's activation constraints on
  results["2x2x2"] = run(learner_params, parallel.batch_sharding(learner_mesh))
print("RESULT" + json.dumps(results))
"""


def test_sharded_continuous_equals_unsharded_on_8_fake_devices():
  results = run_on_8_fake_devices(_SHARDED_SCRIPT, timeout=600)
  tokens, logprobs, lengths = results.pop("unsharded")
  assert len(set(map(tuple, tokens))) > 30  # rows differ: a real comparison
  for name, (other_tokens, other_logprobs, other_lengths) in results.items():
    assert other_tokens == tokens, name
    assert other_lengths == lengths, name
    np.testing.assert_allclose(other_logprobs, logprobs, atol=1e-5, err_msg=name)
