"""Decode speed of `gru_mem.sampling.generate` against transformers' `generate` (PyTorch, CPU).

One random Qwen2 model (hidden 512, 4 layers, vocab 32000, tied embeddings, float32) is saved as
an HF folder and loaded by both sides. Greedy, 128-token prompts, 128 new tokens, EOS ignored, at
batch 1, 16 and 64. Decode time = time(128 new tokens) - time(1 new token), so prefill and
compilation (both sides are warmed up first) are left out; tokens/s = batch * 127 / decode time.

It also measures this machine's memory read bandwidth and float32 matmul rate, and reports how
close decode comes to each limit: bytes one step must read (weights, KV cache) / step time /
bandwidth (the limit at batch 1), and FLOP per step / step time / matmul rate (the limit at large
batch).

  python benchmarks/sampling.py [--batches 1,16,64] [--repeats 5]

Timed by the protocol of benchmarks/common.py: within each repeat the four runs (ours and
transformers, 1 and 128 new tokens) alternate; the speed ratio is the median of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from gru_mem import sampling  # noqa: E402
from gru_mem.buckets import DEFAULT_LENGTH_BUCKETS, smallest_bucket  # noqa: E402
from gru_mem.model import hf  # noqa: E402

PROMPT_TOKENS = 128
NEW_TOKENS = 128
HF_CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, rope_theta=1e6,
                 tie_word_embeddings=True, max_position_embeddings=4096)


def memory_read_bandwidth(gib: float = 1.0, iterations: int = 10) -> dict:
  """Bytes/s of reading a `gib`-sized float32 array: numpy sum, jitted jnp sum, and a jitted
  [1, 512] x [512, n] product (the shape of a batch-1 LM head). The fastest counts."""
  array = np.ones(int(gib * 2**30) // 4, np.float32)
  device_array = jnp.asarray(array)
  matrix, vector = device_array.reshape(512, -1), jnp.ones((1, 512), jnp.float32)
  total, vector_times_matrix = jax.jit(jnp.sum), jax.jit(jnp.matmul)
  readers = {
      "numpy_sum": lambda: array.sum(),
      "jax_sum": lambda: total(device_array).block_until_ready(),
      "jax_vector_matrix": lambda: vector_times_matrix(vector, matrix).block_until_ready(),
  }
  rates = {name: array.nbytes / common.time_call(read, warmup=1, iterations=iterations)["min_s"]
           for name, read in readers.items()}
  return {"array_bytes": array.nbytes, "bytes_per_s_by_method": rates,
          "bytes_per_s": max(rates.values())}


def decode_step_bytes(config, params, batch: int, cache_slots: int) -> dict:
  """Bytes one decode step must read: every weight (the embedding only as the tied LM head, or
  one row per token when untied) and each row's K and V cache over all its slots."""
  leaf_bytes = {jax.tree_util.keystr(k): v.nbytes
                for k, v in jax.tree_util.tree_leaves_with_path(params)}
  weights = sum(leaf_bytes.values())
  if not config.tie_word_embeddings:
    weights -= leaf_bytes["['embed_tokens']"]
  itemsize = jnp.dtype(config.jnp_dtype).itemsize
  kv_cache = (2 * config.num_layers * batch * cache_slots * config.num_kv_heads * config.head_dim
              * itemsize)
  return {"weights": weights, "kv_cache": kv_cache, "total": weights + kv_cache}


def decode_step_flop(config, batch: int, cache_slots: int) -> int:
  """FLOP of one decode step: 2 per matmul weight per row (the LM head, not the embedding
  lookup) plus the attention scores and values over every cache slot (4 * slots * heads * d)."""
  matmul_weights = config.num_params()
  if not config.tie_word_embeddings:
    matmul_weights -= config.vocab_size * config.hidden_size
  attention = 4 * config.num_layers * cache_slots * config.num_heads * config.head_dim
  return batch * (2 * matmul_weights + attention)


def our_runner(config, params, prompts):
  """A callable generating `n` greedy tokens per row with our sampler (compiled on first use)."""
  settings = sampling.SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0.0)
  batch = len(prompts)
  last = {}

  def run(limit):
    last["tokens"] = sampling.generate(config, params, prompts, 0, settings,
                                       max_new_tokens_per_row=[limit] * batch).tokens
    assert (last["tokens"][:, limit:] == settings.pad_id).all()

  run(1)  # compiles prefill and decode: the per-row limit does not change the program
  return run, last


def transformers_runner(model, prompts):
  """A callable generating `n` greedy tokens per row with transformers' `generate`."""
  ids = torch.tensor(np.asarray(prompts), dtype=torch.long)
  last = {}

  def run(new_tokens):
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == PROMPT_TOKENS + new_tokens
    last["tokens"] = out[:, PROMPT_TOKENS:].numpy()

  run(2)  # warm-up
  return run, last


