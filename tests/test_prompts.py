"""agent/prompts.py: spliced prompt ids against tokenizing the whole prompt text."""

import copy
import functools
import os

import numpy as np
import pytest

from gru_mem.agent import modes, prompts
from gru_mem.data.tokenizer import IM_START, Tokenizer, builtin_tokenizer, load_tokenizer

# (question, memory, chunk) texts: typical fields whose splices match full-text tokenization.
FIELDS = [
    ("what is the magic number of the golden apple?", "",
     "the golden apple is in the garden. the magic number of the golden apple is 7381."),
    ("Who wrote the letter?", "the letter was found in the library.",
     " and then the river turned cold,"),
    ("which city?", "Paris (France), 1889; \"tower\" - notes",
     "Ünïcödé text: 東京 and ¿qué? 42"),
]
# Fields in the documented exceptions: ids differ from encode(full text), text is the same.
EXCEPTIONS = [("q?", "m.", "\n\nthe chunk starts a paragraph"), ("q?", "m.", "ends in spaces  ")]


@functools.lru_cache(maxsize=1)
def _qwen2(path):
  return load_tokenizer(path)


@pytest.fixture(params=["builtin", "qwen2"])
def tokenizer(request):
  if request.param == "builtin":
    return builtin_tokenizer()
  return _qwen2(os.path.join(request.getfixturevalue("sample_data"), "qwen2_tokenizer"))


def _full_text(tokenizer, template, **fields):
  """Independent reference: the filled-in template as one chat user message."""
  if not fields.get("memory", True):
    fields["memory"] = prompts.EMPTY_MEMORY
  return tokenizer.apply_chat_template([{"role": "user", "content": template.format(**fields)}],
                                       add_generation_prompt=True)


def _spliced(builder, tokenizer, question, memory, chunk):
  ids = [tokenizer.encode(text) for text in (question, memory, chunk)]
  return builder.memory_turn(*ids), builder.answer_turn(ids[0], ids[1])


@pytest.mark.parametrize("mode", modes.MODES)
def test_spliced_ids_match_full_text(tokenizer, mode):
  builder = prompts.PromptBuilder(tokenizer, mode)
  for question, memory, chunk in FIELDS + EXCEPTIONS:
    memory_ids, answer_ids = _spliced(builder, tokenizer, question, memory, chunk)
    assert memory_ids.dtype == np.int32 and answer_ids.dtype == np.int32
    memory_text = _full_text(tokenizer, prompts.memory_template(mode), question=question,
                             memory=memory, chunk=chunk)
    answer_text = _full_text(tokenizer, prompts.ANSWER_TEMPLATE, question=question, memory=memory)
    assert tokenizer.decode(memory_ids, skip_special_tokens=False) == memory_text
    assert tokenizer.decode(answer_ids, skip_special_tokens=False) == answer_text
    assert builder.memory_turn_text(question, memory, chunk) == memory_text
    assert builder.answer_turn_text(question, memory) == answer_text
    if (question, memory, chunk) in FIELDS:
      assert memory_ids.tolist() == tokenizer.encode(memory_text)
      assert answer_ids.tolist() == tokenizer.encode(answer_text)


def test_documented_exceptions_differ(tokenizer):
  """A chunk starting with a newline or (Qwen2 only) ending in spaces: same text, other ids."""
  builder = prompts.PromptBuilder(tokenizer)
  builtin = tokenizer is builtin_tokenizer()
  for (question, memory, chunk), differs in zip(EXCEPTIONS, [True, not builtin]):
    ids, _ = _spliced(builder, tokenizer, question, memory, chunk)
    full_ids = tokenizer.encode(builder.memory_turn_text(question, memory, chunk))
    assert (ids.tolist() != full_ids) == differs


