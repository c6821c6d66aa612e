"""agent/parse.py: a table of responses, a fuzz against a regex reference, round trips, cuts."""

import functools
import os
import re

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from gru_mem import gates
from gru_mem.agent import parse
from gru_mem.data.tokenizer import builtin_tokenizer, load_tokenizer

YES, NO, CONT, END, BAD = (gates.UPDATE_YES, gates.UPDATE_NO, gates.EXIT_CONTINUE, gates.EXIT_END,
                           gates.INVALID)
GOOD = "<think>t</think>\n<check>yes</check>\n<update>m</update>\n<next>end</next>"

# (name, response, update_gate, exit_gate, format_ok, candidate_memory)
TABLE = [
    ("well formed", GOOD, YES, END, True, "m"),
    ("no continue", "<think>a</think><check>no</check><update></update><next>continue</next>",
     NO, CONT, True, ""),
    ("whitespace everywhere", "\n  <think>\n a b \n</think>\n\n<check> yes\n</check>\t<update>\n"
     " the key is 7 \n</update> <next>  end </next>\n\n", YES, END, True, "the key is 7"),
    ("uppercase gate words", GOOD.replace(">yes<", ">YES<").replace(">end<", ">End<"),
     YES, END, True, "m"),
    ("uppercase tag", GOOD.replace("<check>", "<CHECK>"), BAD, END, False, "m"),
    ("gate maybe", GOOD.replace(">yes<", ">maybe<"), BAD, END, False, "m"),
    ("gate yes.", GOOD.replace(">yes<", ">yes.<"), BAD, END, False, "m"),
    ("gate two words", GOOD.replace(">end<", ">end continue<"), YES, BAD, False, "m"),
    ("empty gate", GOOD.replace(">end<", "><"), YES, BAD, False, "m"),
    ("empty update", GOOD.replace(">m<", "><"), YES, END, True, ""),
    ("missing think", GOOD.replace("<think>t</think>", ""), YES, END, False, "m"),
    ("missing check", GOOD.replace("<check>yes</check>", ""), BAD, END, False, "m"),
    ("missing update", GOOD.replace("<update>m</update>", ""), YES, END, False, ""),
    ("missing next", GOOD.replace("<next>end</next>", ""), YES, BAD, False, "m"),
    ("wrong order", "<think>t</think><update>m</update><check>no</check><next>end</next>",
     NO, END, False, "m"),
    ("close before open", "<think>t</think><check>yes</check></update>m<update><next>end</next>",
     YES, END, False, ""),
    ("duplicated check", GOOD + "<check>no</check>", BAD, END, False, "m"),
    ("duplicated open tag", GOOD.replace("<next>", "<next><next>"), YES, BAD, False, "m"),
    ("text before", "ok " + GOOD, YES, END, False, "m"),
    ("text between", GOOD.replace("</check>\n", "</check> so\n"), YES, END, False, "m"),
    ("text after", GOOD + " done", YES, END, False, "m"),
    ("unclosed update", GOOD.replace("</update>", ""), YES, END, False, ""),
    ("unclosed next (cut off)", GOOD[:-len("</next>")], YES, BAD, False, "m"),
    ("nested check in think", GOOD.replace("<think>t", "<think>t <check>no</check>"),
     BAD, END, False, "m"),
    ("only nested update", "<think>x <update>m</update></think><check>yes</check>"
     "<next>end</next>", YES, END, False, "m"),
    ("empty string", "", BAD, BAD, False, ""),
    ("plain text", "the answer is 7", BAD, BAD, False, ""),
    ("special tokens kept", GOOD + "<|im_end|>", YES, END, False, "m"),
]


@pytest.mark.parametrize("name,text,update,exit_gate,ok,candidate", TABLE,
                         ids=[case[0] for case in TABLE])
def test_table(name, text, update, exit_gate, ok, candidate):
  parsed = parse.parse_response(text)
  assert (parsed.update_gate, parsed.exit_gate, parsed.format_ok, parsed.candidate_memory) == (
      update, exit_gate, ok, candidate)
  assert parsed.format_ok == _reference_format_ok(text)


