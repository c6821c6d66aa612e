"""The Qwen2 decoder in Flax linen, pure-functional, with a fixed-capacity KV cache.

Parameter names mirror the HF module tree (`embed_tokens`, `layers_{i}/self_attn/q_proj`, ...),
so `hf.py` maps them one to one. Every parameter and the main activations carry logical axis
names; `parallel.py` turns those into shardings with a table of rules.

Padding and positions: `mask [batch, length]` marks real tokens. Left-padded rows work as long as
`positions` start at 0 at each row's first real token (`positions_from_mask` computes that).

The KV cache (`init_cache`) has a fixed capacity of slots shared by all rows. A call writes its
`length` new tokens at slots `[cache_index, cache_index + length)` of every row and records which
of them are real in `cache_valid`; a query attends to the real slots at or before its own. So a
left-padded prefill followed by one-token decode steps gives the same numbers as one forward over
the whole sequence. `cache_index` may also be one slot per row (`[batch]`): each row then writes at
its own slot, as the continuous-batching sampler needs (rows at different steps share one cache).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gru_mem import parallel
from gru_mem.model import attention, kv_cache
from gru_mem.model.config import ModelConfig

Cache = dict[str, jax.Array]


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Per-row positions that start at 0 at the first real token: `cumsum(mask) - 1`, floored at 0."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype=None) -> Cache:
  """An empty KV cache: k/v `[layers, batch, capacity, kv_heads, head_dim]` (in `dtype`, default
  the compute dtype; int8 plus k_scale/v_scale [..., 1] under `config.kv_cache_dtype="int8"`).

  `valid [batch, capacity]` marks slots that hold a real token, `index` is the next slot to write
  (a scalar; set it to a `[batch]` array for per-row slots) and `lengths [batch]` counts the real
  tokens of each row (= the position of its next token).
  """
  dtype = dtype or config.jnp_dtype
  shape = (config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim)
  arrays = kv_cache.empty(config.kv_cache_dtype, shape, dtype)
  return {
      **{name: constrain_cache(value) for name, value in arrays.items()},
      "valid": jnp.zeros((batch, capacity), jnp.bool_),
      "index": jnp.zeros((), jnp.int32),
      "lengths": jnp.zeros((batch,), jnp.int32),
  }


CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")  # the KV cache's k, v (scales)


def constrain_cache(kv: jax.Array) -> jax.Array:
  """Lays a cache k or v out by `CACHE_AXES` under the current mesh and rules (rows over the
  batch axes, kv heads over tensor when they divide, else replicated); unchanged without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not nn.get_logical_axis_rules():
    return kv
  spec = nn.logical_to_mesh_axes(CACHE_AXES)
  if any(name not in mesh.shape for axes in spec if axes is not None
         for name in ((axes,) if isinstance(axes, str) else axes)):
    return kv  # a mesh without the rules' axes: leave the layout to the compiler
  return jax.lax.with_sharding_constraint(kv, parallel.fit_spec_to_shape(spec, kv.shape, mesh))


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in HF's split-half layout.

  x: [batch, length, heads, head_dim]; positions: [batch, length].
  With inv_freq_i = theta^(-2i/d) and angle = position * inv_freq (repeated for both halves):
    rope(x) = x * cos(angle) + rotate_half(x) * sin(angle),  rotate_half([x1, x2]) = [-x2, x1].
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, head_dim/2]
  angle = jnp.concatenate([angle, angle], axis=-1)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(jnp.float32) * jnp.cos(angle) + rotated * jnp.sin(angle)).astype(x.dtype)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        (x.shape[-1],), self.config.jnp_param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
    return (x32 * weight.astype(jnp.float32)).astype(self.config.jnp_dtype)


def _dense_param(module, name, shape, axes, config, init=None):
  init = init or nn.initializers.normal(stddev=0.02)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      config.jnp_param_dtype).astype(config.jnp_dtype)


class Projection(nn.Module):
  """A linear map stored like HF's nn.Linear, kernel shaped [in..., out...] with logical axes."""
  config: ModelConfig
  in_axes: tuple
  out_shape: tuple
  out_axes: tuple
  use_bias: bool = False

  @nn.compact
  def __call__(self, x, contract_dims: int = 1):
    in_shape = x.shape[-contract_dims:]
    kernel = _dense_param(self, "kernel", (*in_shape, *self.out_shape),
                          (*self.in_axes, *self.out_axes), self.config)
    y = jnp.tensordot(x.astype(self.config.jnp_dtype), kernel, axes=contract_dims)
    if self.use_bias:
      y = y + _dense_param(self, "bias", self.out_shape, self.out_axes, self.config,
                           nn.initializers.zeros)
    return y


