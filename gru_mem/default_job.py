"""The default job: a tiny model learns both gates on a laptop CPU, and the evaluation report.

  bash launch/local.sh                       # = the line below, in .venv
  python -m gru_mem.default_job --config configs/tiny.py --workdir runs/default

Three stages in one process, each in its own folder of the workdir:
  sft/   stage 1: supervised warm start on scripted trajectories (`gru_mem.sft`)
  rl/    stage 2: GRU-Mem RL (`gru_mem.train`) starting from the stage-1 weights
  eval/  stage 3: held-out evaluation (`gru_mem.evaluate`) of the RL model in `eval.modes` and
         of the stage-1 model in `eval.baseline_modes` (as MemAgent, the baseline, and with its
         own gates, what RL started from): results.json, report.md, PNG plots
and rl_curves.png (reward, gate accuracies, exits, chunks read per RL step) next to them.
Checkpoints and TensorBoard logs stay in sft/ and rl/. Re-running resumes an interrupted stage
and skips finished ones (the evaluation is redone only if its results are missing). timings.json
holds each stage's wall time and CPU-seconds (this process, all threads) and the load average.
"""

from __future__ import annotations

from gru_mem import console

console.quiet_startup()  # before the libraries below are imported

import json
import os
import resource
import time
from typing import Optional

from gru_mem import evaluate, logs, run_folder, settings, sft, train

RL_CURVES = ("reward/trajectory", "reward/update", "gate/update_acc_evidence",
             "gate/update_acc_non_evidence", "gate/exit_exact", "agent/chunks_read",
             "agent/accuracy")


def stage_dirs(workdir: str) -> dict[str, str]:
  return {name: os.path.join(workdir, name) for name in ("sft", "rl", "eval")}


def rl_config(config, sft_dir: str):
  """The RL stage's config: the experiment config starting from the stage-1 params."""
  config = config.copy_and_resolve_references()
  config.model.init_workdir = sft_dir
  return config


def _banner(stage: int, text: str, started: float) -> None:
  elapsed = logs.format_duration(time.perf_counter() - started)
  print(f"\n[default job] stage {stage}/3: {text} (job time {elapsed})", flush=True)


def cpu_seconds() -> float:
  """User + system CPU seconds of this process so far (all its threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def stage_finished(folder: str, steps: int, name: str) -> bool:
  """False (and says so) when a stage stopped before its last step (SIGTERM, non-finite stop):
  the job stops there rather than start the next stage from unfinished weights."""
  done = run_folder.completed_steps(folder) or 0
  if done < steps:
    print(f"[default job] {name} stopped at step {done} of {steps}: the job stops here; run the "
          "same command again to resume", flush=True)
  return done >= steps


def run(config, workdir: str, stages: str = "sft,rl,eval") -> Optional[dict]:
  """Runs (or resumes) the stages named in `stages`; returns the evaluation results (None when
  the evaluation was not run)."""
  wanted = {s.strip() for s in stages.split(",") if s.strip()}
  unknown = wanted - {"sft", "rl", "eval"}
  if unknown:
    raise ValueError(f"stages={stages!r}: unknown {sorted(unknown)}; use any of sft,rl,eval")
  settings.validate_sft(config)
  settings.validate(config)
  evaluate.cells(config.eval)
  dirs = stage_dirs(workdir)
  started, cpu_started = time.perf_counter(), cpu_seconds()
  timings = {}
  if "sft" in wanted:
    _banner(1, f"supervised warm start, {config.sft.steps} steps -> {dirs['sft']}", started)
    stage_start, stage_cpu = time.perf_counter(), cpu_seconds()
    if (run_folder.completed_steps(dirs["sft"]) or 0) >= config.sft.steps:
      print("[default job] stage 1 already done: skipped")
    else:
      sft.train_sft(config, dirs["sft"])
      if not stage_finished(dirs["sft"], config.sft.steps, "stage 1"):
        return None
    timings["sft_s"] = time.perf_counter() - stage_start
    timings["sft_cpu_s"] = cpu_seconds() - stage_cpu
  if "rl" in wanted:
    _banner(2, f"GRU-Mem RL, {config.train.steps} steps from the stage-1 weights -> {dirs['rl']}",
            started)
    stage_start, stage_cpu = time.perf_counter(), cpu_seconds()
    if (run_folder.completed_steps(dirs["rl"]) or 0) >= config.train.steps:
      print("[default job] stage 2 already done: skipped")
    else:
      train.train(rl_config(config, dirs["sft"]), dirs["rl"])
      if not stage_finished(dirs["rl"], config.train.steps, "stage 2"):
        return None
    logs.plot_metrics(os.path.join(dirs["rl"], logs.METRICS_FILE), RL_CURVES,
                      os.path.join(workdir, "rl_curves.png"))
    timings["rl_s"] = time.perf_counter() - stage_start
    timings["rl_cpu_s"] = cpu_seconds() - stage_cpu
  results = None
  if "eval" in wanted:
    _banner(3, f"evaluation on held-out examples -> {dirs['eval']}", started)
    stage_start, stage_cpu = time.perf_counter(), cpu_seconds()
    results_path = os.path.join(dirs["eval"], "results.json")
    if os.path.isfile(results_path):
      print("[default job] stage 3 already done: skipped (delete eval/results.json to redo it)")
      with open(results_path) as f:
        results = json.load(f)
    else:
      models = evaluate.load_models(dirs["rl"], None, dirs["sft"])
      command = f"python -m gru_mem.default_job --workdir {workdir}"
      results = evaluate.evaluate(config, models, dirs["eval"], command)
    timings["eval_s"] = time.perf_counter() - stage_start
    timings["eval_cpu_s"] = cpu_seconds() - stage_cpu
  timings["total_s"] = time.perf_counter() - started
  timings["total_cpu_s"] = cpu_seconds() - cpu_started
  timings["load_average_1_5_15_at_end"] = list(os.getloadavg())
  with open(os.path.join(workdir, "timings.json"), "w") as f:
    json.dump(timings, f, indent=1)
  print(f"\n[default job] done in {logs.format_duration(timings['total_s'])}: "
        + ", ".join(f"{k[:-2]} {logs.format_duration(v)}" for k, v in timings.items()
                    if k.endswith("_s") and not k.endswith("cpu_s") and k != "total_s")
        + f" (wall time; {timings['total_cpu_s']:.0f} CPU-seconds, load average at the end "
        + "{:.1f} {:.1f} {:.1f})".format(*timings["load_average_1_5_15_at_end"]))
  if results is not None:
    print(f"[default job] report: {os.path.join(dirs['eval'], 'report.md')}")
    for name, check in results.get("checks", {}).items():
      print(f"  {name}: {check['value']:.3f} (threshold {check['threshold']}) "
            f"{'ok' if check['passed'] else 'NOT MET'}")
  return results


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.stages)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "experiment config file")
  flags.DEFINE_string("workdir", "runs/default", "the job's folder")
  flags.DEFINE_string("stages", "sft,rl,eval", "comma-separated stages to run")
  app.run(main)