def test_prompt_wording_and_empty_memory(tokenizer):
  gated, memagent = prompts.PromptBuilder(tokenizer, "gru_mem"), prompts.PromptBuilder(
      tokenizer, "memagent")
  gated_text, memagent_text = gated.memory_turn_text("q", "", "c"), memagent.memory_turn_text(
      "q", "", "c")
  tags = [f"<{end}{part}>" for part in ("think", "check", "update", "next") for end in ("", "/")]
  positions = [gated_text.index(tag) for tag in tags]
  assert positions == sorted(positions)
  assert not any(tag in memagent_text for tag in tags)
  assert "\\boxed{}" in gated.answer_turn_text("q", "m")
  q, c = tokenizer.encode("q"), tokenizer.encode("c")
  assert gated.memory_turn(q, [], c).tolist() == gated.memory_turn(
      q, tokenizer.encode(prompts.EMPTY_MEMORY), c).tolist()
  assert gated.answer_turn(q, np.zeros((0,), np.int32)).tolist() == gated.answer_turn(
      q, tokenizer.encode(prompts.EMPTY_MEMORY)).tolist()


def test_overhead_counts_template_tokens(tokenizer):
  builder = prompts.PromptBuilder(tokenizer)
  empty = len(tokenizer.encode(prompts.EMPTY_MEMORY))
  q, m, c = (tokenizer.encode(t) for t in FIELDS[1])
  assert len(builder.memory_turn(q, m, c)) == len(q) + len(m) + len(c) + (
      builder.turn_overhead_tokens - empty)
  assert len(builder.memory_turn(q, [], c)) == len(q) + len(c) + builder.turn_overhead_tokens
  assert len(builder.answer_turn(q, m)) == len(q) + len(m) + builder.answer_overhead_tokens - empty


class CountingTokenizer(Tokenizer):
  """Counts encode calls."""

  def __init__(self, inner):
    super().__init__(inner.hf, inner.name)
    self.encode_calls = 0

  def encode(self, text):
    self.encode_calls += 1
    return super().encode(text)


def test_templates_are_tokenized_once():
  counting = CountingTokenizer(builtin_tokenizer())
  builder = prompts.PromptBuilder(counting, "gru_mem")
  after_init = counting.encode_calls
  assert after_init <= 10
  q, m, c = (np.asarray(builtin_tokenizer().encode(t), np.int32) for t in FIELDS[0])
  for turn in range(100):
    builder.memory_turn(q, m[:turn % 5], c)
    builder.answer_turn(q, m)
  builder.response_stop_sequences(include_end_tag=True)
  assert counting.encode_calls == after_init


def test_chat_template_applied_when_present(sample_data):
  qwen2 = _qwen2(os.path.join(sample_data, "qwen2_tokenizer"))
  im_start = qwen2.token_id(IM_START)
  ids = prompts.PromptBuilder(qwen2).memory_turn([1], [2], [3]).tolist()
  assert ids[0] == im_start and ids.count(im_start) == 3  # system, user, assistant
  assert qwen2.decode(ids[-3:], skip_special_tokens=False) == "<|im_start|>assistant\n"

  plain_hf = copy.deepcopy(builtin_tokenizer().hf)
  plain_hf.chat_template = None
  plain = Tokenizer(plain_hf, "plain")
  assert not plain.has_chat_template
  builder = prompts.PromptBuilder(plain)
  ids = builder.memory_turn(plain.encode("q?"), [], plain.encode("c")).tolist()
  assert plain.token_id(IM_START) not in ids
  expected = prompts.GATED_MEMORY_TEMPLATE.format(question="q?", memory="none", chunk="c") + "\n\n"
  assert plain.decode(ids) == expected and ids == plain.encode(expected)


def test_response_stop_sequences(sample_data):
  qwen2 = _qwen2(os.path.join(sample_data, "qwen2_tokenizer"))
  eos, im_end = qwen2.token_id("<|endoftext|>"), qwen2.token_id("<|im_end|>")
  gated = prompts.PromptBuilder(qwen2, "gru_mem")
  assert set(gated.response_stop_sequences()) == {(eos,), (im_end,)}
  with_tag = gated.response_stop_sequences(include_end_tag=True)
  assert with_tag[-1] == tuple(qwen2.encode("</next>")) and len(with_tag) == 3
  memagent = prompts.PromptBuilder(qwen2, "memagent")
  assert len(memagent.response_stop_sequences(include_end_tag=True)) == 2


def test_bad_mode():
  with pytest.raises(ValueError, match="mode='gated'"):
    prompts.PromptBuilder(builtin_tokenizer(), "gated")
