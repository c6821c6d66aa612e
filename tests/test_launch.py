"""Launch scripts: they parse, print the commands they would run (DRY_RUN=1, with gcloud / srun
stubbed to fail if called), and the alpha sweep trains the tiny config for real and summarises."""

import json
import os
import subprocess
import sys

import pytest

from gru_mem import checkpoint, run_folder, sweep_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("launch/tpu_vm.sh", "launch/slurm_gpu.sbatch", "launch/sweep_alpha.sh")
# a tiny RL step (2 prompts x 2 samples, short documents) as overrides of configs/tiny.py
TINY_OVERRIDES = [
    "--config.data.train_tasks=niah_single_1", "--config.data.context_tokens=200",
    "--config.agent.chunk_tokens=64", "--config.agent.memory_tokens=16",
    "--config.agent.max_response_tokens=24", "--config.agent.max_answer_tokens=8",
    "--config.rl.group_size=2", "--config.rl.prompts_per_step=2",
    "--config.rl.dynamic_sampling=False", "--config.optim.micro_batch_rows=8",
    "--config.train.steps=2", "--config.train.save_every=2",
]


def stubbed_env(tmp_path, **extra):
  """PATH with gcloud, srun and sbatch that record being called and fail."""
  stubs = tmp_path / "stubs"
  stubs.mkdir(exist_ok=True)
  for name in ("gcloud", "srun", "sbatch"):
    stub = stubs / name
    stub.write_text(f"#!/bin/sh\necho called >> {tmp_path}/called_{name}\nexit 99\n")
    stub.chmod(0o755)
  return dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", **extra)


