"""Prefill and train-step throughput of our Qwen2 against transformers (PyTorch, CPU, float32).

Both load the same random weights from the same HF folder and run the same tokens:
  prefill: one inference forward over [batch, length] producing all logits (no grad).
  train:   forward + backward of the mean next-token cross-entropy
           (ours: jax.jit(jax.value_and_grad(loss)); transformers: loss.backward()).
Also measures this machine's dense float32 matmul peak and reports our model FLOP utilisation:
  train FLOP = 6 * N_matmul * tokens + 12 * layers * batch * length^2 * heads * head_dim,
  prefill FLOP = 2 * N_matmul * tokens + 4 * layers * batch * length^2 * heads * head_dim,
where N_matmul counts the weights used in matmuls (the LM head, not the embedding lookup) and the
attention term counts the full (not causally halved) score and value products, as both compute.

  python benchmarks/forward.py                  # tiny and 0.5B-shaped -> results/forward.json

Timed by the protocol of benchmarks/common.py (sides alternated in one process, every repeat
kept, median ratio and spread, load average before and after).
  python benchmarks/forward.py --layers_05b=24  # the full 0.5B depth (slow on a small CPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from gru_mem.model import hf, transformer  # noqa: E402
from gru_mem.model.config import ModelConfig, preset, to_hf_config  # noqa: E402
from gru_mem.rl.loss import token_log_probs  # noqa: E402


def write_random_hf_folder(config: ModelConfig, folder: str, seed: int = 0) -> None:
  """A randomly initialised transformers Qwen2ForCausalLM of this shape, saved as safetensors."""
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**to_hf_config(config)))
  model.save_pretrained(folder)


def matmul_params(config: ModelConfig) -> int:
  """Weights used in matmuls: all parameters but the embedding lookup (the head is a matmul)."""
  embedding = config.vocab_size * config.hidden_size
  return config.num_params() - (0 if config.tie_word_embeddings else embedding)


def step_flops(config: ModelConfig, batch: int, length: int) -> dict[str, float]:
  tokens = batch * length
  attention = (config.num_layers * batch * length**2 * config.num_heads * config.head_dim)
  return {"prefill": 2 * matmul_params(config) * tokens + 4 * attention,
          "train": 6 * matmul_params(config) * tokens + 12 * attention}


def our_steps(config: ModelConfig, params, tokens: np.ndarray):
  """(prefill, train) callables for our model that block until the result is ready."""
  tokens = jnp.asarray(tokens)

  @jax.jit
  def prefill(p, t):
    return transformer.forward(config, p, t)[0]

  def loss_fn(p, t):  # the learner's own token log-probs (rl.loss.token_log_probs)
    logits, _ = transformer.forward(config, p, t)
    return -token_log_probs(logits[:, :-1], t[:, 1:]).mean()

  train = jax.jit(jax.value_and_grad(loss_fn))
  return (lambda: prefill(params, tokens).block_until_ready(),
          lambda: jax.block_until_ready(train(params, tokens)))


def torch_steps(model, tokens: np.ndarray):
  """(prefill, train) callables for transformers' model (gradients reset between steps)."""
  tokens = torch.tensor(tokens, dtype=torch.long)

  def prefill():
    with torch.inference_mode():
      return model(input_ids=tokens).logits

  def train():
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss

  return prefill, train


