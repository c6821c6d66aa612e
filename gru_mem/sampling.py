"""Batched generation on device: a bucketed left-padded prefill, then a `lax.while_loop` decode.

`generate(config, params, prompts, rng, settings)` takes any number of token-id prompts of any
lengths. Rows are cut into batches whose size is one of `settings.batch_buckets` (dummy rows fill
the rest, done from the start), each left-padded to one of `settings.length_buckets`: at most
(#batch buckets) x (#length buckets) compilations. The prefill computes logits only at the last
column (every row's last real token) and samples the first token; the decode loop then feeds one
token per step into the KV cache until every row is done, without leaving the device. Row i's
random stream is `fold_in(fold_in(rng, i), step)` (i its index among the inputs), so its samples
do not depend on its batch or padding. `gru_mem.continuous.generate` streams rows through
`settings.slots` decode slots instead (continuous batching, the same outputs), from these pieces.

Log-probs: `logprobs` is log pi(token) under the model at temperature 1 (RL's pi_old);
`sampling_logprobs` is the log-prob under the distribution actually sampled from (temperature,
top-k then top-p applied; 0 for greedy). Jitted calls follow whatever sharding params and prompt
arrays carry (pass `batch_sharding` to place the prompts on a mesh).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from gru_mem.buckets import DEFAULT_LENGTH_BUCKETS, smallest_bucket
from gru_mem.model.config import ModelConfig
from gru_mem.model.logprobs import picked_log_prob
from gru_mem.model.transformer import Transformer, forward, init_cache, positions_from_mask

# Row states inside the loop; the last three are also the public stop reasons.
RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3
STOP_REASONS = {EOS: "eos", STOP: "stop", LENGTH: "length"}

# How many times prefill / decode were traced (= compiled). Tests read it to bound compilations.
TRACE_COUNTS: collections.Counter = collections.Counter()

_DEFAULT_BATCH_BUCKETS = tuple(2 ** i for i in range(0, 9))  # 1 ... 256


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How to sample. temperature 0 is greedy; top_p 1.0 and top_k 0 switch those filters off.

  A row is done right after it emits an `eos_id` token, the last token of one of
  `stop_sequences` (each a tuple of token ids, matched against generated tokens only), or its
  token limit. Prompts are left-padded to one of `length_buckets`, batches to one of
  `batch_buckets`.
  """

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  stop_sequences: tuple[tuple[int, ...], ...] = ()
  eos_id: Union[int, tuple[int, ...], None] = None
  pad_id: int = 0
  length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS
  batch_buckets: tuple[int, ...] = _DEFAULT_BATCH_BUCKETS
  prefill_chunk_tokens: int = 2048  # prompts longer than this are prefilled chunk by chunk
  slots: int = 0  # > 0: continuous batching through this many decode slots (0: static batches)
  refill_free_slots: int = 0  # refill once this many slots are free (0: a quarter of the slots)

  def __post_init__(self):
    if self.slots < 0 or self.refill_free_slots < 0:
      raise ValueError(f"slots={self.slots}, refill_free_slots={self.refill_free_slots}: use >= 0")
    if self.prefill_chunk_tokens < 1:
      raise ValueError(f"prefill_chunk_tokens={self.prefill_chunk_tokens}: must be >= 1")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
    if not self.temperature >= 0:
      raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 means greedy)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1.0 switches it off)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 switches it off)")
    for name in ("length_buckets", "batch_buckets"):
      buckets = getattr(self, name)
      if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"{name}={buckets}: must be a non-empty increasing tuple of sizes >= 1")
    # Normalise to hashable tuples of ints (the settings key the jit cache).
    stops = tuple(tuple(int(t) for t in s) for s in self.stop_sequences)
    if any(len(s) == 0 for s in stops):
      raise ValueError(f"stop_sequences={self.stop_sequences}: contains an empty sequence")
    object.__setattr__(self, "stop_sequences", stops)
    object.__setattr__(self, "length_buckets", tuple(int(b) for b in self.length_buckets))
    object.__setattr__(self, "batch_buckets", tuple(int(b) for b in self.batch_buckets))

  @property
  def eos_ids(self) -> tuple[int, ...]:
    if self.eos_id is None:
      return ()
    if isinstance(self.eos_id, (int, np.integer)):
      return (int(self.eos_id),)
    return tuple(int(t) for t in self.eos_id)


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """The part of the settings that shapes the compiled program (a static jit argument)."""
  max_new_tokens: int
  temperature: float
  top_p: float
  top_k: int
  stop_sequences: tuple[tuple[int, ...], ...]
  eos_ids: tuple[int, ...]
  pad_id: int
  prefill_chunk_tokens: int = 2048


