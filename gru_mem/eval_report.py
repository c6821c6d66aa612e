"""The evaluation's outputs: the default job's checks, a markdown report and PNG plots.

`results` is what `evaluate.evaluate` builds: {"cells": [one dict per (task, length, depth,
model, mode) with its numbers], "meta": {...}, "checks": {...}}.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Sequence

import numpy as np

MAIN = ("gru_mem", "gru_mem")  # (model, mode): the RL model with both gates
BASELINE = ("stage1", "memagent")  # the stage-1 model read the MemAgent way
BEFORE_RL = ("stage1", "gru_mem")  # the stage-1 model's own gates: what RL started from


def _rows(cells: Sequence[dict], model: str, mode: str, **where) -> list[dict]:
  return [c for c in cells if c["model"] == model and c["mode"] == mode
          and all(c[k] == v for k, v in where.items())]


def _pooled(rows: Sequence[dict], value: str, weight: str) -> float:
  """sum(value * weight) / sum(weight) over rows whose value is a number."""
  pairs = [(r[value], r[weight]) for r in rows
           if r[weight] and r.get(value) is not None and not math.isnan(r[value])]
  total = sum(w for _, w in pairs)
  return sum(v * w for v, w in pairs) / total if total else float("nan")


POOLED_BY_EXAMPLES = ("accuracy", "exit_early", "exit_exact", "exit_late", "chunks_read",
                      "work_tokens")


def pooled_summary(cells: Sequence[dict], model: str, mode: str) -> dict:
  """One (model, mode) pooled over every cell it ran on: update-gate accuracies over the chunks
  of each class, the rest over examples; `seconds` is the summed wall time (machine-dependent).
  Empty when the run is missing."""
  rows = _rows(cells, model, mode)
  if not rows:
    return {}
  summary = {"cells": len(rows), "examples": sum(r["examples"] for r in rows),
             "update_acc_evidence": _pooled(rows, "update_acc_evidence", "evidence_chunks"),
             "update_acc_non_evidence": _pooled(rows, "update_acc_non_evidence",
                                                "non_evidence_chunks")}
  for name in POOLED_BY_EXAMPLES:
    summary[name] = _pooled(rows, name, "examples")
  summary["seconds"] = sum(r["seconds"] for r in rows)
  return summary


def speed_pairs(cells: Sequence[dict], eval_config) -> list[tuple[dict, dict]]:
  """(GRU-Mem cell, baseline cell) pairs of the speed check: evidence within the first
  eval.speed_depth of documents of >= eval.speed_min_chunks chunks."""
  pairs = []
  for cell in _rows(cells, *MAIN):
    if cell["evidence_depth"] > eval_config.speed_depth or \
        cell["num_chunks"] < eval_config.speed_min_chunks:
      continue
    match = _rows(cells, *BASELINE, task=cell["task"], length=cell["length"],
                  evidence_depth=cell["evidence_depth"])
    if match:
      pairs.append((cell, match[0]))
  return pairs


def default_job_checks(cells: Sequence[dict], eval_config) -> dict:
  """The default job's claims, GRU-Mem (RL model, gru_mem mode) against the stage-1 model in
  memagent mode, pooled over every cell both were run on; every value is a count, none depends
  on the machine:

    update_acc_evidence, update_acc_non_evidence >= eval.min_update_acc   (chunks pooled)
    exit_exact >= eval.min_exit_exact                                     (examples pooled)
    accuracy >= baseline accuracy - eval.max_accuracy_drop                (examples pooled)
    work_speedup_early_evidence = baseline tokens / GRU-Mem tokens per example >= eval.min_speedup,
      the smallest over the `speed_pairs` cells; tokens = prompt tokens prefilled + tokens
      generated over every turn, the answer turn included.
  Each entry: {"value", "threshold", "passed"} (+ "note"); empty when a run is missing.
  """
  main, base = _rows(cells, *MAIN), _rows(cells, *BASELINE)
  if not main or not base:
    return {}
  checks = {}

  def check(name, value, threshold, higher_is_better=True, note=""):
    passed = bool(not math.isnan(value) and (value >= threshold if higher_is_better
                                             else value <= threshold))
    checks[name] = {"value": value, "threshold": threshold, "passed": passed}
    if note:
      checks[name]["note"] = note

  check("update_acc_evidence", _pooled(main, "update_acc_evidence", "evidence_chunks"),
        eval_config.min_update_acc)
  check("update_acc_non_evidence", _pooled(main, "update_acc_non_evidence", "non_evidence_chunks"),
        eval_config.min_update_acc)
  check("exit_exact", _pooled(main, "exit_exact", "examples"), eval_config.min_exit_exact)
  drop = _pooled(base, "accuracy", "examples") - _pooled(main, "accuracy", "examples")
  check("accuracy_drop_vs_memagent", drop, eval_config.max_accuracy_drop, higher_is_better=False)
  pairs = [(c, b) for c, b in speed_pairs(cells, eval_config)
           if c.get("work_tokens") and b.get("work_tokens")]
  if pairs:
    ratios = [b["work_tokens"] / c["work_tokens"] for c, b in pairs]
    worst = pairs[int(np.argmin(ratios))]
    check("work_speedup_early_evidence", float(min(ratios)), eval_config.min_speedup,
          note=f"{worst[0]['task']}: {worst[1]['work_tokens']:.0f} vs "
          f"{worst[0]['work_tokens']:.0f} tokens per example, chunks read "
          f"{worst[1]['chunks_read']:.1f} vs {worst[0]['chunks_read']:.1f} of "
          f"{worst[0]['num_chunks']:.0f}")
  return checks


def speed_table(cells: Sequence[dict], eval_config) -> str:
  """Per early-evidence cell: tokens per example, chunks read and wall time, baseline vs GRU-Mem."""
  lines = ["| task | tokens/example memagent / GRU-Mem | work speed-up | chunks read | "
           "wall s memagent / GRU-Mem (machine-dependent) | wall speed-up |", "|---|---|---|---|---|---|"]
  for cell, base in speed_pairs(cells, eval_config):
    if not cell.get("work_tokens"):
      continue
    wall = base["seconds"] / cell["seconds"] if cell["seconds"] > 0 else float("nan")
    lines.append(f"| {cell['task']} | {base['work_tokens']:.0f} / {cell['work_tokens']:.0f} | "
                 f"{base['work_tokens'] / cell['work_tokens']:.2f}x | {base['chunks_read']:.1f} / "
                 f"{cell['chunks_read']:.1f} of {cell['num_chunks']:.0f} | {base['seconds']:.2f} / "
                 f"{cell['seconds']:.2f} | {wall:.2f}x |")
  return "\n".join(lines)


def gates_table(cells: Sequence[dict]) -> str:
  """Every (model, mode) pooled over the grid, the stage-1 model's gates (before RL) next to
  the RL model's (after)."""
  runs = list(dict.fromkeys((c["model"], c["mode"]) for c in cells))
  order = [BASELINE, BEFORE_RL, MAIN]
  runs = [r for r in order if r in runs] + [r for r in runs if r not in order]
  names = {BASELINE: "stage 1, memagent (the baseline)", BEFORE_RL: "stage 1, gru_mem (before RL)",
           MAIN: "GRU-Mem, gru_mem (after RL)"}
  lines = ["| model, mode | accuracy % | update acc evidence / other % | exit early / exact / "
           "late % | chunks read | tokens/example | wall s (machine-dependent) |",
           "|---|---|---|---|---|---|---|"]
  for run in runs:
    p = pooled_summary(cells, *run)
    lines.append(f"| {names.get(run, ', '.join(run))} | {_percent(p['accuracy'])} | "
                 f"{_percent(p['update_acc_evidence'])} / {_percent(p['update_acc_non_evidence'])}"
                 f" | {_percent(p['exit_early'])} / {_percent(p['exit_exact'])} / "
                 f"{_percent(p['exit_late'])} | {p['chunks_read']:.2f} | {p['work_tokens']:.0f} | "
                 f"{p['seconds']:.1f} |")
  return "\n".join(lines)


