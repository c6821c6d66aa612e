"""Rollout cost on a random tiny model (issue 5): per-chunk time vs length, and early exit's savings.

(a) Linear cost. `memagent` mode (every chunk read, memory rewritten each turn) through the real
    sampler (`rollout.sampler_policy`, greedy) on documents of 4, 16 and 64 chunks. The prompt of
    every memory turn is question + memory (<= memory_tokens) + one chunk, so time per chunk
    should stay flat as the document grows: the ratio of 64-chunk to 4-chunk time per chunk is
    the figure (1.0 = linear total cost). Compilation is warmed up first (one 4-chunk rollout).
    (The random model's greedy responses mostly decode to empty text, so its memory stays short;
    prompts pad to one fixed length bucket either way.)
(b) Early exit. Documents whose evidence lies in their first 20% (`evidence_within=0.2`). A
    scripted policy that pays the real sampler's cost on every prompt batch (it generates with
    the tiny model, then discards the tokens) but returns scripted responses: `<check>yes` on
    evidence chunks, `<next>end` at the last one (mode `gru_mem`); in `memagent` mode the same
    policy (same cost a call) never exits; `gru_mem_no_exit` (the same gated prompts and
    responses, `end` ignored) isolates the exit from the prompt template. Chunks read and wall
    time are compared. Prompts pad to fixed length buckets, so every memory turn costs the same.

  python benchmarks/rollout.py [--lengths 4,16,64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gru_mem import gates, sampling  # noqa: E402
from gru_mem.agent import parse  # noqa: E402
from gru_mem.agent.prompts import PromptBuilder  # noqa: E402
from gru_mem.agent.modes import MODES  # noqa: E402
from gru_mem.agent.rollout import (AgentExample, RolloutSettings, check_budget,  # noqa: E402
                                   rollout, sampler_policy)
from gru_mem.data import synthetic  # noqa: E402
from gru_mem.agent.chunking import chunk_token_ids  # noqa: E402
from gru_mem.data.tokenizer import builtin_tokenizer  # noqa: E402
from gru_mem.model import transformer  # noqa: E402
from gru_mem.model.config import preset  # noqa: E402

CHUNK_TOKENS = 64
MEMORY_TOKENS = 32
MAX_RESPONSE_TOKENS = 16
MAX_ANSWER_TOKENS = 8
# Every memory turn (<= ~250 tokens gated, <= ~200 memagent; checked) pads to 256 and every
# answer turn (<= ~90) to 128, so a turn costs the same whatever the mode or the memory's length.
LENGTH_BUCKETS = (128, 256)


def tiny_model(tokenizer):
  """preset('tiny') with the built-in tokenizer's vocabulary, random weights."""
  config = preset("tiny", vocab_size=-(-tokenizer.vocab_size // 64) * 64)
  return config, transformer.init_params(config, jax.random.PRNGKey(0))


def needle_examples(tokenizer, count: int, num_chunks: int, evidence_within: float = 1.0):
  """`count` niah_single_2 examples of `num_chunks` chunks each (the ids cut to an exact count)."""
  examples = []
  for seed in range(count):
    example = synthetic.generate("niah_single_2", num_chunks * CHUNK_TOKENS + 64, tokenizer,
                                 seed=seed, evidence_within=evidence_within)
    agent_example = AgentExample.from_example(example, tokenizer, CHUNK_TOKENS)
    chunks = agent_example.chunks
    if chunks.num_tokens < num_chunks * CHUNK_TOKENS:
      raise RuntimeError(f"example {seed}: {chunks.num_tokens} tokens, fewer than "
                         f"{num_chunks} chunks of {CHUNK_TOKENS}")
    cut = num_chunks * CHUNK_TOKENS
    spans = [(t0, min(t1, cut)) for t0, t1 in chunks.evidence_token_spans if t0 < cut]
    agent_example.chunks = chunk_token_ids(chunks.token_ids[:cut], CHUNK_TOKENS, spans)
    for mode in MODES:  # every memory turn fits the largest length bucket
      check_budget(PromptBuilder(tokenizer, mode), agent_example, settings_for(mode), CHUNK_TOKENS,
                   LENGTH_BUCKETS[-1], seed)
    examples.append(agent_example)
  return examples


def settings_for(mode: str) -> RolloutSettings:
  return RolloutSettings(mode=mode, memory_tokens=MEMORY_TOKENS,
                         max_response_tokens=MAX_RESPONSE_TOKENS,
                         max_answer_tokens=MAX_ANSWER_TOKENS)


def per_chunk_times(policy, tokenizer, lengths, rows: int, repeats: int) -> list[dict]:
  """(a): memagent rollouts of `rows` documents of each length; seconds per chunk (memory turns).

  The lengths take turns (4, 16, 64, 4, 16, 64, ...) so that a burst of load from other processes
  falls on all of them alike. Per length: the median over repeats of (memory-turn seconds /
  chunks), its minimum, the median single step, and the resident memory after each rollout.
  """
  builder = PromptBuilder(tokenizer, "memagent")
  settings = settings_for("memagent")
  examples = {n: needle_examples(tokenizer, rows, n) for n in lengths}
  start = time.perf_counter()
  rollout(policy, builder, tokenizer, examples[min(lengths)], jax.random.PRNGKey(0), settings)
  print(f"(a) warm-up ({min(lengths)} chunks, compiles): {time.perf_counter() - start:.1f} s",
        flush=True)
  runs = {n: [] for n in lengths}
  for repeat in range(repeats):
    for num_chunks in lengths:
      result = rollout(policy, builder, tokenizer, examples[num_chunks],
                       jax.random.PRNGKey(repeat), settings)
      assert all(t.chunks_read == num_chunks for t in result.trajectories)
      runs[num_chunks].append({"memory_turns_s": sum(result.step_seconds),
                               "step_s": result.step_seconds,
                               "answer_turn_s": result.answer_seconds,
                               "total_s": result.total_seconds, "rss_after_bytes": common.rss_bytes()})
  results = []
  for num_chunks in lengths:
    per_chunk = [run["memory_turns_s"] / num_chunks for run in runs[num_chunks]]
    row = {"num_chunks": num_chunks, "rows": rows,
           "seconds_per_chunk": statistics.median(per_chunk),
           "seconds_per_chunk_min": min(per_chunk), "seconds_per_chunk_runs": per_chunk,
           "median_step_s": statistics.median(t for run in runs[num_chunks] for t in run["step_s"]),
           "rss_after_bytes_max": max(run["rss_after_bytes"] for run in runs[num_chunks]),
           "runs": runs[num_chunks]}
    results.append(row)
    print(f"(a) {num_chunks:3d} chunks x {rows} rows: {1e3 * row['seconds_per_chunk']:.1f} ms per "
          f"chunk (median of {repeats}; min {1e3 * row['seconds_per_chunk_min']:.1f}, median step "
          f"{1e3 * row['median_step_s']:.1f}), RSS after <= "
          f"{row['rss_after_bytes_max'] / 2**20:.0f} MiB", flush=True)
  return results


class CostedScriptedPolicy:
  """Scripted gate decisions at the real sampler's cost.

  Each call first runs `real_policy` on the same prompts (the tokens are discarded), then answers
  every prompt from a script: the prompt's question and section text name its example and chunk.
  Gated modes: `<check>yes` on evidence chunks (memory: the answer), `<next>end` at the last
  evidence chunk, else `<check>no`, continue (`gru_mem_no_exit` ignores the end). memagent: the
  memory itself, never an exit. Answer turn: the gold answer, boxed.
  """

  def __init__(self, real_policy, tokenizer, examples, mode: str):
    self.real_policy, self.tokenizer, self.mode = real_policy, tokenizer, mode
    self.by_question = {tokenizer.decode(e.question_ids).strip(): e for e in examples}
    self.chunk_index = {}  # (question text, section text) -> chunk index
    for question, example in self.by_question.items():
      for index in range(example.chunks.num_chunks):
        section = tokenizer.decode(example.chunks.chunk(index)).strip()
        self.chunk_index[(question, section)] = index

  def __call__(self, prompt_ids, rng, max_new_tokens):
    self.real_policy(prompt_ids, rng, max_new_tokens)  # pay the generation cost
    ids = [self.tokenizer.encode(self.respond(self.tokenizer.decode(p))) + [self.tokenizer.eos_id]
           for p in prompt_ids]
    width = max(len(r) for r in ids)
    return types.SimpleNamespace(row=lambda i: ids[i],
                                 logprobs=np.zeros((len(ids), width), np.float32))

  def respond(self, prompt: str) -> str:
    question = re.search(r"question:\n(.*?) \n\n", prompt, re.S).group(1).strip()
    example = self.by_question[question]
    section = re.search(r"current section:\n(.*?) \n\n", prompt, re.S)
    if section is None:  # the answer turn
      return f"\\boxed{{{example.answers[0]}}}"
    index = self.chunk_index[(question, section.group(1).strip())]
    has_evidence = index in example.chunks.evidence_chunks
    if self.mode == "memagent":
      return f"the value is {example.answers[0]}" if has_evidence else "no evidence yet"
    end = gates.EXIT_END if index == example.chunks.last_evidence_chunk else gates.EXIT_CONTINUE
    if has_evidence:
      return parse.format_response("evidence", gates.UPDATE_YES, example.answers[0], end)
    return parse.format_response("nothing new", gates.UPDATE_NO, "", end)


def early_exit_savings(real_policy, tokenizer, num_examples: int, num_chunks: int,
                       repeats: int) -> dict:
  """(b): gru_mem exiting at the last evidence chunk vs memagent reading every chunk."""
  examples = needle_examples(tokenizer, num_examples, num_chunks, evidence_within=0.2)
  figures = {"num_examples": num_examples, "num_chunks": num_chunks,
             "last_evidence_chunks": [int(e.chunks.last_evidence_chunk) for e in examples]}
  modes = ("gru_mem", "gru_mem_no_exit", "memagent")
  runs, calls = {mode: [] for mode in modes}, {}
  for mode in modes:
    policy = CostedScriptedPolicy(real_policy, tokenizer, examples, mode)
    builder = PromptBuilder(tokenizer, mode)
    calls[mode] = lambda m=mode, p=policy, b=builder: runs[m].append(rollout(
        p, b, tokenizer, examples, jax.random.PRNGKey(len(runs[m])), settings_for(m)))
  common.alternate(calls, repeats=repeats, warmup=1)  # the modes take turns (the protocol)
  for mode in modes:
    runs[mode] = runs[mode][1:]  # the warm-up run compiled
    chunks_read = [t.chunks_read for t in runs[mode][0].trajectories]
    if mode == "gru_mem":
      assert chunks_read == [lec + 1 for lec in figures["last_evidence_chunks"]], chunks_read
      assert all(t.answer == e.answers[0] for t, e in zip(runs[mode][0].trajectories, examples))
    else:  # memagent and gru_mem_no_exit read every chunk
      assert chunks_read == [num_chunks] * num_examples
    figures[mode] = {"chunks_read": chunks_read, "chunks_read_total": sum(chunks_read),
                     "steps": len(runs[mode][0].rows_generated_per_step),
                     "rows_generated_per_step": runs[mode][0].rows_generated_per_step,
                     "wall_s": statistics.median(r.total_seconds for r in runs[mode]),
                     "wall_s_runs": [r.total_seconds for r in runs[mode]]}
    print(f"(b) {mode:15s}: {sum(chunks_read):4d} chunks read in "
          f"{figures[mode]['steps']} steps, {figures[mode]['wall_s']:.2f} s", flush=True)
  for baseline in ("memagent", "gru_mem_no_exit"):
    for figure, key in (("chunks_read", "chunks_read_total"), ("steps", "steps"),
                        ("wall_time", "wall_s")):
      figures[f"{figure}_ratio_gru_mem_to_{baseline}"] = (
          figures["gru_mem"][key] / figures[baseline][key])
    print(f"(b) gru_mem / {baseline}: chunks read "
          f"{figures[f'chunks_read_ratio_gru_mem_to_{baseline}']:.3f}, steps "
          f"{figures[f'steps_ratio_gru_mem_to_{baseline}']:.3f}, wall time "
          f"{figures[f'wall_time_ratio_gru_mem_to_{baseline}']:.3f}", flush=True)
  return figures


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="4,16,64")
  parser.add_argument("--rows", type=int, default=4, help="documents read at once in (a)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--exit-examples", type=int, default=8)
  parser.add_argument("--exit-chunks", type=int, default=64)
  args = parser.parse_args()
  lengths = [int(n) for n in args.lengths.split(",")]
  protocol = common.Protocol()
  tokenizer = builtin_tokenizer()
  config, params = tiny_model(tokenizer)
  policy = sampler_policy(config, params, sampling.SamplingSettings(
      temperature=0.0, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
      length_buckets=LENGTH_BUCKETS))
  linear = per_chunk_times(policy, tokenizer, lengths, args.rows, args.repeats)
  peak_rss_after_linear = common.peak_rss_bytes()
  by_length = {row["num_chunks"]: row for row in linear}
  ratios = {statistic: by_length[max(lengths)][statistic] / by_length[min(lengths)][statistic]
            for statistic in ("seconds_per_chunk", "seconds_per_chunk_min", "median_step_s")}
  print(f"(a) {max(lengths)} / {min(lengths)} chunks: time per chunk (median) "
        f"{ratios['seconds_per_chunk']:.3f}, (min) {ratios['seconds_per_chunk_min']:.3f}, "
        f"median step {ratios['median_step_s']:.3f}", flush=True)
  exits = early_exit_savings(policy, tokenizer, args.exit_examples, args.exit_chunks,
                             args.repeats)
  path = common.save_results("rollout", {
      "model": {"preset": "tiny", "vocab_size": config.vocab_size,
                "num_params": config.num_params()},
      "tokenizer": tokenizer.name, "chunk_tokens": CHUNK_TOKENS, "memory_tokens": MEMORY_TOKENS,
      "max_response_tokens": MAX_RESPONSE_TOKENS, "max_answer_tokens": MAX_ANSWER_TOKENS,
      "sampling": "greedy", "length_buckets": LENGTH_BUCKETS,
      "per_chunk_time": {"mode": "memagent", "results": linear,
                         f"ratios_{max(lengths)}_to_{min(lengths)}_chunks": ratios},
      "peak_rss_bytes_after_per_chunk_time": peak_rss_after_linear,
      "early_exit": exits}, protocol)
  print(f"saved {path}")


if __name__ == "__main__":
  main()
