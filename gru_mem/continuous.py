"""Continuous batching: rows stream through a fixed number of decode slots on device.

`generate(config, params, prompts, rng, settings)` with `settings.slots = S > 0` gives the same
`Generation` as the static `sampling.generate`, but a row that is done frees its slot for the next
waiting prompt instead of idling until the slowest row of its batch ends. With `slots = 0` it is
the static sampler.

Each slot owns one row of a KV cache `[layers, S, P + max_new, kv_heads, head_dim]`, where P is
the length bucket of the call's longest prompt: a prompt (left-padded to its group's bucket
L <= P) sits in columns [P - L, P), its generated tokens from column P on, each slot at its own
step (the cache writes at a per-row index). The host loop:

  queue <- the rows in input order (rows with limit 0 are done without a slot)
  repeat until the queue is empty and every slot is done:
    free <- the slots whose row is done (their tokens go to the host)
    take g = min(|free|, |queue|) rows off the queue; prefill them as one group (a batch bucket
      >= g, its own length bucket, chunked prefill as in `sampling`) and copy the group's cache
      rows into the free slots' columns [P - L, P); the rest of those rows becomes invalid
    decode every slot one token per step inside one `lax.while_loop` until at least
      R = min(settings.refill_free_slots, |queue|) slots are done (queue empty: until all are)

So while rows wait, at most R - 1 slots idle, and the device loop is left once per R finished
rows (R trades idle slots against host round trips and prefill calls; see
benchmarks/continuous_batching.py). Compilations: the slot decode and the empty-slot state once
per (S, P), the group prefill once per (group bucket, length bucket), the copy into slots once
per (S, P, group bucket, length bucket); S is a batch bucket and P a length bucket.

Same results as the static path: row i's token t is drawn with key fold_in(fold_in(rng, i), t),
t being the row's own step, and a query only sees its own row's valid cache columns, so a row's
tokens and log-probs do not depend on its slot or its neighbours (up to float rounding of the
longer, masked attention rows).
"""

from __future__ import annotations

import collections
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gru_mem import parallel, sampling
from gru_mem.buckets import smallest_bucket
from gru_mem.model import kv_cache
from gru_mem.model.config import ModelConfig
from gru_mem.model.transformer import forward, init_cache
from gru_mem.sampling import RUNNING, LENGTH, STOP_REASONS, TRACE_COUNTS, DecodeSpec

_OUTPUTS = ("tokens", "lengths", "logprobs", "sampling_logprobs", "reason")
_ROW_FIELDS = ("tokens", "logprobs", "sampling_logprobs", "lengths", "limits", "reason", "recent",
               "row_keys", "step")


def _constrain(state: dict, row_sharding: Optional[NamedSharding]) -> dict:
  """Pins the slot dim of every slot array (axis 1 of the cache k/v) to the batch axes."""
  if row_sharding is None:
    return state
  axes = row_sharding.spec[0]

  def pin(x, slot_axis=0):
    spec = [None] * x.ndim
    spec[slot_axis] = axes
    return jax.lax.with_sharding_constraint(x, NamedSharding(row_sharding.mesh,
                                                             PartitionSpec(*spec)))
  def pin_kv(x):  # [layers, slots, columns, kv_heads, head_dim]: kv heads over tensor too
    tensor = row_sharding.mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and x.shape[3] % tensor == 0 else None
    return jax.lax.with_sharding_constraint(x, NamedSharding(
        row_sharding.mesh, PartitionSpec(None, axes, None, heads, None)))
  cache = {name: pin_kv(value) if name in kv_cache.CACHE_ARRAYS else pin(value)
           for name, value in state["cache"].items()}
  return {**{name: pin(value) for name, value in state.items() if name != "cache"},
          "cache": cache}


def _empty_slots(rng, *, config: ModelConfig, spec: DecodeSpec, slots: int, prompt_columns: int,
                 row_sharding: Optional[NamedSharding]) -> dict:
  """The state of `slots` slots that hold no row (all done), cache [.., slots, P + max_new, ..]."""
  TRACE_COUNTS["slot_init"] += 1
  cache = init_cache(config, slots, prompt_columns + spec.max_new_tokens)
  cache["index"] = jnp.full((slots,), prompt_columns, jnp.int32)  # per-slot write columns
  state = sampling.decode_state(
      spec, cache, jnp.zeros((slots,), jnp.int32), jnp.full((slots,), LENGTH),
      jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.zeros((slots,), jnp.int32)),
      jnp.zeros((slots,), jnp.int32))  # step: tokens sampled so far by the slot's row
  return _constrain(state, row_sharding)


