"""Rows/s of continuous batching (`gru_mem.continuous`) against static batches, one process.

The workload looks like a chunk step of the agent: 256 rows, prompts of 96-128 tokens, per-row
token limits drawn from a lognormal (median 32 tokens, sigma 0.8) and capped at 8x the median
(256 = max_new_tokens); greedy, no EOS, so every row runs to its limit (a short `no` turn beside a
rewritten memory). Static: `sampling.generate` in batches of 32 (each runs until its longest row
is done). Continuous: 32 slots, refilled once R are free, for each R of --refill. Also a uniform
workload (every row at 256 tokens), where static batches have no idle rows: what the slots cost.

Both are warmed up (every program compiled) before timing; the tokens of every continuous run
are compared with the static run's. The same random Qwen2 (transformers-initialised, float32, loaded from its HF folder) for all.
With --tunix_python (a venv holding google-tunix 0.1.7, see benchmarks/tunix_sampler.py) the
long-tailed workload also runs through tunix's static sampler in batches of 32.

  python benchmarks/continuous_batching.py [--refill 4,16] [--repeats 5]
      [--tunix_python /path/to/venv/bin/python]

Ours: timed by the protocol of benchmarks/common.py (static and continuous alternated in one
process, every repeat kept, median of per-repeat ratios). tunix runs in its own venv, so its
process comes after ours (min of --iterations runs), not alternated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gru_mem import continuous, sampling  # noqa: E402
from gru_mem.model import hf  # noqa: E402

ROWS, SLOTS, MEDIAN_TOKENS, SIGMA, MAX_NEW = 256, 32, 32, 0.8, 256
MODEL = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
             num_kv_heads=2, head_dim=32, tie_word_embeddings=True, max_position_embeddings=1024)


def workload(seed: int = 0, rows: int = ROWS, vocab_size: int = MODEL["vocab_size"],
             median: int = MEDIAN_TOKENS, max_new: int = MAX_NEW, prompt_lengths=(96, 128)):
  """(prompts, long-tailed limits [rows]): lognormal(log median, SIGMA), in [1, max_new];
  prompt lengths uniform in prompt_lengths (both ends included)."""
  rng = np.random.RandomState(seed)
  limits = np.clip(np.round(median * rng.lognormal(0.0, SIGMA, rows)), 1, max_new)
  prompts = [rng.randint(1, vocab_size, n).tolist()
             for n in rng.randint(prompt_lengths[0], prompt_lengths[1] + 1, rows)]
  return prompts, limits.astype(np.int32)


def padded_steps(limits, batch: int) -> int:
  """Decode steps x rows a static sampler runs: each batch until its longest row."""
  return int(sum(batch * limits[i:i + batch].max() for i in range(0, len(limits), batch)))


def save_hf_model(folder: str) -> None:
  """The random Qwen2 of MODEL as an HF folder (both samplers load it)."""
  import torch
  import transformers
  torch.manual_seed(0)
  transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=MODEL["vocab_size"], hidden_size=MODEL["hidden_size"],
      intermediate_size=MODEL["intermediate_size"], num_hidden_layers=MODEL["num_layers"],
      num_attention_heads=MODEL["num_heads"], num_key_value_heads=MODEL["num_kv_heads"],
      head_dim=MODEL["head_dim"], tie_word_embeddings=MODEL["tie_word_embeddings"],
      rope_theta=1e6, max_position_embeddings=MODEL["max_position_embeddings"])
  ).eval().save_pretrained(folder)


def run_tunix(python: str, folder: str, prompts, limits, reference, iterations: int) -> dict:
  """The long-tailed workload through tunix's sampler (its own venv, a subprocess)."""
  job = os.path.join(folder, "job.json")
  with open(job, "w") as f:
    json.dump({"model_dir": folder, "prompts": prompts, "limits": limits.tolist(),
               "batch": SLOTS, "iterations": iterations}, f)
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tunix_sampler.py")
  proc = subprocess.run([python, script, job], capture_output=True, text=True, timeout=3600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  same = [reference.row(i) == row for i, row in enumerate(result.pop("rows"))]
  result["greedy_rows_equal_ours_fraction"] = float(np.mean(same))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--refill", default="4,16", help="refill_free_slots values to time")
  parser.add_argument("--repeats", type=int, default=common.MIN_REPEATS,
                      help="alternated timed runs of each side")
  parser.add_argument("--iterations", type=int, default=2,
                      help="timed runs of tunix (its own process; min taken)")
  parser.add_argument("--tunix_python", default="", help="python of a venv with google-tunix")
  args = parser.parse_args()
  refills = [int(r) for r in args.refill.split(",")]
  protocol = common.Protocol()

  folder = tempfile.mkdtemp()
  save_hf_model(folder)
  config, params = hf.load_hf_checkpoint(folder)
  prompts, limits = workload()
  static = sampling.SamplingSettings(max_new_tokens=MAX_NEW, temperature=0.0,
                                     batch_buckets=(SLOTS,))
  print(f"{ROWS} rows, limits median {np.median(limits):.0f} mean {limits.mean():.1f} max "
        f"{limits.max()}; static batches run {padded_steps(limits, SLOTS)} row-steps for "
        f"{limits.sum()} tokens", flush=True)
  references = {}
  figures = {"model": MODEL, "num_params": config.num_params(), "rows": ROWS, "slots": SLOTS,
             "limits": {"median": float(np.median(limits)), "mean": float(limits.mean()),
                        "max": int(limits.max()), "sigma": SIGMA, "tokens": int(limits.sum()),
                        "static_row_steps": padded_steps(limits, SLOTS)}}
  for name, row_limits in (("long_tailed", limits), ("uniform", np.full(ROWS, MAX_NEW, np.int32))):
    sides, outputs = {}, {}

    def side(key, run):
      def call():
        outputs[key] = run()
      sides[key] = call

    side("static_batches_of_32",
         lambda r=row_limits: sampling.generate(config, params, prompts, 0, static, r))
    for refill in (refills if name == "long_tailed" else [max(1, SLOTS // 4)]):
      settings = dataclasses.replace(  # groups of free slots padded to 1, 2, 4, ... 32 rows
          static, slots=SLOTS, refill_free_slots=refill,
          batch_buckets=sampling.SamplingSettings.batch_buckets)
      side(f"continuous_32_slots_refill_{refill}",
           lambda s=settings, r=row_limits: continuous.generate(config, params, prompts, 0, s, r))
    times = common.alternate(sides, repeats=args.repeats, warmup=1)
    reference = references[name] = outputs["static_batches_of_32"]
    static_s = common.spread(times["static_batches_of_32"])["median"]
    rows = {"static_batches_of_32": {"times_s": times["static_batches_of_32"],
                                     "seconds": static_s, "rows_per_s": ROWS / static_s}}
    print(f"{name}: static {ROWS / static_s:7.2f} rows/s ({static_s:.1f} s)", flush=True)
    for key in list(sides)[1:]:
      out = outputs[key]
      seconds = common.spread(times[key])["median"]
      ratio = common.speed_ratio(times[key], times["static_batches_of_32"])
      row = {"times_s": times[key], "seconds": seconds, "rows_per_s": ROWS / seconds,
             "speedup_over_static": ratio,
             "tokens_equal_static": bool(np.array_equal(out.tokens, reference.tokens)),
             "max_abs_logprob_diff": float(np.abs(out.logprobs - reference.logprobs).max())}
      rows[key] = row
      print(f"{name}: {key}: {row['rows_per_s']:7.2f} rows/s ({seconds:.1f} s), "
            f"x{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}) over static, "
            f"tokens equal {row['tokens_equal_static']}", flush=True)
    figures[name] = rows
  if args.tunix_python:
    tunix = run_tunix(args.tunix_python, folder, prompts, limits, references["long_tailed"],
                      args.iterations)
    tunix["rows_per_s"] = ROWS / tunix["seconds"]
    figures["long_tailed"]["tunix_static_batches_of_32"] = tunix
    print(f"long_tailed: tunix {tunix['rows_per_s']:7.2f} rows/s ({tunix['seconds']:.1f} s); "
          f"greedy rows equal ours {100 * tunix['greedy_rows_equal_ours_fraction']:.0f}%")
  shutil.rmtree(folder)
  path = common.save_results("continuous_batching", figures, protocol)
  print(f"saved {path}")


if __name__ == "__main__":
  main()
