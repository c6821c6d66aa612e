"""Grouped-query attention with one entry point and several implementations (`model.attention`).

Every attention of the model (the learner's forward, the sampler's prefill chunks and one-token
decode, `forward`, the HF parity path) is one call

  attention(q, k, v, key_valid, query_offset, implementation=...)

  q [batch, q_len, heads, head_dim], k, v [batch, k_len, kv_heads, head_dim],
  key_valid [batch, k_len] bool (slot j holds a real token), query i sits at slot
  query_offset + i (or query_offset[b] + i), and query i sees key j iff  j <= query_offset + i
  and  key_valid[b, j].

  out_i = sum_j p_ij v_j,  p_ij = exp(s_ij) / sum_j' exp(s_ij') over visible j, s = q k^T / sqrt(d)

That one rule covers causal rows, left and right padding (`key_valid` is the padding mask) and a
KV cache with per-row lengths (`key_valid` = the cache's `valid` slots, `query_offset` = the
cache index, traced). Each group of `heads // kv_heads` query heads shares one kv head.

Implementations:
  xla      the reference: two einsums over the full [batch, kv_heads, group, q, k] float32 scores.
  chunked  online softmax (FlashAttention's recurrence) over key/value blocks in a `lax.scan`,
           inside a `lax.map` over query blocks. Both bodies are `jax.checkpoint`ed, so the
           backward pass keeps per query block only the running (max, sum, output) of each key
           block and recomputes the scores: memory O(k_len * block), never O(q_len * k_len),
           for one extra forward pass of the attention (not of the model). Key blocks that no
           query of the block can see (above the causal diagonal, or all padding) are skipped
           with `lax.cond`. Any backend, any dtype.
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn")`: GPU, bfloat16/float16,
           head_dim a multiple of 8 and at most 128 (256 from Hopper on). The visibility rule goes
           in as a boolean mask (jax turns it into a [batch, 1, q, k] bias in the input dtype).
  splash   TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), causal mask
           plus segment ids for padding, in `shard_map` over the current mesh. Calls against a
           KV cache (a traced `query_offset` that the static splash mask cannot hold) use
           `chunked`. `SPLASH_INTERPRET = True` runs it in Pallas interpret mode (tests on CPU).
  auto     for calls without a cache (the learner, `forward`): splash on TPU, cudnn on GPU
           where dtype and head_dim allow; otherwise (and for every call against a KV cache)
           chunked once k_len >= `CHUNKED_MIN_LENGTH` slots, xla below.

A query that sees no key at all (a left-padding query before any real token) gets a finite
output that nothing reads: the uniform mean of v under `xla` and `cudnn`, zero under `chunked`.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")
MASKED = -1e30  # finite: a fully masked query row stays finite instead of NaN
# `auto` switches from `xla` to `chunked` at this many key slots. benchmarks/attention.py (CPU,
# fwd + bwd): chunked takes 0.78x xla's time at 1K tokens, 0.57x at 2K, 0.39x at 8K; the switch
# sits at 2K so every row of the tiny default job (all under 1K) keeps xla's numbers bit for bit.
CHUNKED_MIN_LENGTH = 2048
DEFAULT_BLOCK = 512  # query and key block of `chunked`
SPLASH_BLOCK = 128  # splash attention's block sizes (rows are padded to a multiple)
SPLASH_INTERPRET = False  # True: Pallas interpret mode (runs splash on CPU, slowly; for tests)
_BACKENDS = {"cudnn": ("gpu", "cuda", "rocm"), "splash": ("tpu",)}


def backend_error(implementation: str, backend: str):
  """None if `implementation` can run on `backend`, else the ValueError to raise."""
  if implementation not in IMPLEMENTATIONS:
    return ValueError(f"attention implementation {implementation!r} is unknown: use one of "
                      f"{IMPLEMENTATIONS}")
  needed = _BACKENDS.get(implementation)
  if needed and backend not in needed and not (implementation == "splash" and SPLASH_INTERPRET):
    runs_here = [name for name in IMPLEMENTATIONS if name not in _BACKENDS
                 or backend in _BACKENDS[name]]
    return ValueError(f"attention implementation {implementation!r} needs a {needed[0]} backend "
                      f"but this one is {backend!r}: set model.attention to one of {runs_here} "
                      "('auto' picks the best of them)")
  return None


def check_implementation(implementation: str, backend: Union[str, None] = None) -> None:
  """Raises a ValueError naming the backend and the alternatives if `implementation` cannot run
  on `backend` (default: JAX's default backend). Called before anything is traced or compiled."""
  error = backend_error(implementation, backend or jax.default_backend())
  if error is not None:
    raise error


def _cudnn_shape_error(dtype, head_dim: int):
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} (cuDNN flash attention takes bfloat16 or float16)"
  if head_dim % 8 or head_dim > 128:
    return f"head_dim {head_dim} (cuDNN needs a multiple of 8, at most 128)"
  return None


