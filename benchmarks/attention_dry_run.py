"""The 7B learner's memory per device at 8K- and 32K-token rows, `xla` vs `chunked` attention.

The paper config (configs/qwen2p5_7b_hotpotqa.py, target h100x8: fsdp=8, 8 rows per micro-batch,
bfloat16 matmuls, scanned layers, full remat) is compiled ahead of time on 8 fake CPU devices
with `gru_mem.dry_run_learner.learner_memory` (what the dry run compiles); nothing is
allocated. Per (attention, row length) it records XLA's memory
analysis and the learner's peak per device:
  peak = arguments + outputs - aliased (the donated state) + temporaries + reference params.

Why chunked and not auto: on an H100 `auto` resolves to cudnn, which cannot be compiled on CPU
devices; on fake CPU devices `auto` would pick chunked for these lengths anyway. So the figures
are xla (the quadratic reference) vs chunked (the portable memory-efficient kernel); cuDNN's
flash attention holds O(length) per head as chunked does, plus the [rows, 1, q, k] bfloat16 mask
bias that `attention.cudnn_attention` passes (reported as `cudnn_mask_bias_bytes_per_device`).
CPU figures estimate an accelerator's: XLA's CPU backend fuses and buffers differently.

  python benchmarks/attention_dry_run.py            # -> benchmarks/results/attention_dry_run.json
  python benchmarks/attention_dry_run.py --lengths 8192 --implementations xla
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (benchmarks/ is not a package)

from gru_mem import dry_run  # noqa: E402

GIB = 2 ** 30
H100_BYTES = 80e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--target", default="h100x8", help="a configs/qwen2p5_7b_hotpotqa target")
  parser.add_argument("--lengths", default="8192,32768")
  parser.add_argument("--implementations", default="xla,chunked")
  args = parser.parse_args()

  from configs import qwen2p5_7b_hotpotqa  # pylint: disable=import-outside-toplevel
  config = qwen2p5_7b_hotpotqa.get_config(args.target)
  count = dry_run.mesh_device_count(config.mesh)
  devices = dry_run.fake_cpu_devices(count)  # before anything starts a JAX backend

  from gru_mem import dry_run_learner, parallel  # pylint: disable=import-outside-toplevel
  from gru_mem import settings as run_settings  # pylint: disable=import-outside-toplevel
  base_model, model_source = dry_run.dry_run_model_config(config)
  settings = run_settings.learner_settings(config)
  mesh = parallel.mesh_from_config(config.mesh, devices=devices)
  shapes = dry_run.default_shapes(config, settings, mesh)
  settings = dataclasses.replace(settings, micro_batch_rows=shapes.rows)
  rows_per_device = shapes.rows // (mesh.shape["data"] * mesh.shape["fsdp"])

  results = []
  for length in (int(x) for x in args.lengths.split(",")):
    dims = dataclasses.replace(shapes, length=length)
    for implementation in args.implementations.split(","):
      memory = dry_run_learner.learner_memory(base_model.replace(attention=implementation),
                                              settings, mesh, dims)
      peak = memory["learner_peak_bytes_per_device"]
      row = {"attention": implementation, "length": length, "response": dims.response,
             "rows_per_micro_batch": dims.rows, "rows_per_device": rows_per_device, **memory,
             "learner_peak_gib": round(peak / GIB, 2),
             "temp_gib": round(memory["temp_bytes"] / GIB, 2),
             "fits_80gb_h100": peak < H100_BYTES}
      print(row, flush=True)
      results.append(row)

  summary = dry_run_learner.compare_implementations(results, rows_per_device)
  print(summary)
  path = common.save_results("attention_dry_run", {
      "config": f"configs/qwen2p5_7b_hotpotqa.py:{args.target}", "model_source": model_source,
      "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
      "devices": f"{count} fake CPU devices",
      "model": {k: v for k, v in dataclasses.asdict(base_model).items() if k != "attention"},
      "note": "auto on an H100 is cudnn (not compilable on CPU); compared: xla vs chunked. "
              "Peak = arguments + outputs - aliased + temporaries + reference params.",
      "rows": results, "summary": summary})
  print("saved", path)


if __name__ == "__main__":
  main()
