r"""Dry run: the config's model on the config's mesh, compiled ahead of time; nothing allocated.

  python -m gru_mem.dry_run --config configs/qwen2p5_7b_hotpotqa.py:h100x8
  python -m gru_mem.dry_run --config configs/qwen2p5_7b_hotpotqa.py:tpu_v5p_64 --out /tmp/7b.json
  python -m gru_mem.train --config configs/qwen2p5_7b_hotpotqa.py:h100x8 --workdir runs/7b \
      --config.train.dry_run=True      # the same, report saved as runs/7b/dry_run.json

Parameters, optimizer state and batches are `jax.ShapeDtypeStruct`s that carry their shardings
(`parallel.param_shardings`, `optimizer_state_shardings`, the batch split over data/fsdp); the
train step is lowered and compiled for them, and the compiled executables' `memory_analysis()`
gives the temporaries (activations, gradients) per device, and attention's share of them
(`dry_run_learner.attention_report`: one layer's attention compiled alone). The sampler
(`dry_run_sampler`) is
compiled as a rollout runs it, prefill and decode loop, with the rollout copy's layout
(`sampling.param_dtype`, `sampling.mesh`) and, beside it, with the learner's float32 params on
the learner's mesh: weight and KV cache bytes, the collectives of the decode loop per token step
(from the compiled HLO), weight all-gathers, the sampler's peak with the train state, and a
roofline of decode tokens/s on `train.dry_run_chip` (h100, tpu_v5p).

Devices. The mesh is built from fake CPU devices, as many as the config's mesh has: a size of -1
counts as 1 unless `--devices N` says how many devices the whole mesh has (e.g. `h100x8` is
data=-1 x fsdp=8 -> 8 devices; `tpu_v5p_64` is data=-1 x fsdp=8 x tensor=4 -> 32 devices, the 32
chips of a v5p-64 slice; `--devices 64` would model two such slices with data=2). In a fresh
process this module asks JAX for that many CPU devices (`jax_num_cpu_devices`, CPU platform only)
before any backend starts; in a process whose JAX already runs it uses the CPU devices it has
and says so if they are too few.

Model shape. From `model.hf_path/config.json` when that folder exists, else from
`model.preset`, so no weights are needed. CPU figures are an estimate of an accelerator's: XLA's
CPU backend fuses and buffers differently (it may keep bfloat16 intermediates in float32).

Shapes lowered (compile time on CPU hardly depends on them, so the defaults are the real ones):
learner micro-batch = optim.micro_batch_rows rows of the bucket of chunk + memory + question
allowance + response tokens; sampler rows = the rollout batch (prompts x group) capped at
sampling.slots (continuous batching: the decode slots, and the first prefill group that fills
them) or, with slots=0, at sampling.max_batch_rows; prompts of the sampling.length_buckets bucket
of chunk + memory + question allowance.
"""

from __future__ import annotations

from gru_mem import console

console.quiet_startup(import_tensorflow=False)  # before the libraries below are imported

import dataclasses
import json
import math
import os
import platform
import sys
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import numpy as np

from gru_mem import dry_run_learner, dry_run_sampler, parallel, runtime, sampling
from gru_mem import settings as run_settings
from gru_mem.buckets import QUESTION_ALLOWANCE_TOKENS, smallest_bucket
from gru_mem.model import transformer
from gru_mem.model.config import ModelConfig
from gru_mem.rl import learner

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class DryRunShapes:
  """What gets lowered: the learner's micro-batch and the sampler's prefill batch."""
  rows: int  # learner rows per micro-batch
  length: int  # learner prompt + response tokens (a length bucket)
  response: int  # learner response tokens (a length bucket)
  sampler_batch: int  # rows of one sampler call
  sampler_prompt: int  # left-padded prompt tokens (a length bucket)
  sampler_new_tokens: int  # decode budget = KV cache slots beyond the prompt
  sampler_prefill_chunk: int = 2048  # prompt tokens prefilled per pass (sampling.prefill_chunk_tokens)


# ----------------------------------------------------------------------------- inputs


