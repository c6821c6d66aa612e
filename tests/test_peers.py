"""benchmarks/peers.py: the random HF Qwen2 it writes decodes non-degenerately (and the same in
transformers and gru_mem), its summary's ratios are right on a hand-made input, its venv pins agree
with setup.py and tunix 0.1.7, a failed venv install is reported and cleaned up, an existing venv
is checked against the pins, and (where the tunix venv exists: GRU_MEM_PEERS_VENV, else
peers.DEFAULT_VENV) its --smoke run measures both sides in one process with equal learner losses."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import peers  # noqa: E402

TUNIX_VENV = os.environ.get("GRU_MEM_PEERS_VENV", peers.DEFAULT_VENV)


def test_written_model_is_not_degenerate_and_decodes_like_transformers(tmp_path):
  import transformers

  from gru_mem import sampling
  from gru_mem.model import hf
  check = peers.write_hf_model(str(tmp_path), peers.SMOKE_MODEL, rows=4, prompt=8, new_tokens=16)
  scale = str(check["layer_weight_scale"])
  assert check["distinct_fraction_by_scale"][scale] >= peers.MIN_DISTINCT_FRACTION
  # the unscaled model is the degenerate one the scaling is there for
  assert check["distinct_fraction_by_scale"]["1.0"] < peers.MIN_DISTINCT_FRACTION
  model = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path)).eval()
  biases = model.model.layers[0].self_attn.q_proj.bias.detach().numpy()
  assert np.abs(biases).min() > 0 and 0.05 < biases.std() < 0.2
  prompts = np.random.RandomState(1).randint(1, peers.SMOKE_MODEL["vocab_size"], (4, 8)).tolist()
  theirs = peers.greedy_rows(model, prompts, 16)
  assert peers.distinct_fraction(theirs) >= peers.MIN_DISTINCT_FRACTION
  config, params = hf.load_hf_checkpoint(str(tmp_path))
  ours = sampling.generate(config, params, prompts, 0, sampling.SamplingSettings(
      max_new_tokens=16, temperature=0.0, batch_buckets=(4,))).tokens
  assert (ours == theirs).mean() > 0.9


def test_summary_ratios_on_a_hand_made_input():
  raw = {"decode": {"16": {"times_s": {"ours": [1.0, 2.0, 1.0], "tunix": [2.0, 2.0, 3.0]},
                           "tokens_per_call": 100, "agreement": {"token_fraction": 1.0}}},
         "agent": {"times_s": {"ours": [2.0, 4.0], "tunix": [8.0, 8.0]}, "rows": 256,
                   "greedy_rows_equal_fraction": 0.5},
         "learner": {"times_s": {"ours": [1.0], "tunix": [1.5]}, "rows": 2, "prompt": 3,
                     "response": 1, "first_step": {}}}
  out = peers.summarise(raw)
  decode = out["decode"]["16"]
  assert decode["ours_over_tunix"]["per_repeat"] == [2.0, 1.0, 3.0]
  assert decode["ours_over_tunix"]["median"] == 2.0
  assert decode["ours_tokens_per_s"] == 100.0 and decode["tunix_tokens_per_s"] == 50.0
  assert out["agent"]["ours_over_tunix"]["median"] == 3.0  # median of 4 and 2
  assert out["agent"]["ours_rows_per_s"] == 256 / 3.0 and out["agent"]["tunix_rows_per_s"] == 32
  assert out["learner"]["ours_over_tunix"]["median"] == 1.5
  assert out["learner"]["ours_tokens_per_s"] == 8.0


def test_venv_pins_are_gru_mem_pins_and_fit_tunix():
  pins = peers.pinned_versions()
  with open(os.path.join(REPO, "setup.py")) as f:
    ours = {n.lower(): v for n, v in re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', f.read())}
  for shared in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections"):
    assert pins[shared] == ours[shared], shared  # the measured gru_mem runs on its own pins
  assert pins["google-tunix"] == "0.1.7"
  # tunix 0.1.7's own requirements: safetensors<0.8, flax>=0.11.1, orbax-checkpoint>=0.12.0
  version = lambda v: tuple(int(x) for x in v.split("."))
  assert version(pins["safetensors"]) < (0, 8)
  assert version(pins["flax"]) >= (0, 11, 1) and version(pins["orbax-checkpoint"]) >= (0, 12)


def test_pinned_versions_rejects_an_unpinned_line(tmp_path):
  path = tmp_path / "req.txt"
  path.write_text("# comment\njax==0.10.2  # pinned\nflax>=0.11\n")
  with pytest.raises(ValueError, match="'flax>=0.11' is not pinned"):
    peers.pinned_versions(str(path))
  path.write_text("Orbax_Checkpoint==0.12.8\n")
  assert peers.pinned_versions(str(path)) == {"orbax-checkpoint": "0.12.8"}


def test_venv_mismatches_names_wrong_and_missing_versions():
  pins = {"numpy": np.__version__, "pytest": "0.0.1", "surely-no-such-package-here": "1.0"}
  assert peers.venv_mismatches(sys.executable, pins) == [
      f"pytest==0.0.1 (have {pytest.__version__})", "surely-no-such-package-here==1.0 (missing)"]
  assert peers.venv_mismatches(sys.executable, {"ml-collections": "1.1.0"}) == []


def test_a_failed_install_is_reported_and_the_half_made_venv_removed(tmp_path, monkeypatch):
  venv = tmp_path / "venv"
  calls = []

  def fake_run(command, check):
    calls.append(command)
    if command[1:3] == ["-m", "venv"]:  # python -m venv DIR: leaves a python behind
      (venv / "bin").mkdir(parents=True)
      (venv / "bin" / "python").write_text("")
      return subprocess.CompletedProcess(command, 0)
    raise subprocess.CalledProcessError(1, command)  # pip install fails

  monkeypatch.setattr(peers.subprocess, "run", fake_run)
  with pytest.raises(SystemExit, match=r"pip could not install .*peers_requirements.txt.* removed"):
    peers.ensure_venv(str(venv))
  assert calls[1][1:] == ["-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                          peers.REQUIREMENTS]
  assert not venv.exists()  # the next run makes it again instead of using a broken one
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "file").write_text("")
  with pytest.raises(SystemExit, match="holds no bin/python"):
    peers.ensure_venv(str(tmp_path / "other"))


def test_an_existing_venv_without_the_pins_is_refused(tmp_path):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  python = venv / "bin" / "python"  # gru_mem's own env: safetensors 0.8, no tunix
  python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
  python.chmod(0o755)
  with pytest.raises(SystemExit, match=r"google-tunix==0.1.7 \(missing\).*safetensors==0.7.0 "
                                       r"\(have 0.8.0\).*pip install -r"):
    peers.ensure_venv(str(venv))


@pytest.mark.skipif(not os.path.exists(os.path.join(TUNIX_VENV, "bin", "python")),
                    reason=f"no tunix venv at {TUNIX_VENV} (make it with `python "
                           f"benchmarks/peers.py --venv {TUNIX_VENV} --setup_only`, or point "
                           "GRU_MEM_PEERS_VENV at one)")
def test_smoke_run_in_the_tunix_venv(tmp_path):
  proc = subprocess.run(
      [sys.executable, "benchmarks/peers.py", "--smoke", "--repeats", "1", "--venv", TUNIX_VENV,
       "--out_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  with open(tmp_path / "peers_smoke.json") as f:
    figures = json.load(f)
  for part in figures["decode"].values():
    assert part["agreement"]["token_fraction"] > 0.9
    assert part["ours_tokens_per_s"] > 0 and part["tunix_tokens_per_s"] > 0
  assert figures["agent"]["greedy_rows_equal_fraction"] > 0.9
  first = figures["learner"]["first_step"]
  assert first["ours"]["loss"] == pytest.approx(first["tunix"]["loss"], rel=1e-4)
  assert first["ours"]["grad_norm"] == pytest.approx(first["tunix"]["grad_norm"], rel=1e-4)
  assert figures["raw"]["child_versions"]["google-tunix"] == "0.1.7"
  assert figures["protocol"]["repeats_alternate_within_one_process"]
