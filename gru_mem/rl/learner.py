"""The learner: one exact gradient-accumulation step, with the loss (an `Objective`) as an argument.

Objectives. An objective turns one micro-batch's response logits into float32 sums (at least
`loss_sum`, the value differentiated, and `token_count`) and the batch's summed terms into
metrics. `DAPO` is Multi-Conv DAPO (`loss.policy_loss_terms`: clipped surrogate + beta k3 KL,
plus the policy entropy as a metric); `NLL` is the supervised warm start's
loss_sum = -sum log pi(response token), with greedy token accuracy.

Exact micro-batching. One jit runs a loop over the real micro-batches (padding micro-batches
are never computed) that adds up each one's sums and the gradient of its `loss_sum` in float32;
the mean gradient is the summed gradient divided once by the batch's response-token count:
  g = (1 / N) sum_m d loss_sum_m / d theta,   N = sum_m token_count_m,
which is the gradient of the whole batch's token-mean loss (see `loss.py`). Clipping by global
norm and AdamW (`optim.py`) then act on that full-batch mean. Rounding: DAPO takes sum * (1/N),
NLL sum / N (`Objective.reciprocal_mean`): the programs RL and SFT had before they shared this
step (XLA turns a per-leaf division by one scalar into a multiplication by its reciprocal).

Bad numbers (issue 19). If loss_sum or the gradient's global norm is not finite, the update is
not applied: the returned state is the input state, the step counter and the optimizer state
included (so Adam's moments and count are never poisoned and `step` counts applied updates),
and metrics['nonfinite'] = 1 (else 0). Stopping after several such steps is the run loop's job.

Memory. The full logits `[rows, length, vocab]` are never formed: only the hidden states that
predict response tokens, `[rows, response, embed]`, are projected to the vocab. For 4 rows of 2048
tokens with 200-token responses, XLA's memory analysis of the step (152k vocab, tiny model, CPU)
gives 2.8 GiB of temporaries instead of 12.0 GiB with full logits; the entropy metric adds 0.6 GiB.

Sharding. With a mesh, parameters and optimizer state carry `state_shardings`, batch rows are
split over ('data', 'fsdp') (`batch.pack_rows(..., mesh=mesh)`), the step is traced under
`parallel.activate(mesh, rules)` so the model's activation constraints apply, and the new state
is given the shardings of the old one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from gru_mem import buckets, parallel
from gru_mem.model import shardings as model_shardings
from gru_mem.model.config import ModelConfig
from gru_mem.model.transformer import Transformer, abstract_params, forward
from gru_mem.rl import loss, optim
from gru_mem.rl.batch import DEFAULT_LENGTH_BUCKETS, Batch

# How many times each jitted function was traced (= compiled). Tests read it to bound compiles.
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class LearnerSettings:
  """Optimizer and loss hyper-parameters.

  learning_rate: peak AdamW step size; warmup_steps: linear warmup to it; lr_schedule: 'constant'
  after warmup, or 'cosine' down to final_lr_fraction * learning_rate over decay_steps.
  weight_decay: decoupled AdamW decay of matrices and embeddings (never biases or norms).
  max_grad_norm: clip of the full-batch mean gradient (0 disables). clip_eps_low/high, kl_beta:
  the DAPO loss (kl_beta 0 needs no reference model). clip_ratio_c: dual-clip, the loss of a
  token with A < 0 capped at -c * A (0 disables; else > 1). log_ratio_clamp: log-ratios clamped
  to [-r, r] before exp (0 disables). kl_clamp: the per-token k3 KL clamped to [-k, k] (0
  disables). micro_batch_rows: rows per micro-batch (a multiple of data*fsdp on a mesh).
  length_buckets: allowed padded lengths of prompt+response and of responses. compute_entropy:
  report the token-mean entropy of the policy on the responses (no gradient; one more pass
  over the logits).
  """

  learning_rate: float = 1e-6
  warmup_steps: int = 0
  lr_schedule: str = "constant"
  decay_steps: int = 0
  final_lr_fraction: float = 0.1
  weight_decay: float = 0.01
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  max_grad_norm: float = 1.0
  clip_eps_low: float = 0.2
  clip_eps_high: float = 0.28
  kl_beta: float = 0.001
  clip_ratio_c: float = 3.0
  log_ratio_clamp: float = 20.0
  kl_clamp: float = 10.0
  micro_batch_rows: int = 8
  length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS
  compute_entropy: bool = True

  def __post_init__(self):
    object.__setattr__(self, "length_buckets", buckets.check_buckets(self.length_buckets))
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
    if self.clip_ratio_c and self.clip_ratio_c <= 1:
      raise ValueError(f"clip_ratio_c={self.clip_ratio_c}: must be > 1 (verl uses 3), or 0 to "
                       "disable dual-clip")
    if self.log_ratio_clamp < 0 or self.kl_clamp < 0:
      raise ValueError(f"log_ratio_clamp={self.log_ratio_clamp} and kl_clamp={self.kl_clamp} "
                       "must be >= 0 (0 disables the clamp)")


@struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: Any  # [] int32, updates applied so far


# ----------------------------------------------------------------------------- objectives


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss: `micro_batch_terms(logits, micro, settings)` -> dict of float32 sums over one
  micro-batch (with `loss_sum`, differentiated, and `token_count`), logits [rows, response,
  vocab]; `metrics(summed terms, settings)` -> dict of numbers; `check_batch(batch, settings)`
  raises before compiling if the batch lacks what the loss needs; `reciprocal_mean`: see above."""
  name: str
  micro_batch_terms: Callable[..., dict]
  metrics: Callable[..., dict]
  check_batch: Callable[..., None] = lambda batch, settings: None
  reciprocal_mean: bool = False  # the mean gradient as sum * (1 / N), else sum / N


