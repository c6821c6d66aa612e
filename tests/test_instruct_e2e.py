"""End to end as a user with a local instruct model: a random small Qwen2 saved with the real
Qwen2 tokenizer, the 3B paper config (small overrides) trained 2 RL steps on the real HotpotQA
sample with the paper prompts, exported with export_hf, evaluated on a MemAgent-format eval file
made from the same sample (the evaluate command line), then asked a question with infer."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, tiny_hf_model

OVERRIDES = ["--config.mesh.fsdp=1", "--config.agent.chunk_tokens=96",
             "--config.agent.memory_tokens=8", "--config.agent.max_response_tokens=6",
             "--config.agent.max_answer_tokens=6", "--config.sampling.prefill_chunk_tokens=256",
             "--config.sampling.max_batch_rows=4", "--config.sampling.slots=0",
             # one CPU device: the rollout samples with the learner's params and mesh
             "--config.sampling.mesh.data=0", "--config.sampling.mesh.tensor=0",
             "--config.sampling.param_dtype=auto"]


def paper_config(model_dir: str, hotpot_path: str):
  path = os.path.join(REPO, "configs", "qwen2p5_3b_hotpotqa.py")
  spec = importlib.util.spec_from_file_location("paper_3b", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("h100x8")
  c.model.hf_path = model_dir
  c.data.hotpotqa_path = hotpot_path
  c.data.num_documents = 2
  for flag in OVERRIDES:  # the same overrides as the command lines below
    key, value = flag.removeprefix("--config.").split("=")
    *sections, name = key.split(".")
    node = c
    for section in sections:
      node = node[section]
    node[name] = type(node[name])(value)
  c.rl.group_size, c.rl.prompts_per_step, c.rl.dynamic_sampling = 2, 1, False
  c.rl.kl_beta, c.rl.compute_entropy = 0.0, False  # fewer programs to compile
  c.optim.micro_batch_rows = 4
  c.train.steps, c.train.save_every = 2, 2
  return c


def run_cli(args, timeout=300):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_a_user_with_a_local_instruct_model(sample_data, tmp_path):
  import time
  start = time.perf_counter()
  lap = lambda what: print(f"{what}: {time.perf_counter() - start:.1f} s", flush=True)  # noqa
  from gru_mem import export_hf, settings, train
  from gru_mem.data import hotpotqa
  from gru_mem.data.tokenizer import load_tokenizer
  tokenizer_dir = os.path.join(sample_data, "qwen2_tokenizer")
  hotpot_path = os.path.join(sample_data, "hotpotqa_dev_sample.json")
  qwen2 = load_tokenizer(tokenizer_dir)
  model_dir = str(tmp_path / "instruct")
  tiny_hf_model(vocab_size=-(-qwen2.vocab_size // 64) * 64, num_hidden_layers=1,
                max_position_embeddings=2048).save_pretrained(model_dir)
  shutil.copytree(tokenizer_dir, model_dir, dirs_exist_ok=True)

  lap("model saved")
  config = paper_config(model_dir, hotpot_path)
  assert settings.prompt_set(config, qwen2).name == "paper"
  workdir = str(tmp_path / "run")
  metrics = train.train(config, workdir)
  assert metrics["data/prompts_drawn"] == 1 and "learner/loss" in metrics
  lap("trained")
  exported, step = export_hf.export(workdir, str(tmp_path / "export"))
  assert step == 2

  lap("exported")
  examples = list(hotpotqa.hotpotqa_examples(hotpot_path, num_docs=2, seed=5, limit=2))
  eval_file = tmp_path / "eval_2.json"
  eval_file.write_text(json.dumps([{"context": e.document, "input": e.question,
                                    "answers": list(e.answers), "num_docs": 2, "index": i}
                                   for i, e in enumerate(examples)]))
  out = tmp_path / "eval"
  run_cli(["gru_mem.evaluate", f"--hf_model={exported}", "--config.eval.tasks=memagent",
           f"--config.data.memagent_path={eval_file}", f"--out={out}",
           f"--config.data.hotpotqa_path={hotpot_path}", "--config.eval.modes=gru_mem",
           "--config.eval.batch_size=2", "--config.eval.examples=2",
           "--config.eval.baseline_modes=", *OVERRIDES[1:]])
  lap("evaluated")
  results = json.load(open(out / "results.json"))
  (cell,) = results["cells"]
  assert (cell["task"], cell["length"], cell["examples"]) == ("memagent", 0, 2)
  assert cell["examples_with_evidence"] == 2  # recovered through the HotpotQA file
  assert {"sub_exact_match", "exact_match", "f1"} <= set(cell)

  document = tmp_path / "doc.txt"
  document.write_text(examples[0].document)
  stdout = run_cli(["gru_mem.infer", f"--hf_model={exported}", f"--document={document}",
                    f"--question={examples[0].question}", "--chunk_tokens=96",
                    "--memory_tokens=8", "--max_response_tokens=6", "--max_answer_tokens=6"])
  lap("inferred")
  assert "answer:" in stdout and "chunks read:" in stdout
