r"""Evaluation: tasks x lengths x evidence depths x (model, mode) -> accuracy, time, gates, memory.

  # the default job's models (stage 3): the RL run in every mode, the SFT run as MemAgent
  python -m gru_mem.evaluate --config configs/tiny.py --workdir runs/default/rl \
      --baseline_workdir runs/default/sft --out runs/default/eval
  # a real model on the paper's grid (HotpotQA documents padded to each length, Qwen's tokenizer)
  python -m gru_mem.evaluate --config configs/base.py --hf_model /models/gru-mem-7b \
      --config.tokenizer=/models/gru-mem-7b --config.eval.tasks=hotpotqa \
      --config.data.hotpotqa_path=/data/hotpot_dev_distractor_v1.json \
      --config.eval.lengths=7000,14000,28000,56000,112000 --out runs/hqa_eval

  # MemAgent's evaluation files (eval_{num_docs}.json, or the training parquet), read whole
  python -m gru_mem.evaluate --hf_model /models/gru-mem-3b --config configs/qwen2p5_3b_hotpotqa.py \
      --config.eval.tasks=memagent --config.data.memagent_path=/data/eval_200.json

Every cell (task, length in tokens of document + question, evidence depth: the evidence lies in
the first `depth` of the document; 1 = anywhere, synthetic tasks only) holds `eval.examples`
held-out examples: the validation stream of the cell's registered task (`sources.family_task`)
with seed `eval.seed` (data seeds `eval.seed * 1_000_003 + i`, the one rule of data/tasks.py),
which no training stage draws (SFT uses `sft.seed`, RL `seed`); real ones are the first records
of the data file. `memagent` and `ruler` documents come whole from their files: one cell each,
length 0 ("as in the file"). Each (model, mode) reads them with greedy decoding,
`eval.batch_size` examples per rollout.

Per cell and run: accuracy (the boxed answer against the gold answers, as r_out), the paper's
answer metrics over the boxed answers (sub_exact_match: gold in prediction or prediction in
gold, exact_match, f1; SQuAD normalisation, best over gold answers), the work per
example in tokens (`work_tokens`: prompt tokens prefilled plus tokens generated, summed over every
turn, the answer turn included; it does not depend on the machine), wall time (machine-dependent;
sampler compilation excluded: every shape is compiled before the clock starts), chunks read,
exits early / exact / late relative to the last evidence chunk, the update gate's accuracy on
evidence and on non-evidence chunks, the format-ok rate and the memory length at every step.
Gate and exit numbers count only the `examples_with_evidence` (a file whose evidence cannot be
recovered still scores answers and format).
Written to `out/`: results.json, report.md (tables and the checks of the default job), and PNG
plots (accuracy vs length, time vs length, memory length vs step); see `eval_report.py`.
"""

from __future__ import annotations

from gru_mem import console

console.quiet_startup()  # before the libraries below are imported

import dataclasses
import itertools
import json
import os
import platform
import sys
from typing import Any, Optional, Sequence

import jax
import numpy as np
import tqdm

from gru_mem import buckets, continuous, eval_report, runtime, settings
from gru_mem.agent import modes
from gru_mem.agent.prompts import PromptBuilder
from gru_mem.agent.rollout import AgentExample, RolloutSettings, rollout, sampler_policy
from gru_mem.data import metrics as answer_metrics
from gru_mem.data import sources, synthetic, tasks
from gru_mem.rl import episodes

REAL_TASKS = sources.REAL_TASKS


@dataclasses.dataclass(frozen=True)
class Cell:
  task: str
  length: int  # tokens of document + question
  evidence_depth: float  # the evidence lies in this leading fraction of the document

  @property
  def name(self) -> str:
    return f"{self.task}/{self.length}/depth{self.evidence_depth:g}"


@dataclasses.dataclass
class Model:
  label: str  # e.g. "gru_mem" (the RL run) or "stage1" (the SFT run)
  config: Any  # ModelConfig
  params: Any
  tokenizer: Any


def _csv(value, kind=str) -> list:
  items = value if isinstance(value, (list, tuple)) else str(value).split(",")
  return [kind(str(v).strip()) for v in items if str(v).strip()]


