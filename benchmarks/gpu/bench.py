"""One prepared check of a single accelerator: decode, prefill, learner MFU and one RL step.

  bash benchmarks/gpu/run.sh                       # on the GPU machine -> results/gpu_h200.json
  python benchmarks/gpu/bench.py --cpu-smoke       # the same code, tiny shapes, on CPU (tested)

Random weights throughout (nothing is downloaded). Each part runs on its own and records its error
instead of stopping the others, so one run always returns a JSON.

(1) decode: bf16 Qwen2.5-1.5B- and 7B-shaped models, greedy, batch 1 / 64 / 256, a 128-token
    prompt; decode time = time(N new tokens) - time(1), tokens/s = batch * (N - 1) / decode time,
    against the HBM-bandwidth limit: batch / (bytes one step reads / bandwidth), the bytes being
    every weight (the embedding only as an untied LM head) plus each row's K and V cache.
(2) prefill: one 8K-token row through the 7B-shaped model (chunked prefill into the cache), tokens/s.
(3) learner: one jitted learner step (forward + backward + AdamW) over 8K-token rows with
    `model.attention=auto`; MFU = 6 * N * tokens (+ attention) FLOP / step time / the chip's bf16 peak.
(4) one RL step of the 7B paper config's shapes (chunk 5,000 tokens, memory 1,024; synthetic
    needle documents of 3 chunks, built-in tokenizer, a small group): the rollout / learner / host
    split of `gru_mem.train`, the step after the compile.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import common  # noqa: E402  (benchmarks/ is not a package)

CHIPS = {  # HBM bytes/s and dense bf16 FLOP/s (vendor figures)
    "h200": (4.8e12, 989e12), "h100": (3.35e12, 989e12), "tpu_v5p": (2.76e12, 459e12),
}
FULL = dict(decode_models=("qwen2.5-1.5b", "qwen2.5-7b"), batches=(1, 64, 256), prompt=128,
            new_tokens=64, prefill_model="qwen2.5-7b", prefill_tokens=8192,
            learner_model="qwen2.5-7b", learner_rows=1, learner_tokens=8192)
SMOKE = dict(decode_models=("tiny",), batches=(1, 4), prompt=32, new_tokens=8,
             prefill_model="tiny", prefill_tokens=256, learner_model="tiny", learner_rows=2,
             learner_tokens=256)


def model(name: str, dtype: str, **overrides):
  import jax
  from gru_mem.model import transformer
  from gru_mem.model.config import preset
  config = preset(name, param_dtype=dtype, dtype=dtype, **overrides)
  params = jax.jit(lambda key: transformer.init_params(config, key))(jax.random.PRNGKey(0))
  return config, params


def weight_bytes(config, params) -> int:
  import jax
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  if not config.tie_word_embeddings:
    total -= params["embed_tokens"].nbytes  # a lookup reads one row per token
  return total


def decode(shapes, dtype: str, bandwidth: float) -> list:
  import numpy as np
  from gru_mem import sampling
  rows = []
  for name in shapes["decode_models"]:
    config, params = model(name, dtype)
    for batch in shapes["batches"]:
      settings = sampling.SamplingSettings(
          max_new_tokens=shapes["new_tokens"], temperature=0.0, batch_buckets=(batch,),
          length_buckets=(shapes["prompt"],))
      prompts = np.random.RandomState(batch).randint(
          1, min(config.vocab_size, 30000), (batch, shapes["prompt"])).tolist()

      def run(limit):
        sampling.generate(config, params, prompts, 0, settings, [limit] * batch)

      run(1)
      times = common.alternate({"one": lambda: run(1), "all": lambda: run(shapes["new_tokens"])},
                               repeats=3, warmup=0)
      decode_s = common.spread([a - o for a, o in zip(times["all"], times["one"])])["median"]
      tokens_per_s = batch * (shapes["new_tokens"] - 1) / decode_s
      cache = shapes["prompt"] + shapes["new_tokens"]
      kv_bytes = (2 * config.num_layers * batch * cache * config.num_kv_heads * config.head_dim
                  * np.dtype(config.jnp_dtype).itemsize)
      step_bytes = weight_bytes(config, params) + kv_bytes
      limit = batch / (step_bytes / bandwidth)
      rows.append({"model": name, "dtype": dtype, "batch": batch, "tokens_per_s": tokens_per_s,
                   "bandwidth_limit_tokens_per_s": limit, "fraction_of_limit": tokens_per_s / limit,
                   "bytes_per_step": step_bytes, "times_s": times})
      print(f"decode {name} batch {batch}: {tokens_per_s:,.0f} tok/s "
            f"({tokens_per_s / limit:.0%} of the HBM limit)", flush=True)
  return rows


def prefill(shapes, dtype: str) -> dict:
  import numpy as np
  from gru_mem import sampling
  config, params = model(shapes["prefill_model"], dtype)
  length = shapes["prefill_tokens"]
  settings = sampling.SamplingSettings(max_new_tokens=1, temperature=0.0, batch_buckets=(1,),
                                       length_buckets=(length,),
                                       prefill_chunk_tokens=min(2048, length))
  prompt = np.random.RandomState(0).randint(1, 30000 if length > 1000 else 100, (1, length))
  run = lambda: sampling.generate(config, params, prompt.tolist(), 0, settings)  # noqa: E731
  run()
  times = common.alternate({"prefill": run}, repeats=3, warmup=0)["prefill"]
  seconds = common.spread(times)["median"]
  print(f"prefill {shapes['prefill_model']} {length} tokens: {length / seconds:,.0f} tok/s",
        flush=True)
  return {"model": shapes["prefill_model"], "tokens": length, "tokens_per_s": length / seconds,
          "times_s": times}


def learner_mfu(shapes, dtype: str, peak: float) -> dict:
  import jax
  import numpy as np
  from gru_mem.rl import batch as batch_lib
  from gru_mem.rl import learner
  config, params = model(shapes["learner_model"], dtype, attention="auto", remat_policy="full")
  rows, tokens = shapes["learner_rows"], shapes["learner_tokens"]
  response = tokens // 8
  settings = learner.LearnerSettings(learning_rate=1e-6, kl_beta=0.0, micro_batch_rows=rows,
                                     compute_entropy=False, length_buckets=(tokens,))
  rng = np.random.default_rng(0)
  batch = batch_lib.pack_rows([batch_lib.LearnerRow(
      prompt_ids=rng.integers(1, 1000, tokens - response).astype(np.int32),
      response_ids=rng.integers(1, 1000, response).astype(np.int32), advantage=1.0,
      old_logprobs=np.full(response, -3.0, np.float32)) for _ in range(rows)],
      settings.length_buckets, rows)
  holder = {"state": learner.create_train_state(params, settings)}
  step = learner.make_train_step(config, settings)

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics)

  times = common.alternate({"step": run}, repeats=3, warmup=1)["step"]
  seconds = common.spread(times)["median"]
  embedding = config.vocab_size * config.hidden_size
  dense = config.num_params() - embedding * (1 if config.tie_word_embeddings else 2)
  attention = 12 * config.num_layers * rows * tokens ** 2 * config.num_heads * config.head_dim / 2
  flop = 6 * dense * rows * tokens + 6 * embedding * rows * response + attention
  # remat recomputes the forward: the hardware does 8N, the figure counts the model's 6N.
  print(f"learner {shapes['learner_model']} {rows}x{tokens}: {seconds:.2f} s/step, MFU "
        f"{flop / seconds / peak:.1%}", flush=True)
  return {"model": shapes["learner_model"], "rows": rows, "tokens_per_row": tokens,
          "step_s": seconds, "model_flop": flop, "mfu": flop / seconds / peak, "times_s": times}


def rl_step(cpu_smoke: bool) -> dict:
  from gru_mem import defaults, logs, train
  config = defaults.get_config()
  if cpu_smoke:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    from configs import smoke  # pylint: disable=import-outside-toplevel
    config = smoke.get_config()
  else:
    config.model.preset, config.model.hf_path = "qwen2.5-7b", ""
    config.model.param_dtype = config.model.dtype = "bfloat16"  # one GPU: no float32 master copy
    config.model.scan_layers, config.model.remat_policy = True, "full"
    config.tokenizer = "builtin"
    config.data.train_tasks = "niah_single_word"
    config.agent.chunk_tokens, config.agent.memory_tokens = 5000, 1024
    config.data.context_tokens = 3 * 5000
    config.rl.group_size, config.rl.prompts_per_step = 4, 2
    config.optim.micro_batch_rows = 1
  config.train.steps, config.train.save_every = 2, 1000
  with tempfile.TemporaryDirectory() as workdir:
    train.train(config, workdir)
    records = logs.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  last = records[-1]
  parts = {p: last[f"time/{p}_s"] for p in ("rollout", "learner", "host")}
  return {"step_s": last["time/step_s"], "seconds": parts,
          "share": {p: s / last["time/step_s"] for p, s in parts.items()},
          "first_step_s_with_compile": records[0]["time/step_s"]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU")
  parser.add_argument("--chip", default="h200", choices=sorted(CHIPS))
  parser.add_argument("--parts", default="decode,prefill,learner,rl_step")
  parser.add_argument("--name", default="", help="results/<name>.json (default gpu_<chip>)")
  parser.add_argument("--out_dir", default=common.RESULTS_DIR, help="where the JSON goes")
  args = parser.parse_args(argv)
  if args.cpu_smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  protocol = common.Protocol(max_load=float("inf") if not args.cpu_smoke else None)
  shapes, dtype = (SMOKE, "float32") if args.cpu_smoke else (FULL, "bfloat16")
  bandwidth, peak = CHIPS[args.chip]
  if args.cpu_smoke:  # measured, so the fractions mean something on this CPU too
    peak = common.matmul_peak_flops(512)["flop_per_s"]
  figures = {"chip": args.chip, "hbm_bytes_per_s": bandwidth, "peak_flop_per_s": peak,
             "cpu_smoke": args.cpu_smoke, "devices": [str(d) for d in jax.devices()],
             "errors": {}}
  runs = {"decode": lambda: decode(shapes, dtype, bandwidth),
          "prefill": lambda: prefill(shapes, dtype),
          "learner": lambda: learner_mfu(shapes, dtype, peak),
          "rl_step": lambda: rl_step(args.cpu_smoke)}
  for part in args.parts.split(","):
    start = time.perf_counter()
    try:
      figures[part] = runs[part]()
    except Exception as error:  # pylint: disable=broad-except
      figures["errors"][part] = f"{type(error).__name__}: {error}"[:2000]
      traceback.print_exc()
    figures.setdefault("part_seconds", {})[part] = time.perf_counter() - start
    path = common.save_results(args.name or f"gpu_{args.chip}", figures, protocol,
                               args.out_dir)  # after each part: a timeout keeps what was done
  print("saved", path)
  return 1 if figures["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
