"""The sampler against transformers' greedy generate, a teacher-forced forward, hand-computed
stopping rules and filtered distributions, and an unsharded run on 8 fake devices."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_8_fake_devices
import torch

from gru_mem import sampling
from gru_mem.model import hf, transformer
from gru_mem.model.config import ModelConfig
from gru_mem.sampling import SamplingSettings, generate

SMALL_BUCKETS = dict(length_buckets=(8, 16, 32, 64), batch_buckets=(1, 2, 4, 8))


def _prompts(lengths, vocab, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(1, vocab, n).tolist() for n in lengths]


def _hf_greedy(model, prompt, max_new_tokens, eos_id=None):
  """transformers' greedy continuation of one unpadded prompt (stops after eos_id)."""
  ids = torch.tensor([prompt])
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def _teacher_forced_log_probs(config, params, prompts, out):
  """Per row i, log softmax of the logits that predict each generated token, from one forward
  over prompt + output (right-padded, which causal attention ignores): [lengths[i], vocab]."""
  sequences = [list(p) + out.row(i) for i, p in enumerate(prompts)]
  width = 64  # one shape for every call, so the forward compiles once
  tokens = np.zeros((len(sequences), width), np.int32)
  mask = np.zeros((len(sequences), width), bool)
  for i, sequence in enumerate(sequences):
    tokens[i, :len(sequence)] = sequence
    mask[i, :len(sequence)] = True
  logits, _ = _forward_jit(config, params, jnp.asarray(tokens), mask=jnp.asarray(mask))
  logits = np.asarray(logits, np.float64)
  log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  return [log_probs[i, len(p) - 1:len(p) - 1 + out.lengths[i]] for i, p in enumerate(prompts)]


_forward_jit = jax.jit(transformer.forward, static_argnames=("config",))


def _filtered_probs(logits, temperature, top_k, top_p):
  """numpy reference of temperature, then top-k, then top-p; returns probabilities [vocab]."""
  scaled = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-scaled, kind="stable")
  keep = np.ones(len(scaled), bool)
  if top_k:
    keep[order[top_k:]] = False
  probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
  probs /= probs.sum()
  if top_p < 1:
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep[order[mass_before >= top_p]] = False
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
  return probs


def _expected_end(tokens, limit, eos_ids=(), stop_sequences=()):
  """(length, reason) a row with this unstopped output must have, by scanning it by hand."""
  for i, token in enumerate(tokens[:limit]):
    if token in eos_ids:
      return i + 1, "eos"
    if any(tuple(tokens[max(0, i + 1 - len(s)):i + 1]) == tuple(s) for s in stop_sequences):
      return i + 1, "stop"
  return limit, "length"


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  """(ModelConfig, params, torch model) of one tiny random Qwen2 saved and loaded back."""
  from conftest import tiny_hf_model
  model = tiny_hf_model(3)
  folder = str(tmp_path_factory.mktemp("hf_sampling"))
  model.save_pretrained(folder)
  config, params = hf.load_hf_checkpoint(folder)
  return config, params, model


