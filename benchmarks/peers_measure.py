"""The measuring half of benchmarks/peers.py: gru_mem and google-tunix 0.1.7 in ONE process.

Runs inside the peers venv (tunix + gru_mem's jax/flax/optax pins; no torch), started by
`peers.py --child`. Both sides load the same HF folder with their own loader; every timed figure
alternates the two sides within this process (`common.alternate`, ABBA order). Writes the raw
times and checks to a JSON file; peers.py turns them into ratios and saves the result.

Parts:
  decode   greedy decode of `new` tokens after `prompt`-token prompts at batch 1, 16, 64: ours
           `sampling.generate` vs tunix's `Sampler`; per-token agreement of the greedy rows.
  agent    the agent-like workload of benchmarks/continuous_batching.py (256 rows, 96-128-token
           prompts, lognormal limits, median 32): ours `continuous.generate` through 32 slots vs
           tunix's sampler in static batches of 32 (each runs to its longest row).
  learner  one jitted learner step on [rows, length] tokens: ours `learner.make_train_step`
           (DAPO objective) vs a jitted step around tunix's registered "grpo" policy loss
           (`function_registry.get_policy_loss_fn`, a `DAPOConfig`: token-mean, clip-higher, no
           KL), both through the same optax chain (`optim.make_optimizer`). The first step's
           loss and gradient norm must agree.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)
import continuous_batching  # noqa: E402
import tunix_sampler  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.rl import common as tunix_common  # noqa: E402
from tunix.rl import function_registry  # noqa: E402
from tunix.rl.grpo import dapo_learner  # noqa: E402

from gru_mem import continuous, sampling  # noqa: E402
from gru_mem.model import hf  # noqa: E402
from gru_mem.rl import batch as batch_lib  # noqa: E402
from gru_mem.rl import learner, optim  # noqa: E402

FULL = {"decode": {"batches": (1, 16, 64), "prompt": 64, "new": 64},
        "agent": {"rows": 256, "slots": 32, "median": 32, "max_new": 256, "prompts": (96, 128)},
        "learner": {"rows": 8, "prompt": 384, "response": 128}}
SMOKE = {"decode": {"batches": (2,), "prompt": 16, "new": 8},
         "agent": {"rows": 16, "slots": 4, "median": 4, "max_new": 16, "prompts": (12, 16)},
         "learner": {"rows": 2, "prompt": 24, "response": 8}}
LOSS_RTOL = 1e-4
# Two untimed calls per side: tunix's jitted step and sampler compile again on their second call
# (measured: 8 s, not 4 ms, for the smoke learner step; the pytree they return is not the one they
# took), so one warm-up would time a compile.
WARMUP = 2


def token_agreement(ours: np.ndarray, theirs: list) -> dict:
  """Fraction of equal tokens position by position, and of rows equal in full."""
  theirs = np.asarray(theirs)[:, :ours.shape[1]]
  equal = ours == theirs
  return {"token_fraction": float(equal.mean()), "row_fraction": float(equal.all(axis=1).mean())}


def bench_decode(sides, shape: dict, vocab: int, repeats: int) -> dict:
  config, params, sampler, eos = sides
  out = {}
  for batch in shape["batches"]:
    rng = np.random.RandomState(batch)
    prompts = [rng.randint(1, vocab, shape["prompt"]).tolist() for _ in range(batch)]
    settings = sampling.SamplingSettings(max_new_tokens=shape["new"], temperature=0.0,
                                         batch_buckets=(batch,))
    limits = np.full(batch, shape["new"], np.int32)
    results = {}

    def ours():
      results["ours"] = sampling.generate(config, params, prompts, 0, settings).tokens

    def tunix():
      results["tunix"] = tunix_sampler.run_batches(sampler, prompts, limits, batch,
                                                   shape["prompt"], eos)

    times = common.alternate({"ours": ours, "tunix": tunix}, repeats=repeats, warmup=WARMUP)
    out[str(batch)] = {"times_s": times, "tokens_per_call": batch * shape["new"],
                       "agreement": token_agreement(results["ours"], results["tunix"]),
                       "distinct_tokens_ours": int(len(np.unique(results["ours"])))}
    print(f"decode batch {batch}: {out[str(batch)]['agreement']}", flush=True)
  return out


def bench_agent(sides, shape: dict, vocab: int, repeats: int) -> dict:
  config, params, sampler, eos = sides
  prompts, limits = continuous_batching.workload(
      rows=shape["rows"], vocab_size=vocab, median=shape["median"], max_new=shape["max_new"],
      prompt_lengths=shape["prompts"])
  slots = shape["slots"]
  settings = sampling.SamplingSettings(max_new_tokens=shape["max_new"], temperature=0.0,
                                       slots=slots, refill_free_slots=max(1, slots // 8))
  prompt_length = 1 << (shape["prompts"][1] - 1).bit_length()
  results = {}

  def ours():
    results["ours"] = continuous.generate(config, params, prompts, 0, settings, limits)

  def tunix():
    results["tunix"] = tunix_sampler.run_batches(sampler, prompts, limits, slots, prompt_length,
                                                 eos)

  times = common.alternate({"ours": ours, "tunix": tunix}, repeats=repeats, warmup=WARMUP)
  same = [results["ours"].row(i) == row for i, row in enumerate(results["tunix"])]
  return {"times_s": times, "rows": shape["rows"], "slots": slots,
          "refill_free_slots": settings.refill_free_slots, "tokens": int(limits.sum()),
          "tunix_row_steps": continuous_batching.padded_steps(limits, slots),
          "limits_median": float(np.median(limits)), "limits_max": int(limits.max()),
          "greedy_rows_equal_fraction": float(np.mean(same))}


def learner_inputs(shape: dict, vocab: int) -> dict:
  rng = np.random.default_rng(0)
  rows, prompt, response = shape["rows"], shape["prompt"], shape["response"]
  return {"prompt": rng.integers(1, vocab, (rows, prompt)).astype(np.int32),
          "response": rng.integers(1, vocab, (rows, response)).astype(np.int32),
          "advantages": rng.normal(size=rows).astype(np.float32),
          # pi_old near the random model's uniform log-prob, so some ratios clip
          "old": (-np.log(vocab) + 0.3 * rng.normal(size=(rows, response))).astype(np.float32)}


def tunix_train_step(model, optimizer, algo_config, eos: int):
  """(step(params, opt_state, example) -> (params, opt_state, loss, grad_norm), params): a jitted
  step around tunix's registered policy loss, the same optimizer as ours."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss_fn = function_registry.get_policy_loss_fn(algo_config.policy_loss_fn)

  def objective(p, example):
    loss, _ = loss_fn(nnx.merge(graphdef, p, rest), example, algo_config, pad_id=0, eos_id=eos)
    return loss

  @jax.jit
  def step(p, opt_state, example):
    loss, grads = jax.value_and_grad(objective)(p, example)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss, optax.global_norm(grads)

  return step, params


