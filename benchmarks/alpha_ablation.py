"""The paper's alpha ablation in miniature: the default job's RL stage at several alphas.

  python benchmarks/alpha_ablation.py --job /tmp/dj_seeds/seed_0 [--alphas 0.5,0.7,0.9,1.0]
      [--out JOB/alpha] [--jobs 1] [-- --config.train.steps=10 ...]

A = alpha * A_traj + (1 - alpha) * A_turn. Every alpha starts from the same stage-1 weights (the
finished default job's JOB/sft) and is read on the same held-out grid (configs/tiny.py's eval.*),
as a user would run it:

  python -m gru_mem.train --config configs/tiny.py --workdir OUT/alpha_A --config.rl.alpha=A \
      --config.model.init_workdir=JOB/sft
  python -m gru_mem.evaluate --config configs/tiny.py --workdir OUT/alpha_A --out OUT/alpha_A/eval \
      --config.eval.modes=gru_mem

(`launch/sweep_alpha.sh configs/tiny.py OUT --config.model.init_workdir=JOB/sft` runs the same
training commands one after another). The job's own alpha (configs/tiny.py's rl.alpha) is not re-run: its RL
run and evaluation are JOB/rl and JOB/eval. Saves benchmarks/results/alpha_ablation.json: per
alpha the gru_mem-mode figures pooled over the grid (update-gate accuracy on evidence / other
chunks, exits, accuracy, chunks read, tokens per example), the commands and their wall times.
The paper's alpha ablation: 0.9 is best; alpha = 1 (no turn reward) updates on
everything; 0.5 hurts the outcome.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
import common  # noqa: E402  (benchmarks/ is not a package)

from gru_mem import eval_report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from configs import tiny  # noqa: E402

JOB_ALPHA = tiny.get_config().rl.alpha  # the default job's own RL run


def commands(job: str, folder: str, alpha: float, extra: list[str]) -> list[list[str]]:
  base = [sys.executable, "-m"]
  return [base + ["gru_mem.train", "--config", "configs/tiny.py", "--workdir", folder,
                  f"--config.rl.alpha={alpha}",
                  f"--config.model.init_workdir={os.path.join(job, 'sft')}", *extra],
          base + ["gru_mem.evaluate", "--config", "configs/tiny.py", "--workdir", folder,
                  "--out", os.path.join(folder, "eval"), "--config.eval.modes=gru_mem", *extra]]


def wait_for(path: str, wait_s: float) -> None:
  """Waits up to wait_s seconds for `path` to exist (a job still running writes it)."""
  deadline = time.time() + wait_s
  while not os.path.exists(path):
    if time.time() > deadline:
      raise FileNotFoundError(f"{path} does not exist: pass a finished default job's folder")
    time.sleep(10)


def run_alpha(job: str, out: str, alpha: float, extra: list[str], wait_s: float) -> dict:
  if alpha == JOB_ALPHA and not extra:
    folder, ran, wall, cpu = job, [], None, None
    results_path = os.path.join(job, "eval", "results.json")
    wait_for(results_path, wait_s)
  else:
    folder = os.path.join(out, f"alpha_{alpha:g}")
    results_path = os.path.join(folder, "eval", "results.json")
    ran, wall, cpu = [], 0.0, 0.0
    if os.path.isfile(os.path.join(folder, "alpha_record.json")):  # done before: re-read it
      with open(os.path.join(folder, "alpha_record.json")) as f:
        return json.load(f)
    if not os.path.isfile(results_path):
      os.makedirs(folder, exist_ok=True)
      env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
      for command in commands(job, folder, alpha, extra):
        start = time.perf_counter()
        with open(os.path.join(folder, "run.log"), "a") as log:
          process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
          _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
          raise RuntimeError(f"alpha {alpha}: {' '.join(command[1:])} failed; see {folder}/run.log")
        wall += time.perf_counter() - start
        cpu += usage.ru_utime + usage.ru_stime
        ran.append(" ".join(command[1:]))
  with open(results_path) as f:
    cells = json.load(f)["cells"]
  record = {"alpha": alpha, "folder": folder, "commands": ran, "wall_s": wall, "cpu_s": cpu,
            "gru_mem": eval_report.pooled_summary(cells, *eval_report.MAIN)}
  if ran:
    with open(os.path.join(folder, "alpha_record.json"), "w") as f:
      json.dump(record, f, indent=1)
  return record


def table(rows: list[dict]) -> str:
  lines = ["| alpha | update acc evidence / other % | exit early / exact / late % | accuracy % | "
           "chunks read | tokens/example |", "|---|---|---|---|---|---|"]
  for row in rows:
    p = row["gru_mem"]
    lines.append(f"| {row['alpha']:g} | {100 * p['update_acc_evidence']:.1f} / "
                 f"{100 * p['update_acc_non_evidence']:.1f} | {100 * p['exit_early']:.1f} / "
                 f"{100 * p['exit_exact']:.1f} / {100 * p['exit_late']:.1f} | "
                 f"{100 * p['accuracy']:.1f} | {p['chunks_read']:.2f} | {p['work_tokens']:.0f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--job", required=True, help="a finished default job's folder")
  parser.add_argument("--alphas", default="0.5,0.7,0.9,1.0")
  parser.add_argument("--out", default=None, help="default: JOB/alpha")
  parser.add_argument("--jobs", type=int, default=1, help="alphas run side by side")
  parser.add_argument("--wait_s", type=float, default=0.0,
                      help="wait this long for a job that is still running (its sft/ and eval/)")
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != "--"]
  job = os.path.abspath(args.job)
  # The stage-1 run is done once the job's RL stage has started (it writes rl/ after sft/).
  wait_for(os.path.join(job, "rl"), args.wait_s)
  out = args.out or os.path.join(job, "alpha")
  alphas = [float(a) for a in args.alphas.split(",")]
  with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
    rows = list(pool.map(lambda a: run_alpha(job, out, a, extra, args.wait_s), alphas))
  rows.sort(key=lambda row: row["alpha"])
  text = table(rows)
  print(text)
  path = common.save_results("alpha_ablation", {
      "job": job, "alphas": alphas, "jobs_side_by_side": args.jobs, "extra_flags": extra,
      "paper": "0.9 best; 1.0 updates on everything; 0.5 hurts the outcome",
      "rows": rows, "table": text})
  print(f"saved {path}")


if __name__ == "__main__":
  main()