def run_script(args, env, timeout=60):
  result = subprocess.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def assert_nothing_called(tmp_path):
  assert not list(tmp_path.glob("called_*")), "a print-only run executed a command"


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
  result = subprocess.run(["bash", "-n", os.path.join(REPO, script)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr


def test_tpu_vm_prints_create_copy_install_run(tmp_path):
  env = stubbed_env(tmp_path, DRY_RUN="1", TPU_NAME="slice1", ZONE="us-east5-a", BUCKET="bkt",
                    MODEL_DIR="/mnt/gcs/qwen7b")
  out = run_script(["launch/tpu_vm.sh", "all", "--config.rl.alpha=0.7"], env)
  lines = [line for line in out.splitlines() if line.startswith("+ ")]
  assert lines[0] == ("+ gcloud compute tpus tpu-vm create slice1 --zone=us-east5-a "
                      "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5")
  assert "git ls-files" in lines[1] and "tar" in lines[1]
  assert lines[2].startswith("+ gcloud compute tpus tpu-vm scp") and "--worker=all" in lines[2]
  assert "pip\\ install" in lines[3] and "--worker=all" in lines[3]
  assert "gcsfuse\\ --implicit-dirs\\ bkt\\ /mnt/gcs" in lines[4]
  train = lines[5]
  for piece in ("--worker=all", "JAX_NUM_PROCESSES=8", "python\\ -m\\ gru_mem.train",
                "configs/qwen2p5_7b_hotpotqa.py:tpu_v5p_64", "/mnt/gcs/gru_mem/slice1",
                "--config.model.hf_path=/mnt/gcs/qwen7b", "--config.rl.alpha=0.7",
                "~/gru_mem_logs/train.log"):
    assert piece in train, (piece, train)
  logs = run_script(["launch/tpu_vm.sh", "logs"], env)
  assert "--worker=0" in logs and "tail" in logs
  assert "delete slice1" in run_script(["launch/tpu_vm.sh", "delete"], env)
  assert_nothing_called(tmp_path)


def test_tpu_vm_hosts_follow_the_accelerator(tmp_path):
  env = stubbed_env(tmp_path, DRY_RUN="1", ACCELERATOR="v5p-128")
  assert "JAX_NUM_PROCESSES=16" in run_script(["launch/tpu_vm.sh", "run"], env)
  bad = subprocess.run(["bash", "launch/tpu_vm.sh", "launch"], cwd=REPO, env=env,
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "usage" in bad.stderr


def test_slurm_prints_srun_with_overrides(tmp_path):
  env = stubbed_env(tmp_path, DRY_RUN="1", CONFIG="configs/qwen2p5_3b_hotpotqa.py:h100x8",
                    WORKDIR="/shared/runs/3b", HOTPOTQA="/shared/hotpot.json")
  out = run_script(["launch/slurm_gpu.sbatch", "--config.train.steps=5"], env)
  srun = [line for line in out.splitlines() if line.startswith("+ srun")]
  assert len(srun) == 1, out
  for piece in ("-m gru_mem.train", "--config configs/qwen2p5_3b_hotpotqa.py:h100x8",
                "--workdir /shared/runs/3b", "--config.data.hotpotqa_path=/shared/hotpot.json",
                "--config.train.steps=5"):
    assert piece in srun[0], (piece, srun[0])
  with open(os.path.join(REPO, "launch/slurm_gpu.sbatch")) as f:
    header = f.read()
  assert "#SBATCH --gpus-per-node=8" in header and "#SBATCH --ntasks-per-node=1" in header
  assert_nothing_called(tmp_path)


def test_sweep_prints_one_run_per_alpha(tmp_path):
  env = stubbed_env(tmp_path, DRY_RUN="1", PYTHON="python3")
  out = run_script(["launch/sweep_alpha.sh", "configs/tiny.py", str(tmp_path / "sw"),
                    "--config.train.steps=2"], env)
  commands = [line for line in out.splitlines() if line.startswith("+ ")]
  assert len(commands) == 5
  for alpha, command in zip(("0.5", "0.7", "0.9", "1.0"), commands):
    assert f"--workdir {tmp_path}/sw/alpha_{alpha} --config.rl.alpha={alpha}" in command
    assert command.endswith("--config.train.steps=2")
  assert commands[-1].startswith("+ python3 -m gru_mem.sweep_summary")
  assert not (tmp_path / "sw").exists()
  bad = subprocess.run(["bash", "launch/sweep_alpha.sh", "configs/tiny.py", "x",
                        "--config.rl.alpha=0.3"], cwd=REPO, env=env, capture_output=True,
                       text=True)
  assert bad.returncode == 2 and "set by the sweep" in bad.stderr


def write_metrics(folder, rows):
  os.makedirs(folder)
  with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def test_summary_averages_last_steps(tmp_path):
  write_metrics(tmp_path / "alpha_1.0", [{"step": 1, "reward/outcome": 0.0},
                                         {"step": 2, "reward/outcome": 0.5}])
  write_metrics(tmp_path / "alpha_0.5", [{"step": 1, "reward/outcome": 0.2, "learner/loss": 1.0},
                                         {"step": 2, "reward/outcome": 0.4, "learner/loss": 3.0},
                                         {"step": 3, "reward/outcome": "nan"}])
  os.makedirs(tmp_path / "notes")  # not a run folder
  rows = sweep_summary.summarize(str(tmp_path), last=2)
  assert [r["alpha"] for r in rows] == [0.5, 1.0]
  assert [r["steps"] for r in rows] == [3, 2]
  assert rows[0]["reward/outcome"] == pytest.approx(0.4)  # nan at step 3 is skipped
  assert rows[0]["learner/loss"] == pytest.approx(3.0)
  assert rows[1]["reward/outcome"] == pytest.approx(0.25)
  assert rows[1]["learner/loss"] is None
  table = sweep_summary.write_summary(str(tmp_path), last=2)
  assert table.splitlines()[2].startswith("| 0.5 | 3 |")
  assert "| - |" in table.splitlines()[3]
  assert json.loads((tmp_path / "summary.json").read_text())["rows"][1]["alpha"] == 1.0
  with pytest.raises(FileNotFoundError, match="no <key>_<value>"):
    sweep_summary.summarize(str(tmp_path / "notes"))


def test_alpha_sweep_trains_tiny_config_and_summarises(tmp_path):
  sweep = tmp_path / "sweep"
  env = stubbed_env(tmp_path, PYTHON=sys.executable, JAX_PLATFORMS="cpu",
                    TF_CPP_MIN_LOG_LEVEL="3")
  out = run_script(["launch/sweep_alpha.sh", "configs/tiny.py", str(sweep), *TINY_OVERRIDES],
                   env, timeout=900)
  summary = json.loads((sweep / "summary.json").read_text())
  assert [row["alpha"] for row in summary["rows"]] == [0.5, 0.7, 0.9, 1.0]
  for row in summary["rows"]:
    alpha_dir = sweep / f"alpha_{row['alpha']}"
    last = [json.loads(line) for line in (alpha_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["steps"] == last["step"] == 2
    for key in ("reward/trajectory", "learner/loss", "agent/chunks_read"):
      assert row[key] == pytest.approx(float(last[key])), key
    metadata = {"experiment": run_folder.read_run(str(alpha_dir)).experiment}
    assert metadata["experiment"]["rl"]["alpha"] == row["alpha"]  # the override reached the run
  assert (sweep / "summary.md").read_text().count("\n| ") == 5  # header + 4 alphas
  assert "| 0.9 | 2 |" in out  # the table is printed at the end
  assert_nothing_called(tmp_path)
