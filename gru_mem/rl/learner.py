"""The learner: packs turns into bucketed micro-batches and takes one exact Multi-Conv DAPO step.

Rows. Every (prompt, response) turn of every trajectory is one `LearnerRow`. `pack_rows`
right-pads prompt + response into `tokens [micro, rows, length]` and lays the response out in
its own `[micro, rows, response]` arrays (tokens, mask, pi_old and pi_ref log-probs), with
`predict_positions` saying which position's hidden state predicts each response token. `length`
and `response` are each rounded up to one of `length_buckets` and the micro-batch count to a
power of two, so a run compiles at most (#buckets)^2 x (1 + log2(most micro-batches)) times.

Exact micro-batching. One jit runs a loop over the real micro-batches (padding micro-batches
are never computed) that adds up each one's loss sums and the gradient of its `loss_sum`; the
mean gradient is the summed gradient divided once by the batch's response-token count, which is
the gradient of the whole batch's token-mean loss (see `loss.py`). Clipping by global norm and
AdamW then act on that full-batch mean.

Memory. The full logits `[rows, length, vocab]` are never formed: the hidden states that predict
response tokens are gathered into `[rows, response, embed]` first and only those are projected
to the vocabulary (the vocab is 152k for Qwen, so logits dwarf every activation). For a micro-
batch of 4 rows of 2048 tokens with 200-token responses, XLA's memory analysis of the step
(152k vocab, the tiny model's other dims, CPU) gives 2.8 GiB of temporaries instead of 12.0 GiB
with full logits. `micro_batch_rows` bounds it further; the entropy metric adds 0.6 GiB there.

Sharding. With a mesh, parameters and optimizer state carry `parallel.param_shardings` /
`optimizer_state_shardings`, batch rows are split over ('data', 'fsdp') (`shard_batch`), the step
is traced under `parallel.activate(mesh, rules)` so the model's activation constraints apply,
and the new state is given the shardings of the old one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from gru_mem.model.config import ModelConfig
from gru_mem.model.transformer import Transformer, forward
from gru_mem.rl import loss

# How many times each jitted function was traced (= compiled). Tests read it to bound compiles.
TRACE_COUNTS: collections.Counter = collections.Counter()

_DEFAULT_LENGTH_BUCKETS = tuple(2 ** i for i in range(6, 16))  # 64 ... 32768
_DECAYED_PARAMS = ("kernel", "embed_tokens", "lm_head")  # weight decay skips biases and norms


@dataclasses.dataclass(frozen=True)
class LearnerSettings:
  """Optimizer and loss hyper-parameters (each a config key).

  learning_rate: peak AdamW step size; warmup_steps: linear warmup to it; lr_schedule: 'constant'
  after warmup, or 'cosine' down to final_lr_fraction * learning_rate over decay_steps.
  weight_decay: decoupled AdamW decay of matrices and embeddings (never biases or norms); 0 by
  default, as the KL to the reference already anchors the policy and decay toward zero would pull
  a pretrained model off its weights. max_grad_norm: clip of the full-batch mean gradient
  (0 disables). clip_eps_low/high, kl_beta: the DAPO loss (kl_beta 0 needs no reference model).
  micro_batch_rows: rows per micro-batch (a multiple of data*fsdp on a mesh). length_buckets:
  allowed padded lengths of prompt+response and of responses. compute_entropy: report the token-
  mean entropy of the policy on the responses (no gradient; costs one more pass over the logits).
  """

  learning_rate: float = 1e-6
  warmup_steps: int = 0
  lr_schedule: str = "constant"
  decay_steps: int = 0
  final_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  max_grad_norm: float = 1.0
  clip_eps_low: float = 0.2
  clip_eps_high: float = 0.28
  kl_beta: float = 0.001
  micro_batch_rows: int = 8
  length_buckets: tuple[int, ...] = _DEFAULT_LENGTH_BUCKETS
  compute_entropy: bool = True

  def __post_init__(self):
    object.__setattr__(self, "length_buckets", tuple(int(b) for b in self.length_buckets))
    buckets = self.length_buckets
    if not buckets or buckets[0] < 1 or list(buckets) != sorted(set(buckets)):
      raise ValueError(f"length_buckets={buckets}: must be a non-empty increasing tuple of sizes "
                       ">= 1")
    if self.micro_batch_rows < 1:
      raise ValueError(f"micro_batch_rows={self.micro_batch_rows}: must be >= 1")
    if self.learning_rate < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
      raise ValueError("learning_rate, weight_decay and max_grad_norm must be >= 0, got "
                       f"{self.learning_rate}, {self.weight_decay}, {self.max_grad_norm}")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps={self.warmup_steps}: must be >= 0")
    if self.lr_schedule not in ("constant", "cosine"):
      raise ValueError(f"lr_schedule={self.lr_schedule!r}: use 'constant' or 'cosine'")
    if self.lr_schedule == "cosine" and self.decay_steps < 1:
      raise ValueError(f"lr_schedule='cosine' needs decay_steps >= 1, got {self.decay_steps}")
    if not (0 <= self.clip_eps_low < 1 and self.clip_eps_high >= 0):
      raise ValueError(f"clip_eps_low={self.clip_eps_low} must be in [0, 1) and clip_eps_high="
                       f"{self.clip_eps_high} >= 0")
    if self.kl_beta < 0:
      raise ValueError(f"kl_beta={self.kl_beta}: must be >= 0 (0 disables the reference model)")


@dataclasses.dataclass
class LearnerRow:
  """One turn: prompt ids, response ids, the turn's advantage, pi_old (and optionally pi_ref)
  log-probs of each response token ([len(response_ids)] float arrays)."""
  prompt_ids: np.ndarray
  response_ids: np.ndarray
  advantage: float
  old_logprobs: np.ndarray
  ref_logprobs: Optional[np.ndarray] = None


@struct.dataclass
class Batch:
  """Packed rows. Row k of the input is row k % rows of micro-batch k // rows.

  tokens, input_mask: [micro, rows, length] prompt + response, right-padded; mask = real tokens.
  predict_positions: [micro, rows, response] int32, the position whose hidden state predicts
  response token j (prompt length - 1 + j). response_tokens, response_mask, old_logprobs,
  ref_logprobs (None when absent): [micro, rows, response]. advantages: [micro, rows].
  num_rows: [] int32, the number of real rows (padding rows follow them, mask all false).
  """
  tokens: Any
  input_mask: Any
  predict_positions: Any
  response_tokens: Any
  response_mask: Any
  advantages: Any
  old_logprobs: Any
  ref_logprobs: Any
  num_rows: Any

  def micro_batch(self, index):
    """Micro-batch `index` (may be traced): every [micro, ...] field indexed at `index`."""
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False),
                        self.replace(num_rows=None))


@struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: Any  # [] int32, updates taken so far


def _bucket(size: int, buckets: Sequence[int], what: str) -> int:
  for bucket in buckets:
    if bucket >= size:
      return bucket
  raise ValueError(f"{what} of {size} tokens exceeds the largest length bucket {buckets[-1]}: "
                   "add a larger bucket to length_buckets or shorten the rows")


def _check_row(i: int, row: LearnerRow, with_ref: bool) -> None:
  prompt, response = np.asarray(row.prompt_ids), np.asarray(row.response_ids)
  if prompt.ndim != 1 or prompt.size == 0:
    raise ValueError(f"row {i}: prompt_ids must be a non-empty 1-D array, got shape {prompt.shape}")
  if response.ndim != 1 or response.size == 0:
    raise ValueError(f"row {i}: response_ids must be a non-empty 1-D array, got shape "
                     f"{response.shape}; drop turns with empty responses")
  if np.shape(row.old_logprobs) != response.shape:
    raise ValueError(f"row {i}: old_logprobs has shape {np.shape(row.old_logprobs)}, want one per "
                     f"response token {response.shape}")
  if (row.ref_logprobs is not None) != with_ref:
    raise ValueError(f"row {i}: give ref_logprobs for every row or for none")
  if with_ref and np.shape(row.ref_logprobs) != response.shape:
    raise ValueError(f"row {i}: ref_logprobs has shape {np.shape(row.ref_logprobs)}, want "
                     f"{response.shape}")
  if not np.isfinite(row.advantage):
    raise ValueError(f"row {i}: advantage {row.advantage} is not finite")


def pack_rows(rows: Sequence[LearnerRow], length_buckets: Sequence[int], micro_batch_rows: int,
              pad_id: int = 0) -> Batch:
  """Rows -> a `Batch` of numpy arrays: [micro, micro_batch_rows, bucketed length] (see `Batch`).

  The micro-batch count is rounded up to a power of two with all-padding micro-batches.
  """
  if not rows:
    raise ValueError("rows is empty: pass at least one LearnerRow")
  if micro_batch_rows < 1:
    raise ValueError(f"micro_batch_rows={micro_batch_rows}: must be >= 1")
  with_ref = rows[0].ref_logprobs is not None
  for i, row in enumerate(rows):
    _check_row(i, row, with_ref)
  length = _bucket(max(len(r.prompt_ids) + len(r.response_ids) for r in rows), length_buckets,
                   "a prompt + response")
  response = _bucket(max(len(r.response_ids) for r in rows), length_buckets, "a response")
  num_micro = 1 << (math.ceil(len(rows) / micro_batch_rows) - 1).bit_length()
  total = num_micro * micro_batch_rows
  arrays = {
      "tokens": np.full((total, length), pad_id, np.int32),
      "input_mask": np.zeros((total, length), bool),
      "predict_positions": np.zeros((total, response), np.int32),
      "response_tokens": np.full((total, response), pad_id, np.int32),
      "response_mask": np.zeros((total, response), bool),
      "advantages": np.zeros((total,), np.float32),
      "old_logprobs": np.zeros((total, response), np.float32),
      "ref_logprobs": np.zeros((total, response), np.float32) if with_ref else None,
  }
  for k, row in enumerate(rows):
    prompt_len, response_len = len(row.prompt_ids), len(row.response_ids)
    arrays["tokens"][k, :prompt_len] = row.prompt_ids
    arrays["tokens"][k, prompt_len:prompt_len + response_len] = row.response_ids
    arrays["input_mask"][k, :prompt_len + response_len] = True
    arrays["predict_positions"][k, :response_len] = np.arange(prompt_len - 1,
                                                              prompt_len - 1 + response_len)
    arrays["response_tokens"][k, :response_len] = row.response_ids
    arrays["response_mask"][k, :response_len] = True
    arrays["advantages"][k] = row.advantage
    arrays["old_logprobs"][k, :response_len] = row.old_logprobs
    if with_ref:
      arrays["ref_logprobs"][k, :response_len] = row.ref_logprobs
  arrays = {name: None if a is None else a.reshape(num_micro, micro_batch_rows, *a.shape[1:])
            for name, a in arrays.items()}
  return Batch(**arrays, num_rows=np.int32(len(rows)))


def response_values(batch: Batch, values) -> list[np.ndarray]:
  """Per real row, the entries of `values [micro, rows, response]` on its response tokens."""
  values = np.asarray(values).reshape(-1, np.shape(values)[-1])
  mask = np.asarray(batch.response_mask).reshape(values.shape)
  return [values[k, mask[k]] for k in range(int(batch.num_rows))]


# ----------------------------------------------------------------------------- log-probs and loss


def _response_logits(config: ModelConfig, params, micro: Batch):
  """Logits [rows, response, vocab] (float32) of the response tokens only.

  Runs the decoder over [rows, length], gathers the hidden states at `predict_positions` into
  [rows, response, embed] and projects only those to the vocabulary.
  """
  hidden, _ = forward(config, params, micro.tokens, mask=micro.input_mask, return_hidden=True)
  picked = jnp.take_along_axis(hidden, micro.predict_positions[..., None], axis=1)
  picked = nn.with_logical_constraint(picked, ("batch", "length", "embed"))
  return Transformer(config).apply({"params": params}, picked, method=Transformer.logits)


def _token_log_probs(logits, tokens):
  """log softmax(logits)[token] = logits[token] - logsumexp(logits), logits [rows, response, vocab].

  Same numbers as `loss.token_log_probs`, but no [rows, response, vocab] log-softmax is kept for
  the backward pass: 30% less temporary memory for the step (2.8 vs 4.0 GiB with 152k vocab,
  4 x 256 response slots, measured with XLA's memory analysis on CPU).
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def _micro_batch_terms(params, micro: Batch, config: ModelConfig, settings: LearnerSettings):
  """The loss sums of one micro-batch; `loss_sum` is what gets differentiated."""
  logits = _response_logits(config, params, micro)
  logp = _token_log_probs(logits, micro.response_tokens)  # [rows, response]
  terms = loss.policy_loss_terms(
      logp, micro.old_logprobs, micro.ref_logprobs, micro.advantages, micro.response_mask,
      clip_eps_low=settings.clip_eps_low, clip_eps_high=settings.clip_eps_high,
      kl_beta=settings.kl_beta)
  if settings.compute_entropy:
    terms["entropy_sum"] = jax.lax.stop_gradient(loss.entropy_sum(logits, micro.response_mask))
  return terms["loss_sum"], terms


def _num_micro_batches(batch: Batch):
  """The real micro-batches, ceil(num_rows / rows) (traced): the loops skip the padding ones."""
  rows = batch.tokens.shape[1]
  return (jnp.asarray(batch.num_rows, jnp.int32) + rows - 1) // rows


def _gradient_sums(params, batch: Batch, config: ModelConfig, settings: LearnerSettings):
  """(sum over micro-batches of d loss_sum / d params (float32), summed loss terms)."""
  grad_fn = jax.value_and_grad(_micro_batch_terms, has_aux=True)
  zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  zero_terms = jax.eval_shape(lambda: _micro_batch_terms(params, batch.micro_batch(0), config,
                                                         settings)[1])
  zero_terms = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_terms)

  def add_micro_batch(index, carry):
    grad_sum, terms_sum = carry
    (_, terms), grads = grad_fn(params, batch.micro_batch(index), config, settings)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
    return grad_sum, loss.add_terms(terms_sum, terms)

  return jax.lax.fori_loop(0, _num_micro_batches(batch), add_micro_batch,
                           (zero_grads, zero_terms))