def test_fields_and_gate_helpers():
  parsed = parse.parse_response(" <think> a\nb </think><check>no</check><update> c </update>"
                                "<next>continue</next>")
  assert (parsed.think, parsed.candidate_memory, parsed.candidate_memory_ids) == ("a\nb", "c", None)
  assert parse.effective_update(YES) and not parse.effective_update(NO)
  assert not parse.effective_update(BAD) and not parse.effective_exit(BAD)
  assert parse.effective_exit(END) and not parse.effective_exit(CONT)
  np.testing.assert_array_equal(parse.effective_update(np.array([YES, NO, BAD])), [1, 0, 0])
  np.testing.assert_array_equal(parse.effective_exit(np.array([END, CONT, BAD])), [1, 0, 0])


def _reference_format_ok(text: str) -> bool:
  """Independent reference: one regex over the whole text plus tag counts."""
  if any(text.count(tag) != 1 for tag in parse.TAGS):
    return False
  match = re.fullmatch(r"\s*<think>.*</think>\s*<check>(.*)</check>\s*<update>.*</update>"
                       r"\s*<next>(.*)</next>\s*", text, re.S)
  return bool(match) and match[1].strip().lower() in ("yes", "no") and (
      match[2].strip().lower() in ("continue", "end"))


def _mutate(text: str, edits) -> str:
  for kind, position, payload in edits:
    position = position % (len(text) + 1)
    if kind == "insert":
      text = text[:position] + payload + text[position:]
    elif kind == "delete":
      text = text[:position] + text[position + len(payload):]
    else:  # duplicate a stretch
      text = text[:position] + text[position:position + len(payload)] + text[position:]
  return text


PIECES = st.sampled_from(parse.TAGS + ("<", ">", "/", "yes", "no", "end", "continue", " ", "\n",
                                      "YES", "maybe", "<|im_end|>", "\\boxed{"))
EDIT = st.tuples(st.sampled_from(["insert", "delete", "duplicate"]), st.integers(0, 200),
                 st.one_of(PIECES, st.text(max_size=4)))
GATED = st.builds(lambda t, u, m, e: parse.format_response(t, u, m, e),
                  st.sampled_from(["", "think", "a b\nc"]), st.booleans(),
                  st.sampled_from(["", "the key is 7", "x"]), st.booleans())
FUZZ_TEXT = st.one_of(st.text(max_size=80), st.builds(_mutate, GATED, st.lists(EDIT, max_size=5)),
                      st.lists(PIECES, max_size=12).map("".join))


@hypothesis.settings(max_examples=2000, deadline=None)
@hypothesis.given(FUZZ_TEXT)
def test_fuzz_never_raises_and_agrees_with_reference(text):
  parsed = parse.parse_response(text)
  assert parsed.update_gate in (YES, NO, BAD) and parsed.exit_gate in (CONT, END, BAD)
  assert parsed.format_ok == _reference_format_ok(text)
  if parsed.format_ok:
    assert parsed.update_gate != BAD and parsed.exit_gate != BAD
    again = parse.parse_response(parse.format_response(parsed.think, parsed.update_gate,
                                                       parsed.candidate_memory, parsed.exit_gate))
    assert again == parsed
  answer, answer_ok = parse.parse_answer(text)
  assert answer_ok == bool(answer)


NO_TAGS = st.text(max_size=40).filter(lambda s: not any(tag in s for tag in parse.TAGS))


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(NO_TAGS, st.sampled_from([YES, NO]), NO_TAGS, st.sampled_from([CONT, END]))
def test_format_response_round_trip(think, update, memory, exit_gate):
  parsed = parse.parse_response(parse.format_response(think, update, memory, exit_gate))
  assert parsed == parse.ParsedResponse(think.strip(), update, memory.strip(), exit_gate, True)


