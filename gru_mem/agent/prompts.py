"""Prompts of the memory agent, assembled from token ids that are tokenized once.

Three prompts (the wording is ours; the structure follows GRU-Mem / MemAgent):
  * memory turn, gated modes (`gru_mem`, `gru_mem_no_exit`): problem Q, previous memory M_{t-1},
    current section C_t, then how to write `<think>` `<check>` `<update>` `<next>`;
  * memory turn, `memagent`: the same inputs, and the response is the new memory itself;
  * answer turn (every mode): Q and the final memory; the answer goes inside `\\boxed{}`.
`gru_mem_no_exit` uses the gated prompt unchanged; only the rollout ignores its `<next>` gate.

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
token cut can leave one ending in whitespace); pass stripped questions too.
"""

from __future__ import annotations

from typing import Sequence

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

# Placeholders that cut the rendered template into pieces (no tokenizer or template makes them).
_SENTINELS = {"question": "\x00Q\x00", "memory": "\x00M\x00", "chunk": "\x00C\x00"}


def memory_template(mode: str) -> str:
  """The user-message template of a memory turn in `mode` (fields: question, memory, chunk)."""
  _check_mode(mode)
  return GATED_MEMORY_TEMPLATE if modes.is_gated(mode) else MEMAGENT_MEMORY_TEMPLATE


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

  Fields are token ids without padding (lists or 1-D arrays); an empty memory renders as
  `EMPTY_MEMORY`. Results are 1-D int32 arrays.
  """

  def __init__(self, tokenizer: Tokenizer, mode: str = "gru_mem"):
    _check_mode(mode)
    self.tokenizer = tokenizer
    self.mode = mode
    self.gated = modes.is_gated(mode)
    self.memory_template = memory_template(mode)
    self._memory_pieces = _pieces(tokenizer, self.memory_template, ("question", "memory", "chunk"))
    self._answer_pieces = _pieces(tokenizer, ANSWER_TEMPLATE, ("question", "memory"))
    self.empty_memory_ids = np.asarray(tokenizer.encode(EMPTY_MEMORY), np.int32)
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
                  memory=memory or EMPTY_MEMORY, chunk=chunk)

  def answer_turn_text(self, question: str, memory: str) -> str:
    """The text that `answer_turn` spells."""
    return render(self.tokenizer, ANSWER_TEMPLATE, question=question,
                  memory=memory or EMPTY_MEMORY)

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