def _log_probs(params, batch: Batch, *, config: ModelConfig, rules=None):
  """log pi(response token) [micro, rows, response] under `params` (0 on padding).

  `rules` only keys the jit cache: flax's logical-axis rules are not part of JAX's trace cache.
  """
  TRACE_COUNTS["log_probs"] += 1

  def fill(index, out):
    micro = batch.micro_batch(index)
    logp = _token_log_probs(_response_logits(config, params, micro), micro.response_tokens)
    logp = jnp.where(micro.response_mask, logp, 0.0)
    return jax.lax.dynamic_update_index_in_dim(out, logp, index, 0)

  out = jnp.zeros(batch.response_tokens.shape, jnp.float32)
  return jax.lax.fori_loop(0, _num_micro_batches(batch), fill, out)


_log_probs_jit = jax.jit(_log_probs, static_argnames=("config", "rules"))


def _rules(mesh, rules):
  """The logical-axis rules in force: None without a mesh, else `rules` or parallel.RULES."""
  if mesh is None:
    return None
  from gru_mem import parallel  # pylint: disable=import-outside-toplevel
  return tuple(parallel.RULES if rules is None else rules)


def _activated(mesh, rules):
  """`parallel.activate(mesh, rules)` (activation constraints apply when tracing), or nothing."""
  if mesh is None:
    return contextlib.nullcontext()
  from gru_mem import parallel  # pylint: disable=import-outside-toplevel
  return parallel.activate(mesh, _rules(mesh, rules))