def cells(eval_config) -> list[Cell]:
  """The grid: every task x length x depth (real tasks only at depth 1, where they are)."""
  names, lengths = _csv(eval_config.tasks), _csv(eval_config.lengths, int)
  depths = _csv(eval_config.evidence_depths, float)
  if not names or not lengths or not depths:
    raise ValueError(f"eval.tasks={eval_config.tasks!r}, eval.lengths={eval_config.lengths!r} and "
                     f"eval.evidence_depths={eval_config.evidence_depths!r} must each name one or "
                     "more values")
  for task in names:
    if task not in synthetic.TASKS and task not in REAL_TASKS:
      raise ValueError(f"eval.tasks: {task!r} is unknown; use {sorted(synthetic.TASKS)} or "
                       f"{list(REAL_TASKS)}")
  for depth in depths:
    if not 0.0 < depth <= 1.0:
      raise ValueError(f"eval.evidence_depths: {depth} must be in (0, 1]")
  grid = []
  for task, length, depth in itertools.product(names, lengths, depths):
    if task in REAL_TASKS and depth < 1.0:
      continue  # real documents place their own evidence
    if task in sources.FIXED_LENGTH_TASKS:
      length = 0  # documents come whole from the file
    if Cell(task, length, depth) not in grid:
      grid.append(Cell(task, length, depth))
  return grid


def held_out_examples(config, tokenizer, cell: Cell) -> list:
  """`eval.examples` examples of `cell` that no training stage sees (see the module doc)."""
  spec = sources.family_task(cell.task, config.data, tokenizer, length=cell.length or None,
                             depth=cell.evidence_depth, eval_seed=config.eval.seed,
                             eval_examples=config.eval.examples)
  return list(tasks.examples(spec.name, "validation"))


def check_eval_config(config) -> list[Cell]:
  """The grid, after checking the eval keys and reading every data file it needs (errors name
  the file, record and field), before any model is loaded."""
  grid = cells(config.eval)
  if config.eval.examples < 1 or config.eval.batch_size < 1:
    raise ValueError(f"eval.examples={config.eval.examples} and eval.batch_size="
                     f"{config.eval.batch_size}: both must be >= 1")
  for task in dict.fromkeys(cell.task for cell in grid):
    if task in REAL_TASKS:
      sources.check_file(config.data, task)
  settings.check_prompt(config)
  return grid


def warm_up(model: Model, sample_settings, builder: PromptBuilder,
            agent_examples: Sequence[AgentExample], rollout_settings: RolloutSettings,
            batch_size: int) -> None:
  """Compiles the sampler for every batch bucket up to `batch_size` and every prompt-length
  bucket that these examples' memory and answer turns can reach, so no compilation lands inside
  a timed rollout. Each dummy row decodes a single token."""
  longest_question = max(len(e.question_ids) for e in agent_examples)
  longest_chunk = max(len(e.chunks.chunk(0)) for e in agent_examples)
  memory = rollout_settings.memory_tokens
  prompt_lengths = {  # the shortest and longest prompts of each kind (their buckets may differ)
      rollout_settings.max_response_tokens: (
          builder.turn_overhead_tokens,
          builder.turn_overhead_tokens + longest_question + memory + longest_chunk),
      rollout_settings.max_answer_tokens: (
          builder.answer_overhead_tokens,
          builder.answer_overhead_tokens + longest_question + memory)}
  batches = sorted({min(2 ** i, batch_size) for i in range(batch_size.bit_length() + 1)})
  for max_new, (shortest, longest) in prompt_lengths.items():
    spec = dataclasses.replace(sample_settings, max_new_tokens=max_new)
    for length in sorted(set(range(shortest, longest + 1, 64)) | {longest}):
      for batch in batches:
        bucket = buckets.smallest_bucket(length, spec.length_buckets, beyond_largest="size")
        key = (model.config, spec, batch, bucket)
        if key in _WARMED:
          continue
        continuous.generate(model.config, model.params, [np.ones(length, np.int32)] * batch, 0,
                            spec, max_new_tokens_per_row=np.ones(batch, np.int32))
        _WARMED.add(key)


_WARMED: set = set()  # (model config, sampling settings, batch, length bucket) already compiled