def dry_run_model_config(config) -> tuple[ModelConfig, str]:
  """(ModelConfig, where its shape came from): `runtime.model_config_from`, with model.hf_path's
  config.json when the folder exists, else the preset (no tokenizer, so its vocab stands)."""
  m = config.model
  if m.hf_path and os.path.isfile(os.path.join(m.hf_path, "config.json")):
    return runtime.model_config_from(config), f"{m.hf_path}/config.json"
  shape_config = config.copy_and_resolve_references()
  shape_config.model.hf_path = ""
  where = f"preset {m.preset!r}"
  if m.hf_path:
    where += f" (model.hf_path {m.hf_path!r} has no config.json)"
  return runtime.model_config_from(shape_config), where


def mesh_device_count(mesh_config, devices: Optional[int] = None) -> int:
  """Devices the dry-run mesh spans: `devices` if given, else the product of the mesh sizes with
  -1 counted as 1."""
  if devices:
    return int(devices)
  return math.prod(max(int(mesh_config.get(a, 1)), 1) for a in parallel.MESH_AXES)


def fake_cpu_devices(count: int) -> list:
  """`count` CPU devices. Before JAX starts a backend, asks for exactly that many (and the CPU
  platform only); afterwards uses the CPU devices there are."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise RuntimeError(
        f"the dry run needs {count} CPU devices but JAX already started with {len(devices)}: run "
        "it in a fresh process (python -m gru_mem.dry_run --config ...), or start this one with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
  return devices[:count]


def default_shapes(config, settings: learner.LearnerSettings, mesh, shards: int = 0
                   ) -> DryRunShapes:
  """The shapes a real step of `config` runs at (see the module docstring); sampler rows a
  multiple of `shards` (default: the mesh's data x fsdp)."""
  a = config.agent
  prompt = a.chunk_tokens + a.memory_tokens + QUESTION_ALLOWANCE_TOKENS
  response = max(a.max_response_tokens, a.max_answer_tokens)
  shards = shards or math.prod(mesh.shape[axis] for axis in parallel.BATCH_AXES)
  sampler_settings = sampling.SamplingSettings()
  return DryRunShapes(
      rows=settings.micro_batch_rows,
      length=smallest_bucket(prompt + response, settings.length_buckets, "a learner row"),
      response=smallest_bucket(response, settings.length_buckets, "a response"),
      sampler_batch=dry_run_sampler.sampler_rows(
          config.rl.prompts_per_step * config.rl.group_size, config.sampling.slots,
          config.sampling.max_batch_rows, sampler_settings.batch_buckets, shards),
      sampler_prompt=smallest_bucket(prompt, run_settings.sampling_length_buckets(config),
                                     "a sampler prompt"),
      sampler_new_tokens=a.max_response_tokens,
      sampler_prefill_chunk=config.sampling.prefill_chunk_tokens)


_abstract = dry_run_sampler.abstract
bytes_per_device = dry_run_sampler.bytes_per_device


abstract_train_state = dry_run_learner.abstract_train_state
abstract_batch = dry_run_learner.abstract_batch
compile_train_step = dry_run_learner.compile_train_step


# ----------------------------------------------------------------------------- the report


def run(config, devices: Optional[int] = None, shapes: Optional[dict] = None,
        sampler: bool = True, out_path: Optional[str] = None, verbose: bool = True,
        learner_step: bool = True, learner_layout: bool = True) -> dict:
  """Builds the abstract state, compiles, prints the report and returns it as a dict (also
  written as JSON to `out_path`). `shapes` overrides fields of `default_shapes`. The sampler
  is compiled with the rollout layout (`sampling.param_dtype`, `sampling.mesh`) and, when that
  differs and `learner_layout`, with the learner's parameters and mesh beside it."""
  model_config, model_source = dry_run_model_config(config)
  settings = run_settings.learner_settings(config)
  dry_run_sampler.check_chip(config.train.dry_run_chip)
  count = mesh_device_count(config.mesh, devices)
  mesh = parallel.mesh_from_config(config.mesh, devices=fake_cpu_devices(count))
  layout = run_settings.rollout_layout(config, model_config, mesh)  # fails before any compile
  shards = math.lcm(*(math.prod(m.shape[a] for a in parallel.BATCH_AXES)
                      for m in (mesh, layout.mesh)))
  dims = dataclasses.replace(default_shapes(config, settings, mesh, shards), **(shapes or {}))
  settings = dataclasses.replace(settings, micro_batch_rows=dims.rows)

  state = abstract_train_state(model_config, settings, mesh)
  batch = abstract_batch(dims, mesh, with_ref=bool(settings.kl_beta))
  params_bytes = bytes_per_device(state.params)
  report: dict[str, Any] = {
      "model_source": model_source, "model_config": dataclasses.asdict(model_config),
      "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
      "devices": f"{count} fake CPU devices", "shapes": dataclasses.asdict(dims),
      "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "params_bytes_total": int(sum(x.size * np.dtype(x.dtype).itemsize
                                    for x in jax.tree.leaves(state.params))),
      "params_bytes_per_device": params_bytes,
      "optimizer_bytes_per_device": bytes_per_device(state.opt_state),
      "reference_bytes_per_device": params_bytes if settings.kl_beta else 0,
      "batch_bytes_per_device": bytes_per_device(batch),
  }
  if learner_step:
    compiled, seconds = compile_train_step(model_config, settings, mesh, state, batch)
    memory = dry_run_sampler.memory(compiled)
    report["train_step_compile_s"] = round(seconds, 2)
    report.update({f"train_step_{k}_bytes": v for k, v in memory.items()})
    if memory:
      report["learner_peak_bytes_per_device"] = (
          memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
          + report["reference_bytes_per_device"])
      report["attention"] = dry_run_learner.attention_report(model_config, mesh, dims.rows,
                                                             dims.length, memory["temp"])
  if sampler:
    report.update(sampler_report(config, layout, state, dims, report, learner_layout))
  report["environment"] = {"machine": platform.machine(), "python": platform.python_version(),
                           "jax": jax.__version__, "flax": flax.__version__,
                           "command": " ".join(sys.argv)}
  if verbose:
    print(format_report(report), flush=True)
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
      json.dump(report, f, indent=2)
  return report