def compiled_flops(lowered):
  """XLA's FLOP count of a lowered program (compiles it once more: skipped in --smoke)."""
  return lowered.compile().cost_analysis().get("flops")


def bench_learner(ours_config, ours_params, tunix_model, eos, shape: dict, vocab: int,
                  repeats: int, count_flops: bool = True) -> dict:
  data = learner_inputs(shape, vocab)
  total = shape["prompt"] + shape["response"]
  settings = learner.LearnerSettings(
      learning_rate=1e-5, weight_decay=0.0, kl_beta=0.0, clip_ratio_c=0.0,
      micro_batch_rows=shape["rows"], compute_entropy=False,
      length_buckets=tuple(sorted({shape["response"], total})))
  rows = [batch_lib.LearnerRow(prompt_ids=p, response_ids=r, advantage=float(a), old_logprobs=o)
          for p, r, a, o in zip(data["prompt"], data["response"], data["advantages"], data["old"])]
  batch = batch_lib.pack_rows(rows, settings.length_buckets, settings.micro_batch_rows)
  ours_step = learner.make_train_step(ours_config, settings)
  holder = {"ours": learner.create_train_state(ours_params, settings)}
  ours_flops = count_flops and compiled_flops(learner.lower_train_step(
      ours_config, settings, None, holder["ours"], batch))

  algo = dapo_learner.DAPOConfig(epsilon=settings.clip_eps_low,
                                 epsilon_high=settings.clip_eps_high, loss_agg_mode="token-mean",
                                 overlong_buffer=None)
  algo.temperature = 1.0  # tunix's learner sets it from the rollout config
  optimizer = optim.make_optimizer(settings)
  step, params = tunix_train_step(tunix_model, optimizer, algo, eos)
  example = tunix_common.TrainExample(
      prompt_ids=jnp.asarray(data["prompt"]), prompt_mask=jnp.ones(data["prompt"].shape, bool),
      completion_ids=jnp.asarray(data["response"]),
      completion_mask=jnp.ones(data["response"].shape, jnp.float32),
      advantages=jnp.asarray(data["advantages"]), ref_per_token_logps=None,
      old_per_token_logps=jnp.asarray(data["old"]))
  holder["tunix"] = (params, optimizer.init(params))
  tunix_flops = count_flops and compiled_flops(step.lower(*holder["tunix"], example))
  first = {}

  def ours():
    holder["ours"], metrics = ours_step(holder["ours"], batch)
    first.setdefault("ours", {k: float(metrics[k]) for k in ("loss", "grad_norm")})
    jax.block_until_ready(metrics)

  def tunix():
    params, opt_state, loss, grad_norm = step(*holder["tunix"], example)
    holder["tunix"] = (params, opt_state)
    first.setdefault("tunix", {"loss": float(loss), "grad_norm": float(grad_norm)})

  times = common.alternate({"ours": ours, "tunix": tunix}, repeats=repeats, warmup=WARMUP)
  for key in ("loss", "grad_norm"):
    a, b = first["ours"][key], first["tunix"][key]
    if not np.isclose(a, b, rtol=LOSS_RTOL, atol=1e-6):
      raise AssertionError(f"first learner step {key}: ours {a} vs tunix {b} (rtol {LOSS_RTOL})")
  print(f"learner first step: {first}", flush=True)
  return {"times_s": times, "first_step": first, "rtol": LOSS_RTOL, **shape,
          "xla_flops_per_step": {"ours": ours_flops, "tunix": tunix_flops}}