def _insert(state: dict, group: dict, slot_ids, *, row_sharding: Optional[NamedSharding]) -> dict:
  """Copies a prefilled group (cache [.., G, L, ..]) into slots `slot_ids` [G] (out of range:
  a dummy row, dropped). Its prompt goes to columns [P - L, P); the slot's other columns become
  invalid, so nothing of the slot's previous row stays visible."""
  TRACE_COUNTS["slot_insert"] += 1
  cache, new = state["cache"], group["cache"]
  max_new = state["tokens"].shape[1]
  prompt_columns = cache["valid"].shape[1] - max_new
  first = prompt_columns - new["valid"].shape[1]
  valid_rows = jnp.pad(new["valid"], ((0, 0), (first, max_new)))  # [G, P + max_new]

  def put(buffer, rows):  # [S, ...] <- [G, ...]
    return buffer.at[slot_ids].set(rows.astype(buffer.dtype), mode="drop")

  def put_prompt(buffer, rows):  # k/v [layers, S, P + max_new, ...] <- [layers, G, L, ...]
    return buffer.at[:, slot_ids, first:prompt_columns].set(rows.astype(buffer.dtype), mode="drop")

  cache = {
      **{name: put_prompt(cache[name], new[name]) for name in kv_cache.CACHE_ARRAYS
         if name in cache},
      "valid": put(cache["valid"], valid_rows),
      "index": put(cache["index"], jnp.full(slot_ids.shape, prompt_columns, jnp.int32)),
      "lengths": put(cache["lengths"], new["lengths"]),
  }
  step = jnp.broadcast_to(group["step"], slot_ids.shape)
  rows = {name: put(state[name], step if name == "step" else group[name]) for name in _ROW_FIELDS}
  return _constrain({**rows, "cache": cache}, row_sharding)


def _record_slots(state: dict, logits: jax.Array, active: jax.Array, spec: DecodeSpec) -> dict:
  """Samples each active slot's next token (its token number `step`) and marks finished rows.

  A slot whose row is done writes nothing and keeps its step, so its outputs stay as they were.
  """
  keys = jax.vmap(jax.random.fold_in)(state["row_keys"], state["step"])
  token, logprob, sampling_logprob = sampling.sample_tokens(logits, keys, spec)
  token = jnp.where(active, token, spec.pad_id)
  slot = jnp.arange(token.shape[0])
  column = jnp.where(active, state["step"], spec.max_new_tokens)  # out of range: dropped

  def write(buffer, value):  # buffer [S, max_new], value [S]
    return buffer.at[slot, column].set(value.astype(buffer.dtype), mode="drop")

  lengths = state["lengths"] + active.astype(jnp.int32)
  shifted = jnp.concatenate([state["recent"][:, 1:], token[:, None]], axis=1)
  recent = jnp.where(active[:, None], shifted, state["recent"])
  reason = sampling.end_reason(token, lengths, state["limits"], recent, spec)
  return {
      **state,
      "tokens": write(state["tokens"], token),
      "logprobs": write(state["logprobs"], logprob),
      "sampling_logprobs": write(state["sampling_logprobs"], sampling_logprob),
      "lengths": lengths,
      "recent": recent,
      "reason": jnp.where(active, reason, state["reason"]),
      "step": state["step"] + active.astype(jnp.int32),
  }


def _decode_slots(params, state: dict, exit_when_done, *, config: ModelConfig, spec: DecodeSpec,
                  row_sharding: Optional[NamedSharding]) -> dict:
  """One token per step for every running slot until `exit_when_done` slots are done (or all)."""
  TRACE_COUNTS["slot_decode"] += 1
  prompt_columns = state["cache"]["valid"].shape[1] - spec.max_new_tokens

  def keep_going(s):
    running = s["reason"] == RUNNING
    return jnp.any(running) & (jnp.sum(~running) < exit_when_done)

  def one_token(s):
    active = s["reason"] == RUNNING
    last_token = jnp.take_along_axis(s["tokens"], jnp.maximum(s["step"] - 1, 0)[:, None], axis=1)
    # Token t - 1 of a slot's row goes to column P + t - 1; a done slot rewrites an unused column.
    cache = {**s["cache"], "index": prompt_columns + s["step"] - 1}
    logits, cache = forward(config, params, last_token, cache["lengths"][:, None],
                            active[:, None], cache)
    return _record_slots({**s, "cache": cache}, logits[:, 0], active, spec)

  return _constrain(jax.lax.while_loop(keep_going, one_token, state), row_sharding)


_empty_slots_jit = jax.jit(_empty_slots, static_argnames=(
    "config", "spec", "slots", "prompt_columns", "row_sharding"))
_insert_jit = jax.jit(_insert, static_argnames=("row_sharding",), donate_argnums=(0,))
_decode_slots_jit = jax.jit(_decode_slots, static_argnames=("config", "spec", "row_sharding"),
                            donate_argnums=(1,))
empty_slots_jit, decode_slots_jit = _empty_slots_jit, _decode_slots_jit  # for the dry run