def bench_shape(name: str, config: ModelConfig, batch: int, length: int, warmup: int,
                repeats: int, peak: float, note: str = "") -> dict:
  """Prefill and train step of both sides on one shape, alternated `repeats` times."""
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, config.vocab_size, (batch, length)).astype(np.int32)
  with tempfile.TemporaryDirectory() as folder:
    write_random_hf_folder(config, folder)
    loaded_config, params = hf.load_hf_checkpoint(folder)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  assert loaded_config == config, (loaded_config, config)
  torch_model.eval()  # dropout is 0 in Qwen2; eval only fixes the module flags

  ours, theirs = our_steps(config, params, tokens), torch_steps(torch_model, tokens)
  start = time.perf_counter()
  ours[0]()
  prefill_compile_s = time.perf_counter() - start
  start = time.perf_counter()
  ours[1]()
  train_compile_s = time.perf_counter() - start

  flops = step_flops(config, batch, length)
  result = {"config": config.__dict__, "num_params": config.num_params(), "note": note,
            "batch": batch, "length": length, "tokens_per_step": batch * length,
            "flop_per_step": flops, "ours_compile_s": {"prefill": prefill_compile_s,
                                                       "train": train_compile_s}}
  for kind, index in (("prefill", 0), ("train", 1)):
    times = common.alternate({"ours": ours[index], "transformers": theirs[index]},
                             repeats=repeats, warmup=warmup)
    ratio = common.speed_ratio(times["ours"], times["transformers"])
    median_s = {side: common.spread(seconds)["median"] for side, seconds in times.items()}
    result[kind] = {
        "times_s": times,
        "tokens_per_s": {side: batch * length / s for side, s in median_s.items()},
        "speed_ratio_ours_over_transformers": ratio,
        "ours_mfu": flops[kind] / median_s["ours"] / peak,
        "transformers_mfu": flops[kind] / median_s["transformers"] / peak,
    }
    print(f"{name:>10} {kind:>7}: ours {result[kind]['tokens_per_s']['ours']:9.1f} tok/s, "
          f"transformers {result[kind]['tokens_per_s']['transformers']:9.1f} tok/s, ratio "
          f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f} over {repeats}), "
          f"our MFU {result[kind]['ours_mfu']:.1%}", flush=True)
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers_05b", type=int, default=4,
                      help="decoder layers of the 0.5B-shaped model (Qwen2.5-0.5B has 24)")
  parser.add_argument("--vocab_05b", type=int, default=32768,
                      help="its vocabulary size (Qwen2.5-0.5B has 151936)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=common.MIN_REPEATS,
                      help="alternated timed steps per side of the 0.5B shape")
  parser.add_argument("--repeats_tiny", type=int, default=10, help="the same for 'tiny'")
  parser.add_argument("--skip_05b", action="store_true", help="only the tiny shape")
  parser.add_argument("--name", default="forward", help="results/<name>.json")
  args = parser.parse_args(argv)

  started = time.perf_counter()
  protocol = common.Protocol()
  peak = common.matmul_peak_flops()
  print(f"float32 matmul peak: {peak['flop_per_s'] / 1e9:.1f} GFLOP/s "
        f"(torch threads {torch.get_num_threads()})", flush=True)
  shapes = {"tiny": bench_shape("tiny", preset("tiny"), 4, 256, args.warmup, args.repeats_tiny,
                                peak["flop_per_s"])}
  if not args.skip_05b:
    full = preset("qwen2.5-0.5b")
    config = full.replace(num_layers=args.layers_05b, vocab_size=args.vocab_05b)
    note = ("Qwen2.5-0.5B shape" + ("" if config == full else
            f" with num_layers {full.num_layers}->{config.num_layers}, vocab_size "
            f"{full.vocab_size}->{config.vocab_size} to fit the time budget"))
    shapes["qwen2.5-0.5b-shaped"] = bench_shape("0.5b", config, 1, 512, args.warmup,
                                                 args.repeats, peak["flop_per_s"], note)
  matmul = common.matmul_ratio()
  print("dense float32 matmul, XLA / torch: " + ", ".join(
      f"{n}: {m['xla_over_torch']['median']:.2f}" for n, m in matmul.items()), flush=True)
  figures = {"matmul_peak": peak, "matmul_xla_over_torch": matmul,
             "torch_num_threads": torch.get_num_threads(), "shapes": shapes,
             "total_runtime_s": time.perf_counter() - started}
  print("saved", common.save_results(args.name, figures, protocol))


if __name__ == "__main__":
  main()
