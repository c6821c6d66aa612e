"""The dry run's learner: the train step compiled for abstract state and batch, its memory per
device, and attention's share of its temporaries.

  learner_memory(...)        compiles `learner.train_step_jit` for ShapeDtypeStructs that carry
                             their shardings and reads XLA's memory analysis: arguments, outputs,
                             aliased (the donated state), temporaries, and the learner's peak
                             = arguments + outputs - aliased + temporaries + reference params.
  attention_report(...)      attention's share of the learner's temporaries. One layer's
                             attention, forward and backward (a vjp, as the learner's remat
                             backward runs it), is compiled alone at the learner's per-row shapes
                             and layout, with the configured implementation and with `xla` (the
                             quadratic reference): with full remat the backward recomputes one
                             layer at a time, so what one layer's attention holds is attention's
                             part of the step's temporaries; share = that / the step's.
  compare_implementations(rows)  per row length, what `chunked` saves against `xla` in whole
                             train steps (benchmarks/attention_dry_run.py).
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gru_mem import dry_run_sampler, parallel
from gru_mem.model import attention, transformer
from gru_mem.model.config import ModelConfig
from gru_mem.rl import batch as rl_batch
from gru_mem.rl import learner, optim

GIB = 2 ** 30


def abstract_train_state(model_config: ModelConfig, settings: learner.LearnerSettings, mesh
                         ) -> learner.TrainState:
  """The TrainState as ShapeDtypeStructs with `learner.state_shardings`; allocates nothing."""
  shardings = learner.state_shardings(model_config, settings, mesh)
  params = nn.meta.unbox(transformer.abstract_params(model_config))
  opt_state = jax.eval_shape(optim.make_optimizer(settings).init, params)
  step = jax.ShapeDtypeStruct((), jnp.int32)
  return dry_run_sampler.abstract(learner.TrainState(params, opt_state, step), shardings)


def abstract_batch(shapes, mesh, with_ref: bool) -> rl_batch.Batch:
  """One micro-batch of `shapes` (rows, length, response: a `dry_run.DryRunShapes`) laid out as
  `learner.shard_batch` places it (rows over data/fsdp)."""
  split = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
  rows, length, response = shapes.rows, shapes.length, shapes.response

  def array(shape, dtype):
    return jax.ShapeDtypeStruct((1, rows, *shape), dtype, sharding=split)

  return rl_batch.Batch(
      tokens=array((length,), jnp.int32), input_mask=array((length,), jnp.bool_),
      predict_positions=array((response,), jnp.int32),
      response_tokens=array((response,), jnp.int32), response_mask=array((response,), jnp.bool_),
      advantages=array((), jnp.float32), old_logprobs=array((response,), jnp.float32),
      ref_logprobs=array((response,), jnp.float32) if with_ref else None,
      num_rows=jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())))


def compile_train_step(model_config: ModelConfig, settings: learner.LearnerSettings, mesh,
                       state: learner.TrainState, batch: rl_batch.Batch):
  """(compiled train step, seconds to lower + compile): the very jitted function that
  `learner.make_train_step` runs (donation, output shardings), traced under
  `parallel.activate(mesh)` so the model's activation constraints are in the program."""
  step = learner.train_step_jit(model_config, settings, mesh)
  start = time.perf_counter()
  with parallel.activate(mesh):
    compiled = step.lower(state, batch).compile()
  return compiled, time.perf_counter() - start


def learner_memory(model_config: ModelConfig, settings: learner.LearnerSettings, mesh, shapes
                   ) -> dict:
  """The train step of `shapes` compiled: {argument, output, alias, temp}_bytes, the reference
  params' bytes (kl_beta > 0), learner_peak_bytes_per_device and compile_s (see the module doc)."""
  state = abstract_train_state(model_config, settings, mesh)
  batch = abstract_batch(shapes, mesh, with_ref=bool(settings.kl_beta))
  compiled, seconds = compile_train_step(model_config, settings, mesh, state, batch)
  memory = dry_run_sampler.memory(compiled)
  reference = dry_run_sampler.bytes_per_device(state.params) if settings.kl_beta else 0
  peak = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + reference
  return {**{f"{k}_bytes": v for k, v in memory.items()}, "reference_bytes_per_device": reference,
          "learner_peak_bytes_per_device": peak, "compile_s": round(seconds, 1)}


