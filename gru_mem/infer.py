r"""Answer one question about a text file of any length with the memory agent.

  python -m gru_mem.infer --hf_model exports/tiny --document book.txt --question "who ..." --trace
  python -m gru_mem.infer --workdir runs/tiny [--step 20] --document book.txt --question "..."

The document is read and tokenized once and cut into chunks of `--chunk_tokens`; the agent reads
them in order, keeping a memory of at most `--memory_tokens` tokens, and (mode `gru_mem`) stops
as soon as its exit gate says `end`; then it answers from the question and its final memory.
Decoding is greedy unless `--temperature` > 0. `--trace` prints every memory turn as it happens.

Settings left unset come from the run's config (`--workdir`), else from the paper's defaults
(chunk 5000, memory 1024 tokens). Bad input (document, question, mode, model flags, token
budget) fails with a message before any weights are read or anything is compiled.
"""

from __future__ import annotations

from gru_mem import console

console.quiet_startup(import_tensorflow=False)  # before the libraries below are imported

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from gru_mem import gates, run_folder, sampling, settings
from gru_mem.agent import modes
from gru_mem.agent.chunking import chunk_document
from gru_mem.agent.prompts import PromptBuilder, choose_prompt_set
from gru_mem.agent.rollout import (AgentExample, Policy, RolloutSettings, check_budget, rollout,
                                   sampler_policy)
from gru_mem.data.tokenizer import Tokenizer
from gru_mem.model.config import ModelConfig

# The agent settings a run's config may give; the defaults (the paper's values) fill the rest.
AGENT_DEFAULTS = settings.agent_defaults()

_UPDATE_NAMES = {value: word for word, value in gates.UPDATE_WORDS.items()}
_EXIT_NAMES = {value: word for word, value in gates.EXIT_WORDS.items()}