def measure(model_dir: str, out_path: str, smoke: bool, repeats: int, parts) -> None:
  shapes = SMOKE if smoke else FULL
  config, params = hf.load_hf_checkpoint(model_dir)
  tunix_model, tunix_config, eos = tunix_sampler.load_model(model_dir)
  cache = max(shapes["decode"]["prompt"] + shapes["decode"]["new"],
              (1 << (shapes["agent"]["prompts"][1] - 1).bit_length()) + shapes["agent"]["max_new"])
  sides = (config, params, tunix_sampler.make_sampler(tunix_model, tunix_config, eos, cache), eos)
  raw = {"shapes": shapes, "repeats": repeats, "num_params": config.num_params(),
         "child_versions": common.package_versions(
             ("google-tunix", "jax", "jaxlib", "flax", "optax", "numpy", "safetensors")),
         "child_machine": common.machine_info(), "child_threads": common.thread_settings()}
  if "decode" in parts:
    raw["decode"] = bench_decode(sides, shapes["decode"], config.vocab_size, repeats)
  if "agent" in parts:
    raw["agent"] = bench_agent(sides, shapes["agent"], config.vocab_size, repeats)
    print(f"agent: rows equal {raw['agent']['greedy_rows_equal_fraction']}", flush=True)
  if "learner" in parts:
    raw["learner"] = bench_learner(config, params, tunix_model, eos, shapes["learner"],
                                   config.vocab_size, repeats, count_flops=not smoke)
  with open(out_path, "w") as f:
    json.dump(raw, f)

