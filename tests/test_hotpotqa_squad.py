"""HotpotQA and SQuAD long documents on the real samples: gold paragraphs, evidence, chunks."""

import copy
import functools
import json
import os
import re

import pytest

from gru_mem.agent import chunking
from gru_mem.data import hotpotqa, squad
from gru_mem.data.tokenizer import builtin_tokenizer, load_tokenizer

HEADER = re.compile(r"(?:^|\n\n)Document (\d+):\n([^\n]*)\n")


@functools.lru_cache(maxsize=1)
def _load_qwen2(folder):
  return load_tokenizer(folder)


@pytest.fixture
def qwen2(sample_data):
  return _load_qwen2(os.path.join(sample_data, "qwen2_tokenizer"))


@pytest.fixture
def hotpot_records(sample_data):
  return hotpotqa.load_hotpotqa(os.path.join(sample_data, "hotpotqa_dev_sample.json"))


@pytest.fixture
def squad_data(sample_data):
  return squad.load_squad(os.path.join(sample_data, "squad_v2_dev_sample.json"))


def titles_in(document):
  """(number, title) of each numbered document, read back from the text."""
  return [(int(number), title) for number, title in HEADER.findall(document)]


def reference_evidence_chunks(tok, document, evidence, chunk_tokens):
  """Evidence chunks found without offsets: L(i) = len(decode(ids[:i])); token i covers
  [L(i), L(i+1)); binary searches find the first token ending after a span's start and the first
  token starting at or after its end."""
  ids = tok.encode(document)
  assert tok.decode(ids) == document
  decoded = functools.lru_cache(maxsize=None)(lambda i: len(tok.decode(ids[:i])))

  def first(predicate):
    low, high = 0, len(ids)
    while low < high:
      middle = (low + high) // 2
      if predicate(middle):
        high = middle
      else:
        low = middle + 1
    return low

  chunks = set()
  for start, end in evidence:
    t0 = first(lambda i: decoded(i + 1) > start)
    t1 = first(lambda i: decoded(i) >= end)
    chunks.update(range(t0 // chunk_tokens, (t1 - 1) // chunk_tokens + 1))
  return tuple(sorted(chunks))


def test_hotpotqa_gold_paragraphs_and_evidence(hotpot_records):
  for index in range(12):
    record = hotpot_records[index]
    example = hotpotqa.hotpotqa_example(hotpot_records, index, num_docs=30, seed=3)
    numbered = titles_in(example.document)
    assert [number for number, _ in numbered] == list(range(1, 31))
    titles = [title for _, title in numbered]
    assert len(set(titles)) == 30
    gold_titles = {title for title, _ in record["supporting_facts"]}
    own_titles = {title for title, _ in record["context"]}
    assert gold_titles <= set(titles)
    assert not (set(titles) - gold_titles) & own_titles  # distractors come from other records
    sentences = dict((title, s) for title, s in record["context"])
    supporting = sorted(sentences[t][i].strip() for t, i in record["supporting_facts"])
    assert sorted(example.evidence_texts()) == supporting
    assert example.id == record["_id"] and example.answers == (record["answer"],)


@pytest.mark.parametrize("chunk_tokens", [64, 500])
def test_hotpotqa_evidence_chunks(hotpot_records, qwen2, chunk_tokens):
  for index, tok in ((0, qwen2), (7, qwen2), (3, builtin_tokenizer())):
    example = hotpotqa.hotpotqa_example(hotpot_records, index, num_docs=25, seed=1)
    chunked = chunking.chunk_example(example, tok, chunk_tokens)
    expected = reference_evidence_chunks(tok, example.document, example.evidence, chunk_tokens)
    assert chunked.evidence_chunks == expected
    assert chunked.last_evidence_chunk == expected[-1]


def test_hotpotqa_seeds_and_target_tokens(hotpot_records, qwen2):
  first = hotpotqa.hotpotqa_example(hotpot_records, 4, num_docs=20, seed=0)
  assert first == hotpotqa.hotpotqa_example(hotpot_records, 4, num_docs=20, seed=0)
  assert first.document != hotpotqa.hotpotqa_example(hotpot_records, 4, num_docs=20, seed=1).document
  example = hotpotqa.hotpotqa_example(hotpot_records, 4, target_tokens=8000, tokenizer=qwen2)
  tokens = len(qwen2.encode(example.document)) + len(qwen2.encode(example.question))
  assert 0.97 * 8000 <= tokens <= 8000
  examples = list(hotpotqa.hotpotqa_examples(hotpot_records, num_docs=12, limit=3))
  assert [e.id for e in examples] == [r["_id"] for r in hotpot_records[:3]]


def test_hotpotqa_bad_records(sample_data, hotpot_records, tmp_path):
  broken = copy.deepcopy(hotpot_records[:3])
  del broken[1]["supporting_facts"]
  with pytest.raises(ValueError, match=r"HotpotQA record 1 \(_id='5a8c7595554299585d9e36b6'\): "
                                       r"missing field 'supporting_facts'"):
    list(hotpotqa.hotpotqa_examples(broken, num_docs=5))
  broken = copy.deepcopy(hotpot_records[:3])
  broken[2]["supporting_facts"].append(["No Such Title", 0])
  with pytest.raises(ValueError, match=r"record 2 .*'supporting_facts' names title 'No Such"):
    hotpotqa.validate_records(broken)
  broken = copy.deepcopy(hotpot_records[:3])
  del broken[0]["_id"]
  with pytest.raises(ValueError, match=r"HotpotQA record 0 \(no _id\): missing field '_id'"):
    hotpotqa.validate_records(broken)
  with pytest.raises(ValueError, match=r"num_docs=500 needs 498 distractor paragraphs but only"):
    hotpotqa.hotpotqa_example(hotpot_records[:10], 0, num_docs=500)
  with pytest.raises(ValueError, match="give exactly one of num_docs or target_tokens"):
    hotpotqa.hotpotqa_example(hotpot_records, 0)
  with pytest.raises(FileNotFoundError, match="hotpotqa_path='/no/file.json'"):
    hotpotqa.load_hotpotqa("/no/file.json")


def test_squad_gold_paragraph_and_evidence(squad_data, qwen2):
  assert len(squad_data.questions) == 1721  # the answerable ones, as PROVENANCE.md counts
  for index in (0, 50, 900, 1720):
    question = squad_data.questions[index]
    title, context = squad_data.paragraphs[question.paragraph]
    example = squad.squad_example(squad_data, index, num_docs=40, seed=2)
    assert len(titles_in(example.document)) == 40
    assert example.evidence_texts() == [context.strip()]
    assert example.document.count(context) == 1
    assert all(answer in example.evidence_texts()[0] for answer in example.answers)
    for chunk_tokens in (128, 700):
      chunked = chunking.chunk_example(example, qwen2, chunk_tokens)
      assert chunked.evidence_chunks == reference_evidence_chunks(
          qwen2, example.document, example.evidence, chunk_tokens)


def test_squad_bad_input(sample_data):
  with open(os.path.join(sample_data, "squad_v2_dev_sample.json")) as f:
    raw = json.load(f)
  broken = copy.deepcopy(raw)
  qa = broken["data"][1]["paragraphs"][2]["qas"][0]
  del qa["answers"]
  with pytest.raises(ValueError, match=(r"SQuAD article 1 \('Computational_complexity_theory'\) "
                                        rf"paragraph 2 question id='{qa['id']}': missing field "
                                        r"'answers'")):
    squad.parse_squad(broken)
  with pytest.raises(ValueError, match="SQuAD file: missing field 'data'"):
    squad.parse_squad({"version": "v2.0"})
  data = squad.parse_squad({"data": raw["data"][:1]})
  with pytest.raises(ValueError, match=r"SQuAD question 0 \(id='.*'\): num_docs=100 needs 99"):
    squad.squad_example(data, 0, num_docs=100)