def decode_spec(settings: SamplingSettings) -> DecodeSpec:
  """The compiled-program part of `settings`."""
  return DecodeSpec(settings.max_new_tokens, float(settings.temperature), float(settings.top_p),
                    int(settings.top_k), settings.stop_sequences, settings.eos_ids,
                    int(settings.pad_id), int(settings.prefill_chunk_tokens))


@dataclasses.dataclass
class Generation:
  """One entry per input row, in input order (numpy arrays).

  tokens [N, max_new] (pad_id after the end), lengths [N] (generated tokens, including the
  EOS / stop sequence), logprobs and sampling_logprobs [N, max_new] float32 (0 after the end),
  stop_reason [N] str: 'eos', 'stop' or 'length'.
  """
  tokens: np.ndarray
  lengths: np.ndarray
  logprobs: np.ndarray
  sampling_logprobs: np.ndarray
  stop_reason: np.ndarray

  def __len__(self) -> int:
    return len(self.lengths)

  def row(self, i: int) -> list[int]:
    """Row i's generated token ids (up to and including its EOS / stop sequence)."""
    return self.tokens[i, :self.lengths[i]].tolist()


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """The logits of the sampling distribution: logits / T, then top-k, then top-p (nucleus).

  top-k keeps tokens whose logit is >= the k-th largest; top-p keeps the smallest set of most
  likely tokens whose probability mass reaches p (always the most likely one). Removed tokens
  get -inf. logits: [batch, vocab] float32.
  """
  scaled = logits / temperature
  if top_k == 0 and top_p >= 1.0:
    return scaled
  k = top_k if 0 < top_k < scaled.shape[-1] else scaled.shape[-1]
  top_values, _ = jax.lax.top_k(scaled, k)  # [batch, k], descending
  threshold = top_values[:, -1:]
  if top_p < 1.0:
    probs = jax.nn.softmax(top_values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = mass_before < top_p  # a prefix of the sorted values; the first is always kept
    threshold = jnp.min(jnp.where(kept, top_values, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample_tokens(logits: jax.Array, keys: jax.Array, spec: DecodeSpec):
  """Draws one token per row. Returns (token [B], logprob [B], sampling_logprob [B]).

  logprob = log softmax(logits)[token] (temperature 1); sampling_logprob is the same under the
  filtered distribution actually sampled from (0 when greedy: a point mass).
  """
  if spec.temperature == 0:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling_logprob = jnp.zeros(token.shape, jnp.float32)
  else:
    filtered = filter_logits(logits, spec.temperature, spec.top_k, spec.top_p)
    token = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    sampling_logprob = picked_log_prob(filtered, token)
  return token, picked_log_prob(logits, token), sampling_logprob


def end_reason(token, lengths, limits, recent, spec: DecodeSpec) -> jax.Array:
  """Each row's state after emitting `token` [B]: EOS, STOP, LENGTH or RUNNING. lengths [B]
  counts its tokens so far, recent [B, longest stop] its last ones (-1 before the first)."""
  hit_eos = jnp.zeros(token.shape, jnp.bool_)
  for eos in spec.eos_ids:
    hit_eos = hit_eos | (token == eos)
  hit_stop = jnp.zeros(token.shape, jnp.bool_)
  for stop in spec.stop_sequences:
    hit_stop = hit_stop | jnp.all(recent[:, -len(stop):] == jnp.asarray(stop, jnp.int32), axis=1)
  return jnp.where(hit_eos, EOS, jnp.where(hit_stop, STOP, jnp.where(
      lengths >= limits, LENGTH, RUNNING))).astype(jnp.int32)


def _record(state: dict, logits: jax.Array, spec: DecodeSpec) -> dict:
  """Samples token number `step` for every row, writes it and marks rows that are now done."""
  step = state["step"]
  keys = jax.vmap(jax.random.fold_in, (0, None))(state["row_keys"], step)
  token, logprob, sampling_logprob = sample_tokens(logits, keys, spec)
  active = state["reason"] == RUNNING
  token = jnp.where(active, token, spec.pad_id)
  zero = jnp.zeros_like(logprob)

  def write(buffer, value):  # buffer [B, max_new], value [B]
    return jax.lax.dynamic_update_slice_in_dim(buffer, value[:, None].astype(buffer.dtype), step, 1)

  lengths = state["lengths"] + active.astype(jnp.int32)
  recent = jnp.concatenate([state["recent"][:, 1:], token[:, None]], axis=1)  # [B, longest stop]
  reason = end_reason(token, lengths, state["limits"], recent, spec)
  return {
      **state,
      "tokens": write(state["tokens"], token),
      "logprobs": write(state["logprobs"], jnp.where(active, logprob, zero)),
      "sampling_logprobs": write(state["sampling_logprobs"],
                                 jnp.where(active, sampling_logprob, zero)),
      "lengths": lengths,
      "recent": recent,
      "reason": jnp.where(active, reason, state["reason"]).astype(jnp.int32),
      "step": step + 1,
  }


def _prefill(params, prompt_tokens, prompt_mask, limits, row_ids, rng, *, config: ModelConfig,
             spec: DecodeSpec, decode_room: bool = True):
  """Runs the left-padded prompts [B, L] through the model and samples each row's first token.
  The cache holds L + max_new_tokens slots (L without `decode_room`, for `continuous`)."""
  TRACE_COUNTS["prefill"] += 1
  batch, length = prompt_tokens.shape
  cache = init_cache(config, batch, length + (spec.max_new_tokens if decode_room else 0))
  last_hidden, cache = _chunked_prefill(config, params, prompt_tokens, prompt_mask, cache,
                                        spec.prefill_chunk_tokens)
  # Left padding puts every row's last real token in the last column: only it needs logits.
  logits = Transformer(config).apply({"params": params}, last_hidden[:, None],
                                     method=Transformer.logits)[:, 0]
  state = decode_state(spec, cache, limits, jnp.where(limits > 0, RUNNING, LENGTH),
                       jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids),
                       jnp.zeros((), jnp.int32))
  return _record(state, logits, spec)


def decode_state(spec: DecodeSpec, cache, limits, reason, row_keys, step) -> dict:
  """The decode loop's carry for len(limits) rows with nothing generated yet: the cache, the
  output buffers [rows, max_new_tokens], the rows' limits, stop reasons and random keys."""
  rows = limits.shape[0]
  longest_stop = max([len(s) for s in spec.stop_sequences], default=1)
  return {
      "cache": cache,
      "tokens": jnp.full((rows, spec.max_new_tokens), spec.pad_id, jnp.int32),
      "logprobs": jnp.zeros((rows, spec.max_new_tokens), jnp.float32),
      "sampling_logprobs": jnp.zeros((rows, spec.max_new_tokens), jnp.float32),
      "lengths": jnp.zeros((rows,), jnp.int32),
      "limits": limits,
      "reason": reason.astype(jnp.int32),
      "recent": jnp.full((rows, longest_stop), -1, jnp.int32),  # never equals a token id
      "row_keys": row_keys,
      "step": step,
  }


def _chunked_prefill(config: ModelConfig, params, tokens, mask, cache, chunk_tokens: int):
  """Feeds the prompts [B, L] into the cache `chunk_tokens` columns at a time (a lax.scan).

  Attention scores then take [B, heads, chunk, capacity] instead of [B, heads, L, L]: what keeps
  a 8k-token prefill of a 7B model within device memory. Returns (hidden of the last column, cache).
  """
  batch, length = tokens.shape
  positions = positions_from_mask(mask)
  if length <= chunk_tokens or length % chunk_tokens:
    hidden, cache = forward(config, params, tokens, positions, mask, cache, return_hidden=True)
    return hidden[:, -1], cache

  def split(x):  # [B, L] -> [chunks, B, chunk]
    return x.reshape(batch, length // chunk_tokens, chunk_tokens).swapaxes(0, 1)

  def one_chunk(cache, chunk):
    chunk_tokens_, chunk_positions, chunk_mask = chunk
    hidden, cache = forward(config, params, chunk_tokens_, chunk_positions, chunk_mask, cache,
                            return_hidden=True)
    return cache, hidden[:, -1]

  cache, last_hiddens = jax.lax.scan(one_chunk, cache, (split(tokens), split(positions), split(mask)))
  return last_hiddens[-1], cache


def _decode(params, state, *, config: ModelConfig, spec: DecodeSpec):
  """Feeds the last sampled token of every row and samples the next, until all rows are done."""
  TRACE_COUNTS["decode"] += 1

  def not_finished(s):
    return (s["step"] < spec.max_new_tokens) & jnp.any(s["reason"] == RUNNING)

  def one_token(s):
    last_token = jax.lax.dynamic_slice_in_dim(s["tokens"], s["step"] - 1, 1, axis=1)  # [B, 1]
    positions = s["cache"]["lengths"][:, None]
    logits, cache = forward(config, params, last_token, positions, cache=s["cache"])
    return _record({**s, "cache": cache}, logits[:, 0], spec)

  return jax.lax.while_loop(not_finished, one_token, state)


prefill_jit = jax.jit(_prefill, static_argnames=("config", "spec", "decode_room"))
decode_jit = jax.jit(_decode, static_argnames=("config", "spec"), donate_argnums=(1,))


def batch_shards(batch_sharding) -> int:
  """How many pieces `batch_sharding` cuts the batch axis into (1 when there is none)."""
  if batch_sharding is None:
    return 1
  devices = len(batch_sharding.device_set)
  starts = {index[0].start for index in batch_sharding.devices_indices_map((devices, 1)).values()}
  return len(starts)


def check_prompts(config: ModelConfig, prompts, settings: SamplingSettings,
                  max_new_tokens_per_row) -> tuple[list[np.ndarray], np.ndarray]:
  """Prompts as int32 arrays and per-row token limits [N]; raises ValueError on bad input."""
  rows = [np.asarray(p) for p in prompts]
  if not rows:
    raise ValueError("prompts is empty: pass at least one prompt")
  longest_allowed = min(config.max_position_embeddings, settings.length_buckets[-1])
  for i, row in enumerate(rows):
    if row.ndim != 1 or (row.size and not np.issubdtype(row.dtype, np.integer)):
      raise ValueError(f"prompt {i} must be a 1-D sequence of token ids, got shape {row.shape} "
                       f"dtype {row.dtype}")
    if row.size == 0:
      raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    if row.size > longest_allowed:
      raise ValueError(
          f"prompt {i} has {row.size} tokens, more than the {longest_allowed} allowed "
          f"(max_position_embeddings={config.max_position_embeddings}, largest length bucket="
          f"{settings.length_buckets[-1]}): shorten it or add a larger length bucket")
    if row.min() < 0 or row.max() >= config.vocab_size:
      raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={config.vocab_size})")
  if max_new_tokens_per_row is None:
    limits = np.full(len(rows), settings.max_new_tokens, np.int32)
  else:
    limits = np.asarray(max_new_tokens_per_row)
    if limits.shape != (len(rows),):
      raise ValueError(f"max_new_tokens_per_row has shape {limits.shape}: give one limit per "
                       f"prompt ({len(rows)})")
    if limits.min() < 0 or limits.max() > settings.max_new_tokens:
      raise ValueError(f"max_new_tokens_per_row must lie in [0, max_new_tokens="
                       f"{settings.max_new_tokens}], got [{limits.min()}, {limits.max()}]")
  return [row.astype(np.int32) for row in rows], limits.astype(np.int32)


def left_pad(rows: list[np.ndarray], batch: int, length: int, pad_id: int):
  """rows -> tokens [batch, length] (left-padded with pad_id) and mask [batch, length] bool."""
  tokens = np.full((batch, length), pad_id, np.int32)
  mask = np.zeros((batch, length), bool)
  for i, row in enumerate(rows):
    tokens[i, length - len(row):] = row
    mask[i, length - len(row):] = True
  return tokens, mask


def generate(config: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], rng: Any,
             settings: SamplingSettings, max_new_tokens_per_row: Optional[Sequence[int]] = None,
             batch_sharding: Optional[jax.sharding.Sharding] = None) -> Generation:
  """Samples a continuation of every prompt (any number, any lengths up to the largest bucket).
  rng: a PRNG key or an int seed; max_new_tokens_per_row: optional limits [N] in [0,
  max_new_tokens]; batch_sharding: for the [batch, length] prompts (e.g. NamedSharding(mesh,
  P('data'))), batch buckets rounded up to its shard count. Params keep their sharding."""
  if settings.slots:
    raise ValueError(f"slots={settings.slots}: call gru_mem.continuous.generate (or set slots=0)")
  rows, limits = check_prompts(config, prompts, settings, max_new_tokens_per_row)
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.PRNGKey(rng)
  spec = decode_spec(settings)
  shards = batch_shards(batch_sharding)
  largest_batch = smallest_bucket(settings.batch_buckets[-1], settings.batch_buckets,
                                  multiple_of=shards)
  finals = []
  for start in range(0, len(rows), largest_batch):  # dispatch every batch before reading any
    chunk = rows[start:start + largest_batch]
    batch = smallest_bucket(len(chunk), settings.batch_buckets, multiple_of=shards)
    length = smallest_bucket(max(len(r) for r in chunk), settings.length_buckets)
    tokens, mask = left_pad(chunk, batch, length, settings.pad_id)
    if batch_sharding is not None:
      tokens, mask = jax.device_put((tokens, mask), batch_sharding)
    chunk_limits = np.zeros(batch, np.int32)  # dummy rows: limit 0, done from the start
    chunk_limits[:len(chunk)] = limits[start:start + len(chunk)]
    row_ids = np.arange(start, start + batch, dtype=np.int32)
    state = prefill_jit(params, tokens, mask, chunk_limits, row_ids, rng, config=config,
                         spec=spec)
    state = decode_jit(params, state, config=config, spec=spec)
    del state["cache"]
    finals.append((len(chunk), state))
  return _collect(finals)


def _collect(finals) -> Generation:
  """Copies the finished batches to the host, drops dummy rows and joins them in input order."""
  fields = ("tokens", "lengths", "logprobs", "sampling_logprobs", "reason")
  host = jax.device_get([{k: state[k] for k in fields} for _, state in finals])
  joined = {k: np.concatenate([h[k][:n] for (n, _), h in zip(finals, host)]) for k in fields}
  reason = np.array([STOP_REASONS[int(r)] for r in joined["reason"]])
  return Generation(tokens=joined["tokens"], lengths=joined["lengths"],
                    logprobs=joined["logprobs"], sampling_logprobs=joined["sampling_logprobs"],
                    stop_reason=reason)
