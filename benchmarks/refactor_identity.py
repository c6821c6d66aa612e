"""Issue 13's check: the re-laid house gives the default job the same results as the code before it.

Runs the default job (`configs/tiny.py`, full size unless flags say otherwise) in two git worktrees
of this repository, side by side (one core each, so both see the same single-threaded arithmetic),
and compares what each wrote: `eval/results.json` whole, and every metric the old code logged at
every logged SFT and RL step (`metrics.jsonl`), with the fields that are seconds, rates, the
command line and the work folder left out (at both commits the speed-up check was a ratio of wall
seconds, so it is left out too; today it counts tokens). Metrics only the re-laid code logs (the
loss safety's counters) are summed over the steps and reported.

  before: 91f7337, the last commit before the re-laying (issue 13) began;
  after:  25d6aa0, the merge that finished it, plus the two commits that made stage 1 the same
          program as before the shared step (2fd2f99, d7b8722: one divisor for the NLL mean, the
          log-softmax taken at the token), run with the loss safety that landed in the same merge
          (issue 19) switched off: rl.clip_ratio_c=0, rl.log_ratio_clamp=0, rl.kl_clamp=0.

Later commits change RL's arithmetic on purpose (gather-free token log-probs, the masked-sum
pick) and its data (issue 18's default job), so today's main is not compared with 91f7337.

  python benchmarks/refactor_identity.py --workdir /tmp/ri [--config.sft.steps=30 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

BEFORE = "91f7337"
AFTER = "25d6aa0"
AFTER_PICKS = ("2fd2f99", "d7b8722")
SAFETY_OFF = ("--config.rl.clip_ratio_c=0", "--config.rl.log_ratio_clamp=0",
              "--config.rl.kl_clamp=0")
# speedup_early_evidence: at both commits a ratio of wall seconds (091dc81 made it count tokens)
VOLATILE = ("sec", "time", "wall", "elapsed", "per_s", "steps_s", "tok_s", "command", "workdir",
            "speedup_early_evidence")


def worktree(repo: str, path: str, commit: str, picks=()) -> None:
  if os.path.isdir(path):
    return
  subprocess.run(["git", "-C", repo, "worktree", "add", "-f", "--detach", path, commit], check=True)
  for pick in picks:
    subprocess.run(["git", "-C", path, "-c", "user.name=bench", "-c", "user.email=bench@local",
                    "cherry-pick", pick], check=True)


def stable(value):
  """`value` without the fields that are seconds, rates or paths."""
  if isinstance(value, dict):
    return {k: stable(v) for k, v in value.items() if not any(t in k.lower() for t in VOLATILE)}
  if isinstance(value, list):
    return [stable(v) for v in value]
  return value


def read_run(workdir: str) -> dict:
  run = {"results": json.load(open(os.path.join(workdir, "eval", "results.json")))}
  for stage in ("sft", "rl"):
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
      run[stage] = [json.loads(line) for line in f if line.strip()]
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  args, job_flags = parser.parse_known_args()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  protocol = common.Protocol()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1",
         "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
  sides = {"before": (BEFORE, (), ()), "after": (AFTER, AFTER_PICKS, SAFETY_OFF)}
  jobs = {}
  for name, (commit, picks, flags) in sides.items():
    tree = os.path.join(args.workdir, f"tree_{name}")
    worktree(repo, tree, commit, picks)
    out = os.path.join(args.workdir, f"job_{name}")
    if not os.path.exists(os.path.join(out, "eval", "results.json")):
      command = [sys.executable, "-m", "gru_mem.default_job", "--config", "configs/tiny.py",
                 "--workdir", out, *flags, *job_flags]
      log = open(os.path.join(args.workdir, f"{name}.log"), "w")
      jobs[name] = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=log)
  for name, job in jobs.items():
    if job.wait():
      sys.exit(f"the {name} job failed: see {args.workdir}/{name}.log")
  runs = {name: read_run(os.path.join(args.workdir, f"job_{name}")) for name in sides}
  same = {"results": stable(runs["before"]["results"]) == stable(runs["after"]["results"])}
  added = {}
  for stage in ("sft", "rl"):  # every metric the old code logged, at every logged step
    before, after = ([stable(m) for m in runs[side][stage]] for side in ("before", "after"))
    same[stage] = len(before) == len(after) and all(
        all(key in b and a[key] == b[key] for key in a) for a, b in zip(before, after))
    new_keys = sorted(set(after[0]) - set(before[0]))
    added[stage] = {key: sum(m[key] for m in after) for key in new_keys}
  figures = {"before": BEFORE, "after": AFTER, "after_cherry_picks": list(AFTER_PICKS),
             "after_flags": list(SAFETY_OFF), "job_flags": job_flags, "threads": env["XLA_FLAGS"],
             "identical": same,
             "metrics_added_after_summed_over_steps": added,
             "metric_rows": {stage: len(runs["before"][stage]) for stage in ("sft", "rl")},
             "results_before": runs["before"]["results"],
             "results_after": runs["after"]["results"]}
  print("identical:", same, "metrics only the re-laid code logs (sums):", added)
  print("saved", common.save_results("refactor_identity", figures, protocol))


if __name__ == "__main__":
  main()
