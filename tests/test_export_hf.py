"""export_hf: a run's checkpoint, loaded back by transformers, gives our logits and token ids."""

import os
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from configs import tiny
from gru_mem import checkpoint, export_hf, run_folder, runtime
from gru_mem.data.tokenizer import builtin_tokenizer
from gru_mem.model import transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_TEXT = ("the special magic number for amber falcon is 4827163.\n\nwhat is the special magic "
               "number for amber falcon? Ünïcödé 東京 <check>yes</check>")


def write_run(workdir: str, steps=(1, 2)):
  """A training run folder as train.py lays it out (tiny preset, built-in tokenizer), with
  different random params at each step; biases and norms perturbed so a mis-mapping shows."""
  config = tiny.get_config()
  tokenizer = builtin_tokenizer()
  model_config = runtime.model_config_from(config, tokenizer)
  params_by_step = {}
  with checkpoint.CheckpointManager(workdir, save_every=1, keep=None) as manager:
    for step in steps:
      params = transformer.init_params(model_config, jax.random.PRNGKey(step))
      leaves, treedef = jax.tree.flatten(params)
      noise = jax.random.split(jax.random.PRNGKey(100 + step), len(leaves))
      params = jax.tree.unflatten(treedef, [
          np.asarray(x + 0.05 * jax.random.normal(k, x.shape, x.dtype))
          for x, k in zip(leaves, noise)])
      params_by_step[step] = params
      manager.save(step, {"params": params, "step": np.int32(step)}, {"examples_consumed": step},
                   runtime.run_metadata(config, model_config), force=True)
  tokenizer.save(os.path.join(workdir, run_folder.TOKENIZER_DIR))
  return model_config, params_by_step, tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  model_config, params_by_step, tokenizer = write_run(workdir)
  return types.SimpleNamespace(workdir=workdir, model_config=model_config,
                               params=params_by_step, tokenizer=tokenizer)


def our_logits(model_config, params, ids):
  logits, _ = transformer.forward(model_config, jax.tree.map(jax.numpy.asarray, params),
                                  jax.numpy.asarray([ids], jax.numpy.int32))
  return np.asarray(logits[0])


def hf_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def test_export_loads_in_transformers_with_our_logits_and_ids(run, tmp_path):
  folder, step = export_hf.export(run.workdir, str(tmp_path / "hf"))
  assert step == 2  # the latest
  for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
    assert os.path.isfile(os.path.join(folder, name)), name

  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  ids = run.tokenizer.encode(SAMPLE_TEXT)
  assert list(hf_tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False)) == ids
  assert hf_tokenizer.decode(ids) == SAMPLE_TEXT

  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  reference = hf_logits(model, ids)
  np.testing.assert_allclose(our_logits(run.model_config, run.params[2], ids), reference,
                             atol=1e-5, rtol=0)
  # Step 1's params give different logits: the test can tell the steps apart.
  assert np.abs(our_logits(run.model_config, run.params[1], ids) - reference).max() > 1e-2


def test_step_picks_that_checkpoint(run, tmp_path):
  folder, step = export_hf.export(run.workdir, str(tmp_path / "hf1"), step=1)
  assert step == 1
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  ids = run.tokenizer.encode(SAMPLE_TEXT)
  np.testing.assert_allclose(our_logits(run.model_config, run.params[1], ids),
                             hf_logits(model, ids), atol=1e-5, rtol=0)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7; available: \[1, 2\]"):
    export_hf.export(run.workdir, str(tmp_path / "hf7"), step=7)


def test_bfloat16_export(run, tmp_path):
  folder, _ = export_hf.export(run.workdir, str(tmp_path / "bf16"), dtype="bfloat16")
  with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
    assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
  assert model.dtype == torch.bfloat16
  assert model.config.dtype == torch.bfloat16
  # The bf16 weights are ours rounded to bf16: upcast, they give exactly our logits with rounded
  # params; run in bf16, the same up to bf16 arithmetic (|logits| ~1.5, bf16 spacing ~0.008).
  ids = run.tokenizer.encode(SAMPLE_TEXT)
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16).astype(np.float32),
                         run.params[2])
  ours = our_logits(run.model_config, rounded, ids)
  np.testing.assert_allclose(hf_logits(model, ids), ours, atol=0.05, rtol=0)
  np.testing.assert_allclose(hf_logits(model.float(), ids), ours, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match=r"--dtype='float16': use one of \('float32', 'bfloat16'\)"):
    export_hf.export(run.workdir, str(tmp_path / "fp16"), dtype="float16")


def test_out_folder_rules(run, tmp_path):
  precious = tmp_path / "precious"
  precious.mkdir()
  (precious / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match="not an HF export: .* --overwrite"):
    export_hf.export(run.workdir, str(precious))
  assert (precious / "notes.txt").read_text() == "keep me"
  export_hf.export(run.workdir, str(precious), step=1, overwrite=True)
  assert not (precious / "notes.txt").exists()
  export_hf.export(run.workdir, str(precious), step=2)  # an earlier export: replaced freely
  assert export_hf.is_hf_export(str(precious))
  (tmp_path / "empty").mkdir()
  export_hf.export(run.workdir, str(tmp_path / "empty"))
  for out in (run.workdir, os.path.dirname(run.workdir)):
    with pytest.raises(ValueError, match="would replace the run"):
      export_hf.export(run.workdir, out, overwrite=True)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="is a file"):
    export_hf.export(run.workdir, str(tmp_path / "file"), overwrite=True)
  with pytest.raises(FileNotFoundError, match="has no checkpoints/ folder"):
    export_hf.export(str(tmp_path), str(tmp_path / "x"))


def test_command_line(run, tmp_path):
  out = tmp_path / "cli"
  start = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "gru_mem.export_hf", f"--workdir={run.workdir}", "--step=1",
       f"--out={out}", "--dtype=bfloat16"], cwd=REPO, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"exported step 1 of {run.workdir} (bfloat16) to {out}" in proc.stdout
  assert export_hf.is_hf_export(str(out))
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "a").write_text("a")
  proc = subprocess.run(
      [sys.executable, "-m", "gru_mem.export_hf", f"--workdir={run.workdir}",
       f"--out={tmp_path / 'busy'}"], cwd=REPO, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 1
  assert "error: --out" in proc.stderr and "Traceback" not in proc.stderr
  print(f"two export_hf subprocesses: {time.perf_counter() - start:.1f} s")
