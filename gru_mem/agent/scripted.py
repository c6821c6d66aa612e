r"""Scripted memory-agent trajectories: what stage 1 (`gru_mem.sft`) trains on.

A small model trained from scratch knows nothing of the response format, so RL alone would never
see a parseable turn. Stage 1 teaches the format and the copying skill from scripted trajectories
over synthetic examples whose evidence chunks are known:

  memory turn t (gated):   <think>T</think> <check>U</check> <update>M</update> <next>E</next>
  memory turn t (memagent): M
  answer turn:              \boxed{answer}

The scripted memory M is the previous memory plus the evidence text of chunk t, copied from the
document (a needle cut by a chunk boundary is copied piece by piece). The think T states what a
reader notes and decides (`scripted_think`): whether the section holds evidence, and "enough"
once M holds all of it, each followed by the decision it bears on, which the tags repeat. The
decisions are scripted MemAgent-like: U = yes and E = continue, except that U says no with
probability `update_noise` (`update_noise_non_evidence` on a chunk without evidence) and E says
end with probability `exit_noise` (`exit_noise_complete` once the memory holds every evidence).
So the warm-started policy reads, copies and answers, and, sampled, says `no` / `end` now and
then, which RL needs to explore; greedy, it always updates and never exits (every noise below
1/2). Tying the gates to what the section holds is left to RL: with equal noise the stage-1
gates are blind to it; the tiny config makes the noise a little higher where no / end would be
right, a prior no stronger than a pretrained reader's. A turn whose gate says no writes an empty
<update> (the memory is kept, nothing to copy). Half of the trajectories (`memagent_fraction`)
use the MemAgent prompt and response, so the same weights are the MemAgent baseline.

`CopyRows` is the copy warm-up that comes first: it grows the in-context copying a pretrained
model would bring. Every step's rows are a pure function of (seed, step), so a resumed run sees
exactly the batches a straight run would.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Optional

import numpy as np

from gru_mem import gates
from gru_mem.agent import parse
from gru_mem.agent.prompts import EMPTY_MEMORY, PromptBuilder
from gru_mem.agent.rollout import AgentExample
from gru_mem.data import sources, tasks, vocabulary
from gru_mem.data.tokenizer import IM_END, Tokenizer

THINK_STYLES = ("state", "empty")


@dataclasses.dataclass(frozen=True)
class ScriptSettings:
  """How scripted trajectories are drawn (each a config key under `sft`)."""
  update_noise: float = 0.15  # P(a turn says no): on evidence chunks (and all, by default)
  exit_noise: float = 0.08  # P(a turn says end): before the memory is complete (and always)
  update_noise_non_evidence: Optional[float] = None  # P(no) on chunks without evidence (None: same)
  exit_noise_complete: Optional[float] = None  # P(end) once the memory is complete (None: same)
  memagent_fraction: float = 0.5  # share of trajectories in the MemAgent format
  memory_tokens: int = 1024  # the memory cap (agent.memory_tokens)
  keep_non_evidence_turns: float = 1.0  # P(training on a memory turn whose section holds no evidence)
  think: str = "state"  # "state": say what the section holds (see `scripted_think`) | "empty"

  def __post_init__(self):
    if self.think not in THINK_STYLES:
      raise ValueError(f"sft.think={self.think!r}: use one of {THINK_STYLES}")
    for name in ("update_noise", "exit_noise", "memagent_fraction", "keep_non_evidence_turns",
                 "update_noise_non_evidence", "exit_noise_complete"):
      if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"sft.{name}={getattr(self, name)}: must be in [0, 1]")
    if self.memory_tokens < 1:
      raise ValueError(f"memory_tokens={self.memory_tokens}: must be >= 1")

  def update_noise_for(self, has_evidence: bool) -> float:
    """P(the scripted update gate says no) on a chunk with or without evidence."""
    if has_evidence or self.update_noise_non_evidence is None:
      return self.update_noise
    return self.update_noise_non_evidence

  def exit_noise_for(self, memory_complete: bool) -> float:
    """P(the scripted exit gate says end), before or once the memory holds every evidence."""
    if not memory_complete or self.exit_noise_complete is None:
      return self.exit_noise
    return self.exit_noise_complete


def end_of_turn_id(tokenizer: Tokenizer) -> int:
  """The token that ends an assistant turn: <|im_end|> for ChatML tokenizers, else EOS."""
  im_end = tokenizer.token_id(IM_END)
  return tokenizer.eos_id if im_end is None else im_end


def response_ids(text: str, tokenizer: Tokenizer) -> np.ndarray:
  """encode(text) + the end-of-turn token: what a sampler that stops on it would have produced."""
  return np.asarray(tokenizer.encode(text) + [end_of_turn_id(tokenizer)], np.int32)


def evidence_in_chunk(chunks, chunk_index: int) -> list[tuple[int, np.ndarray, bool]]:
  """(span index, the span's token ids inside chunk `chunk_index`, whether the span started in an
  earlier chunk) for every evidence span that overlaps the chunk, in document order."""
  start, end = chunk_index * chunks.chunk_tokens, (chunk_index + 1) * chunks.chunk_tokens
  pieces = []
  for index, (t0, t1) in enumerate(chunks.evidence_token_spans):
    lo, hi = max(t0, start), min(t1, end)
    if lo < hi:
      pieces.append((index, chunks.token_ids[lo:hi], t0 < start))
  return pieces


def copy_evidence(copied: str, pieces, stored_spans: set, tokenizer: Tokenizer) -> str:
  """The evidence text copied so far (`copied`, unstripped) plus the evidence of this chunk.

  A piece that continues a span whose start was copied is appended as is (a chunk boundary may
  cut a word or a number, or fall just before a space); a new piece is appended after a space.
  The scripted memory is the result, stripped.
  """
  for index, ids, continues in pieces:
    piece = tokenizer.decode(ids)
    if continues and index in stored_spans:
      copied += piece
    else:
      copied = f"{copied.rstrip()} {piece.lstrip()}" if copied.strip() else piece.lstrip()
  return copied


def scripted_think(has_evidence: bool, memory_complete: bool, update: bool, end: bool,
                   style: str) -> str:
  """The <think> of a scripted gated turn: each observation, then the decision it bears on.

  "state": "evidence" or "nothing" (does this section hold evidence?), the update decision
  ("yes" / "no"), "enough" once the candidate memory holds every piece of evidence (it answers
  the question), then the exit decision ("continue" / "end"), e.g. "evidence yes enough end".
  The decisions are the scripted gates (MemAgent-like plus noise) and the <check> / <next> tags
  repeat them. Each decision word comes right after the observation it should follow, where a
  small model's state holds that observation plainly: RL then only has to learn to let the
  decision follow the observation. "empty": an empty think.
  """
  if style == "empty":
    return ""
  return " ".join(["evidence" if has_evidence else "nothing", "yes" if update else "no"]
                  + (["enough"] if memory_complete else []) + ["end" if end else "continue"])


@dataclasses.dataclass
class ScriptedTurn:
  prompt_ids: np.ndarray
  response_ids: np.ndarray
  kind: str  # "memory" | "answer"
  has_evidence: bool = False  # a memory turn whose section holds evidence


def scripted_trajectory(example: AgentExample, builder: PromptBuilder, tokenizer: Tokenizer,
                        rng: random.Random, script: ScriptSettings) -> list[ScriptedTurn]:
  """The turns of one scripted read of `example` in the builder's mode (see the module doc).

  The memory carried from turn to turn is what the rollout would carry: the parsed <update> of a
  `yes` turn (gated) or the whole response (memagent), cut to `memory_tokens`. The answer turn is
  kept only when the final memory holds every evidence piece (else no answer can be scripted).
  """
  gated = builder.gated
  memory_ids = np.zeros((0,), np.int32)
  copied, stored_spans, lost_evidence = "", set(), False
  turns = []
  for chunk_index in range(example.chunks.num_chunks):
    pieces = evidence_in_chunk(example.chunks, chunk_index)
    candidate_copied = copy_evidence(copied, pieces, stored_spans, tokenizer)
    candidate = candidate_copied.strip() or EMPTY_MEMORY
    complete = not lost_evidence and chunk_index >= example.chunks.last_evidence_chunk
    update = not (gated and rng.random() < script.update_noise_for(bool(pieces)))
    say_end = gated and rng.random() < script.exit_noise_for(complete and update)
    prompt = builder.memory_turn(example.question_ids, memory_ids,
                                 example.chunks.chunk(chunk_index))
    if gated:
      think = scripted_think(bool(pieces), complete, update, say_end, script.think)
      text = parse.format_response(think, gates.UPDATE_YES if update else gates.UPDATE_NO,
                                   candidate if update else "",
                                   gates.EXIT_END if say_end else gates.EXIT_CONTINUE)
    else:
      text = candidate
    turns.append(ScriptedTurn(prompt, response_ids(text, tokenizer), "memory",
                              has_evidence=bool(pieces)))
    if update:
      copied = candidate_copied
      memory_ids = np.asarray(parse.cut_to_tokens(candidate, script.memory_tokens, tokenizer)[1],
                              np.int32)
      stored_spans.update(index for index, _, _ in pieces)
    elif pieces:
      lost_evidence = True
    if say_end:
      break
  complete = (not lost_evidence and chunk_index >= example.chunks.last_evidence_chunk
              and len(tokenizer.encode(copied.strip())) <= script.memory_tokens)
  if complete:
    answer_text = "\\boxed{" + ", ".join(example.answers) + "}"
    turns.append(ScriptedTurn(builder.answer_turn(example.question_ids, memory_ids),
                              response_ids(answer_text, tokenizer), "answer"))
  return turns


class ScriptedRows:
  """The (prompt ids, response ids) rows of SFT step s: every turn of the scripted trajectories of examples
  [s * examples_per_step, (s + 1) * examples_per_step) of the `data` stream with seed `seed`."""

  def __init__(self, data_config, tokenizer: Tokenizer, chunk_tokens: int, script: ScriptSettings,
               examples_per_step: int, seed: int, prompt_set=None):
    if examples_per_step < 1:
      raise ValueError(f"sft.examples_per_step={examples_per_step}: must be >= 1")
    sources.check_data_config(data_config)
    self.data_config, self.tokenizer, self.chunk_tokens = data_config, tokenizer, chunk_tokens
    self.script, self.examples_per_step, self.seed = script, examples_per_step, seed
    self.source = sources.register_config_tasks(data_config, tokenizer, seed)
    self.builders = {mode: PromptBuilder(tokenizer, mode, prompt_set)
                     for mode in ("gru_mem", "memagent")}

  def trajectory(self, index: int) -> list[ScriptedTurn]:
    example = tasks.example_at(self.source, index, self.seed)
    agent_example = AgentExample.from_example(example, self.tokenizer, self.chunk_tokens)
    rng = random.Random(f"sft/{self.seed}/{index}")
    mode = "memagent" if rng.random() < self.script.memagent_fraction else "gru_mem"
    return scripted_trajectory(agent_example, self.builders[mode], self.tokenizer, rng,
                               self.script)

  def rows(self, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The step's turns as (prompt ids, response ids). A memory turn whose section holds no evidence (it writes "none" or
    copies the memory forward, the most common and least informative kind) is kept with
    probability keep_non_evidence_turns; the step's first turn always is, so a step is never empty."""
    first = step * self.examples_per_step
    turns = [turn for index in range(first, first + self.examples_per_step)
             for turn in self.trajectory(index)]
    rng = random.Random(f"sft/{self.seed}/keep/{step}")
    turns = [t for i, t in enumerate(turns)
             if i == 0 or t.kind == "answer" or t.has_evidence
             or rng.random() < self.script.keep_non_evidence_turns]
    return [(t.prompt_ids, t.response_ids) for t in turns]