class Attention(nn.Module):
  """Grouped-query self-attention with q/k/v bias and rotary embeddings; the attention itself
  is `attention.attention` with `config.attention`'s implementation."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache_layer: Optional[Cache], cache_meta: Optional[Cache]):
    cfg = self.config
    q = Projection(cfg, ("embed",), (cfg.num_heads, cfg.head_dim), ("heads", "head_dim"),
                   use_bias=True, name="q_proj")(x)
    k = Projection(cfg, ("embed",), (cfg.num_kv_heads, cfg.head_dim), ("kv_heads", "head_dim"),
                   use_bias=True, name="k_proj")(x)
    v = Projection(cfg, ("embed",), (cfg.num_kv_heads, cfg.head_dim), ("kv_heads", "head_dim"),
                   use_bias=True, name="v_proj")(x)
    q = rotary_embedding(q, positions, cfg.rope_theta)
    k = rotary_embedding(k, positions, cfg.rope_theta)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))

    layer = None
    if cache_layer is None:
      stored, key_valid, query_offset, new_cache_layer = {"k": k, "v": v}, mask, 0, None
    else:
      query_offset = cache_meta["index"]
      new_cache_layer = _write_cache(cache_layer, kv_cache.entries(cfg.kv_cache_dtype, k, v),
                                     query_offset)
      key_valid = cache_meta["valid"]
      stored = new_cache_layer
      if "layer" in cache_layer:
        if new_cache_layer["k"].dtype in (cfg.jnp_dtype, jnp.int8):
          layer = cache_layer["layer"]  # attend to the stacked cache as written (in place)
        else:
          stored = {name: value[cache_layer["layer"]] for name, value in stored.items()}

    # Query i (slot query_offset + i) sees key slot j <= its own that holds a real token.
    keys, values = stored["k"], stored["v"]
    if keys.dtype != jnp.int8:  # int8 values go in as stored, with their scales
      keys, values = keys.astype(cfg.jnp_dtype), values.astype(cfg.jnp_dtype)
    out = attention.attention(q, keys, values, key_valid, query_offset,
                              implementation=cfg.attention, layer=layer,
                              k_scale=stored.get("k_scale"), v_scale=stored.get("v_scale"))
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    out = Projection(cfg, ("heads", "head_dim"), (cfg.hidden_size,), ("embed",),
                     name="o_proj")(out, contract_dims=2)
    return out, new_cache_layer


def _write_cache(cache_layer: Cache, new: Cache, start) -> Cache:
  """Writes the new tokens' cache entries `new` {k, v (, k_scale, v_scale)} [batch, length,
  kv_heads, ...] at slot `start`; returns the written cache arrays (without "layer").

  `cache_layer` is either one layer's arrays [batch, slots, ...] (scanned layers) or the whole
  stacked cache [layers, batch, slots, ...] plus this layer's index under "layer". The second
  form updates the stacked buffers in place, so a decode step does not copy the cache.
  `start` [batch] writes each row at its own slot (a scatter, also in place).
  """
  layer = cache_layer.get("layer")
  if jnp.ndim(start) == 1:
    batch, length = new["k"].shape[:2]
    rows = jnp.arange(batch)[:, None]
    slots = start[:, None] + jnp.arange(length)[None, :]  # [batch, length]
    at = (rows, slots) if layer is None else (layer, rows, slots)
    return {name: cache_layer[name].at[at].set(x.astype(cache_layer[name].dtype))
            for name, x in new.items()}
  if layer is None:
    return {name: jax.lax.dynamic_update_slice_in_dim(
        cache_layer[name], x.astype(cache_layer[name].dtype), start, axis=1)
            for name, x in new.items()}
  zero = jnp.zeros((), jnp.int32)
  at = (jnp.asarray(layer, jnp.int32), zero, jnp.asarray(start, jnp.int32), zero, zero)
  return {name: jax.lax.dynamic_update_slice(
      cache_layer[name], x[None].astype(cache_layer[name].dtype), at) for name, x in new.items()}


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    gate = Projection(cfg, ("embed",), (cfg.intermediate_size,), ("mlp",), name="gate_proj")(x)
    up = Projection(cfg, ("embed",), (cfg.intermediate_size,), ("mlp",), name="up_proj")(x)
    hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return Projection(cfg, ("mlp",), (cfg.hidden_size,), ("embed",), name="down_proj")(hidden)


class DecoderLayer(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(.)). Returns (x, new cache layer).

  Scanned (`carry_cache`): called as (carry, layer index, ...) with carry = (x, the whole stacked
  cache {k, v} or None) and returns ((x, cache), None): each layer writes its slots into the
  stacked buffer in place, as the unscanned layers do, instead of slicing the cache as a scan
  input and stacking a new one as its output (a copy of the whole cache per decode step)."""
  config: ModelConfig
  carry_cache: bool = False

  @nn.compact
  def __call__(self, x, cache_layer, positions, mask, cache_meta):
    if self.carry_cache:
      (x, stacked), layer = x, cache_layer
      cache_layer = None if stacked is None else {**stacked, "layer": layer}
    attn_out, new_cache_layer = Attention(self.config, name="self_attn")(
        RMSNorm(self.config, name="input_layernorm")(x), positions, mask, cache_layer, cache_meta)
    x = x + attn_out
    x = x + MLP(self.config, name="mlp")(RMSNorm(self.config, name="post_attention_layernorm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if self.carry_cache:
      return (x, new_cache_layer), None
    return x, new_cache_layer


def _remat(layer_cls, policy: str):
  if policy == "none":
    return layer_cls
  policies = {
      "full": None,
      "dots_saveable": jax.checkpoint_policies.dots_saveable,
      "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }
  return nn.remat(layer_cls, policy=policies[policy], prevent_cse=True, static_argnums=())


class Transformer(nn.Module):
  """Qwen2ForCausalLM.

  __call__(tokens [B, T], positions [B, T], mask [B, T], cache=None, return_hidden=False)
    -> (logits [B, T, vocab] float32 (or final hidden states), new cache or None)
  """
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = self.param(
        "embed_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), cfg.jnp_param_dtype)
    layer_cls = _remat(DecoderLayer, cfg.remat_policy)
    if cfg.scan_layers:
      self.layers = nn.scan(
          layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, carry_cache=True, name="layers")
    else:
      self.layers = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg, name="norm")
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param(
          "lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
          (cfg.hidden_size, cfg.vocab_size), cfg.jnp_param_dtype)

  def __call__(self, tokens, positions, mask=None, cache: Optional[Cache] = None,
               return_hidden: bool = False):
    cfg = self.config
    if mask is None:
      mask = jnp.ones(tokens.shape, jnp.bool_)
    mask = mask.astype(jnp.bool_)
    x = jnp.take(self.embed_tokens, tokens, axis=0).astype(cfg.jnp_dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    cache_meta, names = None, kv_cache.cache_names(cfg.kv_cache_dtype)
    if cache is not None:
      start = cache["index"]
      cache_meta = {"index": start, "valid": _write_valid(cache["valid"], mask, start)}
    if cfg.scan_layers:
      layer_caches = None if cache is None else {name: cache[name] for name in names}
      (x, new_layer_caches), _ = self.layers((x, layer_caches), jnp.arange(cfg.num_layers),
                                             positions, mask, cache_meta)
    else:
      # Each layer writes its slots into the stacked cache in place (see `_write_cache`).
      new_layer_caches = None if cache is None else {name: cache[name] for name in names}
      for i, layer in enumerate(self.layers):
        layer_cache = None if cache is None else {**new_layer_caches, "layer": i}
        x, written = layer(x, layer_cache, positions, mask, cache_meta)
        if cache is not None:
          new_layer_caches = written

    new_cache = None
    if cache is not None:
      new_cache = {
          **new_layer_caches,
          "valid": cache_meta["valid"],
          "index": cache["index"] + tokens.shape[1],
          "lengths": cache["lengths"] + mask.sum(axis=1, dtype=jnp.int32),
      }
    hidden = self.norm(x)
    if return_hidden:
      return hidden, new_cache
    return self.logits(hidden), new_cache

  def logits(self, hidden):
    """hidden [..., embed] -> logits [..., vocab] in float32."""
    cfg = self.config
    if cfg.tie_word_embeddings:
      head = self.embed_tokens.astype(cfg.jnp_dtype).T
    else:
      head = self.lm_head.astype(cfg.jnp_dtype)
    logits = jnp.dot(hidden.astype(cfg.jnp_dtype), head, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def _write_valid(valid, mask, start):
  """valid [batch, capacity] with mask [batch, length] written from slot `start` (or `start[b]`)."""
  if jnp.ndim(start) == 0:
    return jax.lax.dynamic_update_slice_in_dim(valid, mask, start, axis=1)
  slots = start[:, None] + jnp.arange(mask.shape[1])[None, :]
  return valid.at[jnp.arange(valid.shape[0])[:, None], slots].set(mask)


def init_params(config: ModelConfig, rng: jax.Array) -> Any:
  """Random parameters (unboxed from their logical-partitioning metadata)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = Transformer(config).init(rng, tokens, tokens)
  return nn.meta.unbox(variables["params"])


def abstract_params(config: ModelConfig) -> Any:
  """Shapes and dtypes of the parameters, boxed with their logical axes; allocates nothing."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda r: Transformer(config).init(r, tokens, tokens)["params"],
                        jax.random.PRNGKey(0))


def forward(config: ModelConfig, params, tokens, positions=None, mask=None, cache=None,
            return_hidden: bool = False):
  """`Transformer(config).apply` with default positions (from the padding mask)."""
  if mask is None:
    mask = jnp.ones(tokens.shape, jnp.bool_)
  if positions is None:
    positions = positions_from_mask(mask)
  return Transformer(config).apply({"params": params}, tokens, positions, mask, cache,
                                   return_hidden)


def stack_layers(params, num_layers: int):
  """`layers_{i}` subtrees -> one `layers` subtree with a leading [num_layers] axis (scan layout)."""
  params = dict(params)
  layers = [params.pop(f"layers_{i}") for i in range(num_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params


def unstack_layers(params, num_layers: int):
  """Inverse of `stack_layers`."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