def resolve(implementation: str, *, backend: str, k_len: int, dtype, head_dim: int,
            cached: bool) -> str:
  """The implementation `attention` runs: `implementation` itself unless it is 'auto' (see the
  module docstring), or 'splash' against a KV cache, which runs 'chunked'. Raises a ValueError
  for one that cannot run on `backend` or (cudnn) take `dtype` / `head_dim`."""
  check_implementation(implementation, backend)
  if implementation == "splash" and cached:
    return "chunked"
  if implementation == "cudnn" and _cudnn_shape_error(dtype, head_dim):
    raise ValueError(f"attention implementation 'cudnn' cannot take "
                     f"{_cudnn_shape_error(dtype, head_dim)}: use model.dtype='bfloat16', or "
                     "model.attention='chunked' or 'auto'")
  if implementation != "auto":
    return implementation
  if backend == "tpu" and not cached:
    return "splash"
  if backend in _BACKENDS["cudnn"] and not cached and _cudnn_shape_error(dtype, head_dim) is None:
    return "cudnn"
  return "chunked" if k_len >= CHUNKED_MIN_LENGTH else "xla"


def attention(q, k, v, key_valid, query_offset=0, *, implementation: str = "xla",
              block_size: Optional[int] = None, layer=None, k_scale=None, v_scale=None):
  """Grouped-query attention under the visibility rule of the module docstring.

  q [batch, q_len, heads, head_dim]; k, v [batch, k_len, kv_heads, head_dim]; key_valid
  [batch, k_len] bool; query_offset: the slot of query 0 (an int, or a traced scalar for a KV
  cache, or [batch] slots: one per row, as the continuous sampler's per-row cache index).
  block_size: chunked's query and key block (default `DEFAULT_BLOCK`, read at trace time).
  layer: k and v are a whole stacked cache [layers, batch, k_len, ...] and the call attends to
  layer `layer` (a traced index): `chunked` then reads its key blocks straight from the stacked
  buffer (no copy of the layer; blocks it skips are not read), the others index k[layer].
  k_scale, v_scale: k and v are an int8 cache with these float32 scales [..., k_len, kv_heads, 1]
  (`kv_cache.py`), folded into each key block's scores and probabilities (xla, chunked).
  Returns [batch, q_len, heads, head_dim] in v's dtype (q's for int8 v).
  """
  scales = {} if k_scale is None else {"k_scale": k_scale, "v_scale": v_scale}
  if layer is not None and implementation_for(implementation, q, k.shape[2],
                                              query_offset) != "chunked":
    scales = {name: x[layer] for name, x in scales.items()}
    k, v, layer = k[layer], v[layer], None
  if layer is not None:
    if k.shape != v.shape or k.shape[1] != q.shape[0] or key_valid.shape != k.shape[1:3]:
      raise ValueError(f"attention: q {q.shape}, stacked k {k.shape}, v {v.shape}, key_valid "
                       f"{key_valid.shape}: want k = v = [layers, batch, k_len, kv_heads, d]")
    return chunked_attention(q, k, v, key_valid, query_offset,
                             block_size=block_size or DEFAULT_BLOCK, layer=layer, **scales)
  batch, q_len, heads, head_dim = q.shape
  if k.shape != v.shape or k.shape[0] != batch or heads % k.shape[2] or k.shape[3] != head_dim:
    raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape}: want k and v of one "
                     "shape [batch, k_len, kv_heads, head_dim] with heads a multiple of kv_heads")
  if key_valid.shape != k.shape[:2]:
    raise ValueError(f"attention: key_valid {key_valid.shape} must be [batch, k_len] "
                     f"{k.shape[:2]}")
  name = implementation_for(implementation, q, k.shape[1], query_offset)
  if name == "xla":
    return xla_attention(q, k, v, visibility(key_valid, query_offset, q_len), **scales)
  if name == "chunked":
    return chunked_attention(q, k, v, key_valid, query_offset,
                             block_size=block_size or DEFAULT_BLOCK, **scales)
  if scales:  # cudnn / splash take no int8: this layer in q's dtype
    k = (k.astype(jnp.float32) * scales["k_scale"]).astype(q.dtype)
    v = (v.astype(jnp.float32) * scales["v_scale"]).astype(q.dtype)
  if name == "cudnn":
    return cudnn_attention(q, k, v, key_valid, query_offset, causal=not cached)
  return splash_attention(q, k, v, key_valid)


