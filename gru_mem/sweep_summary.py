r"""The summary table of a sweep: one row per run folder, its metrics averaged over its last steps.

  python -m gru_mem.sweep_summary runs/alpha_sweep            # every alpha_*/metrics.jsonl
  python -m gru_mem.sweep_summary runs/alpha_sweep --last 10  # average the last 10 steps

Run folders are the sweep folder's subfolders named `<key>_<value>` (launch/sweep_alpha.sh makes
`alpha_0.5`, `alpha_0.7`, ...); rows are sorted by value. The table is printed and written as
`summary.md` and `summary.json` in the sweep folder.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Optional, Sequence

from gru_mem import logs

# What tells the alpha runs apart (DESIGN.md: 0.9 best, 1.0 updates on everything, 0.5 hurts).
COLUMNS = (
    "reward/trajectory", "reward/outcome", "reward/update", "gate/update_acc_evidence",
    "gate/update_acc_non_evidence", "gate/exit_exact", "agent/chunks_read",
    "agent/memory_tokens", "learner/loss", "time/step_s",
)
_RUN_NAME = re.compile(r"^(?P<key>[A-Za-z_]+?)_(?P<value>-?[0-9.]+(?:e-?[0-9]+)?)$")


def run_folders(sweep_dir: str) -> list[tuple[str, float, str]]:
  """(key, value, path) of each `<key>_<value>` subfolder holding a metrics file, by value."""
  if not os.path.isdir(sweep_dir):
    raise FileNotFoundError(f"sweep folder {sweep_dir!r} does not exist")
  found = []
  for name in os.listdir(sweep_dir):
    match = _RUN_NAME.match(name)
    path = os.path.join(sweep_dir, name)
    if match and os.path.isfile(os.path.join(path, logs.METRICS_FILE)):
      found.append((match["key"], float(match["value"]), path))
  if not found:
    raise FileNotFoundError(f"{sweep_dir} has no <key>_<value>/{logs.METRICS_FILE} run folders: "
                            "point at the folder launch/sweep_alpha.sh wrote")
  return sorted(found, key=lambda run: run[1])


def _mean(values: Sequence[float]) -> Optional[float]:
  finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  return sum(finite) / len(finite) if finite else None


def summarize(sweep_dir: str, last: int = 1, columns: Sequence[str] = COLUMNS) -> list[dict]:
  """One dict per run: key, value, steps (the last step logged) and, per column, the mean over
  the run's last `last` logged steps (None when the run never logged it)."""
  if last < 1:
    raise ValueError(f"last={last}: must be >= 1")
  rows = []
  for key, value, path in run_folders(sweep_dir):
    records = logs.read_metrics(os.path.join(path, logs.METRICS_FILE))
    tail = records[-last:]
    row = {key: value, "steps": records[-1]["step"] if records else 0, "run": path}
    row.update({c: _mean([r.get(c) for r in tail]) for c in columns})
    rows.append(row)
  return rows


def format_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
  """A Markdown table: the swept key, steps, then each column (4 significant digits)."""
  if not rows:
    return "(no runs)"
  key = next(iter(rows[0]))
  header = [key, "steps", *columns]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [f"{row[key]:g}", str(row["steps"])]
    cells += ["-" if row[c] is None else f"{row[c]:.4g}" for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_summary(sweep_dir: str, last: int = 1) -> str:
  """Writes summary.md and summary.json in `sweep_dir`; returns the table."""
  rows = summarize(sweep_dir, last)
  table = format_table(rows)
  with open(os.path.join(sweep_dir, "summary.md"), "w") as f:
    f.write(f"Mean over the last {last} logged step(s) of each run.\n\n{table}\n")
  with open(os.path.join(sweep_dir, "summary.json"), "w") as f:
    json.dump({"last_steps": last, "rows": rows}, f, indent=2)
  return table


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) != 2:
    raise SystemExit("usage: python -m gru_mem.sweep_summary SWEEP_DIR [--last N]")
  print(write_summary(argv[1], flags.FLAGS.last))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=ungrouped-imports
  flags.DEFINE_integer("last", 1, "average each metric over a run's last N logged steps")
  app.run(main)
