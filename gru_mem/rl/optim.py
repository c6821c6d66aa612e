"""The optimizer: clip by global norm, then AdamW on a warmup + constant / cosine schedule.

Weight decay acts on matrices and embeddings (`DECAYED_PARAMS`), never on biases or norms.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
import optax

DECAYED_PARAMS = ("kernel", "embed_tokens", "lm_head")  # weight decay skips biases and norms


class OptimizerSettings(Protocol):
  """The fields read here (`learner.LearnerSettings` has them all)."""
  learning_rate: float
  warmup_steps: int
  lr_schedule: str  # 'constant' | 'cosine'
  decay_steps: int
  final_lr_fraction: float
  weight_decay: float
  adam_b1: float
  adam_b2: float
  adam_eps: float
  max_grad_norm: float


def learning_rate_at(settings: OptimizerSettings, step):
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


def decay_mask(params):
  """True on the leaves weight decay acts on (names in `DECAYED_PARAMS`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in DECAYED_PARAMS, params)


def make_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
  """Clip by global norm (of the full-batch mean gradient; max_grad_norm 0 skips it), then AdamW
  with step size `learning_rate_at(settings, count)`."""
  adamw = optax.adamw(lambda count: learning_rate_at(settings, count), b1=settings.adam_b1,
                      b2=settings.adam_b2, eps=settings.adam_eps,
                      weight_decay=settings.weight_decay, mask=decay_mask)
  if not settings.max_grad_norm:
    return adamw
  return optax.chain(optax.clip_by_global_norm(settings.max_grad_norm), adamw)