def _dapo_terms(logits, micro: Batch, settings: LearnerSettings) -> dict:
  logp = loss.token_log_probs(logits, micro.response_tokens)  # [rows, response]
  terms = loss.policy_loss_terms(
      logp, micro.old_logprobs, micro.ref_logprobs, micro.advantages, micro.response_mask,
      clip_eps_low=settings.clip_eps_low, clip_eps_high=settings.clip_eps_high,
      kl_beta=settings.kl_beta, clip_ratio_c=settings.clip_ratio_c,
      log_ratio_clamp=settings.log_ratio_clamp, kl_clamp=settings.kl_clamp)
  if settings.compute_entropy:
    terms["entropy_sum"] = jax.lax.stop_gradient(loss.entropy_sum(logits, micro.response_mask))
  return terms


def _dapo_metrics(terms: dict, settings: LearnerSettings) -> dict:
  if not settings.compute_entropy:
    return loss.token_means(terms)
  return {**loss.token_means(terms),
          "entropy": terms["entropy_sum"] / loss.at_least_one(terms["token_count"])}


def _dapo_check(batch: Batch, settings: LearnerSettings) -> None:  # before compiling
  if settings.kl_beta and batch.ref_logprobs is None:
    raise ValueError(f"kl_beta={settings.kl_beta} needs batch.ref_logprobs: set them with "
                     "reference_log_probs(config, ref_params, batch), or set kl_beta=0")


def _nll_terms(logits, micro: Batch, _settings: LearnerSettings) -> dict:
  """nll_sum = loss_sum = -sum log pi(response token); correct_count: tokens greedy decoding
  would have produced."""
  logp = loss.log_softmax_at(logits, micro.response_tokens)  # [rows, response]
  mask = micro.response_mask
  nll_sum = -jnp.sum(jnp.where(mask, logp, 0.0))
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == micro.response_tokens) & mask)
  return {"loss_sum": nll_sum, "nll_sum": nll_sum,
          "token_count": jnp.sum(mask).astype(jnp.float32),
          "correct_count": correct.astype(jnp.float32)}


def _nll_metrics(terms: dict, _settings: LearnerSettings) -> dict:
  count = loss.at_least_one(terms["token_count"])
  return {"loss": terms["nll_sum"] / count, "token_accuracy": terms["correct_count"] / count}


DAPO = Objective("dapo", _dapo_terms, _dapo_metrics, _dapo_check, reciprocal_mean=True)
NLL = Objective("nll", _nll_terms, _nll_metrics)


# ----------------------------------------------------------------------------- log-probs


def response_logits(config: ModelConfig, params, micro: Batch):
  """Logits [rows, response, vocab] (float32) of the response tokens only: runs the decoder over
  [rows, length], gathers the hidden states at `predict_positions` into [rows, response, embed]
  and projects only those to the vocabulary."""
  hidden, _ = forward(config, params, micro.tokens, mask=micro.input_mask, return_hidden=True)
  picked = jnp.take_along_axis(hidden, micro.predict_positions[..., None], axis=1)
  picked = nn.with_logical_constraint(picked, ("batch", "length", "embed"))
  return Transformer(config).apply({"params": params}, picked, method=Transformer.logits)


