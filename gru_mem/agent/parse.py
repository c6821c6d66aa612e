"""Parsing the agent's responses into gate decisions, a candidate memory and an answer.

A gated memory turn (modes `gru_mem`, `gru_mem_no_exit`) is well-formed when it is exactly

    <think>...</think> <check>yes|no</check> <update>...</update> <next>continue|end</next>

with only whitespace before, between and after the four parts. Rules (the parser never raises on
a string; what it cannot read becomes `gates.INVALID` / empty text / format_ok=False):
  * Tags are case-sensitive. A part is present iff its open tag and its close tag each occur
    exactly once, the open tag first; its content is the text between them, stripped. A tag that
    occurs twice (duplicated, or nested in another part) makes that part absent.
  * Gate words are read from the stripped content, case-insensitively: yes/no for `check`,
    continue/end for `next`. Anything else, or an absent part, is INVALID. An INVALID update gate
    acts as "no" (keep M_{t-1}), an INVALID exit gate as "continue".
  * Each part is read on its own, so a response with an extra word outside the tags still yields
    its gates; `format_ok` additionally needs all four parts present, in order, nothing but
    whitespace outside them, and both gates valid.
  * The candidate memory (the `update` content, "" if absent) is cut to `memory_tokens` tokens.
Pass text decoded without special tokens (`Tokenizer.decode` skips them by default).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from gru_mem import gates
from gru_mem.agent import modes
from gru_mem.data.metrics import extract_boxed
from gru_mem.data.tokenizer import Tokenizer

PARTS = ("think", "check", "update", "next")
TAGS = tuple(tag for part in PARTS for tag in (f"<{part}>", f"</{part}>"))


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
  think: str
  update_gate: int  # gates.UPDATE_YES / UPDATE_NO / INVALID
  candidate_memory: str  # the stripped <update> content, cut to memory_tokens tokens
  exit_gate: int  # gates.EXIT_CONTINUE / EXIT_END / INVALID
  format_ok: bool
  # ids of candidate_memory (at most memory_tokens) when a tokenizer was given, else None: use
  # them as M_t instead of re-encoding the text (a cut can fall inside a character).
  candidate_memory_ids: Optional[tuple[int, ...]] = None


def effective_update(update_gate):
  """U_t applied: True iff the gate is UPDATE_YES (INVALID acts as no). Elementwise on arrays."""
  return update_gate == gates.UPDATE_YES


def effective_exit(exit_gate):
  """E_t applied: True iff the gate is EXIT_END (INVALID acts as continue). Elementwise."""
  return exit_gate == gates.EXIT_END


def _part_span(text: str, part: str) -> Optional[tuple[int, int]]:
  """(start of the open tag, end of the close tag) of `part`, or None if the part is absent."""
  open_tag, close_tag = f"<{part}>", f"</{part}>"
  if text.count(open_tag) != 1 or text.count(close_tag) != 1:
    return None
  start, close = text.index(open_tag), text.index(close_tag)
  if close < start + len(open_tag):
    return None
  return start, close + len(close_tag)


def _content(text: str, part: str, span: Optional[tuple[int, int]]) -> Optional[str]:
  if span is None:
    return None
  return text[span[0] + len(part) + 2:span[1] - len(part) - 3].strip()


def _gate(content: Optional[str], words: dict) -> int:
  if content is None:
    return gates.INVALID
  return words.get(content.lower(), gates.INVALID)


def _laid_out_in_order(text: str, spans: list) -> bool:
  """The spans follow one another and only whitespace lies outside them."""
  position = 0
  for start, end in spans:
    if start < position or text[position:start].strip():
      return False
    position = end
  return not text[position:].strip()


def _valid_unicode(text: str) -> str:
  """`text` with lone surrogates (which tokenizers reject) replaced by '?'."""
  return text.encode("utf-8", "replace").decode("utf-8")


def cut_to_tokens(text: str, memory_tokens: Optional[int], tokenizer: Optional[Tokenizer]
                  ) -> tuple[str, Optional[tuple[int, ...]]]:
  """(text, ids) with at most `memory_tokens` ids: the first ones of encode(text), decoded.

  Without a tokenizer the text is returned whole and ids is None.
  """
  if tokenizer is None:
    if memory_tokens is not None:
      raise ValueError(f"memory_tokens={memory_tokens} needs a tokenizer to count tokens: pass "
                       "tokenizer=")
    return text, None
  if memory_tokens is not None and memory_tokens < 0:
    raise ValueError(f"memory_tokens={memory_tokens}: must be >= 0 (or None for no cap)")
  ids = tuple(tokenizer.encode(_valid_unicode(text)))
  if memory_tokens is None or len(ids) <= memory_tokens:
    return text, ids
  ids = ids[:memory_tokens]
  return tokenizer.decode(ids), ids


def parse_response(text: str, memory_tokens: Optional[int] = None,
                   tokenizer: Optional[Tokenizer] = None, mode: str = "gru_mem"
                   ) -> ParsedResponse:
  """Reads a memory-turn response of a gated mode (see the module docstring for the rules).

  `mode='memagent'` reads the whole response, stripped and cut to memory_tokens, as M_t
  (format ok iff it is not empty), with update_gate UPDATE_YES and exit_gate EXIT_CONTINUE.
  """
  if not isinstance(text, str):
    raise TypeError(f"parse_response: text must be a str, got {type(text).__name__}")
  if not modes.is_gated(mode):
    memory, ids = cut_to_tokens(text.strip(), memory_tokens, tokenizer)
    return ParsedResponse("", gates.UPDATE_YES, memory, gates.EXIT_CONTINUE, bool(memory), ids)
  spans = {part: _part_span(text, part) for part in PARTS}
  contents = {part: _content(text, part, spans[part]) for part in PARTS}
  update_gate = _gate(contents["check"], gates.UPDATE_WORDS)
  exit_gate = _gate(contents["next"], gates.EXIT_WORDS)
  format_ok = (all(span is not None for span in spans.values())
               and _laid_out_in_order(text, [spans[part] for part in PARTS])
               and update_gate != gates.INVALID and exit_gate != gates.INVALID)
  candidate, ids = cut_to_tokens(contents["update"] or "", memory_tokens, tokenizer)
  return ParsedResponse(think=contents["think"] or "", update_gate=update_gate,
                        candidate_memory=candidate, exit_gate=exit_gate, format_ok=format_ok,
                        candidate_memory_ids=ids)


def parse_answer(text: str) -> tuple[Optional[str], bool]:
  r"""(answer, format_ok) of an answer turn: the stripped content of the last `\boxed{...}`.

  Uses `metrics.extract_boxed` (the scorer's reading): a last `\boxed{` left unclosed gives
  (None, False); an empty box gives ("", False).
  """
  if not isinstance(text, str):
    raise TypeError(f"parse_answer: text must be a str, got {type(text).__name__}")
  boxed = extract_boxed(text)
  if boxed is None:
    return None, False
  answer = boxed.strip()
  return answer, bool(answer)


def _gate_word(gate, words: dict, name: str) -> str:
  """The word of a gate value (a bool counts as 1 / 0)."""
  for word, value in words.items():
    if isinstance(gate, (int, np.integer, np.bool_)) and gate == value:
      return word
  raise ValueError(f"{name}={gate!r}: must be one of {sorted(words.values())} (or a bool)")


def format_response(think: str, update, memory: str, exit) -> str:
  """A well-formed gated response; `parse_response` gives back the stripped fields exactly.

  update: gates.UPDATE_YES / UPDATE_NO (or True / False); exit: gates.EXIT_END / EXIT_CONTINUE
  (or True = end / False = continue). Fields must not contain tag text.
  """
  for name, field in (("think", think), ("memory", memory)):
    tag = next((t for t in TAGS if t in field), None)
    if tag is not None:
      raise ValueError(f"{name} contains the tag {tag!r}: a response field cannot hold tag text")
  check_word = _gate_word(update, gates.UPDATE_WORDS, "update")
  next_word = _gate_word(exit, gates.EXIT_WORDS, "exit")
  return (f"<think>{think.strip()}</think>\n<check>{check_word}</check>\n"
          f"<update>{memory.strip()}</update>\n<next>{next_word}</next>")