def attention_program_temp(model_config: ModelConfig, mesh, rows: int, length: int,
                           implementation: str) -> int:
  """Temporaries per device of one layer's attention over `rows` rows of `length` tokens, forward
  and backward (the vjp of `attention.attention` for a cotangent of the output), q/k/v laid out
  as the model constrains them (rows over data/fsdp, heads over tensor where they divide)."""
  c = model_config
  q_shape = (rows, length, c.num_heads, c.head_dim)
  kv_shape = (rows, length, c.num_kv_heads, c.head_dim)

  def spec(shape, logical):
    return jax.ShapeDtypeStruct(shape, c.jnp_dtype,
                                sharding=parallel.logical_sharding(logical, shape, mesh))
  heads = ("batch", "length", "heads", "head_dim")
  args = (spec(q_shape, heads), spec(kv_shape, ("batch", "length", "kv_heads", "head_dim")),
          spec(kv_shape, ("batch", "length", "kv_heads", "head_dim")),
          jax.ShapeDtypeStruct((rows, length), jnp.bool_, sharding=NamedSharding(
              mesh, parallel.fit_spec_to_shape(P(parallel.BATCH_AXES), (rows, length), mesh))),
          spec(q_shape, heads))

  def forward_backward(q, k, v, valid, cotangent):
    out, vjp = jax.vjp(lambda q, k, v: attention.attention(q, k, v, valid,
                                                           implementation=implementation), q, k, v)
    return out, vjp(cotangent)

  with parallel.activate(mesh):
    compiled = jax.jit(forward_backward).lower(*args).compile()
  return dry_run_sampler.memory(compiled)["temp"]


def attention_report(model_config: ModelConfig, mesh, rows: int, length: int,
                     train_step_temp_bytes: int) -> dict:
  """Attention's share of the learner's temporaries (see the module doc): the implementation as
  configured and as it resolves here, one layer's attention temporaries with it and with `xla`,
  and the share of `train_step_temp_bytes` (the configured learner's)."""
  configured = model_config.attention
  resolved = attention.resolve(configured, backend=jax.default_backend(), k_len=length,
                               dtype=model_config.jnp_dtype, head_dim=model_config.head_dim,
                               cached=False)
  temp = attention_program_temp(model_config, mesh, rows, length, resolved)
  xla = temp if resolved == "xla" else attention_program_temp(model_config, mesh, rows, length,
                                                              "xla")
  return {"implementation": configured, "resolved": resolved, "rows": rows, "length": length,
          "attention_temp_bytes": temp, "xla_attention_temp_bytes": xla,
          "train_step_temp_bytes": train_step_temp_bytes,
          "share_of_learner_temp": temp / train_step_temp_bytes if train_step_temp_bytes else None}


def compare_implementations(rows: list, rows_per_device: int) -> dict:
  """{length: xla and chunked peaks, the temporaries chunked saves and their share of xla's, and
  the [rows/device, 1, length, length] bfloat16 mask bias that the cuDNN path builds} for rows
  of `learner_memory` tagged with "attention" and "length"."""
  by = {(r["attention"], r["length"]): r for r in rows}
  summary = {}
  for length in sorted({r["length"] for r in rows}):
    if ("xla", length) in by and ("chunked", length) in by:
      xla, chunked = by[("xla", length)], by[("chunked", length)]
      saved = xla["temp_bytes"] - chunked["temp_bytes"]
      summary[length] = {
          "xla_peak_gib": round(xla["learner_peak_bytes_per_device"] / GIB, 2),
          "chunked_peak_gib": round(chunked["learner_peak_bytes_per_device"] / GIB, 2),
          "temp_saved_by_chunked_gib": round(saved / GIB, 2),
          "share_of_xla_temp_saved": round(saved / xla["temp_bytes"], 3),
          "cudnn_mask_bias_bytes_per_device": rows_per_device * length * length * 2}
  return summary
