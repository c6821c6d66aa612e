"""The dry run's sampler: the prefill and the decode loop compiled for one weight layout, and
what they cost per device, read from the compiled programs.

`layout_report(...)` lowers what a rollout runs (`continuous.decode_slots_jit` when
`sampling.slots` > 0, else `sampling.decode_jit`, and the prefill of one group of prompts) for
the given parameters (ShapeDtypeStructs with shardings) on the given mesh, and reports:

  weight_bytes         the sampler's parameters per device;
  kv_cache_bytes       the decode KV cache per device (kv heads over tensor when they divide;
                       int8 values and their float32 scales under `kv_cache_dtype` "int8");
  decode_carry_bytes   what the compiled decode loop carries per device (weights as the loop
                       sees them, gathered or not, and the cache);
  bytes_per_token_step what one token step reads: the carry, its weights counted at the
                       parameter dtype (XLA's CPU backend converts bfloat16 weights to float32
                       before the loop, as its dots run in float32; an accelerator reads them as
                       stored), plus the weights the loop gathers anew at every step;
  loop_weight_bytes    the part of that carry derived from the weights alone;
  loop_ops_of_cache_shape  {opcode: per token step} of the loop's ops whose result has the
                       stacked cache's per-device dims (`hlo_text.loop_arrays_of_shape`): a copy,
                       broadcast or transpose is a whole-cache copy per step beyond the carry
                       (none since the layers carry the cache in place; XLA's CPU backend still
                       converts a bfloat16 cache to float32 around each per-slot scatter);
  collectives_per_token_step / collectives_outside_loop: {kind: {count, bytes}} from the HLO;
  weight_gathers       all-gathers of a weight (gru_mem.hlo_text), in or out of the loop;
  sampler_peak_bytes   train state + the rollout copy + the decode (or prefill) program's
                       arguments, outputs and temporaries;
  roofline             decode tokens/s on `chip`: rows / max(bytes per token step / HBM bandwidth,
                       FLOPs per device / peak), FLOPs per token step = 2 x matmul params x rows
                       + 4 x layers x rows x cache columns x heads x head_dim (QK and PV), split
                       evenly over the devices. A memory-bound bound: real decode is slower.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gru_mem import continuous, hlo_text, parallel, sampling
from gru_mem.buckets import smallest_bucket
from gru_mem.model import kv_cache, transformer
from gru_mem.model.config import ModelConfig

# Dense bfloat16 peak and HBM bandwidth per chip (vendor figures).
CHIPS = {
    "h100": {"name": "NVIDIA H100 SXM", "hbm_bytes_per_s": 3.35e12, "bf16_flops_per_s": 989e12},
    "tpu_v5p": {"name": "TPU v5p", "hbm_bytes_per_s": 2.76e12, "bf16_flops_per_s": 459e12},
}


def check_chip(chip: str) -> None:
  if chip and chip not in CHIPS:
    raise ValueError(f"train.dry_run_chip={chip!r}: use one of {sorted(CHIPS)} or '' (no roofline)")


def decode_spec(new_tokens: int, prefill_chunk: int) -> sampling.DecodeSpec:
  return sampling.DecodeSpec(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                             stop_sequences=(), eos_ids=(0,), pad_id=0,
                             prefill_chunk_tokens=prefill_chunk)


def abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def bytes_per_device(tree) -> int:
  """sum over leaves of prod(shard shape) * itemsize (ShapeDtypeStructs with shardings)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def abstract_decode_state(config: ModelConfig, spec: sampling.DecodeSpec, rows: int,
                          prompt_columns: int, mesh, slots: bool) -> dict:
  """The decode loop's carry as ShapeDtypeStructs: the cache k/v by `transformer.CACHE_AXES`,
  [rows, ...] arrays over the batch axes, scalars replicated."""
  if slots:
    shapes = jax.eval_shape(functools.partial(
        continuous.empty_slots_jit, config=config, spec=spec, slots=rows,
        prompt_columns=prompt_columns, row_sharding=None), jax.random.PRNGKey(0))
  else:
    def state():
      cache = transformer.init_cache(config, rows, prompt_columns + spec.max_new_tokens)
      limits = jnp.zeros((rows,), jnp.int32)
      keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(0), limits)
      return sampling.decode_state(spec, cache, limits, limits, keys, jnp.zeros((), jnp.int32))
    shapes = jax.eval_shape(state)

  def sharding(path, leaf):
    name = jax.tree_util.keystr(path)
    if any(name.endswith(f"['{array}']") for array in kv_cache.CACHE_ARRAYS):
      return parallel.logical_sharding(transformer.CACHE_AXES, leaf.shape, mesh)
    if leaf.ndim and leaf.shape[0] == rows:
      spec = parallel.fit_spec_to_shape(P(parallel.BATCH_AXES), leaf.shape, mesh)
      return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                              sharding=sharding(path, leaf)), shapes)


def memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  return {name: int(getattr(stats, f"{name}_size_in_bytes"))
          for name in ("argument", "output", "alias", "temp")}


def compile_decode(config: ModelConfig, params, state, mesh, spec, slots: bool):
  """(compiled decode loop, seconds): the very jitted function a rollout runs."""
  start = time.perf_counter()
  with parallel.activate(mesh):
    if slots:
      replicated = NamedSharding(mesh, P())
      lowered = continuous.decode_slots_jit.lower(
          params, state, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), config=config,
          spec=spec, row_sharding=NamedSharding(mesh, P(parallel.BATCH_AXES)))
    else:
      lowered = sampling.decode_jit.lower(params, state, config=config, spec=spec)
    compiled = lowered.compile()
  return compiled, time.perf_counter() - start


def compile_prefill(config: ModelConfig, params, rows: int, prompt: int, mesh, spec,
                    decode_room: bool):
  """(compiled prefill of one batch of left-padded prompts split over data/fsdp, seconds)."""
  split = NamedSharding(mesh, P(parallel.BATCH_AXES))
  args = (params,
          jax.ShapeDtypeStruct((rows, prompt), jnp.int32, sharding=split),
          jax.ShapeDtypeStruct((rows, prompt), jnp.bool_, sharding=split),
          jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=split),
          jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=split),
          jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P())))
  start = time.perf_counter()
  with parallel.activate(mesh):
    compiled = sampling.prefill_jit.lower(*args, config=config, spec=spec,
                                          decode_room=decode_room).compile()
  return compiled, time.perf_counter() - start


def flops_per_token_step(config: ModelConfig, rows: int, columns: int) -> float:
  """2 x matmul parameters x rows (the embedding lookup is no matmul; a tied embedding is the
  head) + QK and PV over every cache column: 4 x layers x rows x columns x heads x head_dim."""
  matmul_params = config.num_params() - (0 if config.tie_word_embeddings
                                         else config.vocab_size * config.hidden_size)
  attention = 4 * config.num_layers * rows * columns * config.num_heads * config.head_dim
  return 2.0 * matmul_params * rows + attention


def roofline(carry_bytes: int, flops_per_device: float, rows: int, chip: str) -> dict:
  """Decode tokens/s of the whole mesh on `chip` if a token step took max(memory, compute)."""
  spec = CHIPS[chip]
  memory_s = carry_bytes / spec["hbm_bytes_per_s"]
  compute_s = flops_per_device / spec["bf16_flops_per_s"]
  step_s = max(memory_s, compute_s)
  return {"chip": spec["name"], "token_step_memory_s": memory_s,
          "token_step_compute_s": compute_s, "bound": "memory" if memory_s >= compute_s
          else "compute", "decode_tokens_per_s": rows / step_s}


def layout_report(config: ModelConfig, params, mesh, *, rows: int, prompt: int, new_tokens: int,
                  prefill_chunk: int, slots: bool, train_state_bytes: int, copy_bytes: int,
                  chip: str = "", prefill: bool = True) -> dict:
  """Compiles the decode loop (and the prefill) for `params` on `mesh`; see the module doc.
  `train_state_bytes` stays on the devices meanwhile; `copy_bytes` is the rollout copy's (0 when
  the sampler reads the learner's parameters, which are then part of the train state)."""
  spec = decode_spec(new_tokens, prefill_chunk)
  state = abstract_decode_state(config, spec, rows, prompt, mesh, slots)
  weight_bytes = bytes_per_device(params)
  state_bytes = bytes_per_device(state)
  compiled, decode_s = compile_decode(config, params, state, mesh, spec, slots)
  text = compiled.as_text()
  loop = hlo_text.decode_loop_report(text, len(jax.tree.leaves(params)))
  cache_k = state["cache"]["k"]
  cache_dims = cache_k.sharding.shard_shape(cache_k.shape)
  decode_memory = memory(compiled)
  resident = train_state_bytes + copy_bytes
  report: dict[str, Any] = {
      "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
      "param_dtype": config.param_dtype, "rows": rows, "cache_columns": prompt + new_tokens,
      "weight_bytes": weight_bytes,
      "kv_cache_dtype": config.kv_cache_dtype,
      "kv_cache_bytes": bytes_per_device({k: v for k, v in state["cache"].items()
                                          if k in kv_cache.CACHE_ARRAYS}),
      "decode_state_bytes": state_bytes,
      "decode_carry_bytes": loop["carry_bytes"],
      "bytes_per_token_step": (loop["carry_bytes"] - loop["carried_weight_bytes"]
                               + loop["carried_weight_elements"] * jnp.dtype(config.jnp_param_dtype).itemsize
                               + loop["in_loop_weight_gather_bytes"]),
      "loop_weight_bytes": loop["carried_weight_bytes"],
      "collectives_per_token_step": loop["in_loop"],
      "collectives_outside_loop": loop["outside"],
      "weight_gathers": {"count": len(loop["weight_gathers"]),
                         "in_loop": sum(g["in_loop"] for g in loop["weight_gathers"]),
                         "bytes": sum(g["bytes"] for g in loop["weight_gathers"])},
      "cache_dims_per_device": list(cache_dims),
      "loop_ops_of_cache_shape": hlo_text.loop_arrays_of_shape(text, cache_dims),
      "decode_compile_s": round(decode_s, 2),
      "decode_memory": decode_memory,
  }
  peaks = []
  if decode_memory:  # the state is donated: its output reuses the argument buffers
    peaks.append(resident + state_bytes + decode_memory["output"] - decode_memory["alias"]
                 + decode_memory["temp"])
  if prefill:
    compiled, prefill_s = compile_prefill(config, params, rows, prompt, mesh, spec,
                                          decode_room=not slots)
    prefill_memory = memory(compiled)
    report.update(prefill_compile_s=round(prefill_s, 2), prefill_memory=prefill_memory)
    if prefill_memory:  # continuous batching: the slots' state is live while a group prefills
      peaks.append(resident + (state_bytes if slots else 0) + prefill_memory["output"]
                   + prefill_memory["temp"])
  if peaks:
    report["sampler_peak_bytes"] = max(peaks)
  flops = flops_per_token_step(config, rows, prompt + new_tokens) / mesh.size
  report["flops_per_token_step_per_device"] = flops
  if chip:
    report["roofline"] = roofline(report["bytes_per_token_step"], flops, rows, chip)
  return report