def policy_log_probs(config: ModelConfig, params, batch: Batch, mesh=None, rules=None):
  """log pi_theta of every response token, [micro, rows, response] float32 (0 on padding).
  Compare with `batch.old_logprobs` to check pi_old; `response_values` unpacks it per row."""
  with _activated(mesh, rules):
    return _log_probs_jit(params, batch, config=config, rules=_rules(mesh, rules))


def reference_log_probs(config: ModelConfig, ref_params, batch: Batch, mesh=None, rules=None):
  """log pi_ref [micro, rows, response] from frozen reference params, for the k3 KL term:
  `batch = batch.replace(ref_logprobs=reference_log_probs(config, ref_params, batch))`."""
  return policy_log_probs(config, ref_params, batch, mesh, rules)


# ----------------------------------------------------------------------------- optimizer and step


def learning_rate_at(settings: LearnerSettings, step):
  """lr(t) = lr * min(1, (t + 1) / warmup); with 'cosine', for s = t - warmup after warmup:
  lr * (f + (1 - f) * (1 + cos(pi * min(s / decay_steps, 1))) / 2), f = final_lr_fraction."""
  step = jnp.asarray(step, jnp.float32)
  peak = settings.learning_rate
  warmup = jnp.minimum(1.0, (step + 1.0) / max(settings.warmup_steps, 1))
  if settings.lr_schedule == "constant":
    return peak * warmup
  progress = jnp.clip((step - settings.warmup_steps) / settings.decay_steps, 0.0, 1.0)
  f = settings.final_lr_fraction
  cosine = f + (1.0 - f) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < settings.warmup_steps, peak * warmup, peak * cosine)