def sampler_report(config, layout, state: learner.TrainState, dims: DryRunShapes, report: dict,
                   learner_layout: bool = True) -> dict:
  """The sampler with the rollout layout ("rollout") and, when that differs, with the
  learner's parameters and mesh ("learner_layout"); see `dry_run_sampler.layout_report`."""
  train_state_bytes = (report["params_bytes_per_device"] + report["optimizer_bytes_per_device"]
                       + report["reference_bytes_per_device"])
  common = dict(rows=dims.sampler_batch, prompt=dims.sampler_prompt,
                new_tokens=dims.sampler_new_tokens, prefill_chunk=dims.sampler_prefill_chunk,
                slots=bool(config.sampling.slots), train_state_bytes=train_state_bytes,
                chip=config.train.dry_run_chip)
  if layout.shares_learner_params:
    rollout_params, copy_bytes = state.params, 0
  else:
    rollout_params = _abstract(nn.meta.unbox(transformer.abstract_params(layout.config)),
                               layout.shardings())
    copy_bytes = bytes_per_device(rollout_params)
  rollout = dry_run_sampler.layout_report(layout.config, rollout_params, layout.mesh,
                                          copy_bytes=copy_bytes, **common)
  out = {"rollout": rollout, "rollout_weight_bytes_per_device": rollout["weight_bytes"],
         "kv_cache_bytes_per_device": rollout["kv_cache_bytes"],
         "sampler_prefill_compile_s": rollout.get("prefill_compile_s"),
         **{f"sampler_prefill_{k}_bytes": v for k, v in rollout.get("prefill_memory", {}).items()}}
  if "sampler_peak_bytes" in rollout:
    out["sampler_peak_bytes_per_device"] = rollout["sampler_peak_bytes"]
  if learner_layout and not layout.same_as_learner:
    out["learner_layout"] = dry_run_sampler.layout_report(
        layout.learner_config, state.params, layout.learner_mesh, copy_bytes=0, prefill=False,
        **common)
    rates = [r.get("roofline", {}).get("decode_tokens_per_s") for r in
             (rollout, out["learner_layout"])]
    if all(rates):
      out["rollout_vs_learner_layout_decode_tokens_per_s"] = rates[0] / rates[1]
  return out


