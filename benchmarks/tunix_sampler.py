"""google-tunix 0.1.7's static sampler on a job file written by continuous_batching.py.

Runs in its own venv (tunix pins safetensors<0.8; jax/flax/optax/orbax at gru_mem's pins install
beside it). Loads the HF folder with tunix's Qwen2 loader, then samples the prompts greedily in
batches of `batch`; each batch runs until its longest row's limit (tunix has one step count per
call) and rows are cut to their own limits. tunix's sampler takes strings and a tokenizer, so a
stand-in tokenizer whose tokens are decimal ids feeds it token ids. The whole workload runs once
to compile every shape, then `iterations` timed runs (min). Prints one JSON line: seconds, the
rows' tokens and the versions.

  /path/to/tunix_venv/bin/python benchmarks/tunix_sampler.py JOB.json
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from tunix.generate import sampler as sampler_lib  # noqa: E402
from tunix.models.qwen2 import model as qwen2_model  # noqa: E402
from tunix.models.qwen2 import params as qwen2_params  # noqa: E402


class DecimalIdTokenizer:
  """Text is space-separated token ids; no BOS; pad 0; an EOS id the model never emits."""

  def __init__(self, eos: int):
    self.eos = eos

  def encode(self, text: str, **_) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids, **_) -> str:
    return " ".join(str(int(t)) for t in ids)

  def bos_id(self) -> int:
    return 0

  def eos_id(self) -> int:
    return self.eos

  def pad_id(self) -> int:
    return 0


def load_model(model_dir: str):
  """(tunix Qwen2 model, its ModelConfig, eos id) from an HF folder, through tunix's own loader.
  The eos id is vocab_size: outside the vocabulary, so rows end at their limits only."""
  with open(os.path.join(model_dir, "config.json")) as f:
    hf = json.load(f)
  config = qwen2_model.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
      embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
      num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
      num_kv_heads=hf["num_key_value_heads"],
      rope_theta=int(hf.get("rope_parameters", hf).get("rope_theta", 1e6)),
      norm_eps=hf["rms_norm_eps"], use_tied_embedding=hf["tie_word_embeddings"])
  return qwen2_params.create_model_from_safe_tensors(model_dir, config), config, hf["vocab_size"]


def make_sampler(model, config, eos: int, cache_size: int):
  """tunix's static sampler with a KV cache of `cache_size` positions."""
  return sampler_lib.Sampler(
      model, DecimalIdTokenizer(eos),
      sampler_lib.CacheConfig(cache_size=cache_size, num_layers=config.num_layers,
                              num_kv_heads=config.num_kv_heads, head_dim=config.head_dim))


def run_batches(sampler, prompts, limits, batch: int, prompt_length: int, eos: int):
  """Greedy rows (token lists cut to their limits), `batch` prompts per sampler call; each call
  runs until its longest row's limit."""
  rows = []
  for start in range(0, len(prompts), batch):
    steps = int(np.max(limits[start:start + batch]))
    out = sampler([" ".join(map(str, p)) for p in prompts[start:start + batch]],
                  max_generation_steps=steps, max_prompt_length=prompt_length,
                  eos_tokens=[eos], temperature=0.0)
    rows += [np.asarray(t)[:limit].tolist()
             for t, limit in zip(out.tokens, limits[start:start + batch])]
  return rows


def main():
  with open(sys.argv[1]) as f:
    job = json.load(f)
  model, config, eos = load_model(job["model_dir"])
  prompts, limits, batch = job["prompts"], np.asarray(job["limits"]), job["batch"]
  prompt_length = 1 << (max(len(p) for p in prompts) - 1).bit_length()
  sampler = make_sampler(model, config, eos, prompt_length + int(limits.max()))

  def run():
    return run_batches(sampler, prompts, limits, batch, prompt_length, eos)

  run()  # compiles each batch's shape
  times = []
  for _ in range(job["iterations"]):
    start = time.perf_counter()
    rows = run()
    times.append(time.perf_counter() - start)
  print(json.dumps({"seconds": min(times), "times_s": times, "rows": rows,
                    "versions": {name: importlib.metadata.version(name) for name in
                                 ("google-tunix", "jax", "flax", "safetensors")}}))


if __name__ == "__main__":
  main()
