"""agent/prompts.py: spliced prompt ids against tokenizing the whole prompt text."""

import copy
import functools
import os
import re

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


@pytest.mark.parametrize("mode", modes.MODES)
def test_minimal_prompts_splice_like_full_text_and_are_short(mode):
  """The `minimal` set: spliced ids equal tokenizing the whole text; the fields come in order;
  its template adds at most half the compact set's tokens to a turn."""
  tokenizer = builtin_tokenizer()
  builder = prompts.PromptBuilder(tokenizer, mode, prompts.MINIMAL)
  template = prompts.memory_template(mode, prompts.MINIMAL)
  for question, memory, chunk in FIELDS[:2]:
    memory_ids, answer_ids = _spliced(builder, tokenizer, question, memory, chunk)
    memory_text = _full_text(tokenizer, template, question=question, memory=memory, chunk=chunk)
    answer_text = _full_text(tokenizer, prompts.MINIMAL.answer, question=question, memory=memory)
    assert memory_ids.tolist() == tokenizer.encode(memory_text)
    assert answer_ids.tolist() == tokenizer.encode(answer_text)
    positions = [memory_text.index(f"{name}:\n{field}")
                 for name, field in (("question", question), ("memory", memory or "none"),
                                     ("section", chunk))]
    assert positions == sorted(positions)
  compact = prompts.PromptBuilder(tokenizer, mode)
  assert 2 * builder.turn_overhead_tokens <= compact.turn_overhead_tokens
  assert prompts.choose_prompt_set(tokenizer, "minimal") is prompts.MINIMAL


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


# --- prompt sets: paper (instruct models), compact (built-in), a user's prompt file -------------


def _paper_reference(tokenizer, template, **fields):
  """Independent reference: the filled-in paper template as one chat user message."""
  if not fields.get("memory"):
    fields["memory"] = "No previous memory"
  return tokenizer.apply_chat_template([{"role": "user", "content": template.format(**fields)}],
                                       add_generation_prompt=True)


@pytest.mark.parametrize("mode", modes.MODES)
def test_paper_prompts_through_the_qwen2_chat_template(sample_data, mode):
  qwen2 = _qwen2(os.path.join(sample_data, "qwen2_tokenizer"))
  builder = prompts.PromptBuilder(qwen2, mode, prompts.PAPER)
  template = prompts.memory_template(mode, prompts.PAPER)
  for question, memory, chunk in FIELDS:
    memory_ids, answer_ids = _spliced(builder, qwen2, question, memory, chunk)
    memory_text = _paper_reference(qwen2, template, question=question, memory=memory, chunk=chunk)
    answer_text = _paper_reference(qwen2, prompts.PAPER.answer, question=question, memory=memory)
    assert memory_ids.tolist() == qwen2.encode(memory_text)
    assert answer_ids.tolist() == qwen2.encode(answer_text)
    assert builder.memory_turn_text(question, memory, chunk) == memory_text
  text = builder.memory_turn_text("Who?", "", "Some section.")
  assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
  order = ["<problem>\nWho?", "<memory>\nNo previous memory", "<section>\nSome section."]
  if modes.is_gated(mode):
    order += ["<think>", "</think>", "<check>", "</check>", "<update>", "</update>", "<next>",
              "</next>"]
  positions = [text.index(piece) for piece in order]
  assert positions == sorted(positions)
  assert "\\boxed{}" in builder.answer_turn_text("Who?", "m")


def test_prompt_choice_follows_the_tokenizer(sample_data, tmp_path):
  qwen2 = _qwen2(os.path.join(sample_data, "qwen2_tokenizer"))
  builtin = builtin_tokenizer()
  builtin.save(str(tmp_path / "saved"))  # as in a run folder: still the built-in tokenizer
  assert prompts.choose_prompt_set(qwen2) is prompts.PAPER
  assert prompts.choose_prompt_set(builtin) is prompts.COMPACT
  assert prompts.choose_prompt_set(load_tokenizer(str(tmp_path / "saved"))) is prompts.COMPACT
  assert prompts.choose_prompt_set(builtin, "paper") is prompts.PAPER
  with pytest.raises(ValueError, match="agent.prompt='fancy': use one of"):
    prompts.choose_prompt_set(builtin, "fancy")


PROMPT_FILE = """# my prompts
== memory ==
Problem:
{question}
Notes so far:
{memory}
Text:
{chunk}
Answer as <think>why</think> <check>yes or no</check> <update>notes</update> <next>end or continue</next>.
== memagent_memory ==
Problem:
{question}
Notes so far:
{memory}
Text:
{chunk}
Write the new notes {like this}.
== answer ==
Problem:
{question}
Notes:
{memory}
Put the answer in \\boxed{}.
== empty_memory ==
(nothing yet)
"""


def prompt_file_text() -> str:
  """PROMPT_FILE with " " before the newline after each field (the piece-boundary rule)."""
  return re.sub(r"(\{(?:question|memory|chunk)\})\n", r"\1 \n", PROMPT_FILE)


def test_prompt_file(sample_data, tmp_path):
  qwen2 = _qwen2(os.path.join(sample_data, "qwen2_tokenizer"))
  path = tmp_path / "prompts.txt"
  path.write_text(prompt_file_text())
  prompt_set = prompts.read_prompt_file(str(path))
  builder = prompts.PromptBuilder(qwen2, "memagent", prompt_set)
  text = builder.memory_turn_text("Who?", "", "Text here.")
  assert "Notes so far:\n(nothing yet) \nText:\nText here. \nWrite the new notes {like this}." in text
  question, memory, chunk = FIELDS[1]
  ids, answer = _spliced(builder, qwen2, question, memory, chunk)
  assert ids.tolist() == qwen2.encode(builder.memory_turn_text(question, memory, chunk))
  assert "Put the answer in \\boxed{}." in builder.answer_turn_text("Who?", "m")


@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace("== answer ==", "== answers =="), "line 18: unknown section 'answers'"),
    (lambda t: t + "== empty_memory ==\nx\n", "section 'empty_memory' appears twice"),
    (lambda t: t.replace("== empty_memory ==\n(nothing yet)\n", ""),
     "section 'empty_memory' is missing"),
    (lambda t: t.replace("Notes:\n{memory}", "Notes:\n{question}"),
     r"section 'answer' holds the fields \['question', 'question'\]"),
    (lambda t: t.replace("<check>yes or no</check> ", ""),
     r"does not describe the response tags \['<check>', '</check>'\]"),
    (lambda t: t.replace("\\boxed{}", "a box"), "must ask for the answer inside"),
])
def test_prompt_file_errors_name_the_problem(tmp_path, change, message):
  path = tmp_path / "prompts.txt"
  path.write_text(change(prompt_file_text()))
  with pytest.raises(ValueError, match=f"agent.prompt_file=.*{message}"):
    prompts.read_prompt_file(str(path))