def test_format_response_rejects_bad_fields():
  with pytest.raises(ValueError, match="tag '</update>'"):
    parse.format_response("t", YES, "a</update>b", END)
  with pytest.raises(ValueError, match="update=-1"):
    parse.format_response("t", BAD, "m", END)
  with pytest.raises(ValueError, match="exit='end'"):
    parse.format_response("t", YES, "m", "end")
  assert parse.format_response("t", True, "m", False) == parse.format_response("t", YES, "m", CONT)


@functools.lru_cache(maxsize=1)
def _qwen2(path):
  return load_tokenizer(path)


def _tokenizers(sample_data):
  return [builtin_tokenizer(), _qwen2(os.path.join(sample_data, "qwen2_tokenizer"))]


def test_memory_cut_to_exactly_memory_tokens(sample_data):
  candidate = ("the magic number of the golden apple is 7381, and the silver wagon belongs to "
               "the bright tower near the harbor; naïve café notes follow.")
  response = parse.format_response("found it", YES, candidate, CONT)
  for tokenizer in _tokenizers(sample_data):
    full_ids = tokenizer.encode(candidate)
    assert len(full_ids) > 12
    for memory_tokens in (0, 1, 5, 12):
      parsed = parse.parse_response(response, memory_tokens, tokenizer)
      assert parsed.candidate_memory_ids == tuple(full_ids[:memory_tokens])
      assert parsed.candidate_memory == tokenizer.decode(full_ids[:memory_tokens])
      memagent = parse.parse_response(candidate, memory_tokens, tokenizer, mode="memagent")
      assert (memagent.candidate_memory, memagent.format_ok) == (parsed.candidate_memory,
                                                                 memory_tokens > 0)
    uncut = parse.parse_response(response, len(full_ids), tokenizer)
    assert (uncut.candidate_memory, uncut.candidate_memory_ids) == (candidate, tuple(full_ids))
  # A cut inside a multi-byte character (byte-level tokens of "ï") decodes to a replacement char.
  builtin = builtin_tokenizer()
  ids = builtin.encode("naïve")
  for cut in range(len(ids) + 1):
    parsed = parse.parse_response(parse.format_response("", YES, "naïve", END), cut, builtin)
    assert parsed.candidate_memory_ids == tuple(ids[:cut])


def test_memory_cut_argument_errors_and_odd_text():
  with pytest.raises(ValueError, match="needs a tokenizer"):
    parse.parse_response(GOOD, memory_tokens=4)
  with pytest.raises(ValueError, match="memory_tokens=-1"):
    parse.parse_response(GOOD, -1, builtin_tokenizer())
  odd = GOOD.replace(">m<", ">\ud800 lone surrogate \x00<")
  parsed = parse.parse_response(odd, 3, builtin_tokenizer())
  assert parsed.format_ok and len(parsed.candidate_memory_ids) == 3


def test_memagent_mode():
  tokenizer = builtin_tokenizer()
  whole = parse.parse_response("  the key is 7 \n", mode="memagent")
  assert (whole.candidate_memory, whole.format_ok) == ("the key is 7", True)
  empty = parse.parse_response(" \n ", mode="memagent")
  assert (empty.candidate_memory, empty.format_ok) == ("", False)
  parsed = parse.parse_response(" the key is 7 ", 2, tokenizer, mode="memagent")
  assert (parsed.update_gate, parsed.exit_gate, parsed.format_ok) == (YES, CONT, True)
  assert parsed.candidate_memory_ids == tuple(tokenizer.encode("the key is 7")[:2])
  with pytest.raises(ValueError, match="mode='gru'"):
    parse.parse_response(GOOD, mode="gru")


ANSWERS = [
    ("so the answer is \\boxed{7}.", "7", True),
    ("\\boxed{a} then \\boxed{ b }", "b", True),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{x} and \\boxed{y", None, False),  # the last box is cut off
    ("\\boxed{}", "", False),
    ("\\boxed{ }", "", False),
    ("the answer is 7", None, False),
    ("\\boxed 7", None, False),
    ("", None, False),
]


@pytest.mark.parametrize("text,answer,ok", ANSWERS)
def test_parse_answer(text, answer, ok):
  assert parse.parse_answer(text) == (answer, ok)