def _decay_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in _DECAYED_PARAMS, params)


def make_optimizer(settings: LearnerSettings) -> optax.GradientTransformation:
  """Clip by global norm (of the full-batch mean gradient), then AdamW on `learning_rate_at`."""
  adamw = optax.adamw(lambda count: learning_rate_at(settings, count), b1=settings.adam_b1,
                      b2=settings.adam_b2, eps=settings.adam_eps,
                      weight_decay=settings.weight_decay, mask=_decay_mask)
  if not settings.max_grad_norm:
    return adamw
  return optax.chain(optax.clip_by_global_norm(settings.max_grad_norm), adamw)


def state_shardings(config: ModelConfig, settings: LearnerSettings, mesh, rules=None):
  """The TrainState of NamedShardings on `mesh`: params per `parallel.param_shardings`, Adam
  moments like their params, counts replicated."""
  from gru_mem import parallel  # pylint: disable=import-outside-toplevel
  from gru_mem.model.transformer import abstract_params  # pylint: disable=import-outside-toplevel
  rules = parallel.RULES if rules is None else rules
  params = parallel.param_shardings(config, mesh, rules)
  opt_state = parallel.optimizer_state_shardings(make_optimizer(settings), abstract_params(config),
                                                 params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return TrainState(params=params, opt_state=opt_state, step=replicated)


def _init_state(params, settings: LearnerSettings) -> TrainState:
  return TrainState(params=params, opt_state=make_optimizer(settings).init(params),
                    step=jnp.zeros((), jnp.int32))


_init_state_jit = jax.jit(_init_state, static_argnames=("settings",))


def create_train_state(params, settings: LearnerSettings, shardings: Optional[TrainState] = None
                       ) -> TrainState:
  """A fresh TrainState (step 0) holding its own copy of `params` (the train step donates it).
  With `shardings` (from `state_shardings`) every leaf is created in its shards."""
  if shardings is None:
    return _init_state_jit(params, settings=settings)
  init = jax.jit(_init_state, static_argnames=("settings",), out_shardings=shardings)
  return init(jax.device_put(params, shardings.params), settings=settings)


def shard_batch(batch: Batch, mesh) -> Batch:
  """Places a packed batch on `mesh` with its rows split over ('data', 'fsdp')."""
  from gru_mem import parallel  # pylint: disable=import-outside-toplevel
  shards = math.prod(mesh.shape[a] for a in parallel.BATCH_AXES)
  rows = np.shape(batch.tokens)[1]
  if rows % shards:
    raise ValueError(f"micro_batch_rows={rows} is not divisible by data*fsdp = {shards}: use a "
                     f"multiple of {shards}")
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXES))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.device_put(x, split if np.ndim(x) >= 2 else replicated), batch)