@pytest.fixture(scope="module")
def peaked_model():
  """A vocab-16 model whose next-token distributions are far from uniform."""
  config = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=False,
                       max_position_embeddings=256)
  params = jax.jit(transformer.init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
  params["lm_head"] = jnp.asarray(np.random.RandomState(0).normal(0, 0.35, (32, 16)), jnp.float32)
  return config, params


def test_greedy_matches_transformers_token_for_token(hf_pair):
  config, params, model = hf_pair
  prompts = _prompts([3, 11, 1, 20, 7], config.vocab_size)
  settings = SamplingSettings(max_new_tokens=12, temperature=0.0, **SMALL_BUCKETS)
  ours = generate(config, params, prompts, jax.random.PRNGKey(0), settings)
  for i, prompt in enumerate(prompts):
    assert ours.row(i) == _hf_greedy(model, prompt, 12), i
  assert list(ours.stop_reason) == ["length"] * 5

  # An EOS id taken from row 0's output: every row must stop exactly where transformers does.
  eos_id = ours.row(0)[4]
  with_eos = generate(config, params, prompts, jax.random.PRNGKey(0),
                      SamplingSettings(max_new_tokens=12, temperature=0.0, eos_id=eos_id,
                                       **SMALL_BUCKETS))
  for i, prompt in enumerate(prompts):
    reference = _hf_greedy(model, prompt, 12, eos_id=eos_id)
    assert with_eos.row(i) == reference, i
    assert with_eos.stop_reason[i] == ("eos" if reference[-1] == eos_id else "length")
    assert (with_eos.tokens[i, len(reference):] == 0).all()
  assert with_eos.stop_reason[0] == "eos" and with_eos.lengths[0] <= 5


def test_chunked_prefill_equals_one_pass_prefill(hf_pair):
  """Long prompts are prefilled 8 columns at a time: the same tokens and log-probs (1e-5)."""
  config, params, model = hf_pair
  prompts = _prompts([3, 30, 17, 25], config.vocab_size, seed=3)
  one_pass = SamplingSettings(max_new_tokens=8, temperature=1.0, **SMALL_BUCKETS)
  chunked = SamplingSettings(max_new_tokens=8, temperature=1.0, prefill_chunk_tokens=8,
                             **SMALL_BUCKETS)
  a = generate(config, params, prompts, jax.random.PRNGKey(5), one_pass)
  b = generate(config, params, prompts, jax.random.PRNGKey(5), chunked)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  assert _hf_greedy(model, prompts[1], 4) == generate(
      config, params, prompts[1:2], 0, SamplingSettings(
          max_new_tokens=4, temperature=0.0, prefill_chunk_tokens=8, **SMALL_BUCKETS)).row(0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_logprobs_equal_teacher_forced_forward(hf_pair, temperature, top_k, top_p):
  config, params, _ = hf_pair
  prompts = _prompts([5, 2, 17, 9, 1], config.vocab_size, seed=1)
  settings = SamplingSettings(max_new_tokens=12, temperature=temperature, top_k=top_k,
                              top_p=top_p, **SMALL_BUCKETS)
  out = generate(config, params, prompts, jax.random.PRNGKey(7), settings)
  teacher_forced = _teacher_forced_log_probs(config, params, prompts, out)
  for i, log_probs in enumerate(teacher_forced):
    steps = np.arange(out.lengths[i])
    np.testing.assert_allclose(out.logprobs[i, steps], log_probs[steps, out.row(i)], atol=1e-4)
    if temperature == 0:
      np.testing.assert_array_equal(out.sampling_logprobs[i], 0.0)
      continue
    allowed = [_filtered_probs(log_probs[t], temperature, top_k, top_p) for t in steps]
    expected = [np.log(allowed[t][out.row(i)[t]]) for t in steps]
    assert all(np.isfinite(expected)), "a token outside the top-k / top-p set was emitted"
    np.testing.assert_allclose(out.sampling_logprobs[i, steps], expected, atol=1e-4)


def test_stop_sequences_eos_and_limits_end_rows_where_a_hand_scan_does(hf_pair):
  config, params, _ = hf_pair
  prompts = _prompts([4, 9, 2, 13, 6, 21], config.vocab_size, seed=2)
  base = dict(max_new_tokens=12, temperature=1.0, **SMALL_BUCKETS)
  free = generate(config, params, prompts, jax.random.PRNGKey(3), SamplingSettings(**base))
  rows = [free.row(i) for i in range(len(prompts))]
  assert all(len(r) == 12 for r in rows)
  stops = (tuple(rows[0][5:8]), tuple(rows[1][7:9]),
           (rows[2][3], rows[2][4], (rows[2][5] + 1) % config.vocab_size))  # last: a decoy
  eos_id = rows[3][9]
  limits = [12, 12, 12, 12, 3, 0]
  stopped = generate(config, params, prompts, jax.random.PRNGKey(3),
                     SamplingSettings(stop_sequences=stops, eos_id=eos_id, **base),
                     max_new_tokens_per_row=limits)
  reasons = set()
  for i, row in enumerate(rows):
    length, reason = _expected_end(row, limits[i], (eos_id,), stops)
    assert (stopped.lengths[i], stopped.stop_reason[i]) == (length, reason), i
    assert stopped.row(i) == row[:length]
    np.testing.assert_allclose(stopped.logprobs[i, :length], free.logprobs[i, :length], atol=1e-5)
    np.testing.assert_array_equal(stopped.logprobs[i, length:], 0.0)
    reasons.add(reason)
  assert reasons == {"stop", "eos", "length"}
  assert stopped.lengths[0] <= 8 and stopped.lengths[4] <= 3 and stopped.row(5) == []


def test_greedy_row_does_not_depend_on_its_batch(hf_pair):
  config, params, _ = hf_pair
  prompts = _prompts([6, 3, 40, 1, 9], config.vocab_size, seed=4)
  settings = SamplingSettings(max_new_tokens=12, temperature=0.0, **SMALL_BUCKETS)
  together = generate(config, params, prompts, jax.random.PRNGKey(0), settings)
  for i in (0, 1, 3):  # alone: a smaller length bucket and batch bucket than together
    alone = generate(config, params, [prompts[i]], jax.random.PRNGKey(0), settings)
    assert alone.row(0) == together.row(i)
    np.testing.assert_allclose(alone.logprobs[0], together.logprobs[i], atol=1e-5)


def test_sampling_does_not_depend_on_bucket_padding(hf_pair):
  config, params, _ = hf_pair
  prompts = _prompts([6, 3, 5], config.vocab_size, seed=5)
  # tight: two batches of 2 rows (the second with a dummy row); loose: one batch of 8.
  tight = SamplingSettings(max_new_tokens=8, length_buckets=(8,), batch_buckets=(2,))
  loose = SamplingSettings(max_new_tokens=8, length_buckets=(32,), batch_buckets=(8,))
  a = generate(config, params, prompts, jax.random.PRNGKey(1), tight)
  b = generate(config, params, prompts, jax.random.PRNGKey(1), loose)
  assert a.tokens.shape == (3, 8)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  c = generate(config, params, prompts, jax.random.PRNGKey(2), tight)
  assert not np.array_equal(a.tokens, c.tokens)  # and the key does matter


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, 1.0), (1.0, 0, 0.6), (0.7, 6, 0.8)])
def test_filtered_sampling_frequencies_match_renormalised_distribution(
    peaked_model, temperature, top_k, top_p):
  config, params = peaked_model
  prompt = [3, 1, 4, 1, 5]
  draws = 4096  # one first token per row; each row has its own random stream
  settings = SamplingSettings(max_new_tokens=1, temperature=temperature, top_k=top_k,
                              top_p=top_p, length_buckets=(8,), batch_buckets=(512,))
  out = generate(config, params, [prompt] * draws, jax.random.PRNGKey(11), settings)
  logits, _ = _forward_jit(config, params, jnp.asarray([prompt]))
  probs = _filtered_probs(np.asarray(logits[0, -1]), temperature, top_k, top_p)
  assert 2 <= (probs > 0).sum() < config.vocab_size  # the filter really removes tokens
  counts = np.bincount(out.tokens[:, 0], minlength=config.vocab_size)
  assert counts[probs == 0].sum() == 0
  frequencies = counts / draws
  sigma = np.sqrt(probs * (1 - probs) / draws)
  assert np.all(np.abs(frequencies - probs) <= 5 * sigma + 1e-3), (frequencies, probs)