def time_decode(runners: dict, repeats: int) -> dict:
  """Per repeat and side: decode seconds = time(NEW_TOKENS tokens) - time(1 token), all four
  runs alternated within each repeat."""
  sides = {}
  for name, run in runners.items():
    sides[f"{name}/1"] = lambda run=run: run(1)
    sides[f"{name}/{NEW_TOKENS}"] = lambda run=run: run(NEW_TOKENS)
  times = common.alternate(sides, repeats=repeats, warmup=0)
  return {"times_s": times, "decode_s": {
      name: [full - one for full, one in zip(times[f"{name}/{NEW_TOKENS}"], times[f"{name}/1"])]
      for name in runners}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="1,16,64")
  parser.add_argument("--repeats", type=int, default=common.MIN_REPEATS,
                      help="alternated timed runs per side and length")
  args = parser.parse_args()
  protocol = common.Protocol()
  batches = [int(b) for b in args.batches.split(",")]

  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_CONFIG)).eval()
  with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    config, params = hf.load_hf_checkpoint(folder)
  bandwidth = memory_read_bandwidth()
  matmul_peak = common.matmul_peak_flops()
  print(f"memory read bandwidth {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s; float32 matmul "
        f"{matmul_peak['flop_per_s'] / 1e9:.0f} GFLOP/s; torch threads {torch.get_num_threads()}")
  rows = []
  for batch in batches:
    prompts = np.random.RandomState(batch).randint(1, HF_CONFIG["vocab_size"],
                                                   (batch, PROMPT_TOKENS)).tolist()
    ours, ours_last = our_runner(config, params, prompts)
    theirs, theirs_last = transformers_runner(model, prompts)
    timed = time_decode({"ours": ours, "transformers": theirs}, args.repeats)
    decode_s = {name: common.spread(seconds)["median"] for name, seconds in timed["decode_s"].items()}
    decode_tokens = batch * (NEW_TOKENS - 1)
    ratio = common.speed_ratio(timed["decode_s"]["ours"], timed["decode_s"]["transformers"])
    row = {
        "batch": batch, "times_s": timed["times_s"], "decode_s": timed["decode_s"],
        "ours_decode_tokens_per_s": decode_tokens / decode_s["ours"],
        "transformers_decode_tokens_per_s": decode_tokens / decode_s["transformers"],
        "ours_ms_per_step": 1e3 * decode_s["ours"] / (NEW_TOKENS - 1),
        "transformers_ms_per_step": 1e3 * decode_s["transformers"] / (NEW_TOKENS - 1),
        "speed_ratio_ours_over_transformers": ratio,
        "greedy_tokens_equal_fraction": float(np.mean(ours_last["tokens"] ==
                                                      theirs_last["tokens"])),
    }
    row["speedup"] = ratio["median"]
    cache_slots = smallest_bucket(PROMPT_TOKENS, DEFAULT_LENGTH_BUCKETS) + NEW_TOKENS
    step_bytes = decode_step_bytes(config, params, batch, cache_slots)
    row["bytes_read_per_step"] = step_bytes
    step_s = decode_s["ours"] / (NEW_TOKENS - 1)
    row["bandwidth_fraction"] = step_bytes["total"] / step_s / bandwidth["bytes_per_s"]
    row["flop_per_step"] = decode_step_flop(config, batch, cache_slots)
    row["matmul_peak_fraction"] = row["flop_per_step"] / step_s / matmul_peak["flop_per_s"]
    rows.append(row)
    print(f"batch {batch:3d}: ours {row['ours_decode_tokens_per_s']:8.1f} tok/s "
          f"({row['ours_ms_per_step']:.1f} ms/step), transformers "
          f"{row['transformers_decode_tokens_per_s']:8.1f} tok/s "
          f"({row['transformers_ms_per_step']:.1f} ms/step), x{ratio['median']:.2f} "
          f"({ratio['min']:.2f}-{ratio['max']:.2f}); "
          f"{100 * row['bandwidth_fraction']:.0f}% of memory bandwidth, "
          f"{100 * row['matmul_peak_fraction']:.0f}% of matmul peak; "
          f"greedy tokens equal {100 * row['greedy_tokens_equal_fraction']:.0f}%", flush=True)
  path = common.save_results("sampling", {
      "model": HF_CONFIG, "num_params": config.num_params(), "dtype": "float32",
      "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "torch_threads":
      torch.get_num_threads(), "memory_bandwidth": bandwidth, "matmul_peak": matmul_peak,
      "results": rows}, protocol)
  print(f"saved {path}")


if __name__ == "__main__":
  main()