def sampler_rows(rollouts: int, slots: int, max_batch_rows: int, batch_buckets, shards: int
                 ) -> int:
  """Rows of the decode loop (and of the first prefill group), as the samplers pick them:
  continuous batching fills the bucket of min(rollouts, slots) slots (buckets: those of
  `settings.sampling_settings` below slots, then slots), static batches take the bucket of
  min(rollouts, max_batch_rows); rounded up to a multiple of `shards`."""
  buckets = tuple(b for b in batch_buckets if b < max_batch_rows) + (max_batch_rows,)
  if slots:
    buckets = tuple(b for b in buckets if b < slots) + (slots,)
  rows = smallest_bucket(min(rollouts, buckets[-1]), buckets)
  return -(-rows // shards) * shards


def format_layout(name: str, report: dict, gib: float = 2 ** 30) -> list:
  """Report lines of one layout."""
  mesh = " ".join(f"{a}={s}" for a, s in report["mesh"].items())
  loop = report["collectives_per_token_step"]
  outside = report["collectives_outside_loop"]

  def collectives(c):
    return ", ".join(f"{k} {v['count']} ({v['bytes'] / 2 ** 20:.1f} MiB)" for k, v in
                     sorted(c.items())) or "none"
  lines = [f"{name}: mesh {mesh}, {report['param_dtype']} weights, {report['rows']} rows x "
           f"{report['cache_columns']} cache columns",
           f"  {'weight_bytes':<32} {report['weight_bytes']:>15}  "
           f"{report['weight_bytes'] / gib:8.2f} GiB",
           f"  {'kv_cache_bytes':<32} {report['kv_cache_bytes']:>15}  "
           f"{report['kv_cache_bytes'] / gib:8.2f} GiB",
           f"  {'decode_carry_bytes':<32} {report['decode_carry_bytes']:>15}  "
           f"{report['decode_carry_bytes'] / gib:8.2f} GiB  carried by the decode loop "
           f"({report['loop_weight_bytes'] / gib:.2f} GiB of weights)",
           f"  {'bytes_per_token_step':<32} {report['bytes_per_token_step']:>15}  "
           f"{report['bytes_per_token_step'] / gib:8.2f} GiB  read per token step (carry, weights "
           "as stored, + weights gathered in the loop)"]
  if "sampler_peak_bytes" in report:
    lines.append(f"  {'sampler_peak_bytes':<32} {report['sampler_peak_bytes']:>15}  "
                 f"{report['sampler_peak_bytes'] / gib:8.2f} GiB  with the train state")
  gathers = report["weight_gathers"]
  ops = report.get("loop_ops_of_cache_shape", {})
  lines += [f"  ops per token step with the cache's shape {report.get('cache_dims_per_device')}: "
            + (", ".join(f"{k} {v}" for k, v in sorted(ops.items())) or "none"),
            f"  collectives per token step: {collectives(loop)}",
            f"  collectives outside the loop: {collectives(outside)}",
            f"  weight all-gathers: {gathers['count']} ({gathers['in_loop']} in the loop, "
            f"{gathers['bytes'] / gib:.2f} GiB)"]
  if "roofline" in report:
    r = report["roofline"]
    lines.append(f"  roofline on {r['chip']}: {r['decode_tokens_per_s']:,.0f} decode tokens/s "
                 f"({r['bound']}-bound)")
  return lines