def run_cell(model: Model, mode: str, config, examples: Sequence, batch_size: int) -> dict:
  """Reads `examples` with `model` in `mode` (greedy) and summarises the trajectories."""
  tokenizer = model.tokenizer
  rollout_settings = settings.rollout_settings(config, group_size=1, mode=mode)
  builder = PromptBuilder(tokenizer, mode, settings.prompt_set(config, tokenizer))
  sample_settings = settings.sampling_settings(config, tokenizer,
                                               temperature=config.sampling.eval_temperature)
  policy = sampler_policy(model.config, model.params, sample_settings)
  agent_examples = [AgentExample.from_example(e, tokenizer, config.agent.chunk_tokens)
                    for e in examples]
  warm_up(model, sample_settings, builder, agent_examples, rollout_settings, batch_size)
  trajectories, seconds = [], 0.0
  for start in range(0, len(agent_examples), batch_size):
    batch = agent_examples[start:start + batch_size]
    result = rollout(policy, builder, tokenizer, batch, jax.random.PRNGKey(start),
                     rollout_settings)
    trajectories += result.trajectories
    seconds += result.total_seconds
  return summarize(trajectories, agent_examples, config, mode, seconds)


def work_tokens(trajectory) -> tuple[int, int]:
  """(prompt tokens prefilled, tokens generated) of one trajectory, summed over all its turns,
  the answer turn included: the tokens the model processed to read and answer."""
  turns = list(trajectory.turns) + ([trajectory.answer_turn] if trajectory.answer_turn else [])
  return (sum(len(t.prompt_ids) for t in turns), sum(len(t.response_ids) for t in turns))


def summarize(trajectories, agent_examples, config, mode: str, seconds: float) -> dict:
  """The numbers of one (cell, run) from its trajectories (one per example)."""
  prompt_tokens, generated_tokens = (np.array(x, np.float64).reshape(-1) for x in
                                     zip(*[work_tokens(t) for t in trajectories]))
  scored = episodes.score_rollout(trajectories, agent_examples, 1, config.rl, mode)
  arrays, metrics = scored.arrays, scored.metrics
  alive = arrays.alive[:, 0]  # [examples, steps]
  known = alive & arrays.evidence_known[:, :1]  # turns of examples with evidence
  memory = np.where(alive, arrays.memory_length[:, 0], 0)
  steps_alive = np.maximum(alive.sum(0), 1)
  answers = [answer_metrics.score_answer(t.answer or "", e.answers, e.answer_mode)
             for t, e in zip(trajectories, agent_examples)]
  return {
      "examples": len(trajectories),
      "examples_with_evidence": int(arrays.evidence_known[:, 0].sum()),
      "accuracy": metrics["agent/accuracy"],
      **{key: float(np.mean([a[key] for a in answers])) if answers else 0.0
         for key in ("sub_exact_match", "exact_match", "f1")},
      "seconds": seconds,
      "seconds_per_example": seconds / max(len(trajectories), 1),
      "prompt_tokens": float(prompt_tokens.mean()),  # per example
      "generated_tokens": float(generated_tokens.mean()),  # per example
      "work_tokens": float((prompt_tokens + generated_tokens).mean()),  # per example
      "chunks_read": metrics["agent/chunks_read"],
      "num_chunks": float(np.mean([e.chunks.num_chunks for e in agent_examples])),
      "exit_early": metrics["gate/exit_early"],
      "exit_exact": metrics["gate/exit_exact"],
      "exit_late": metrics["gate/exit_late"],
      "update_acc_evidence": metrics["gate/update_acc_evidence"],
      "update_acc_non_evidence": metrics["gate/update_acc_non_evidence"],
      "evidence_chunks": int((known & arrays.chunk_has_evidence[:, 0]).sum()),
      "non_evidence_chunks": int((known & ~arrays.chunk_has_evidence[:, 0]).sum()),
      "format_ok": metrics["agent/format_ok"],
      "memory_tokens": metrics["agent/memory_tokens"],
      "memory_tokens_by_step": (memory.sum(0) / steps_alive).tolist(),
      "examples_alive_by_step": alive.sum(0).tolist(),
  }