def implementation_for(implementation: str, q, k_len: int, query_offset) -> str:
  """What `attention` runs for q [batch, q_len, heads, head_dim] against k_len key slots."""
  cached = not (isinstance(query_offset, (int, np.integer)) and query_offset == 0
                and q.shape[1] == k_len)
  return resolve(implementation, backend=jax.default_backend(), k_len=k_len, dtype=q.dtype,
                 head_dim=q.shape[3], cached=cached)


def visibility(key_valid, query_offset, q_len: int):
  """visible [batch, q_len, k_len] bool: key slot j <= query_offset + i and key_valid[b, j]."""
  query_slot = jnp.reshape(query_offset, (-1, 1)) + jnp.arange(q_len)  # [1 or batch, q_len]
  key_slot = jnp.arange(key_valid.shape[1])
  return (key_slot[None, None, :] <= query_slot[:, :, None]) & key_valid[:, None, :]


def xla_attention(q, k, v, visible, k_scale=None, v_scale=None):
  """softmax(q k^T / sqrt(d) + mask) v with each kv head shared by a group of query heads.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim];
  visible: [batch, q_len, k_len] bool. Scores and softmax run in float32. With int8 k, v and
  their scales [batch, k_len, kv_heads, 1]: s_j = (q . k_j) k_scale_j, out = sum_j (p_j
  v_scale_j) v_j (the values converted to q's dtype, never multiplied out).
  """
  batch, q_len, heads, head_dim = q.shape
  group = heads // k.shape[2]
  compute = q.dtype if v.dtype == jnp.int8 else v.dtype
  q = q.reshape(batch, q_len, heads // group, group, head_dim)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k.astype(q.dtype),
                      preferred_element_type=jnp.float32)
  if k_scale is not None:
    scores = scores * per_key(k_scale)
  scores = scores / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(visible[:, None, None, :, :], scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  if v_scale is not None:
    probs = probs * per_key(v_scale)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(compute), v.astype(compute))
  return out.reshape(batch, q_len, heads, head_dim)


def per_key(scale):
  """A cache scale [batch, k_len, kv_heads, 1] as [batch, kv_heads, 1, 1, k_len] (scores' axes)."""
  return scale[..., 0].transpose(0, 2, 1)[:, :, None, None, :].astype(jnp.float32)


