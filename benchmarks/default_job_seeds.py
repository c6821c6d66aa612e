"""The default job for several seeds: each seed's checks, gates before / after RL, work, wall time.

  python benchmarks/default_job_seeds.py [--seeds 0,1,2] [--workdir /tmp/dj_seeds] [--jobs 1]
      [-- --config.train.steps=10 ...]   # extra flags go to every job

Seed k runs `python -m gru_mem.default_job --config configs/tiny.py --workdir WORKDIR/seed_k
--config.seed=k --config.sft.seed=k+1` in its own process (seed 0 is the default job itself:
`seed` 0, `sft.seed` 1); the held-out grid (`eval.seed`) is the same for every seed. Each process's
wall time and CPU-seconds (user + system, from the kernel's accounting of the child) are recorded
with the load average before and after: on a shared machine the wall time grows with whatever
else runs, the CPU-seconds much less. With --jobs > 1 seeds run side by side (their wall times are
then from concurrent runs; the JSON says so). A seed folder whose job finished is re-read, not
re-run (its recorded times are kept).

Saves benchmarks/results/default_job_seeds.json: per seed the checks, the pooled summaries of the
stage-1 model (memagent and gru_mem modes) and the RL model, the timings; and the mean and the
worst seed of every check (`summary_table` is the README's table).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
import common  # noqa: E402  (benchmarks/ is not a package)

from gru_mem import eval_report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOWER_IS_BETTER = ("accuracy_drop_vs_memagent",)


def seed_flags(seed: int) -> list[str]:
  return [f"--config.seed={seed}", f"--config.sft.seed={seed + 1}"]


def run_seed(seed: int, workdir: str, extra: list[str]) -> dict:
  """Runs (or re-reads) one seed's default job; returns its record."""
  folder = os.path.join(workdir, f"seed_{seed}")
  record_path = os.path.join(folder, "seed_record.json")
  if os.path.isfile(record_path):
    with open(record_path) as f:
      return json.load(f)
  os.makedirs(folder, exist_ok=True)
  command = [sys.executable, "-m", "gru_mem.default_job", "--config", "configs/tiny.py",
             "--workdir", folder, *seed_flags(seed), *extra]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  load_before, from_timings = list(os.getloadavg()), False
  if os.path.isfile(os.path.join(folder, "eval", "results.json")) and \
      os.path.isfile(os.path.join(folder, "timings.json")):
    from_timings = True  # a finished job without a record: its own timings.json has the times
  else:
    start = time.perf_counter()
    with open(os.path.join(folder, "job.log"), "w") as log:
      process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
      _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
      raise RuntimeError(f"seed {seed}: the job failed (exit {status}); see {folder}/job.log")
  with open(os.path.join(folder, "eval", "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(folder, "timings.json")) as f:
    timings = json.load(f)
  if from_timings:
    wall, cpu = timings["total_s"], timings.get("total_cpu_s", float("nan"))
  else:
    cpu = usage.ru_utime + usage.ru_stime
  record = {
      "seed": seed, "command": " ".join(command[1:]), "workdir": folder,
      "wall_s": wall, "cpu_s": cpu, "times_from_the_jobs_timings_json": from_timings,
      "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
      "stage_timings": timings, "checks": results["checks"],
      "all_checks_passed": all(c["passed"] for c in results["checks"].values()),
      "pooled": {f"{model}/{mode}": eval_report.pooled_summary(results["cells"], model, mode)
                 for model, mode in (eval_report.BASELINE, eval_report.BEFORE_RL,
                                     eval_report.MAIN)},
  }
  with open(record_path, "w") as f:
    json.dump(record, f, indent=1)
  return record


def summarize(records: list[dict]) -> dict:
  """Per check: the mean, the worst seed's value and whether every seed passed."""
  summary = {}
  for name in records[0]["checks"]:
    values = [r["checks"][name]["value"] for r in records]
    worst = max(values) if name in LOWER_IS_BETTER else min(values)
    summary[name] = {"mean": sum(values) / len(values), "worst": worst,
                     "threshold": records[0]["checks"][name]["threshold"],
                     "every_seed_passed": all(r["checks"][name]["passed"] for r in records)}
  for key in ("wall_s", "cpu_s"):
    values = [r[key] for r in records]
    summary[key] = {"mean": sum(values) / len(values), "worst": max(values)}
  return summary


def summary_table(summary: dict, seeds: list[int]) -> str:
  lines = [f"| check ({len(seeds)} seeds) | threshold | mean | worst seed | every seed passed |",
           "|---|---|---|---|---|"]
  for name, s in summary.items():
    if name in ("wall_s", "cpu_s"):
      continue
    comparison = "<=" if name in LOWER_IS_BETTER else ">="
    lines.append(f"| {name} | {comparison} {s['threshold']} | {s['mean']:.3f} | {s['worst']:.3f} "
                 f"| {'yes' if s['every_seed_passed'] else 'NO'} |")
  for key, label in (("wall_s", "wall time s (machine- and load-dependent)"),
                     ("cpu_s", "CPU-seconds of the job's process")):
    lines.append(f"| {label} | | {summary[key]['mean']:.0f} | {summary[key]['worst']:.0f} | |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--workdir", default="/tmp/default_job_seeds")
  parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side")
  parser.add_argument("--name", default="default_job_seeds", help="results JSON name")
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != "--"]
  seeds = [int(s) for s in args.seeds.split(",")]
  with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
    records = list(pool.map(lambda s: run_seed(s, args.workdir, extra), seeds))
  summary = summarize(records)
  table = summary_table(summary, seeds)
  print(table)
  path = common.save_results(args.name, {
      "seeds": seeds, "jobs_side_by_side": args.jobs, "extra_flags": extra,
      "note": "wall_s per seed is from " + ("one job at a time" if args.jobs == 1 else
                                            f"{args.jobs} jobs side by side")
              + " on a machine shared with other engineers' work (load averages recorded)",
      "records": records, "summary": summary, "summary_table": table,
      "all_checks_passed_every_seed": all(r["all_checks_passed"] for r in records)})
  print(f"saved {path}; children CPU-seconds "
        f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime:.0f} user")


if __name__ == "__main__":
  main()