def test_compilations_are_bounded_by_buckets_used(peaked_model):
  config, params = peaked_model
  settings = SamplingSettings(max_new_tokens=3, temperature=0.0, length_buckets=(8, 16),
                              batch_buckets=(1, 2, 4))
  rng = np.random.RandomState(0)
  before = dict(sampling.TRACE_COUNTS)
  buckets_used = set()
  for call in range(50):
    lengths = rng.randint(1, 17, rng.randint(1, 5))
    generate(config, params, _prompts(lengths, 16, seed=call), jax.random.PRNGKey(call), settings)
    buckets_used.add((min(b for b in (1, 2, 4) if b >= len(lengths)),
                      min(b for b in (8, 16) if b >= lengths.max())))
  for name in ("prefill", "decode"):
    assert sampling.TRACE_COUNTS[name] - before.get(name, 0) == len(buckets_used) <= 6, name
  generate(config, params, [[1, 2]], jax.random.PRNGKey(0), settings)
  assert sampling.TRACE_COUNTS["prefill"] - before.get("prefill", 0) == len(buckets_used)


@pytest.mark.parametrize("change,message", [
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[list(range(1, 16)) * 5]), "more than the 64 allowed"),
    (dict(prompts=[[1, 99]]), "outside"),
    (dict(limits=[1, 2]), "one limit per prompt"),
    (dict(limits=[5]), r"\[0, max_new_tokens=4\]"),
])
def test_bad_input_is_refused_before_any_compile(peaked_model, change, message):
  config, params = peaked_model
  before = dict(sampling.TRACE_COUNTS)
  settings = SamplingSettings(max_new_tokens=4, **SMALL_BUCKETS)
  with pytest.raises(ValueError, match=message):
    generate(config, params, change.get("prompts", [[1, 2]]), jax.random.PRNGKey(0), settings,
             max_new_tokens_per_row=change.get("limits"))
  assert dict(sampling.TRACE_COUNTS) == before