_BYTE_LINES = (
    ("params_bytes_per_device", "parameters"),
    ("optimizer_bytes_per_device", "optimizer state"),
    ("reference_bytes_per_device", "reference policy (kl_beta > 0)"),
    ("batch_bytes_per_device", "learner micro-batch"),
    ("train_step_temp_bytes", "train step temporaries: activations, gradients"),
    ("learner_peak_bytes_per_device", "learner peak (estimate)"),
    ("rollout_weight_bytes_per_device", "sampler weights (the rollout copy's layout)"),
    ("kv_cache_bytes_per_device", "sampler KV cache"),
    ("sampler_prefill_temp_bytes", "sampler prefill temporaries"),
    ("sampler_peak_bytes_per_device", "sampler peak with the train state (estimate)"),
)


def format_report(report: dict) -> str:
  """The report as text: one `key  bytes  (GiB)  what` line per figure."""
  m, s = report["model_config"], report["shapes"]
  mesh = " ".join(f"{axis}={size}" for axis, size in report["mesh"].items())
  lines = [
      f"dry run: model from {report['model_source']}: {m['num_layers']} layers, hidden "
      f"{m['hidden_size']}, vocab {m['vocab_size']}; param_dtype {m['param_dtype']}, dtype "
      f"{m['dtype']}, scan_layers {m['scan_layers']}, remat {m['remat_policy']}",
      f"mesh: {mesh} on {report['devices']}",
      f"learner micro-batch: {s['rows']} rows x {s['length']} tokens ({s['response']} response); "
      f"sampler: {s['sampler_batch']} rows x {s['sampler_prompt']} prompt + "
      f"{s['sampler_new_tokens']} new tokens",
      f"num_params {report['num_params']}",
      f"params_bytes_total {report['params_bytes_total']}",
      "per device:",
  ]
  for key, what in _BYTE_LINES:
    if key in report:
      lines.append(f"  {key:<32} {report[key]:>15}  {report[key] / GIB:8.2f} GiB  {what}")
  if "attention" in report:
    a = report["attention"]
    lines.append(f"  attention ({a['implementation']}, runs {a['resolved']} here): one layer's "
                 f"forward + backward holds {a['attention_temp_bytes'] / GIB:.2f} GiB = "
                 f"{a['share_of_learner_temp']:.1%} of the train step temporaries (xla: "
                 f"{a['xla_attention_temp_bytes'] / GIB:.2f} GiB)")
  for key, name in (("rollout", "sampler, rollout layout"),
                    ("learner_layout", "sampler, learner layout (the learner's params as they are)")):
    if key in report:
      lines += dry_run_sampler.format_layout(name, report[key])
  if "rollout_vs_learner_layout_decode_tokens_per_s" in report:
    lines.append(f"roofline decode tokens/s, rollout / learner layout: "
                 f"{report['rollout_vs_learner_layout_decode_tokens_per_s']:.2f}x")
  compiles = [f"{k[:-len('_compile_s')]} {report[k]:.1f} s" for k in
              ("train_step_compile_s", "sampler_prefill_compile_s") if report.get(k)]
  compiles += [f"{k} decode {report[k]['decode_compile_s']:.1f} s" for k in
               ("rollout", "learner_layout") if k in report]
  lines.append("lower + compile: " + ", ".join(compiles))
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  overrides = {name: getattr(f, name) for name in ("rows", "length", "response", "sampler_batch",
                                                   "sampler_prompt", "sampler_new_tokens")
               if getattr(f, name)}
  run(f.config, devices=f.devices, shapes=overrides, sampler=f.sampler, out_path=f.out,
      learner_step=f.learner, learner_layout=f.learner_layout)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=ungrouped-imports
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/base.py", "experiment config file")
  flags.DEFINE_integer("devices", 0, "devices of the whole mesh (0: the config's sizes, -1 as 1)")
  for _name in ("rows", "length", "response", "sampler_batch", "sampler_prompt",
                "sampler_new_tokens"):
    flags.DEFINE_integer(_name, 0, f"override the lowered {_name} (0: from the config)")
  flags.DEFINE_bool("sampler", True, "also compile the sampler: prefill and decode loop")
  flags.DEFINE_bool("learner", True, "compile the learner's train step")
  flags.DEFINE_bool("learner_layout", True, "also compile the decode loop with the learner's "
                    "params and mesh, when the rollout layout differs")
  flags.DEFINE_string("out", None, "write the report as JSON here")
  app.run(main)
