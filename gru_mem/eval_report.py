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


def _rows(cells: Sequence[dict], model: str, mode: str, **where) -> list[dict]:
  return [c for c in cells if c["model"] == model and c["mode"] == mode
          and all(c[k] == v for k, v in where.items())]


def _pooled(rows: Sequence[dict], value: str, weight: str) -> float:
  """sum(value * weight) / sum(weight) over rows whose value is a number."""
  pairs = [(r[value], r[weight]) for r in rows
           if r[weight] and r[value] is not None and not math.isnan(r[value])]
  total = sum(w for _, w in pairs)
  return sum(v * w for v, w in pairs) / total if total else float("nan")


def default_job_checks(cells: Sequence[dict], eval_config) -> dict:
  """The default job's claims, GRU-Mem (RL model, gru_mem mode) against the stage-1 model in
  memagent mode, pooled over every cell both were run on:

    update_acc_evidence, update_acc_non_evidence >= eval.min_update_acc   (chunks pooled)
    exit_exact >= eval.min_exit_exact                                     (examples pooled)
    accuracy >= baseline accuracy - eval.max_accuracy_drop                (examples pooled)
    speedup = baseline seconds / GRU-Mem seconds >= eval.min_speedup on the cells whose evidence
      lies in the first eval.speed_depth of a document of >= eval.speed_min_chunks chunks.
  Each entry: {"value", "threshold", "passed"}; empty when a run is missing.
  """
  main, base = _rows(cells, *MAIN), _rows(cells, *BASELINE)
  if not main or not base:
    return {}
  checks = {}

  def check(name, value, threshold, higher_is_better=True):
    passed = bool(not math.isnan(value) and (value >= threshold if higher_is_better
                                             else value <= threshold))
    checks[name] = {"value": value, "threshold": threshold, "passed": passed}

  check("update_acc_evidence", _pooled(main, "update_acc_evidence", "evidence_chunks"),
        eval_config.min_update_acc)
  check("update_acc_non_evidence", _pooled(main, "update_acc_non_evidence", "non_evidence_chunks"),
        eval_config.min_update_acc)
  check("exit_exact", _pooled(main, "exit_exact", "examples"), eval_config.min_exit_exact)
  drop = _pooled(base, "accuracy", "examples") - _pooled(main, "accuracy", "examples")
  check("accuracy_drop_vs_memagent", drop, eval_config.max_accuracy_drop, higher_is_better=False)
  speed_cells = [c for c in main if c["evidence_depth"] <= eval_config.speed_depth
                 and c["num_chunks"] >= eval_config.speed_min_chunks]
  ratios = []
  for cell in speed_cells:
    match = _rows(base, *BASELINE, task=cell["task"], length=cell["length"],
                  evidence_depth=cell["evidence_depth"])
    if match and cell["seconds"] > 0:
      ratios.append(match[0]["seconds"] / cell["seconds"])
  if ratios:
    check("speedup_early_evidence", float(min(ratios)), eval_config.min_speedup)
  return checks


def _percent(value) -> str:
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else \
      f"{100 * value:.1f}"


def results_table(cells: Sequence[dict]) -> str:
  """One markdown row per (task, length, depth, model, mode)."""
  header = ("| task | length | evidence in first | model | mode | accuracy % | time s | "
            "chunks read | exit early/exact/late % | update acc evid / non-evid % | "
            "memory tokens |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for c in cells:
    lines.append(
        f"| {c['task']} | {c['length']} | {100 * c['evidence_depth']:.0f}% | {c['model']} | "
        f"{c['mode']} | {_percent(c['accuracy'])} | {c['seconds']:.2f} | "
        f"{c['chunks_read']:.1f}/{c['num_chunks']:.0f} | {_percent(c['exit_early'])} / "
        f"{_percent(c['exit_exact'])} / {_percent(c['exit_late'])} | "
        f"{_percent(c['update_acc_evidence'])} / {_percent(c['update_acc_non_evidence'])} | "
        f"{c['memory_tokens']:.1f} |")
  return "\n".join(lines)


def checks_table(checks: dict) -> str:
  if not checks:
    return "(no checks: the run needs both the gru_mem model and the stage-1 baseline)"
  lines = ["| check | value | threshold | passed |", "|---|---|---|---|"]
  for name, c in checks.items():
    comparison = "<=" if name.startswith("accuracy_drop") else ">="
    lines.append(f"| {name} | {c['value']:.3f} | {comparison} {c['threshold']} | "
                 f"{'yes' if c['passed'] else 'NO'} |")
  return "\n".join(lines)


def write_report(results: dict, out_dir: str) -> str:
  """report.md: the command, the checks, and the full table."""
  meta = results.get("meta", {})
  text = "\n\n".join([
      "# Evaluation report",
      f"Command: `{meta.get('command', '')}`\n\nMachine: {meta.get('platform', '')}, "
      f"{meta.get('cpu_count', '?')} CPUs, devices {meta.get('devices', '')}; jax "
      f"{meta.get('jax', '')}, python {meta.get('python', '')}. Greedy decoding; times exclude "
      "compilation.",
      "## Checks (GRU-Mem model in gru_mem mode vs the stage-1 model in memagent mode)",
      checks_table(results.get("checks", {})),
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