@pytest.mark.parametrize("field,value,message", [
    ("max_new_tokens", 0, "max_new_tokens=0: must be >= 1"),
    ("temperature", -0.5, "temperature=-0.5: must be >= 0"),
    ("top_p", 0.0, r"top_p=0.0: must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p=1.5: must be in \(0, 1\]"),
    ("top_k", -1, "top_k=-1"),
    ("stop_sequences", ((),), "empty sequence"),
    ("length_buckets", (64, 32), "increasing"),
])
def test_bad_settings_are_refused(field, value, message):
  with pytest.raises(ValueError, match=message):
    SamplingSettings(**{field: value})


def test_prompt_longer_than_max_position_embeddings_is_refused(peaked_model):
  config, params = peaked_model  # max_position_embeddings=256
  with pytest.raises(ValueError, match="max_position_embeddings=256"):
    generate(config, params, [[1] * 300], 0, SamplingSettings(max_new_tokens=2))


_SHARDED_SCRIPT = r"""
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gru_mem.model import transformer
from gru_mem.model.config import ModelConfig
from gru_mem.sampling import SamplingSettings, generate
assert jax.device_count() == 8
config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
                     max_position_embeddings=256)
params = transformer.init_params(config, jax.random.PRNGKey(0))
rng = np.random.RandomState(0)
prompts = [rng.randint(1, 64, n).tolist() for n in (3, 9, 1, 14, 6)]
settings = SamplingSettings(max_new_tokens=8, temperature=1.0, top_k=20,
                            length_buckets=(16,), batch_buckets=(4, 8))
def run(p, sharding=None):
  out = generate(config, p, prompts, jax.random.PRNGKey(1), settings, batch_sharding=sharding)
  return out.tokens.tolist(), out.logprobs.tolist(), out.lengths.tolist()
results = {"unsharded": run(params)}
mesh = Mesh(np.array(jax.devices()), ("data",))
replicated = jax.device_put(params, NamedSharding(mesh, P()))
results["data8"] = run(replicated, NamedSharding(mesh, P("data")))
mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
def shard_embed(x):  # the embed dim (size 32) of every leaf that has one, over 'tensor'
  spec = [None] * x.ndim
  if 32 in x.shape:
    spec[x.shape.index(32)] = "tensor"
  return jax.device_put(x, NamedSharding(mesh2, P(*spec)))
sharded = jax.tree.map(shard_embed, params)
assert not sharded["lm_head"].sharding.is_fully_replicated
results["data2_tensor4"] = run(sharded, NamedSharding(mesh2, P("data")))
print("RESULT" + json.dumps(results))
"""


def test_sharded_run_equals_unsharded_run_on_8_fake_devices():
  results = run_on_8_fake_devices(_SHARDED_SCRIPT, timeout=300)
  tokens, logprobs, lengths = results.pop("unsharded")
  for name, (other_tokens, other_logprobs, other_lengths) in results.items():
    assert other_tokens == tokens, name
    assert other_lengths == lengths, name
    np.testing.assert_allclose(other_logprobs, logprobs, atol=1e-5, err_msg=name)
