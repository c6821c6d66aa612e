"""Prompts of the memory agent, assembled from token ids that are tokenized once.

Three prompts (the wording is ours; the structure follows GRU-Mem / MemAgent):
  * memory turn, gated modes (`gru_mem`, `gru_mem_no_exit`): problem Q, previous memory M_{t-1},
    current section C_t, then how to write `<think>` `<check>` `<update>` `<next>`;
  * memory turn, `memagent`: the same inputs, and the response is the new memory itself;
  * answer turn (every mode): Q and the final memory; the answer goes inside `\\boxed{}`.
`gru_mem_no_exit` uses the gated prompt unchanged; only the rollout ignores its `<next>` gate.

Prompt sets (`agent.prompt`): `compact` (lower-case, for the built-in tokenizer, whose vocabulary
has no capitals; empty memory "none"), `paper` (for instruct models and HF tokenizers: the
problem, the previous memory, "No previous memory" at the start, the section, explicit response
instructions) and `minimal` (the compact fields and one line naming the response: for a model
trained from scratch, which learns the format in stage 1). `auto` picks `compact` for the
built-in tokenizer and `paper` otherwise.
`agent.prompt_file` reads a user's set (`read_prompt_file`, format in its docstring).

Each prompt is one user message, put through the tokenizer's chat template when it has one (with
the assistant generation prompt). `PromptBuilder` renders the template once with placeholders,
cuts it at the placeholders into text pieces, tokenizes each piece once, and builds every turn by
concatenating ids: `prefix + question + piece + memory + piece + chunk + suffix`.

Piece boundaries. Every piece before a field ends with a newline and every piece after a field
starts with " \\n" (a space, then the newline). With Qwen2's pre-tokenizer, whose pieces BPE
never merges across, this makes the spliced ids equal `encode(full prompt text)` whenever the
field's own ids are `encode(field text)`, except in two cases (where the ids differ but still
decode to the same text):
  * a field that starts with a newline (possibly after spaces), e.g. a chunk cut at a paragraph
    break: the newline joins the piece's newline ("\\n\\n" is one token);
  * a field that ends with whitespace: the whitespace joins the following " \\n" (Qwen2 only;
    the built-in tokenizer learned no merge of whitespace runs other than "\\n\\n").
A leading " \\n" rather than "\\n" keeps fields that end in punctuation exact: Qwen2 merges
"?\\n\\n" into one token but not "? \\n\\n". Memories from `parse.py` are stripped text (only a
token cut can leave one ending in whitespace); pass stripped questions too. Both built-in sets
follow this rule; a prompt file should too (its splice is still exact in text, see above).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional, Sequence

import numpy as np

from gru_mem.agent import modes
from gru_mem.data.tokenizer import Tokenizer


EMPTY_MEMORY = "none"  # what an empty memory M_0 renders as

_INTRO = ("you are reading a long document one section at a time to answer a question. keep a "
          "short memory of the evidence you have found so far.\n\n")
_INPUTS = "question:\n{question} \n\nmemory:\n{memory} \n\ncurrent section:\n{chunk} \n\n"

GATED_MEMORY_TEMPLATE = _INTRO + _INPUTS + (
    "read the current section and respond in this format:\n"
    "<think>reason about the section, the memory and the question</think>\n"
    "<check>yes if the section holds new evidence for the question, else no</check>\n"
    "<update>the new memory: the previous memory with any new evidence added</update>\n"
    "<next>end if the memory is now enough to answer the question, else continue</next>")

MEMAGENT_MEMORY_TEMPLATE = _INTRO + _INPUTS + (
    "read the current section and write the new memory: keep the relevant notes of the previous "
    "memory and add any new evidence for the question. respond with the new memory only.")

ANSWER_TEMPLATE = (
    "answer the question using only your memory of a long document.\n\n"
    "question:\n{question} \n\nmemory:\n{memory} \n\n"
    "think briefly, then write the final answer inside \\boxed{{}}.")


# `minimal`: the fields and one line naming the response, no instructions. For a model trained
# from scratch (the default job): stage 1 teaches it the format, and instructions it cannot read
# would be ~110 of a gated turn's ~240 tokens in every rollout, learner row and SFT row.
_MINIMAL_INPUTS = "question:\n{question} \n\nmemory:\n{memory} \n\nsection:\n{chunk} \n\n"
MINIMAL_GATED_TEMPLATE = _MINIMAL_INPUTS + "respond with think, check, update and next."
MINIMAL_MEMAGENT_TEMPLATE = _MINIMAL_INPUTS + "respond with the new memory only."
MINIMAL_ANSWER_TEMPLATE = ("question:\n{question} \n\nmemory:\n{memory} \n\n"
                           "write the final answer inside \\boxed{{}}.")


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """The user-message templates of one prompt set (str.format templates: fields in braces)."""
  name: str
  gated_memory: str  # fields question, memory, chunk (in this order)
  memagent_memory: str  # fields question, memory, chunk
  answer: str  # fields question, memory
  empty_memory: str  # what an empty memory M_0 renders as


COMPACT = PromptSet("compact", GATED_MEMORY_TEMPLATE, MEMAGENT_MEMORY_TEMPLATE, ANSWER_TEMPLATE,
                    EMPTY_MEMORY)

_PAPER_INPUTS = ("<problem>\n{question} \n</problem>\n\n"
                 "<memory>\n{memory} \n</memory>\n\n"
                 "<section>\n{chunk} \n</section>\n\n")
PAPER = PromptSet(
    "paper",
    gated_memory=(
        "You are given a problem, your memory of the article so far and the next section of the "
        "article. Read the section and decide whether it holds information that helps to solve "
        "the problem, then keep your memory up to date.\n\n" + _PAPER_INPUTS +
        "Respond in exactly this format, with nothing outside the four tags:\n"
        "<think>your reasoning about the section, the memory and the problem</think>\n"
        "<check>yes if the section holds new information that helps to solve the problem, "
        "otherwise no</check>\n"
        "<update>the complete new memory: the previous memory together with the new relevant "
        "information</update>\n"
        "<next>end if the memory is now enough to solve the problem, otherwise continue</next>"),
    memagent_memory=(
        "You are given a problem, your memory of the article so far and the next section of the "
        "article. Read the section and write your updated memory: keep what in the previous "
        "memory helps to solve the problem and add any new relevant information from the "
        "section.\n\n" + _PAPER_INPUTS +
        "Respond with the updated memory only."),
    answer=(
        "You have read a long article section by section and kept a memory of what helps to "
        "solve the problem. Solve the problem using your memory.\n\n"
        "<problem>\n{question} \n</problem>\n\n<memory>\n{memory} \n</memory>\n\n"
        "Think it through briefly, then give the final answer inside \\boxed{{}}, for example "
        "\\boxed{{Paris}}."),
    empty_memory="No previous memory")
MINIMAL = PromptSet("minimal", MINIMAL_GATED_TEMPLATE, MINIMAL_MEMAGENT_TEMPLATE,
                    MINIMAL_ANSWER_TEMPLATE, EMPTY_MEMORY)

PROMPT_SETS = {"compact": COMPACT, "paper": PAPER, "minimal": MINIMAL}
PROMPT_CHOICES = ("auto",) + tuple(PROMPT_SETS)
MEMORY_FIELDS = ("question", "memory", "chunk")
ANSWER_FIELDS = ("question", "memory")


def choose_prompt_set(tokenizer: Tokenizer, name: str = "auto", prompt_file: str = ""
                      ) -> PromptSet:
  """`agent.prompt` / `agent.prompt_file` -> a PromptSet; `auto`: compact for the built-in
  tokenizer, paper for any other (an HF folder)."""
  if prompt_file:
    return read_prompt_file(prompt_file)
  if name not in PROMPT_CHOICES:
    raise ValueError(f"agent.prompt={name!r}: use one of {PROMPT_CHOICES} (or agent.prompt_file)")
  if name == "auto":
    return COMPACT if tokenizer.is_builtin else PAPER
  return PROMPT_SETS[name]


# Placeholders that cut the rendered template into pieces (no tokenizer or template makes them).
_SENTINELS = {"question": "\x00Q\x00", "memory": "\x00M\x00", "chunk": "\x00C\x00"}


def memory_template(mode: str, prompt_set: PromptSet = COMPACT) -> str:
  """The user-message template of a memory turn in `mode` (fields: question, memory, chunk)."""
  _check_mode(mode)
  return prompt_set.gated_memory if modes.is_gated(mode) else prompt_set.memagent_memory


def render(tokenizer: Tokenizer, template: str, **fields: str) -> str:
  """The full prompt text: `template` filled in, as one chat-templated user message."""
  return tokenizer.apply_chat_template([{"role": "user", "content": template.format(**fields)}],
                                       add_generation_prompt=True)


def _check_mode(mode: str) -> None:
  modes.check_mode(mode, "mode")


def _pieces(tokenizer: Tokenizer, template: str, fields: Sequence[str]) -> list[np.ndarray]:
  """Ids of the template text around `fields` (in that order): len(fields) + 1 arrays."""
  text = render(tokenizer, template, **{f: _SENTINELS[f] for f in fields})
  pieces = []
  for field in fields:
    before, sentinel, text = text.partition(_SENTINELS[field])
    if not sentinel or _SENTINELS[field] in text:
      raise ValueError(f"the rendered template must hold the {field} field exactly once, after "
                       f"the fields before it; got {text!r}")
    pieces.append(before)
  pieces.append(text)
  return [np.asarray(tokenizer.encode(p), np.int32) for p in pieces]


def _splice(pieces: Sequence[np.ndarray], fields: Sequence[Sequence[int]]) -> np.ndarray:
  """pieces[0] + fields[0] + pieces[1] + ... + pieces[-1] as one int32 array."""
  parts = [pieces[0]]
  for field, piece in zip(fields, pieces[1:]):
    parts += [np.asarray(field, np.int32).reshape(-1), piece]
  return np.concatenate(parts)


class PromptBuilder:
  """Memory-turn and answer-turn prompt ids for one tokenizer and mode; templates tokenized once.

  Fields are token ids without padding (lists or 1-D arrays); an empty memory renders as the
  prompt set's `empty_memory`; `prompt_set` None is COMPACT. Results are 1-D int32 arrays.
  """

  def __init__(self, tokenizer: Tokenizer, mode: str = "gru_mem",
               prompt_set: Optional[PromptSet] = None):
    _check_mode(mode)
    self.tokenizer = tokenizer
    self.mode = mode
    self.gated = modes.is_gated(mode)
    self.prompt_set = COMPACT if prompt_set is None else prompt_set
    self.memory_template = memory_template(mode, self.prompt_set)
    self.answer_template = self.prompt_set.answer
    self.empty_memory = self.prompt_set.empty_memory
    self._memory_pieces = _pieces(tokenizer, self.memory_template, MEMORY_FIELDS)
    self._answer_pieces = _pieces(tokenizer, self.answer_template, ANSWER_FIELDS)
    self.empty_memory_ids = np.asarray(tokenizer.encode(self.empty_memory), np.int32)
    self._end_tag_ids = tuple(tokenizer.encode("</next>"))
    # Template tokens a turn adds to its fields; counts the empty-memory word too, so that
    # question + memory + chunk + overhead is an upper bound on the prompt length.
    self.turn_overhead_tokens = (sum(len(p) for p in self._memory_pieces)
                                 + len(self.empty_memory_ids))
    self.answer_overhead_tokens = (sum(len(p) for p in self._answer_pieces)
                                   + len(self.empty_memory_ids))

  def _memory_or_empty(self, memory_ids: Sequence[int]) -> Sequence[int]:
    return memory_ids if len(memory_ids) else self.empty_memory_ids

  def memory_turn(self, question_ids: Sequence[int], memory_ids: Sequence[int],
                  chunk_ids: Sequence[int]) -> np.ndarray:
    """Prompt ids of memory turn t from Q, M_{t-1} and C_t.  [prompt_length] int32"""
    return _splice(self._memory_pieces,
                   (question_ids, self._memory_or_empty(memory_ids), chunk_ids))

  def answer_turn(self, question_ids: Sequence[int], memory_ids: Sequence[int]) -> np.ndarray:
    """Prompt ids of the answer turn from Q and the final memory M_T.  [prompt_length] int32"""
    return _splice(self._answer_pieces, (question_ids, self._memory_or_empty(memory_ids)))

  def memory_turn_text(self, question: str, memory: str, chunk: str) -> str:
    """The text that `memory_turn` spells (for traces and for tokenizing the whole prompt)."""
    return render(self.tokenizer, self.memory_template, question=question,
                  memory=memory or self.empty_memory, chunk=chunk)

  def answer_turn_text(self, question: str, memory: str) -> str:
    """The text that `answer_turn` spells."""
    return render(self.tokenizer, self.answer_template, question=question,
                  memory=memory or self.empty_memory)

  def response_stop_sequences(self, include_end_tag: bool = False) -> tuple[tuple[int, ...], ...]:
    """Token sequences that end a response, for `SamplingSettings.stop_sequences`.

    Always the tokenizer's stop ids (EOS, and <|im_end|> where it exists), one per sequence.
    `include_end_tag=True` (gated modes only) adds the ids of "</next>" as the tag encodes on its
    own; BPE may spell the tag differently after some text (e.g. Qwen2 turns " </" into one token),
    so this stop can be missed and EOS / <|im_end|> remains the reliable end.
    """
    stops = tuple((int(i),) for i in self.tokenizer.stop_ids)
    if include_end_tag and self.gated:
      stops += (self._end_tag_ids,)
    return stops


# --- prompt files ---------------------------------------------------------------------------

PROMPT_FILE_SECTIONS = {"memory": MEMORY_FIELDS, "memagent_memory": MEMORY_FIELDS,
                        "answer": ANSWER_FIELDS, "empty_memory": ()}
_HEADER = re.compile(r"^== *([A-Za-z_]+) *==[ \t]*$")
_FIELD = re.compile(r"\{(question|memory|chunk)\}")


def read_prompt_file(path: str) -> PromptSet:
  r"""A PromptSet from a text file of four sections, each opened by a line `== name ==`:

    # lines before the first section are comments
    == memory ==            the gated memory turn: {question}, {memory}, {chunk} once each, in
                            this order, and the four response tags described: <think>...</think>
                            <check>...</check> <update>...</update> <next>...</next>
    == memagent_memory ==   the MemAgent memory turn: {question}, {memory}, {chunk}
    == answer ==            the answer turn: {question}, {memory}; it asks for oxed{}
    == empty_memory ==      one line: what the memory reads before anything is stored

  A section's text is its lines up to the next header, without the trailing newlines. Only the
  exact fields are replaced; every other brace is literal text. Follow the piece-boundary rule
  of the module doc (a newline before each field, " 
" after it) for exact token splices.
  Raises ValueError naming the file, the section and the problem.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"agent.prompt_file={path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  where = f"agent.prompt_file={path!r}"
  sections: dict[str, list[str]] = {}
  current = None
  for number, line in enumerate(lines, start=1):
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      if current not in PROMPT_FILE_SECTIONS:
        raise ValueError(f"{where} line {number}: unknown section {current!r}; the sections are "
                         f"{list(PROMPT_FILE_SECTIONS)}")
      if current in sections:
        raise ValueError(f"{where} line {number}: section {current!r} appears twice; give each "
                         "section exactly once")
      sections[current] = []
    elif current is not None:
      sections[current].append(line)
  texts = {}
  for name, fields in PROMPT_FILE_SECTIONS.items():
    if name not in sections:
      raise ValueError(f"{where}: section {name!r} is missing (a line '== {name} ==' and its "
                       "text); each of the four sections must appear exactly once")
    text = "\n".join(sections[name]).strip("\n")
    found = _FIELD.findall(text)
    if tuple(found) != fields:
      raise ValueError(f"{where}: section {name!r} holds the fields {found}; it must hold "
                       f"{['{' + f + '}' for f in fields]} exactly once each, in this order")
    texts[name] = text
  missing = [t for part in ("think", "check", "update", "next") for t in (f"<{part}>", f"</{part}>")
             if t not in texts["memory"]]
  if missing:
    raise ValueError(f"{where}: section 'memory' does not describe the response tags {missing}: "
                     "describe all four, <think> <check> <update> <next>, with their close tags")
  if "\\boxed{}" not in texts["answer"]:
    raise ValueError(f"{where}: section 'answer' must ask for the answer inside \\boxed{{}}")
  if not texts["empty_memory"].strip() or "\n" in texts["empty_memory"]:
    raise ValueError(f"{where}: section 'empty_memory' must be one non-empty line")

  def as_format(text: str) -> str:  # literal braces escaped, the fields kept
    return re.sub(r"\{\{(question|memory|chunk)\}\}", r"{\1}",
                  text.replace("{", "{{").replace("}", "}}"))
  return PromptSet(f"file:{path}", as_format(texts["memory"]), as_format(texts["memagent_memory"]),
                   as_format(texts["answer"]), texts["empty_memory"])