def num_micro_batches(batch: Batch):
  """The real micro-batches, ceil(num_rows / rows) (traced): the loops skip the padding ones."""
  rows = batch.tokens.shape[1]
  return (jnp.asarray(batch.num_rows, jnp.int32) + rows - 1) // rows


def _log_probs(params, batch: Batch, *, config: ModelConfig, rules=None):
  """log pi(response token) [micro, rows, response] under `params` (0 on padding).

  `rules` only keys the jit cache: flax's logical-axis rules are not part of JAX's trace cache.
  """
  TRACE_COUNTS["log_probs"] += 1

  def fill(index, out):
    micro = batch.micro_batch(index)
    logp = loss.token_log_probs(response_logits(config, params, micro), micro.response_tokens)
    logp = jnp.where(micro.response_mask, logp, 0.0)
    return jax.lax.dynamic_update_index_in_dim(out, logp, index, 0)

  out = jnp.zeros(batch.response_tokens.shape, jnp.float32)
  return jax.lax.fori_loop(0, num_micro_batches(batch), fill, out)


_log_probs_jit = jax.jit(_log_probs, static_argnames=("config", "rules"))


def _rules(mesh, rules):
  """The logical-axis rules in force: None without a mesh, else `rules` or parallel.RULES."""
  return None if mesh is None else tuple(parallel.RULES if rules is None else rules)


def _activated(mesh, rules):
  """`parallel.activate(mesh, rules)` (activation constraints apply when tracing), or nothing."""
  return contextlib.nullcontext() if mesh is None else parallel.activate(mesh, _rules(mesh, rules))


def policy_log_probs(config: ModelConfig, params, batch: Batch, mesh=None, rules=None):
  """log pi_theta of every response token, [micro, rows, response] float32 (0 on padding).
  Compare with `batch.old_logprobs` to check pi_old; `batch.response_values` unpacks it per row."""
  with _activated(mesh, rules):
    return _log_probs_jit(params, batch, config=config, rules=_rules(mesh, rules))


def reference_log_probs(config: ModelConfig, ref_params, batch: Batch, mesh=None, rules=None):
  """log pi_ref [micro, rows, response] from frozen reference params, for the k3 KL term:
  `batch = batch.replace(ref_logprobs=reference_log_probs(config, ref_params, batch))`."""
  return policy_log_probs(config, ref_params, batch, mesh, rules)


# ----------------------------------------------------------------------------- state


