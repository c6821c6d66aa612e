"""Where a decode step's time goes: the step vs its parts, alternated in one process.

The random Qwen2 of benchmarks/sampling.py (hidden 512, 4 layers, vocab 32k, tied, float32), a
128-token prompt prefilled, then 32 decode steps inside one jitted loop for each of:
  full_step        the sampler's step: (time of 33 new tokens - time of 1) / 32, sampling.generate
  layers_and_cache the same forward without the LM head and sampling (hidden states only)
  lm_head xla      the [B, 512] x [512, 32k] LM-head product alone, XLA
  lm_head torch    the same product in torch (what transformers' head costs)
  sample greedy    argmax + the token's log-prob over [B, 32k] logits (sampling.sample_tokens)
Per batch: milliseconds per step of each, median of the alternated repeats.

  python benchmarks/decode_profile.py [--batches 16,64] [--repeats 5]
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gru_mem import sampling  # noqa: E402
from gru_mem.model import transformer  # noqa: E402
from gru_mem.model.config import preset  # noqa: E402
from gru_mem.model.transformer import forward  # noqa: E402

STEPS = 32  # decode steps per timed call
MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
             num_kv_heads=2, head_dim=64, rope_theta=1e6, tie_word_embeddings=True,
             max_position_embeddings=4096)


def parts(config, params, batch: int) -> dict:
  """{part name: a callable running STEPS steps of it}, compiled."""
  settings = sampling.SamplingSettings(max_new_tokens=128, temperature=0.0)
  spec = sampling.decode_spec(settings)
  rows = [np.random.RandomState(0).randint(1, config.vocab_size, 128) for _ in range(batch)]
  tokens, mask = sampling.left_pad(rows, batch, 128, 0)
  state = sampling.prefill_jit(params, tokens, mask, np.full(batch, 128, np.int32),
                               np.arange(batch, dtype=np.int32), jax.random.PRNGKey(0),
                               config=config, spec=spec)
  prompts = [r.tolist() for r in rows]

  def generate(limit):
    sampling.generate(config, params, prompts, 0, settings, [limit] * batch)

  @jax.jit
  def layers_and_cache(p, s):
    def body(_, s):
      last_token = jax.lax.dynamic_slice_in_dim(s["tokens"], s["step"] - 1, 1, axis=1)
      positions = s["cache"]["lengths"][:, None]
      h, cache = forward(config, p, last_token, positions, cache=s["cache"], return_hidden=True)
      return {**s, "cache": cache, "step": s["step"] + 1, "h": h}
    return jax.lax.fori_loop(0, STEPS, body, {**s, "h": jnp.zeros((batch, 1, config.hidden_size))})

  embedding = params["embed_tokens"]
  hidden = jnp.ones((batch, config.hidden_size))

  @jax.jit
  def lm_head(h, table):
    def body(_, c):
      logits = jnp.dot(c[0], table.T)
      return (c[0] + logits[:, :config.hidden_size] * 1e-9, c[1] + logits.sum())
    return jax.lax.fori_loop(0, STEPS, body, (h, 0.0))

  logits = jnp.ones((batch, config.vocab_size))

  @jax.jit
  def sample(x):
    keys = jax.random.split(jax.random.PRNGKey(0), batch)
    def body(_, c):
      token, logprob, _ = sampling.sample_tokens(c[0], keys, spec)
      return (c[0] + token[:, None] * 1e-9, c[1] + logprob.sum())
    return jax.lax.fori_loop(0, STEPS, body, (x, 0.0))

  torch_hidden, torch_table = torch.ones(batch, config.hidden_size), torch.from_numpy(
      np.asarray(embedding))

  def torch_head():
    with torch.inference_mode():
      for _ in range(STEPS):
        torch.matmul(torch_hidden, torch_table.T)

  generate(1)
  return {"sampler_1_token": lambda: generate(1),
          f"sampler_{STEPS + 1}_tokens": lambda: generate(STEPS + 1),
          "layers_and_cache": lambda: jax.block_until_ready(layers_and_cache(params, state)),
          "lm_head_xla": lambda: jax.block_until_ready(lm_head(hidden, embedding)),
          "lm_head_torch": torch_head,
          "sample_greedy": lambda: jax.block_until_ready(sample(logits))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="16,64")
  parser.add_argument("--repeats", type=int, default=common.MIN_REPEATS)
  args = parser.parse_args()
  protocol = common.Protocol()
  config = preset("tiny", **MODEL)
  params = transformer.init_params(config, jax.random.PRNGKey(0))
  results = []
  for batch in map(int, args.batches.split(",")):
    times = common.alternate(parts(config, params, batch), repeats=args.repeats, warmup=1)
    ms = {k: 1e3 * common.spread(v)["median"] / STEPS for k, v in times.items()
          if not k.startswith("sampler_")}
    ms["full_step"] = 1e3 * common.spread(
        [b - a for a, b in zip(times["sampler_1_token"], times[f"sampler_{STEPS + 1}_tokens"])]
    )["median"] / STEPS
    print(f"batch {batch}: ms per step " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()),
          flush=True)
    results.append({"batch": batch, "ms_per_step_median": ms, "times_s": times})
  print("saved", common.save_results("decode_profile", {"model": MODEL, "results": results},
                                     protocol))


if __name__ == "__main__":
  main()