def read_document(path: str) -> str:
  """The UTF-8 text of `path` (a leading byte-order mark dropped); fails on a missing, empty or
  non-UTF-8 file, naming the file and, for bad UTF-8, the byte offset of the first bad byte."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--document {path}: no such file")
  if os.path.isdir(path):
    raise ValueError(f"--document {path} is a folder: give a text file")
  with open(path, "rb") as f:
    data = f.read()
  if not data:
    raise ValueError(f"--document {path} is empty (0 bytes): give a file holding the document")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    bad_byte = data[e.start]
    raise ValueError(
        f"--document {path} is not UTF-8 text: the byte at offset {e.start} (0x{bad_byte:02x}) "
        f"is invalid ({e.reason}); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8"
    ) from None
  del data
  text = text.removeprefix("\ufeff")
  if not text.strip():
    raise ValueError(f"--document {path} holds only whitespace: give a file holding the document")
  return text


def agent_settings(mode: str, chunk_tokens: int, memory_tokens: int, max_response_tokens: int,
                   max_answer_tokens: int) -> RolloutSettings:
  """One sample per question; checks the mode and that every size is >= 1."""
  modes.check_mode(mode, "--mode")
  if int(chunk_tokens) != chunk_tokens or chunk_tokens < 1:
    raise ValueError(f"--chunk_tokens={chunk_tokens}: must be an integer >= 1")
  return RolloutSettings(mode=mode, memory_tokens=memory_tokens,
                         max_response_tokens=max_response_tokens,
                         max_answer_tokens=max_answer_tokens, samples_per_example=1)


def question_ids_within_budget(builder: PromptBuilder, question: str, settings: RolloutSettings,
                               chunk_tokens: int, max_position_embeddings: int) -> np.ndarray:
  """The question's ids, after checking that a memory turn fits the model:
  question + memory + chunk + template <= max_position_embeddings.  int32 [question_tokens]"""
  question = question.strip()
  if not question:
    raise ValueError("--question is empty: ask a question about the document")
  question_ids = np.asarray(builder.tokenizer.encode(question), np.int32)
  example = AgentExample(question_ids, chunks=None, example_id="question")
  check_budget(builder, example, settings, chunk_tokens, max_position_embeddings)
  return question_ids


def turn_record(turn, memory_text: str, num_chunks: int, gated: bool, tokenizer: Tokenizer) -> dict:
  """What --trace shows of one memory turn (gates as words; None in memagent, which has none)."""
  return {
      "chunk_index": int(turn.chunk_index),
      "num_chunks": int(num_chunks),
      "update_gate": _UPDATE_NAMES.get(turn.update_gate, "invalid") if gated else None,
      "exit_gate": _EXIT_NAMES.get(turn.exit_gate, "invalid") if gated else None,
      "format_ok": bool(turn.format_ok),
      "memory": memory_text,
      "memory_tokens": int(turn.memory_length),
      "response": tokenizer.decode(turn.response_ids),
  }


def answer_question(model_config: ModelConfig, params: Any, tokenizer: Tokenizer,
                    document_text: str, question: str, mode: str = "gru_mem",
                    chunk_tokens: int = AGENT_DEFAULTS["chunk_tokens"],
                    memory_tokens: int = AGENT_DEFAULTS["memory_tokens"],
                    max_response_tokens: int = AGENT_DEFAULTS["max_response_tokens"],
                    max_answer_tokens: int = AGENT_DEFAULTS["max_answer_tokens"],
                    prompt: str = "auto", prompt_file: str = "", temperature: float = 0.0,
                    top_p: float = 1.0, seed: int = 0,
                    trace_fn: Optional[Callable[[dict], None]] = None,
                    policy: Optional[Policy] = None,
                    progress_fn: Optional[Callable[[int, int], None]] = None) -> dict:
  """Reads `document_text` chunk by chunk and answers `question`.

  Returns {answer (the last \\boxed{} of the answer turn, None when absent), chunks_read,
  num_chunks, said_end (the exit gate stopped reading), seconds (wall time, tokenizing
  included), turns (one `turn_record` per chunk read), answer_response (the answer turn's text)}.
  `trace_fn(record)` is called after each memory turn, `progress_fn(chunks_read, num_chunks)`
  once the document is chunked and after each memory turn. `policy` replaces the model's sampler
  (tests script responses with it). Settings and budget are checked before the document is
  tokenized or anything is compiled.
  """
  start = time.perf_counter()
  settings = agent_settings(mode, chunk_tokens, memory_tokens, max_response_tokens,
                            max_answer_tokens)
  builder = PromptBuilder(tokenizer, mode, choose_prompt_set(tokenizer, prompt, prompt_file))
  question_ids = question_ids_within_budget(builder, question, settings, chunk_tokens,
                                            model_config.max_position_embeddings)
  if not document_text.strip():
    raise ValueError("the document holds only whitespace: give a non-empty document")
  if policy is None:
    sample_settings = sampling.SamplingSettings(
        max_new_tokens=settings.max_response_tokens, temperature=temperature, top_p=top_p,
        eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
    policy = sampler_policy(model_config, params, sample_settings)
  chunks = chunk_document(document_text, tokenizer, chunk_tokens)  # the one tokenization
  if progress_fn is not None:
    progress_fn(0, chunks.num_chunks)
  example = AgentExample(question_ids, chunks, example_id="document")
  turns: list[dict] = []

  def on_turn(row, step, turn, memory_text):
    del row, step
    record = turn_record(turn, memory_text, chunks.num_chunks, settings.gated, tokenizer)
    turns.append(record)
    if trace_fn is not None:
      trace_fn(record)
    if progress_fn is not None:
      progress_fn(len(turns), chunks.num_chunks)

  result = rollout(policy, builder, tokenizer, [example], jax.random.PRNGKey(seed), settings,
                   on_turn=on_turn)
  trajectory = result.trajectories[0]
  return {"answer": trajectory.answer, "chunks_read": trajectory.chunks_read,
          "num_chunks": chunks.num_chunks, "said_end": trajectory.said_end,
          "seconds": time.perf_counter() - start, "turns": turns,
          "answer_response": tokenizer.decode(trajectory.answer_turn.response_ids)}


def format_trace_line(record: dict) -> str:
  """One line per memory turn: chunk (1-based, of total), gates, format, memory."""
  gates_text = (f"update {record['update_gate']} | exit {record['exit_gate']}"
                if record["update_gate"] is not None else "update always | exit never")
  return (f"[turn] chunk {record['chunk_index'] + 1}/{record['num_chunks']} | {gates_text} | "
          f"format {'ok' if record['format_ok'] else 'bad'} | memory ({record['memory_tokens']} "
          f"tokens): {json.dumps(record['memory'], ensure_ascii=False)}")


def format_summary(result: dict) -> str:
  answer = result["answer"] if result["answer"] is not None else "(none: no \\boxed{} answer)"
  return (f"answer: {answer}\n"
          f"chunks read: {result['chunks_read']} of {result['num_chunks']}\n"
          f"wall time: {result['seconds']:.2f} s")


@dataclasses.dataclass
class Request:
  """A checked command line: the document text and the resolved agent settings."""
  document_text: str
  question: str
  agent: dict  # mode, chunk_tokens, memory_tokens, max_response_tokens, max_answer_tokens


def model_spec(hf_model: Optional[str], workdir: Optional[str], step: Optional[int]
               ) -> tuple[ModelConfig, Tokenizer, dict]:
  """(model config, tokenizer, the run's agent config or {}) without reading any weights."""
  from gru_mem.data.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  from gru_mem.model import hf  # pylint: disable=import-outside-toplevel
  from gru_mem.model.config import from_hf_config  # pylint: disable=import-outside-toplevel
  if hf_model:
    return from_hf_config(hf.read_hf_config(hf_model)), load_tokenizer(hf_model), {}
  info = run_folder.read_run(workdir, step)
  return info.model_config, info.tokenizer, dict(info.experiment.get("agent", {}))


def prepare(hf_model: Optional[str], workdir: Optional[str], step: Optional[int],
            document_path: str, question: str, **agent_flags: Optional[Any]) -> Request:
  """Checks the command line, cheapest first; reads no weights and compiles nothing.

  `agent_flags`: mode, chunk_tokens, memory_tokens, max_response_tokens, max_answer_tokens;
  None takes the run's value (--workdir), else AGENT_DEFAULTS. The prompt set (agent.prompt,
  agent.prompt_file) is always the run's: the model was trained on it.
  """
  if bool(hf_model) == bool(workdir):
    raise ValueError("give exactly one of --hf_model DIR or --workdir DIR")
  if hf_model and step is not None:
    raise ValueError("--step picks a checkpoint of --workdir: drop it with --hf_model")
  unknown = set(agent_flags) - set(AGENT_DEFAULTS)
  if unknown:
    raise TypeError(f"prepare: unknown settings {sorted(unknown)}")
  if agent_flags.get("mode") is not None:
    modes.check_mode(agent_flags["mode"], "--mode")
  for name, value in agent_flags.items():
    if name != "mode" and value is not None and (int(value) != value or value < 1):
      raise ValueError(f"--{name}={value}: must be an integer >= 1")
  if not document_path:
    raise ValueError("--document is required: the path of a UTF-8 text file")
  document_text = read_document(document_path)
  if not question or not question.strip():
    raise ValueError("--question is empty: ask a question about the document")
  model_config, tokenizer, run_agent = model_spec(hf_model, workdir, step)
  agent = {name: next(v for v in (agent_flags.get(name), run_agent.get(name), default)
                      if v is not None)
           for name, default in AGENT_DEFAULTS.items()}
  settings = agent_settings(**agent)
  agent.update(prompt=run_agent.get("prompt") or "auto",
               prompt_file=run_agent.get("prompt_file") or "")
  prompt_set = choose_prompt_set(tokenizer, agent["prompt"], agent["prompt_file"])
  question_ids_within_budget(PromptBuilder(tokenizer, agent["mode"], prompt_set),
                             question, settings,
                             agent["chunk_tokens"], model_config.max_position_embeddings)
  return Request(document_text, question.strip(), agent)


class ChunkProgress:
  """`progress_fn` for answer_question: "chunk i/N, elapsed, ETA" on stderr (tqdm), one bar for
  the memory turns; the answer turn follows the bar's end."""

  def __init__(self):
    self.bar = None

  def __call__(self, done: int, total: int) -> None:
    import tqdm  # pylint: disable=import-outside-toplevel
    if self.bar is None:
      self.bar = tqdm.tqdm(total=total, desc="[infer] reading", unit="chunk", file=sys.stderr,
                           dynamic_ncols=True)
    self.bar.update(done - self.bar.n)
    if done == total:
      self.close()

  def write(self, line: str) -> None:
    if self.bar is None:
      print(line, flush=True)
    else:
      self.bar.write(line, file=sys.stdout)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def main(argv):
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  F = flags.FLAGS
  try:
    request = prepare(F.hf_model, F.workdir, F.step, F.document, F.question, mode=F.mode,
                      chunk_tokens=F.chunk_tokens, memory_tokens=F.memory_tokens,
                      max_response_tokens=F.max_response_tokens,
                      max_answer_tokens=F.max_answer_tokens)
    from gru_mem import runtime
    model_config, params, tokenizer = runtime.load_model(F.hf_model, F.workdir, F.step)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  progress = ChunkProgress()
  try:
    result = answer_question(
        model_config, params, tokenizer, request.document_text, request.question,
        temperature=F.temperature, top_p=F.top_p, seed=F.seed, progress_fn=progress,
        trace_fn=(lambda record: progress.write(format_trace_line(record))) if F.trace else None,
        **request.agent)
  finally:
    progress.close()
  print(format_summary(result), flush=True)


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("hf_model", None, "an HF model folder (e.g. from gru_mem.export_hf)")
  flags.DEFINE_string("workdir", None, "a training run folder (its latest checkpoint, or --step)")
  flags.DEFINE_integer("step", None, "with --workdir: the checkpoint step to load")
  flags.DEFINE_string("document", None, "a UTF-8 text file of any length")
  flags.DEFINE_string("question", None, "the question to answer about the document")
  flags.DEFINE_string("mode", None, f"one of {modes.MODES} (default: the run's, else gru_mem)")
  flags.DEFINE_integer("chunk_tokens", None, "tokens per chunk (default: the run's, else 5000)")
  flags.DEFINE_integer("memory_tokens", None, "memory cap in tokens (default: the run's, else "
                       "1024)")
  flags.DEFINE_integer("max_response_tokens", None, "a memory turn's token budget (default: the "
                       "run's, else 1536)")
  flags.DEFINE_integer("max_answer_tokens", None, "the answer turn's token budget (default: the "
                       "run's, else 256)")
  flags.DEFINE_float("temperature", 0.0, "sampling temperature; 0 is greedy")
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (with --temperature > 0)")
  flags.DEFINE_integer("seed", 0, "sampling seed (with --temperature > 0)")
  flags.DEFINE_bool("trace", False, "print every memory turn as it happens")


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
