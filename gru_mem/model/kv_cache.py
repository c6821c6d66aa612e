"""The KV cache's storage: as the model computes (`"auto"`) or 8-bit (`"int8"`), as serving
engines store it to halve what a decode step reads.

int8 (symmetric, one scale per row, cache slot and kv head, over head_dim):

  scale[b, t, h] = max_d |x[b, t, h, d]| / 127   (1 where the vector is all zero)
  q[b, t, h, d]  = round(x[b, t, h, d] / scale[b, t, h])   in [-127, 127], stored as int8
  x ~ q * scale,   |x - q * scale| <= scale / 2 = max_d |x| / 254

Each token's k and v are quantized when they are written (prefill and decode alike); the cache
then holds int8 `k`, `v` [layers, batch, slots, kv_heads, head_dim] and float32 `k_scale`,
`v_scale` [layers, batch, slots, kv_heads, 1] (same rank and axes, so every cache array is laid
out, written and copied alike). Attention never dequantizes the cache as a whole: it folds the
scales into each key block's scores and probabilities (`attention.attention`'s k_scale /
v_scale): s_j = (q . k_j) * k_scale_j / sqrt(d) and out = sum_j (p_j v_scale_j) v_j, with q . k_j
and p . v over the int8 values converted block by block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KV_CACHE_DTYPES = ("auto", "int8")
CACHE_ARRAYS = ("k", "v", "k_scale", "v_scale")  # the arrays laid out by transformer.CACHE_AXES
INT8_MAX = 127.0


def check_kv_cache_dtype(name: str, key: str = "sampling.kv_cache_dtype") -> None:
  """Raises a ValueError naming the choices unless `name` is one of KV_CACHE_DTYPES."""
  if name not in KV_CACHE_DTYPES:
    raise ValueError(f"{key}={name!r}: use one of {KV_CACHE_DTYPES} ('auto': the cache in the "
                     "model's compute dtype, 'int8': 8-bit values with a float32 scale per "
                     "token and kv head)")


def cache_names(kv_cache_dtype: str) -> tuple:
  """The cache arrays laid out by the cache axes: k, v (and their scales for int8)."""
  return CACHE_ARRAYS if kv_cache_dtype == "int8" else CACHE_ARRAYS[:2]


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [..., head_dim] -> (int8 values [..., head_dim], float32 scale [..., 1]); see module doc."""
  x32 = x.astype(jnp.float32)
  peak = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
  scale = jnp.where(peak > 0, peak / INT8_MAX, 1.0)
  values = jnp.clip(jnp.round(x32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return values, scale


def dequantize(values: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  """values * scale in `dtype` (tests and references; attention folds the scales instead)."""
  return (values.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def entries(kv_cache_dtype: str, k: jax.Array, v: jax.Array) -> dict:
  """The new tokens' k, v [batch, length, kv_heads, head_dim] as the cache stores them."""
  if kv_cache_dtype != "int8":
    return {"k": k, "v": v}
  k_values, k_scale = quantize(k)
  v_values, v_scale = quantize(v)
  return {"k": k_values, "v": v_values, "k_scale": k_scale, "v_scale": v_scale}


def empty(kv_cache_dtype: str, shape: tuple, dtype) -> dict:
  """Zeroed cache arrays for k/v `shape` [layers, batch, slots, kv_heads, head_dim]."""
  if kv_cache_dtype != "int8":
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  scale_shape = (*shape[:-1], 1)
  return {"k": jnp.zeros(shape, jnp.int8), "v": jnp.zeros(shape, jnp.int8),
          "k_scale": jnp.ones(scale_shape, jnp.float32),
          "v_scale": jnp.ones(scale_shape, jnp.float32)}