def _row_sharding(batch_sharding) -> Optional[NamedSharding]:
  """A sharding of [slots] arrays over the batch axes of `batch_sharding` (None: one piece)."""
  if sampling.batch_shards(batch_sharding) == 1:
    return None
  if not isinstance(batch_sharding, NamedSharding):
    raise ValueError(f"batch_sharding={batch_sharding!r}: continuous batching needs a "
                     "NamedSharding (e.g. parallel.batch_sharding(mesh)) to split its slots")
  return NamedSharding(batch_sharding.mesh, PartitionSpec(batch_sharding.spec[0]))


def generate(config: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], rng: Any,
             settings: sampling.SamplingSettings,
             max_new_tokens_per_row: Optional[Sequence[int]] = None,
             batch_sharding: Optional[jax.sharding.Sharding] = None) -> sampling.Generation:
  """`sampling.generate`'s results through `settings.slots` decode slots (0: the static sampler).

  Arguments as `sampling.generate`. The slot count is rounded up to a multiple of the batch
  shards of `batch_sharding`, and lowered to a batch bucket >= the rows when there are fewer.
  """
  if not settings.slots:
    return sampling.generate(config, params, prompts, rng, settings, max_new_tokens_per_row,
                             batch_sharding)
  rows, limits = sampling.check_prompts(config, prompts, settings, max_new_tokens_per_row)
  row_sharding = _row_sharding(batch_sharding)
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.PRNGKey(rng)
  spec = sampling.decode_spec(settings)
  shards = sampling.batch_shards(batch_sharding)
  out = {"tokens": np.full((len(rows), spec.max_new_tokens), spec.pad_id, np.int32),
         "lengths": np.zeros(len(rows), np.int32),
         "logprobs": np.zeros((len(rows), spec.max_new_tokens), np.float32),
         "sampling_logprobs": np.zeros((len(rows), spec.max_new_tokens), np.float32),
         "reason": np.full(len(rows), LENGTH, np.int32)}  # rows with limit 0 stay like this
  queue = collections.deque(i for i in range(len(rows)) if limits[i] > 0)
  if queue:
    _stream(config, params, rows, limits, rng, settings, spec, shards, row_sharding,
            batch_sharding, queue, out)
  return sampling.Generation(
      tokens=out["tokens"], lengths=out["lengths"], logprobs=out["logprobs"],
      sampling_logprobs=out["sampling_logprobs"],
      stop_reason=np.array([STOP_REASONS[int(r)] for r in out["reason"]]))


def _stream(config, params, rows, limits, rng, settings, spec, shards, row_sharding,
            batch_sharding, queue: collections.deque, out: dict) -> None:
  """The host loop of the module docstring: fills `out` [N, ...] row by row as rows finish."""
  group_buckets = tuple(b for b in settings.batch_buckets if b < settings.slots) + (settings.slots,)
  slots = smallest_bucket(min(len(queue), settings.slots), group_buckets, multiple_of=shards)
  group_buckets = tuple(b for b in group_buckets if b < slots) + (slots,)
  refill = min(settings.refill_free_slots or max(1, slots // 4), slots)
  prompt_columns = smallest_bucket(max(len(rows[i]) for i in queue), settings.length_buckets)
  state = _empty_slots_jit(rng, config=config, spec=spec, slots=slots,
                           prompt_columns=prompt_columns, row_sharding=row_sharding)
  occupant = [-1] * slots  # the row each slot holds (-1: free)
  while True:
    free = [s for s in range(slots) if occupant[s] < 0]
    if queue and free:
      group = [queue.popleft() for _ in range(min(len(free), len(queue)))]
      size = smallest_bucket(len(group), group_buckets, multiple_of=shards)
      length = smallest_bucket(max(len(rows[i]) for i in group), settings.length_buckets)
      tokens, mask = sampling.left_pad([rows[i] for i in group], size, length, spec.pad_id)
      if batch_sharding is not None:
        tokens, mask = jax.device_put((tokens, mask), batch_sharding)
      padding = size - len(group)  # dummy rows: limit 0, slot id out of range (dropped)
      group_limits = np.concatenate([limits[group], np.zeros(padding, np.int32)])
      row_ids = np.asarray(group + [len(rows)] * padding, np.int32)
      slot_ids = np.asarray(free[:len(group)] + [slots] * padding, np.int32)
      prefilled = sampling.prefill_jit(params, tokens, mask, group_limits, row_ids, rng,
                                       config=config, spec=spec, decode_room=False)
      state = _insert_jit(state, prefilled, slot_ids, row_sharding=row_sharding)
      for slot, row in zip(free, group):
        occupant[slot] = row
    if all(row < 0 for row in occupant):
      return
    exit_when_done = min(refill, len(queue)) if queue else slots + 1  # empty queue: run to the end
    state = _decode_slots_jit(params, state, np.int32(exit_when_done), config=config, spec=spec,
                              row_sharding=row_sharding)
    host = parallel.to_host({name: state[name] for name in _OUTPUTS})
    for slot, row in enumerate(occupant):
      if row >= 0 and host["reason"][slot] != RUNNING:
        for name in _OUTPUTS:
          out[name][row] = host[name][slot]
        occupant[slot] = -1