class CopyRows:
  """Rows of the copy warm-up: a prompt of random tokens, the response is the same tokens.

  A model trained from scratch has none of the in-context copying a pretrained LM brings; this
  dense copy signal (every response token is a copy) grows it in a few hundred cheap steps (at
  hidden 64 with `fan_in_params`, a phase change near step 500), and the scripted trajectories
  then only have to say *what* to copy. Each token is a digit with probability `digit_fraction`,
  else a word of the built-in vocabulary: runs of digits repeat tokens, so copying them needs
  more than the last token, as a 7-digit needle value does. Step s is a pure function of
  (seed, s).
  """

  def __init__(self, tokenizer: Tokenizer, rows_per_step: int, max_tokens: int, seed: int,
               digit_fraction: float = 0.5):
    if rows_per_step < 1 or max_tokens < 4:
      raise ValueError(f"sft.copy_rows={rows_per_step} must be >= 1 and sft.copy_tokens="
                       f"{max_tokens} >= 4")
    words = [tokenizer.encode(" " + w) for w in vocabulary.all_words()]
    self.words = np.asarray([ids[0] for ids in words if len(ids) == 1], np.int32)
    self.digits = np.asarray([tokenizer.encode(str(d))[0] for d in range(10)], np.int32)
    self.rows_per_step, self.max_tokens, self.seed = rows_per_step, max_tokens, seed
    self.digit_fraction = digit_fraction
    self.end_id = end_of_turn_id(tokenizer)

  def rows(self, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The step's rows as (prompt ids, response ids): the same random tokens twice."""
    rng = np.random.default_rng([self.seed, step])
    rows = []
    for _ in range(self.rows_per_step):
      length = rng.integers(4, self.max_tokens + 1)
      tokens = np.where(rng.random(length) < self.digit_fraction,
                        rng.choice(self.digits, length), rng.choice(self.words, length))
      copy = np.append(tokens, self.end_id).astype(np.int32)  # the end token separates them
      rows.append((copy, copy))
    return rows