def _train_step(state: TrainState, batch: Batch, *, config: ModelConfig,
                settings: LearnerSettings):
  """One update: theta <- AdamW(clip(sum_micro grad loss_sum / token_count))."""
  TRACE_COUNTS["train_step"] += 1
  grad_sum, terms = _gradient_sums(state.params, batch, config, settings)
  tokens = terms["token_count"]
  grads = jax.tree.map(lambda g, p: (g / jnp.maximum(tokens, 1.0)).astype(p.dtype), grad_sum,
                       state.params)
  updates, opt_state = make_optimizer(settings).update(grads, state.opt_state, state.params)
  new_state = TrainState(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                         step=state.step + 1)
  metrics = {**loss.token_means(terms), "grad_norm": optax.global_norm(grads),
             "learning_rate": learning_rate_at(settings, state.step), "tokens": tokens}
  if settings.compute_entropy:
    metrics["entropy"] = terms["entropy_sum"] / jnp.maximum(tokens, 1.0)
  return new_state, metrics


def make_train_step(config: ModelConfig, settings: LearnerSettings, mesh=None, rules=None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """`train_step(state, batch) -> (new state, metrics)`, jitted, the state donated.

  metrics (scalars on device): loss, policy_loss, kl, clip_fraction, ratio_mean, entropy (if
  settings.compute_entropy), grad_norm (before clipping), learning_rate, tokens. With a mesh the
  state must carry `state_shardings(config, settings, mesh, rules)` and the batch `shard_batch`'s;
  the new state gets the same shardings and the trace sees the activation rules.
  """
  static = dict(config=config, settings=settings)
  if mesh is None:
    step_jit = jax.jit(lambda s, b: _train_step(s, b, **static), donate_argnums=0)
  else:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_jit = jax.jit(lambda s, b: _train_step(s, b, **static), donate_argnums=0,
                       out_shardings=(state_shardings(config, settings, mesh, rules), replicated))

  def train_step(state: TrainState, batch: Batch):
    if settings.kl_beta and batch.ref_logprobs is None:
      raise ValueError(f"kl_beta={settings.kl_beta} needs batch.ref_logprobs: set them with "
                       "reference_log_probs(config, ref_params, batch), or set kl_beta=0")
    if np.shape(batch.tokens)[1] != settings.micro_batch_rows:
      raise ValueError(f"batch has {np.shape(batch.tokens)[1]} rows per micro-batch but "
                       f"micro_batch_rows={settings.micro_batch_rows}: pack with the same value")
    with _activated(mesh, rules):
      return step_jit(state, batch)

  return train_step


def pack(rows: Sequence[LearnerRow], settings: LearnerSettings, pad_id: int = 0,
         mesh=None) -> Batch:
  """`pack_rows` with the settings' buckets and micro-batch size, placed on `mesh` if given."""
  batch = pack_rows(rows, settings.length_buckets, settings.micro_batch_rows, pad_id)
  return batch if mesh is None else shard_batch(batch, mesh)
