"""Needle generators: token lengths, evidence spans found independently by regex, seeds, depth."""

import functools
import os
import re

import pytest

from gru_mem.data import synthetic
from gru_mem.data.tokenizer import builtin_tokenizer, load_tokenizer

QUESTION_PATTERNS = [
    re.compile(r"what is the special magic (number|id|word) for (.+) in the document\?"),
    re.compile(r"what are all the special magic (number|id|word)s for (.+) in the document\?"),
    re.compile(r"what are the special magic (number|id|word)s for (.+) in the document\?"),
]


@functools.lru_cache(maxsize=1)
def _load_qwen2(folder):
  return load_tokenizer(folder)


@pytest.fixture
def qwen2(sample_data):
  return _load_qwen2(os.path.join(sample_data, "qwen2_tokenizer"))


@pytest.fixture
def essays(sample_data):
  return os.path.join(sample_data, "paul_graham_essays.txt")


def total_tokens(tok, example):
  return len(tok.encode(example.document)) + len(tok.encode(example.question))


def gold_needles(example):
  """(span, value) of every sentence stating a value for a key the question asks, found by regex."""
  for pattern in QUESTION_PATTERNS:
    match = pattern.fullmatch(example.question)
    if match:
      noun, keys = match.group(1), re.split(r", | and ", match.group(2))
      break
  else:
    raise AssertionError(f"unexpected question {example.question!r}")
  found = []
  for key in keys:
    needle = re.compile(rf"the (special magic {noun} for {re.escape(key)} is ([0-9a-z-]+))\.")
    found += [(m.span(1), m.group(2)) for m in needle.finditer(example.document)]
  return sorted(found)


def check_multihop(example):
  start_key = re.fullmatch(r"what is the secret value of the key that (\w+ \w+) points to\?",
                           example.question).group(1)
  links = re.findall(rf"the key of {start_key} points to (\w+ \w+)\.", example.document)
  assert len(links) == 1
  values = re.findall(rf"the secret value of {links[0]} is (\w+)\.", example.document)
  assert values == list(example.answers)
  # The chain is recoverable from the evidence alone: link 1 names the bridge, link 2 the value.
  first, second = sorted(example.evidence_texts(), key=lambda text: "points to" not in text)
  assert first == f"key of {start_key} points to {links[0]}"  # the facts (`fact_span`)
  assert second == f"secret value of {links[0]} is {values[0]}"


def check_evidence(example):
  """Evidence spans are exactly the facts of the gold needle sentences and hold every answer."""
  if synthetic.TASKS[example.task].multihop:
    return check_multihop(example)
  found = gold_needles(example)
  assert [span for span, _ in found] == sorted(example.evidence)
  assert sorted(value for _, value in found) == sorted(example.answers)
  evidence_text = " ".join(example.evidence_texts())
  assert all(answer in evidence_text for answer in example.answers)
  assert example.answer_mode == ("all" if len(example.answers) > 1 else "any")


@pytest.mark.parametrize("target", [2048, 8192])
def test_lengths_and_evidence_builtin(target, essays):
  tok = builtin_tokenizer()
  for task in synthetic.TASKS:
    for path in (essays, None):  # the essay file and the built-in word haystack
      example = synthetic.generate(task, target, tok, seed=11, essays_path=path)
      assert abs(total_tokens(tok, example) - target) <= 0.02 * target, (task, path)
      check_evidence(example)


@pytest.mark.parametrize("target", [2048, 8192])
def test_lengths_and_evidence_qwen2(target, essays, qwen2):
  for task in synthetic.TASKS:
    example = synthetic.generate(task, target, qwen2, seed=5, essays_path=essays)
    assert abs(total_tokens(qwen2, example) - target) <= 0.02 * target, task
    check_evidence(example)


