"""infer: answer_question in every mode, a scripted exit, the command line, early input errors."""

import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from configs import tiny
from gru_mem import checkpoint, export_hf, gates, infer, run_folder
from gru_mem.agent import parse
from gru_mem.data import synthetic
from gru_mem.model import hf
from test_export_hf import write_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK_TOKENS = 64
SMALL = dict(chunk_tokens=CHUNK_TOKENS, memory_tokens=16, max_response_tokens=12,
             max_answer_tokens=8)
SMALL_FLAGS = [f"--{name}={value}" for name, value in SMALL.items()]
MISSING_MODEL = "/nonexistent/model"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A random tiny run (steps 1 and 2), its step-2 HF export and a ~400-token needle document."""
  workdir = str(tmp_path_factory.mktemp("run"))
  model_config, params_by_step, tokenizer = write_run(workdir)
  export_dir, _ = export_hf.export(workdir, str(tmp_path_factory.mktemp("export") / "hf"))
  example = synthetic.generate("niah_single_1", 400, tokenizer)
  document_path = tmp_path_factory.mktemp("docs") / "doc.txt"
  document_path.write_text(example.document, encoding="utf-8")
  return types.SimpleNamespace(workdir=workdir, model_config=model_config,
                               params=params_by_step[2], tokenizer=tokenizer, export=export_dir,
                               example=example, document_path=str(document_path))


@pytest.mark.parametrize("mode", ["memagent", "gru_mem", "gru_mem_no_exit"])
def test_answer_question_in_every_mode(run, mode):
  traced = []
  result = infer.answer_question(run.model_config, run.params, run.tokenizer,
                                 run.example.document, run.example.question, mode,
                                 trace_fn=traced.append, **SMALL)
  expected_chunks = -(-len(run.tokenizer.encode(run.example.document)) // CHUNK_TOKENS)
  assert result["num_chunks"] == expected_chunks == 7
  assert result["answer"] is None or isinstance(result["answer"], str)
  if mode != "gru_mem" or not result["said_end"]:
    assert result["chunks_read"] == result["num_chunks"]
  assert [r["chunk_index"] for r in traced] == list(range(result["chunks_read"]))
  assert traced == result["turns"]
  for record in traced:
    assert record["num_chunks"] == 7
    assert record["memory_tokens"] <= SMALL["memory_tokens"]
    if mode == "memagent":
      assert record["update_gate"] is None and record["exit_gate"] is None
    else:
      assert record["update_gate"] in ("yes", "no", "invalid")
      assert record["exit_gate"] in ("continue", "end", "invalid")
  assert result["seconds"] > 0


class ScriptedPolicy:
  """Answers memory turns from `script` (one (update, memory, exit) per call, the last repeated),
  then the answer turn with `\\boxed{42}`; keeps every prompt it saw."""

  def __init__(self, tokenizer, script):
    self.tokenizer, self.script, self.prompts = tokenizer, script, []

  def __call__(self, prompt_ids, rng, max_new_tokens):
    assert len(prompt_ids) == 1
    prompt = self.tokenizer.decode(prompt_ids[0])
    if "current section:" in prompt:
      turn = sum("current section:" in p for p in self.prompts)
      update, memory, exit_gate = self.script[min(turn, len(self.script) - 1)]
      text = parse.format_response("thinking", update, memory, exit_gate)
    else:
      text = "the number is \\boxed{42}"
    self.prompts.append(prompt)
    ids = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
    return types.SimpleNamespace(row=lambda i: ids, logprobs=np.zeros((1, len(ids)), np.float32))


SCRIPT = [(gates.UPDATE_YES, "fact one", gates.EXIT_CONTINUE),
          (gates.UPDATE_NO, "junk", gates.EXIT_CONTINUE),
          (gates.UPDATE_YES, "fact one and two", gates.EXIT_END),
          (gates.UPDATE_NO, "junk", gates.EXIT_CONTINUE)]


def test_exit_gate_stops_reading_and_memory_follows_the_update_gate(run):
  policy = ScriptedPolicy(run.tokenizer, SCRIPT)
  traced = []
  result = infer.answer_question(run.model_config, None, run.tokenizer, run.example.document,
                                 run.example.question, "gru_mem", trace_fn=traced.append,
                                 policy=policy, **SMALL)
  assert (result["answer"], result["chunks_read"], result["num_chunks"]) == ("42", 3, 7)
  assert result["said_end"]
  assert [r["memory"] for r in traced] == ["fact one", "fact one", "fact one and two"]
  assert [r["update_gate"] for r in traced] == ["yes", "no", "yes"]
  assert [r["exit_gate"] for r in traced] == ["continue", "continue", "end"]
  assert all(r["format_ok"] for r in traced)
  # Turn t's prompt holds chunk t's text; the answer prompt holds the final memory.
  ids = np.asarray(run.tokenizer.encode(run.example.document))
  for t in range(3):
    chunk_text = run.tokenizer.decode(ids[t * CHUNK_TOKENS:(t + 1) * CHUNK_TOKENS]).strip()
    assert chunk_text in policy.prompts[t]
  assert "fact one and two" in policy.prompts[3] and "current section:" not in policy.prompts[3]

  no_exit = infer.answer_question(run.model_config, None, run.tokenizer, run.example.document,
                                  run.example.question, "gru_mem_no_exit",
                                  policy=ScriptedPolicy(run.tokenizer, SCRIPT), **SMALL)
  assert (no_exit["chunks_read"], no_exit["said_end"]) == (7, False)
  assert no_exit["turns"][-1]["memory"] == "fact one and two"


def test_command_line_traces_every_turn(run):
  expected = infer.answer_question(run.model_config, run.params, run.tokenizer,
                                   run.example.document, run.example.question, "gru_mem", **SMALL)
  proc = subprocess.run(
      [sys.executable, "-m", "gru_mem.infer", f"--hf_model={run.export}",
       f"--document={run.document_path}", f"--question={run.example.question}", "--trace",
       *SMALL_FLAGS], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  trace = [line for line in lines if line.startswith("[turn]")]
  # The HF export gives the same greedy turns as the run's params in this process.
  assert trace == [infer.format_trace_line(r) for r in expected["turns"]]
  assert len(trace) == expected["chunks_read"]
  answer = expected["answer"] if expected["answer"] is not None else "(none: no \\boxed{} answer)"
  assert lines[-3] == f"answer: {answer}"
  assert lines[-2] == f"chunks read: {expected['chunks_read']} of 7"
  assert lines[-1].startswith("wall time: ") and lines[-1].endswith(" s")


def _prepare(document_path, question="what is the number?", hf_model=MISSING_MODEL,
             workdir=None, **kwargs):
  return infer.prepare(hf_model, workdir, None, str(document_path), question, **kwargs)


def test_bad_inputs_fail_before_any_model_is_read(run, tmp_path, monkeypatch):
  def no_loading(*args, **kwargs):
    raise AssertionError("weights were read")
  monkeypatch.setattr(hf, "load_hf_checkpoint", no_loading)
  monkeypatch.setattr(run_folder, "load_params", no_loading)
  monkeypatch.setattr(checkpoint.CheckpointManager, "restore_params", no_loading)
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("café ok ".encode("utf-8") + b"\xff rest")
  with pytest.raises(ValueError, match=rf"--document {latin1} is not UTF-8 text: the byte at "
                                       r"offset 9 \(0xff\) is invalid"):
    _prepare(latin1)
  with pytest.raises(FileNotFoundError, match="--document .*missing.txt: no such file"):
    _prepare(tmp_path / "missing.txt")
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty.txt is empty \(0 bytes\)"):
    _prepare(tmp_path / "empty.txt")
  (tmp_path / "blank.txt").write_text(" \n\t\n")
  with pytest.raises(ValueError, match="blank.txt holds only whitespace"):
    _prepare(tmp_path / "blank.txt")
  with pytest.raises(ValueError, match="is a folder"):
    _prepare(tmp_path)
  good = run.document_path
  with pytest.raises(ValueError, match=r"--mode='fast': use one of"):
    _prepare(good, mode="fast")
  with pytest.raises(ValueError, match="exactly one of --hf_model DIR or --workdir DIR"):
    _prepare(good, hf_model=None)
  with pytest.raises(ValueError, match="exactly one of --hf_model DIR or --workdir DIR"):
    _prepare(good, workdir=run.workdir)
  with pytest.raises(ValueError, match="--question is empty"):
    _prepare(good, question="  ")
  with pytest.raises(ValueError, match="--chunk_tokens=0: must be an integer >= 1"):
    _prepare(good, chunk_tokens=0)
  with pytest.raises(ValueError, match="--step picks a checkpoint of --workdir"):
    infer.prepare(run.export, None, 1, good, "what?")
  # Every input check passes: only now is the (missing) model folder looked at.
  with pytest.raises(FileNotFoundError, match="/nonexistent/model"):
    _prepare(good)
  # Over budget (the tiny model has 4096 positions): needs the tokenizer, never the weights.
  long_question = "what is the number " * 1000
  agent = tiny.get_config().agent  # write_run's config
  with pytest.raises(ValueError, match=rf"needs up to \d+ prompt tokens \(question \d+ \+ memory "
                                       rf"{agent.memory_tokens} \+ chunk {agent.chunk_tokens} .* "
                                       r"the model allows 4096"):
    _prepare(good, question=long_question, hf_model=None, workdir=run.workdir)
  with pytest.raises(ValueError, match=r"chunk 4096 .* the model allows 4096"):
    _prepare(good, hf_model=run.export, chunk_tokens=4096)
  request = _prepare(good, hf_model=None, workdir=run.workdir)  # the run's agent settings
  assert request.agent == {"mode": agent.mode, "chunk_tokens": agent.chunk_tokens,
                           "memory_tokens": agent.memory_tokens,
                           "max_response_tokens": agent.max_response_tokens,
                           "max_answer_tokens": agent.max_answer_tokens,
                           "prompt": agent.prompt, "prompt_file": agent.prompt_file}
  assert request.document_text == run.example.document
  # answer_question checks its budget before tokenizing or compiling (params=None never used).
  with pytest.raises(ValueError, match="the model allows 4096"):
    infer.answer_question(run.model_config, None, run.tokenizer, "doc", long_question, **SMALL)


def test_command_line_input_errors_exit_early(run, tmp_path):
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes(b"abc\xe9def")
  cases = [
      ([f"--hf_model={MISSING_MODEL}", f"--document={latin1}"],
       f"error: --document {latin1} is not UTF-8 text: the byte at offset 3 (0xe9)"),
      ([f"--hf_model={run.export}", f"--workdir={run.workdir}", f"--document={run.document_path}"],
       "error: give exactly one of --hf_model DIR or --workdir DIR"),
  ]
  for args, message in cases:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gru_mem.infer", "--question=what?", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
    print(f"{message[:40]}...: exited after {time.perf_counter() - start:.1f} s")
