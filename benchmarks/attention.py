"""Attention implementations on CPU: forward + backward tokens/s and peak memory vs row length.

A small Qwen2-shaped model (2 layers, hidden 256, 4 query / 2 kv heads of 64) runs one row of
L tokens: loss = mean(final hidden^2), differentiated w.r.t. all parameters, jitted. For each
`model.attention` in {xla, chunked} and L in --lengths:
  temp_bytes   XLA's compiled memory_analysis() temporaries of the step (activations, scores,
               gradients): the peak memory the step needs beyond its arguments and outputs;
  tokens_per_s L / median step time (only run where temp_bytes <= --max_run_gib, as this
               machine is small and shared; larger steps are compiled for their memory only).
               At each L the implementations' timed runs alternate (the protocol of common.py).
Also the growth of temp_bytes per doubling of L, and chunked's time / xla's time per length.

  python benchmarks/attention.py                       # -> benchmarks/results/attention.json
  python benchmarks/attention.py --lengths 512,1024,2048 --block 512
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gru_mem.model import attention, transformer  # noqa: E402
from gru_mem.model.config import preset  # noqa: E402

GIB = 2 ** 30


def small_model(implementation: str):
  return preset("tiny", vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=32768,
                attention=implementation)


def step_fn(config):
  def loss(params, tokens):
    hidden, _ = transformer.forward(config, params, tokens, return_hidden=True)
    return jnp.mean(jnp.square(hidden))
  return jax.jit(jax.value_and_grad(loss))


def compile_step(implementation: str, length: int):
  """(compiled step, params, tokens, XLA's temporaries in bytes) for one row of `length`."""
  config = small_model(implementation)
  params = transformer.init_params(config, jax.random.PRNGKey(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (1, length)),
                       jnp.int32)
  compiled = step_fn(config).lower(params, tokens).compile()
  return compiled, params, tokens, int(compiled.memory_analysis().temp_size_in_bytes)


def measure_length(implementations, length: int, max_run_gib: float, repeats: int) -> list:
  """Rows for each implementation at `length`. Timed runs alternate between implementations
  (after one warm-up each), so a change in the machine's load hits all of them alike."""
  rows, runnable = [], []
  for implementation in implementations:
    compiled, params, tokens, temp = compile_step(implementation, length)
    row = {"implementation": implementation, "length": length, "temp_bytes": temp,
           "temp_gib": round(temp / GIB, 3), "times_s": []}
    rows.append(row)
    if temp > max_run_gib * GIB:
      row["skipped"] = f"temporaries {temp / GIB:.1f} GiB > --max_run_gib {max_run_gib}"
      continue
    run = functools.partial(lambda c, p, t: jax.block_until_ready(c(p, t)), compiled, params,
                            tokens)
    run()  # warm-up
    runnable.append((row, run))
  times = common.alternate({row["implementation"]: run for row, run in runnable},
                           repeats=repeats, warmup=0)
  for row, _ in runnable:
    row["times_s"] = [round(t, 4) for t in times[row["implementation"]]]
    row["step_s"] = round(statistics.median(row["times_s"]), 4)
    row["tokens_per_s"] = round(length / row["step_s"], 1)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
  parser.add_argument("--implementations", default="xla,chunked")
  parser.add_argument("--block", type=int, default=attention.DEFAULT_BLOCK,
                      help="chunked's block size (attention.DEFAULT_BLOCK)")
  parser.add_argument("--max_run_gib", type=float, default=5.0,
                      help="run (time) a step only if its temporaries fit in this many GiB")
  parser.add_argument("--repeats", type=int, default=common.MIN_REPEATS,
                      help="alternated timed runs per implementation and length")
  args = parser.parse_args()
  protocol = common.Protocol()
  attention.DEFAULT_BLOCK = args.block  # the model calls attention with the default block
  lengths = [int(x) for x in args.lengths.split(",")]
  rows = []
  for length in lengths:
    for row in measure_length(args.implementations.split(","), length, args.max_run_gib,
                              args.repeats):
      print(row, flush=True)
      rows.append(row)
  by = {(r["implementation"], r["length"]): r for r in rows}
  summary = {}
  for implementation in args.implementations.split(","):
    growth = [by[(implementation, b)]["temp_bytes"] / by[(implementation, a)]["temp_bytes"]
              for a, b in zip(lengths, lengths[1:]) if b == 2 * a]
    summary[f"{implementation}_temp_growth_per_doubling"] = [round(g, 3) for g in growth]
  summary["chunked_time_over_xla"] = {
      length: round(by[("chunked", length)]["step_s"] / by[("xla", length)]["step_s"], 3)
      for length in lengths
      if "step_s" in by.get(("chunked", length), {}) and "step_s" in by.get(("xla", length), {})}
  summary["chunked_temp_over_xla"] = {
      length: round(by[("chunked", length)]["temp_bytes"] / by[("xla", length)]["temp_bytes"], 4)
      for length in lengths if ("chunked", length) in by and ("xla", length) in by}
  print(summary)
  path = common.save_results("attention", {
      "model": "tiny preset: 2 layers, hidden 256, mlp 512, heads 4, kv_heads 2, head_dim 64, "
               "vocab 1024, float32",
      "step": "jit(value_and_grad(mean(final hidden^2))) over one row of `length` tokens",
      "block": args.block, "auto_chunked_min_length": attention.CHUNKED_MIN_LENGTH,
      "rows": rows, "summary": summary}, protocol)
  print("saved", path)


if __name__ == "__main__":
  main()