def state_shardings(config: ModelConfig, settings: LearnerSettings, mesh, rules=None) -> TrainState:
  """The TrainState of NamedShardings on `mesh`: params per `model.shardings.param_shardings`,
  Adam moments like their params, counts replicated."""
  params = model_shardings.param_shardings(config, mesh, rules)
  opt_state = parallel.optimizer_state_shardings(optim.make_optimizer(settings),
                                                 abstract_params(config), params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return TrainState(params=params, opt_state=opt_state, step=replicated)


def _init_state(params, settings: LearnerSettings) -> TrainState:
  return TrainState(params=params, opt_state=optim.make_optimizer(settings).init(params),
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


# ----------------------------------------------------------------------------- the step


def _micro_batch_loss(params, micro: Batch, config: ModelConfig, settings: LearnerSettings,
                      objective: Objective):
  """(loss_sum, terms) of one micro-batch; loss_sum is what gets differentiated."""
  terms = objective.micro_batch_terms(response_logits(config, params, micro), micro, settings)
  return terms["loss_sum"], terms


def _gradient_sums(params, batch: Batch, config: ModelConfig, settings: LearnerSettings,
                   objective: Objective):
  """(sum over real micro-batches of d loss_sum / d params (float32), summed terms)."""
  grad_fn = jax.grad(_micro_batch_loss, has_aux=True)
  zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  zero_terms = jax.eval_shape(lambda: _micro_batch_loss(params, batch.micro_batch(0), config,
                                                        settings, objective)[1])
  zero_terms = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_terms)

  def add_micro_batch(index, carry):
    grad_sum, terms_sum = carry
    grads, terms = grad_fn(params, batch.micro_batch(index), config, settings, objective)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
    return grad_sum, loss.add_terms(terms_sum, terms)

  return jax.lax.fori_loop(0, num_micro_batches(batch), add_micro_batch,
                           (zero_grads, zero_terms))


def _train_step(state: TrainState, batch: Batch, *, config: ModelConfig,
                settings: LearnerSettings, objective: Objective):
  """One update theta <- AdamW(clip(sum_micro grad loss_sum / token_count)), kept only if finite."""
  TRACE_COUNTS["train_step"] += 1
  grad_sum, terms = _gradient_sums(state.params, batch, config, settings, objective)
  tokens, count = terms["token_count"], jnp.maximum(terms["token_count"], 1.0)  # one divisor
  mean = (lambda g: g * (1.0 / count)) if objective.reciprocal_mean else (lambda g: g / count)
  grads = jax.tree.map(lambda g, p: mean(g).astype(p.dtype), grad_sum, state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(terms["loss_sum"]) & jnp.isfinite(grad_norm)
  updates, opt_state = optim.make_optimizer(settings).update(grads, state.opt_state, state.params)
  new_state = TrainState(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                         step=state.step + 1)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {**objective.metrics(terms, settings), "grad_norm": grad_norm,
             "learning_rate": optim.learning_rate_at(settings, state.step), "tokens": tokens,
             "nonfinite": 1.0 - finite.astype(jnp.float32)}
  return new_state, metrics


@functools.lru_cache(maxsize=None)
def _cached_step_jit(config, settings, mesh, rules, objective):
  step = functools.partial(_train_step, config=config, settings=settings, objective=objective)
  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=0,
                 out_shardings=(state_shardings(config, settings, mesh, rules), replicated))


def train_step_jit(config: ModelConfig, settings: LearnerSettings, mesh=None, rules=None,
                   objective: Objective = DAPO):
  """The jax.jit object `make_train_step` runs (state donated; with a mesh, out_shardings =
  state_shardings). Lower it under `parallel.activate(mesh, rules)`, or use `lower_train_step`."""
  return _cached_step_jit(config, settings, mesh, _rules(mesh, rules), objective)


def lower_train_step(config: ModelConfig, settings: LearnerSettings, mesh, state, batch,
                     rules=None, objective: Objective = DAPO):
  """`train_step_jit(...).lower(state, batch)` traced with the activation rules in force; state
  and batch may be ShapeDtypeStructs carrying shardings (the dry run's ahead-of-time compile)."""
  with _activated(mesh, rules):
    return train_step_jit(config, settings, mesh, rules, objective).lower(state, batch)


def make_train_step(config: ModelConfig, settings: LearnerSettings, mesh=None, rules=None,
                    objective: Objective = DAPO
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """`train_step(state, batch) -> (new state, metrics)`, jitted, the state donated.

  metrics (scalars on device): the objective's (DAPO: loss, policy_loss, kl, clip_fraction,
  dual_clip_fraction, ratio_mean, entropy if settings.compute_entropy; NLL: loss,
  token_accuracy), grad_norm (before clipping), learning_rate, tokens, nonfinite (1 if the
  update was not applied). With a mesh the state must carry `state_shardings(config, settings,
  mesh, rules)` and the batch `pack_rows(..., mesh=mesh)`'s placement.
  """
  step_jit = train_step_jit(config, settings, mesh, rules, objective)

  def train_step(state: TrainState, batch: Batch):
    objective.check_batch(batch, settings)
    if np.shape(batch.tokens)[1] != settings.micro_batch_rows:
      raise ValueError(f"batch has {np.shape(batch.tokens)[1]} rows per micro-batch but "
                       f"micro_batch_rows={settings.micro_batch_rows}: pack with the same value")
    with _activated(mesh, rules):
      return step_jit(state, batch)

  return train_step


@functools.partial(jax.jit, static_argnames=("config", "settings", "objective"))
def _micro_batch_terms_jit(params, micro, *, config, settings, objective):
  return _micro_batch_loss(params, micro, config, settings, objective)[1]


def evaluate_objective(config: ModelConfig, params, batch: Batch, objective: Objective = NLL,
                       settings: Optional[LearnerSettings] = None) -> dict:
  """The objective's metrics of `params` on a packed batch, no update (e.g. NLL: token-mean
  NLL and greedy token accuracy). Sums each real micro-batch's terms on the host in float64."""
  settings = LearnerSettings(kl_beta=0.0) if settings is None else settings
  objective.check_batch(batch, settings)
  totals: dict[str, float] = {}
  for index in range(-(-int(batch.num_rows) // np.shape(batch.tokens)[1])):
    terms = jax.device_get(_micro_batch_terms_jit(params, batch.micro_batch(index), config=config,
                                                  settings=settings, objective=objective))
    totals = {k: totals.get(k, 0.0) + float(v) for k, v in terms.items()}
  return {k: float(v) for k, v in objective.metrics(totals, settings).items()}