def test_task_shapes():
  tok = builtin_tokenizer()
  multikey = synthetic.generate("niah_multikey_1", 2048, tok, seed=3)
  assert multikey.document.count("the special magic number for") == 4  # 1 gold + 3 distractors
  haystack_of_needles = synthetic.generate("niah_multikey_2", 2048, tok, seed=3)
  assert haystack_of_needles.document.count("the special magic number for") > 50
  assert len(gold_needles(haystack_of_needles)) == 1
  uuids = synthetic.generate("niah_multikey_3", 2048, tok, seed=3)
  assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                      uuids.answers[0])
  assert len(synthetic.generate("niah_multivalue", 2048, tok, seed=3).answers) == 4
  assert len(synthetic.generate("niah_multiquery", 2048, tok, seed=3).answers) == 4
  noise = synthetic.generate("niah_single_1", 2048, tok, seed=3)
  assert noise.document.count("the sky is clear.") > 50
  more = synthetic.generate("niah_multiquery", 2048, tok, seed=3, num_keys=6, num_queries=2)
  assert len(more.answers) == 2 and more.document.count("the special magic number for") == 6
  check_evidence(more)


def test_same_seed_same_example_and_seeds_differ(essays):
  tok = builtin_tokenizer()
  for task in ("niah_single_1", "niah_multikey_2", "niah_multihop"):
    first = synthetic.generate(task, 2048, tok, seed=7, essays_path=essays)
    again = synthetic.generate(task, 2048, tok, seed=7, essays_path=essays)
    other = synthetic.generate(task, 2048, tok, seed=8, essays_path=essays)
    assert first == again
    assert (first.document, first.answers) != (other.document, other.answers)


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_1", "niah_multivalue",
                                  "niah_multihop", "niah_multikey_2"])
def test_evidence_within_first_fraction(task, essays):
  tok = builtin_tokenizer()
  for seed in range(4):
    example = synthetic.generate(task, 4096, tok, seed=seed, essays_path=essays,
                                 evidence_within=0.2)
    document_tokens = len(tok.encode(example.document))
    for start, _ in example.evidence:
      assert len(tok.encode(example.document[:start])) <= 0.2 * document_tokens, (seed, start)
    check_evidence(example)


def test_uniform_depth_spreads_over_the_document():
  tok = builtin_tokenizer()
  depths = []
  for seed in range(30):
    example = synthetic.generate("niah_single_1", 2048, tok, seed=seed)
    depths.append(example.evidence[0][0] / len(example.document))
  assert min(depths) < 0.2 and max(depths) > 0.8


class CountingTokenizer:
  """Counts the characters every encode call processes."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self.name = tokenizer.name
    self.characters = 0

  def encode(self, text):
    self.characters += len(text)
    return self._tokenizer.encode(text)

  def encode_batch(self, texts):
    self.characters += sum(len(text) for text in texts)
    return self._tokenizer.encode_batch(texts)


def test_long_target_tokenizes_only_a_few_times_the_document():
  tok = CountingTokenizer(builtin_tokenizer())
  target = 131072
  example = synthetic.generate("niah_multikey_1", target, tok, seed=1)
  assert abs(total_tokens(builtin_tokenizer(), example) - target) <= 0.002 * target
  # Pieces counted once + one or two full passes: a few documents' worth, not O(sentences^2).
  assert tok.characters < 4 * len(example.document)
  check_evidence(example)


@pytest.mark.slow
def test_one_million_tokens_qwen2(essays, qwen2):
  target = 1_048_576
  example = synthetic.generate("niah_multivalue", target, qwen2, seed=2, essays_path=essays)
  assert abs(total_tokens(qwen2, example) - target) <= 0.002 * target
  check_evidence(example)


def test_bad_arguments():
  tok = builtin_tokenizer()
  with pytest.raises(ValueError, match=r"task 'niah_single_2': target_tokens=20 is shorter than "
                                       r"the question \(\d+ tokens\)"):
    synthetic.generate("niah_single_2", 20, tok)
  with pytest.raises(ValueError, match=r"task='niah_single_9': unknown"):
    synthetic.generate("niah_single_9", 2048, tok)
  with pytest.raises(ValueError, match="target_tokens=0: must be"):
    synthetic.generate("niah_single_1", 0, tok)
  with pytest.raises(ValueError, match="evidence_within=0: must be in"):
    synthetic.generate("niah_single_1", 2048, tok, evidence_within=0)
  with pytest.raises(ValueError, match="evidence_within=0.01: the first 1% of a"):
    synthetic.generate("niah_multivalue", 2048, tok, evidence_within=0.01)
  with pytest.raises(FileNotFoundError, match="essays_path='/no/such/file.txt'"):
    synthetic.generate("niah_single_2", 2048, tok, essays_path="/no/such/file.txt")