def _percent(value) -> str:
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else \
      f"{100 * value:.1f}"


def results_table(cells: Sequence[dict]) -> str:
  """One markdown row per (task, length, depth, model, mode)."""
  header = ("| task | length | evidence in first | model | mode | accuracy % | tokens/ex | time s | "
            "chunks read | exit early/exact/late % | update acc evid / non-evid % | "
            "memory tokens |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for c in cells:
    lines.append(
        f"| {c['task']} | {c['length']} | {100 * c['evidence_depth']:.0f}% | {c['model']} | "
        f"{c['mode']} | {_percent(c['accuracy'])} | {c.get('work_tokens', float('nan')):.0f} | "
        f"{c['seconds']:.2f} | "
        f"{c['chunks_read']:.1f}/{c['num_chunks']:.0f} | {_percent(c['exit_early'])} / "
        f"{_percent(c['exit_exact'])} / {_percent(c['exit_late'])} | "
        f"{_percent(c['update_acc_evidence'])} / {_percent(c['update_acc_non_evidence'])} | "
        f"{c['memory_tokens']:.1f} |")
  return "\n".join(lines)


def checks_table(checks: dict) -> str:
  if not checks:
    return "(no checks: the run needs both the gru_mem model and the stage-1 baseline)"
  lines = ["| check | value | threshold | passed | |", "|---|---|---|---|---|"]
  for name, c in checks.items():
    comparison = "<=" if name.startswith("accuracy_drop") else ">="
    lines.append(f"| {name} | {c['value']:.3f} | {comparison} {c['threshold']} | "
                 f"{'yes' if c['passed'] else 'NO'} | {c.get('note', '')} |")
  return "\n".join(lines)


def write_report(results: dict, out_dir: str, eval_config=None) -> str:
  """report.md: the command, the checks, the gates before / after RL, the early-evidence work
  and wall time (with `eval_config`), and the full table."""
  meta = results.get("meta", {})
  speed = ["## Work with all evidence in the first "
           f"{100 * eval_config.speed_depth:.0f}% (the speed check's cells)",
           speed_table(results["cells"], eval_config)] if eval_config is not None else []
  text = "\n\n".join([
      "# Evaluation report",
      f"Command: `{meta.get('command', '')}`\n\nMachine: {meta.get('platform', '')}, "
      f"{meta.get('cpu_count', '?')} CPUs, devices {meta.get('devices', '')}; jax "
      f"{meta.get('jax', '')}, python {meta.get('python', '')}. Greedy decoding. Tokens count "
      "the work (prompt tokens prefilled + tokens generated per example, every turn, the answer "
      "turn included) and do not depend on the machine; wall times exclude compilation and depend "
      "on the machine and on whatever else it runs.",
      "## Checks (GRU-Mem model in gru_mem mode vs the stage-1 model in memagent mode)",
      checks_table(results.get("checks", {})),
      "## The gates before and after RL (pooled over the grid)", gates_table(results["cells"]),
      *speed,
      "## Results", results_table(results["cells"]),
      "Plots: accuracy_vs_length.png, time_vs_length.png, memory_vs_step.png"])
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write(text + "\n")
  return path


def _series(cells: Sequence[dict]) -> dict:
  """{(task, depth): {(model, mode): [cells sorted by length]}}."""
  grouped: dict = collections.defaultdict(lambda: collections.defaultdict(list))
  for c in cells:
    grouped[(c["task"], c["evidence_depth"])][(c["model"], c["mode"])].append(c)
  for runs in grouped.values():
    for rows in runs.values():
      rows.sort(key=lambda c: c["length"])
  return grouped


def plot_results(results: dict, out_dir: str) -> list[str]:
  """accuracy_vs_length.png, time_vs_length.png, memory_vs_step.png; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  grouped = _series(results["cells"])
  panels = sorted(grouped)
  paths = []
  for key, ylabel, name in (("accuracy", "accuracy", "accuracy_vs_length.png"),
                            ("seconds", "wall time (s)", "time_vs_length.png")):
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
      for (model, mode), rows in sorted(grouped[panel].items()):
        ax.plot([r["length"] for r in rows], [r[key] for r in rows], marker="o",
                label=f"{model}/{mode}")
      ax.set_title(f"{panel[0]}, evidence in first {100 * panel[1]:.0f}%", fontsize=9)
      ax.set_xlabel("tokens")
      ax.set_xscale("log", base=2)
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, name))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    for (model, mode), rows in sorted(grouped[panel].items()):
      longest = rows[-1]
      ax.plot(np.arange(1, len(longest["memory_tokens_by_step"]) + 1),
              longest["memory_tokens_by_step"], label=f"{model}/{mode}")
    ax.set_title(f"{panel[0]} at {rows[-1]['length']} tokens, evidence in first "
                 f"{100 * panel[1]:.0f}%", fontsize=9)
    ax.set_xlabel("step (chunk)")
    ax.set_ylabel("memory tokens (rows still reading)")
    ax.grid(alpha=0.3)
  axes[0, -1].legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "memory_vs_step.png"))
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  return paths