def _pad_axis(x, size: int, axis: int, value=0):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def chunked_attention(q, k, v, key_valid, query_offset=0, *, block_size: int = DEFAULT_BLOCK,
                      layer=None, k_scale=None, v_scale=None):
  """Online-softmax attention over key blocks, one query block at a time (FlashAttention's
  recurrence; memory O(block_size * k_len)).

  Per query block, over key blocks t with scores s_t (masked entries at MASKED):
    m_t = max(m_{t-1}, max_j s_tj),   c = exp(m_{t-1} - m_t),   p_tj = exp(s_tj - m_t) [visible]
    l_t = c l_{t-1} + sum_j p_tj,     a_t = c a_{t-1} + p_t v_t,   out = a_T / l_T  (0 if l_T = 0)
  Shapes as `attention` (with `layer`: k, v [layers, batch, k_len, ...], layer `layer`'s keys);
  block sizes need not divide the lengths (the ends are padded and masked). Key block t is a
  dynamic slice of k taken inside the branch that uses it: a block that is skipped is not read,
  and k is not copied into blocks (when the block divides k_len; else this layer is padded).
  int8 k, v with scales (see `xla_attention`): each block is read as stored (int8), converted to
  q's dtype inside the block, and its scales folded into s_t and p_t.
  """
  block_k = min(block_size, k.shape[-3])
  quantized = k_scale is not None
  kv = (k, v, k_scale, v_scale) if quantized else (k, v)
  if layer is not None and k.shape[2] % block_k:  # padding the stack would copy every layer
    kv, layer = tuple(x[layer] for x in kv), None
  if layer is None:
    kv, layer = tuple(x[None] for x in kv), 0
  kv = tuple(_pad_axis(x, -(-k.shape[-3] // block_k) * block_k, 2) for x in kv)
  k, v = kv[:2]
  compute = q.dtype if quantized else v.dtype
  batch, q_len, heads, head_dim = q.shape
  k_len, kv_heads = k.shape[2], k.shape[3]
  group = heads // kv_heads
  block_q = min(block_size, q_len)
  num_q, num_k = -(-q_len // block_q), -(-k_len // block_k)
  scale = 1.0 / math.sqrt(head_dim)

  # q [num_q, batch, block_q, kv_heads, group, head_dim]; k, v stay [layers, batch, slots, ..]
  q_blocks = _pad_axis(q, num_q * block_q, 1).reshape(
      batch, num_q, block_q, kv_heads, group, head_dim).swapaxes(0, 1)
  valid_blocks = _pad_axis(key_valid, num_k * block_k, 1, False).reshape(
      batch, num_k, block_k).swapaxes(0, 1)

  def kv_block(x, k_index):  # [batch, block_k, kv_heads, head_dim (1: scales)] of `layer`
    zero = jnp.zeros((), jnp.int32)
    start = (jnp.asarray(layer, jnp.int32), zero, (k_index * block_k).astype(jnp.int32), zero,
             zero)
    return jax.lax.dynamic_slice(x, start, (1, batch, block_k, kv_heads, x.shape[-1]))[0]

  @jax.checkpoint
  def query_block(q_index, q_block):
    query_slot = (jnp.reshape(query_offset, (-1, 1)) + q_index * block_q
                  + jnp.arange(block_q))  # [1 or batch, block_q]

    def key_block(carry, xs):
      k_index, valid_block = xs
      key_slot = k_index * block_k + jnp.arange(block_k)

      def update(carry):
        m, l, acc = carry  # m, l [batch, kv_heads, group, block_q]; acc [..., block_q, head_dim]
        k_block, v_block = kv_block(k, k_index), kv_block(v, k_index)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", q_block, k_block.astype(q.dtype),
                       preferred_element_type=jnp.float32) * scale
        if quantized:
          s = s * per_key(kv_block(kv[2], k_index))
        visible = (key_slot[None, None, :] <= query_slot[:, :, None]) & valid_block[:, None, :]
        visible = visible[:, None, None]  # [batch, 1, 1, block_q, block_k]
        s = jnp.where(visible, s, MASKED)
        m_new = jnp.maximum(m, s.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
        l = l * correction + p.sum(axis=-1)
        p_v = p * per_key(kv_block(kv[3], k_index)) if quantized else p
        pv = jnp.einsum("bhgqk,bkhd->bhgqd", p_v.astype(compute), v_block.astype(compute),
                        preferred_element_type=jnp.float32)
        return m_new, l, acc * correction[..., None] + pv

      # Skip a key block no query of this block can see (causal upper triangle, all padding).
      seen = (k_index * block_k <= jnp.max(query_slot)) & jnp.any(valid_block)
      return jax.lax.cond(seen, jax.checkpoint(update), lambda c: c, carry), None

    stats = (batch, kv_heads, group, block_q)
    init = (jnp.full(stats, MASKED, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros((*stats, head_dim), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(key_block, init, (jnp.arange(num_k), valid_blocks))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [batch, kv_heads, group, block_q, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, block_q, heads, head_dim).astype(compute)

  out = jax.lax.map(lambda xs: query_block(*xs), (jnp.arange(num_q), q_blocks))
  return out.swapaxes(0, 1).reshape(batch, num_q * block_q, heads, head_dim)[:, :q_len]


def cudnn_attention(q, k, v, key_valid, query_offset=0, *, causal: bool = False):
  """cuDNN flash attention (GPU). `causal` (only for q_len == k_len from slot 0) lets cuDNN skip
  the upper triangle; the mask carries padding and the cache's slots either way."""
  visible = visibility(key_valid, query_offset, q.shape[1])
  return jax.nn.dot_product_attention(q, k, v, mask=visible[:, None], is_causal=causal,
                                      implementation="cudnn")


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, group: int, block: int, interpret: bool):
  """The MQA splash kernel for `group` query heads over one kv head, causal over `length`."""
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * group)
  blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                             block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():  # concrete mask tables, safe to cache across traces
    return splash.make_splash_mqa_single_device(mask, block_sizes=blocks, interpret=interpret)


def splash_attention(q, k, v, key_valid, *, block: int = SPLASH_BLOCK):
  """Splash attention for causal rows from slot 0 (q_len == k_len), TPU or interpret mode.

  Padding goes in as segment ids: a real token is segment 1, a padding slot segment 0, so a
  real query sees the real keys at or before it and a padding query sees only padding slots
  (itself at least: no empty softmax row). Each kv head runs the MQA kernel over its group of
  query heads. Under a mesh (`jax.set_mesh`) it runs in `shard_map`, rows split like the
  model's `batch` axis and heads like `heads`/`kv_heads` when both divide.
  """
  length, heads, head_dim = q.shape[1:]
  group = heads // k.shape[2]
  padded = -(-length // block) * block

  def run(q, k, v, key_valid):
    kernel = _splash_kernel(padded, group, block, SPLASH_INTERPRET)
    segments = _pad_axis(key_valid, padded, 1, False).astype(jnp.int32)  # [batch, padded]
    # [batch, kv_heads, group, padded, d] queries (pre-scaled: splash does not scale), and
    # [batch, kv_heads, padded, d] keys and values.
    qh = _pad_axis(q * (1.0 / math.sqrt(head_dim)), padded, 1).reshape(
        q.shape[0], padded, q.shape[2] // group, group, head_dim).transpose(0, 2, 3, 1, 4)
    kh = _pad_axis(k, padded, 1).transpose(0, 2, 1, 3)
    vh = _pad_axis(v, padded, 1).transpose(0, 2, 1, 3)

    def one_row(qh, kh, vh, segment):
      ids = splash.SegmentIds(q=segment, kv=segment)
      return jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=ids))(qh, kh, vh)

    out = jax.vmap(one_row)(qh, kh, vh, segments)  # [batch, kv_heads, group, padded, d]
    out = out.transpose(0, 3, 1, 2, 4).reshape(q.shape[0], padded, q.shape[2], head_dim)
    return out[:, :length].astype(v.dtype)

  return shard_over_mesh(run, q, k, v, key_valid)


def _fitted_spec(logical: tuple, shape, mesh) -> P:
  """The mesh axes of `logical` under flax's current rules, keeping per dim the longest prefix of
  mesh axes whose sizes divide it (the rest replicated)."""
  spec = []
  for dim, axes in zip(shape, nn.logical_to_mesh_axes(logical)):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for name in names:
      if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]):
        break
      kept.append(name)
    spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*spec)


def shard_over_mesh(fn, q, k, v, key_valid):
  """fn(q, k, v, key_valid) in `shard_map` over the mesh set by `jax.set_mesh`, rows split like
  the model's `batch` axis and heads like `heads` / `kv_heads` (only when both split alike, so
  each shard keeps whole groups); without a mesh, fn itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, key_valid)
  q_spec = _fitted_spec(("batch", "length", "heads", "head_dim"), q.shape, mesh)
  k_spec = _fitted_spec(("batch", "length", "kv_heads", "head_dim"), k.shape, mesh)
  if q_spec[2] != k_spec[2]:
    q_spec, k_spec = P(q_spec[0], None, None, None), P(k_spec[0], None, None, None)
  valid_spec = P(k_spec[0], None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, valid_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, key_valid)
