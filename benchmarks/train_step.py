"""Learner throughput and MFU, and where an RL step's time goes (rollout vs learner vs host).

  python benchmarks/train_step.py [--rl_steps 4] [--repeats 5]

(a) The jitted learner step (forward + backward + AdamW over packed turn rows) on random rows of
    realistic shape, for the tiny preset and a 0.5B-shaped model (the full Qwen2.5-0.5B layer
    shape, fewer layers and a smaller vocabulary to fit a CPU): response tokens/s, all tokens/s,
    and MFU = achieved FLOP/s / this machine's measured dense-matmul peak.
(b) Real RL steps of `configs/smoke.py` (tiny model): the share of each step spent in the
    rollout, in the learner, and in host work (data, rewards, packing, checkpoints).
Saved to benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from gru_mem.model import transformer  # noqa: E402
from gru_mem.model.config import preset  # noqa: E402
from gru_mem.rl import batch as batch_lib  # noqa: E402
from gru_mem.rl import learner  # noqa: E402


def train_step_flops(config, prompt_tokens: int, response_tokens: int) -> float:
  """Forward + backward FLOPs (3x forward) of one packed batch.

  forward = 2 * (non-embedding params) * all tokens  +  attention (2 * 2 * T^2 * heads * head_dim
  per layer per row, causal half counted in full as XLA computes it)  +  2 * embed * vocab * response
  tokens (logits are formed only at response positions).
  """
  c = config
  embedding = c.vocab_size * c.hidden_size
  non_embedding = c.num_params() - embedding * (1 if c.tie_word_embeddings else 2)
  tokens = prompt_tokens + response_tokens
  forward = 2 * non_embedding * tokens + 2 * embedding * response_tokens
  return 3 * forward


def matmul_side(size: int = 2048):
  """(callable, FLOP per call) of a dense float32 [size, size] matmul through XLA."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  return (lambda: matmul(a, b).block_until_ready()), 2 * size**3


def bench_learner(name, config, rows, prompt_len, response_len, repeats):
  """The learner step alternated with the matmul peak: MFU per repeat = step FLOP/s / peak."""
  rng = np.random.default_rng(0)
  settings = learner.LearnerSettings(learning_rate=1e-5, kl_beta=0.0, micro_batch_rows=rows,
                                     compute_entropy=False)
  batch_rows = [batch_lib.LearnerRow(
      prompt_ids=rng.integers(1, config.vocab_size, prompt_len).astype(np.int32),
      response_ids=rng.integers(1, config.vocab_size, response_len).astype(np.int32),
      advantage=float(rng.normal()), old_logprobs=np.full(response_len, -3.0, np.float32))
      for _ in range(rows)]
  batch = batch_lib.pack_rows(batch_rows, settings.length_buckets, settings.micro_batch_rows)
  state = learner.create_train_state(transformer.init_params(config, jax.random.PRNGKey(0)),
                                     settings)
  step = learner.make_train_step(config, settings)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics)

  matmul, matmul_flop = matmul_side()
  times = common.alternate({"learner": run, "matmul": matmul}, repeats=repeats, warmup=1)
  seconds = common.spread(times["learner"])["median"]
  padded_len = batch.tokens.shape[-1]
  flops = train_step_flops(config, rows * prompt_len, rows * response_len)
  mfu = [flops / t / (matmul_flop / m) for t, m in zip(times["learner"], times["matmul"])]
  return {"mfu": common.spread(mfu), "times_s": times,
      "model": name, "rows": rows, "prompt_tokens": prompt_len, "response_tokens": response_len,
      "padded_length": int(padded_len), "step_s": seconds,
      "response_tokens_per_s": rows * response_len / seconds,
      "all_tokens_per_s": rows * (prompt_len + response_len) / seconds,
      "flops_per_step": flops, "achieved_flops_per_s": flops / seconds,
  }


def bench_rl_split(steps: int) -> dict:
  from configs import smoke
  from gru_mem import logs, train
  config = smoke.get_config()
  config.train.steps = steps
  config.train.save_every = steps
  with tempfile.TemporaryDirectory() as workdir:
    train.train(config, workdir)
    records = logs.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  steady = records[1:] or records  # step 1 includes compilation
  total = sum(r["time/step_s"] for r in steady)
  parts = {part: sum(r[f"time/{part}_s"] for r in steady) for part in ("rollout", "learner", "host")}
  return {"steps_measured": len(steady), "mean_step_s": total / len(steady),
          "share": {part: seconds / total for part, seconds in parts.items()},
          "first_step_s_with_compile": records[0]["time/step_s"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=common.MIN_REPEATS)
  parser.add_argument("--rl_steps", type=int, default=4)
  parser.add_argument("--layers_05b", type=int, default=4)
  parser.add_argument("--vocab_05b", type=int, default=32768)
  args = parser.parse_args()

  protocol = common.Protocol()
  peak = common.matmul_peak_flops()
  results = {"matmul_peak": peak, "learner": []}
  shapes = [("tiny", preset("tiny"), 16, 192, 64),
            (f"qwen2.5-0.5b-shaped ({args.layers_05b} layers, vocab {args.vocab_05b})",
             preset("qwen2.5-0.5b", num_layers=args.layers_05b, vocab_size=args.vocab_05b),
             2, 384, 128)]
  for name, config, rows, prompt_len, response_len in shapes:
    figures = bench_learner(name, config, rows, prompt_len, response_len, args.repeats)
    results["learner"].append(figures)
    mfu = figures["mfu"]
    print(f"{name}: {figures['response_tokens_per_s']:.0f} response tok/s, "
          f"{figures['all_tokens_per_s']:.0f} tok/s, MFU {mfu['median']:.1%} "
          f"({mfu['min']:.1%}-{mfu['max']:.1%} over {mfu['n']} alternated repeats)", flush=True)
  results["rl_step_split"] = bench_rl_split(args.rl_steps)
  share = results["rl_step_split"]["share"]
  print("RL step (smoke config): " + ", ".join(f"{k} {v:.0%}" for k, v in share.items()))
  print("saved", common.save_results("train_step", results, protocol))


if __name__ == "__main__":
  main()