def runs(eval_config, models: dict) -> list[tuple[str, str]]:
  """(model label, mode) pairs: the main model in every `eval.modes`, the baseline model (if
  loaded) in `eval.baseline_modes`."""
  pairs = []
  for label, mode_names in (("gru_mem", eval_config.modes),
                            ("stage1", eval_config.baseline_modes)):
    if label not in models:
      continue
    for mode in _csv(mode_names):
      pairs.append((label, modes.check_mode(mode, "eval mode")))
  return pairs


def evaluate(config, models: dict, out_dir: str, command: str = "") -> dict:
  """Runs the grid for `models` ({'gru_mem': Model, optionally 'stage1': Model}) and writes
  results.json, report.md and the plots to `out_dir`. Returns the results dict."""
  grid, pairs = check_eval_config(config), runs(config.eval, models)
  os.makedirs(out_dir, exist_ok=True)
  results = {"cells": [], "meta": run_meta(config, command)}
  progress = tqdm.tqdm(total=len(grid) * len(pairs), desc="[eval] cells", unit="cell",
                       file=sys.stderr, dynamic_ncols=True)
  for cell in grid:
    tokenizer = next(iter(models.values())).tokenizer
    examples = held_out_examples(config, tokenizer, cell)
    for label, mode in pairs:
      progress.set_postfix_str(f"{cell.name} {label}/{mode}")
      summary = run_cell(models[label], mode, config, examples, config.eval.batch_size)
      results["cells"].append({"task": cell.task, "length": cell.length,
                               "evidence_depth": cell.evidence_depth, "model": label,
                               "mode": mode, **summary})
      progress.write(f"[eval] {cell.name} {label}/{mode}: acc {summary['accuracy']:.3f} "
                     f"sub-EM {summary['sub_exact_match']:.3f} F1 {summary['f1']:.3f} "
                     f"tokens/ex {summary['work_tokens']:.0f} time {summary['seconds']:.1f}s "
                     f"chunks {summary['chunks_read']:.1f}/"
                     f"{summary['num_chunks']:.0f} exact-exit {summary['exit_exact']:.2f}",
                     file=sys.stdout)
      progress.update(1)
  progress.close()
  results["checks"] = eval_report.default_job_checks(results["cells"], config.eval)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)
  eval_report.write_report(results, out_dir, config.eval)
  eval_report.plot_results(results, out_dir)
  return results


def run_meta(config, command: str) -> dict:
  """What the figures were measured with: machine, versions, the command."""
  return {"command": command or " ".join(sys.argv), "python": platform.python_version(),
          "jax": jax.__version__, "platform": platform.platform(),
          "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
          "eval": config.eval.to_dict() if hasattr(config.eval, "to_dict") else dict(config.eval),
          "agent": config.agent.to_dict() if hasattr(config.agent, "to_dict") else {}}


def load_models(workdir: Optional[str], hf_model: Optional[str],
                baseline_workdir: Optional[str] = None) -> dict:
  """{'gru_mem': Model from a run folder or an HF folder, 'stage1': Model of baseline_workdir}."""
  models = {}
  model_config, params, tokenizer = runtime.load_model(hf_model=hf_model, workdir=workdir)
  models["gru_mem"] = Model("gru_mem", model_config, params, tokenizer)
  if baseline_workdir:
    model_config, params, tokenizer = runtime.load_model(workdir=baseline_workdir)
    models["stage1"] = Model("stage1", model_config, params, tokenizer)
  return models


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if bool(f.workdir) == bool(f.hf_model):
    raise ValueError("give exactly one of --workdir (a training run) or --hf_model (an HF folder)")
  out = f.out or os.path.join(f.workdir or ".", "eval")
  check_eval_config(f.config)  # bad data files fail before a model is loaded
  models = load_models(f.workdir, f.hf_model, f.baseline_workdir)
  evaluate(f.config, models, out)
  print(f"[eval] wrote {out}/report.md, results.json and plots")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "experiment config file")
  flags.DEFINE_string("workdir", None, "a training run folder to evaluate (its latest checkpoint)")
  flags.DEFINE_string("hf_model", None, "an HF model folder to evaluate instead of a run")
  flags.DEFINE_string("baseline_workdir", None, "a second run evaluated in eval.baseline_modes "
                      "(the default job's stage-1 model as MemAgent)")
  flags.DEFINE_string("out", None, "output folder (default: WORKDIR/eval)")
  app.run(main)
