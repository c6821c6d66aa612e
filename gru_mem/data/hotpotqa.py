"""MemAgent-style long documents from HotpotQA (distractor-setting JSON).

A record: {_id, question, answer, supporting_facts: [[title, sent_id]], context: [[title, [sentences]]]}.
Its document holds the question's gold paragraphs (the titles its supporting facts name) plus
distractor paragraphs drawn from other records' contexts, shuffled with a seed, each one numbered:

  Document 3:
  <title>
  <sentences joined as given>

Evidence spans are the supporting sentences (without surrounding whitespace) inside that text.
"""

from __future__ import annotations

import functools
import os
import random
from typing import Iterator, Optional, Sequence

from gru_mem.data.example import Example, assemble_documents, read_json_file, stripped_span

TASK = "hotpotqa"
REQUIRED_FIELDS = ("_id", "question", "answer", "supporting_facts", "context")


def _where(record, index: int) -> str:
  record_id = record.get("_id") if isinstance(record, dict) else None
  return f"HotpotQA record {index} ({'_id=' + repr(record_id) if record_id else 'no _id'})"


def validate_record(record, index: int) -> None:
  """Raises ValueError naming the record and field when `record` is not a usable HotpotQA record."""
  where = _where(record, index)
  if not isinstance(record, dict):
    raise ValueError(f"{where}: is a {type(record).__name__}, not a JSON object")
  for field in REQUIRED_FIELDS:
    if field not in record:
      raise ValueError(f"{where}: missing field {field!r}")
  if not isinstance(record["question"], str) or not record["question"].strip():
    raise ValueError(f"{where}: field 'question' must be a non-empty string")
  if not isinstance(record["answer"], str):
    raise ValueError(f"{where}: field 'answer' must be a string")
  context = record["context"]
  if not isinstance(context, list) or not context:
    raise ValueError(f"{where}: field 'context' must be a non-empty list of [title, sentences]")
  sentences_by_title = {}
  for item in context:
    if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
        or not isinstance(item[1], list)):
      raise ValueError(f"{where}: field 'context' has an entry that is not [title, [sentences]]")
    sentences_by_title[item[0]] = item[1]
  facts = record["supporting_facts"]
  if not isinstance(facts, list) or not facts:
    raise ValueError(f"{where}: field 'supporting_facts' must be a non-empty list of [title, sent_id]")
  for fact in facts:
    if not isinstance(fact, (list, tuple)) or len(fact) != 2:
      raise ValueError(f"{where}: field 'supporting_facts' entry {fact!r} is not [title, sent_id]")
    title, sent_id = fact
    if title not in sentences_by_title:
      raise ValueError(f"{where}: field 'supporting_facts' names title {title!r}, which is not "
                       "in 'context'")
    if not isinstance(sent_id, int) or not 0 <= sent_id < len(sentences_by_title[title]):
      raise ValueError(f"{where}: field 'supporting_facts' names sentence {sent_id!r} of {title!r}, "
                       f"which has {len(sentences_by_title[title])} sentences")


def validate_records(records) -> list[dict]:
  if not isinstance(records, list):
    raise ValueError(f"HotpotQA data is a {type(records).__name__}: expected a JSON list of records")
  for index, record in enumerate(records):
    validate_record(record, index)
  return records


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, modified: float) -> tuple:
  del modified  # part of the cache key only: a rewritten file is read again
  return tuple(validate_records(read_json_file(path, "hotpotqa_path")))


def load_hotpotqa(path: str) -> list[dict]:
  """Reads and validates a HotpotQA JSON file (cached per path and modification time)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"hotpotqa_path={path!r} does not exist: give a HotpotQA JSON file")
  return list(_load_cached(path, os.path.getmtime(path)))


def paragraph_body(title: str, sentences: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
  """"<title>\\n<sentences joined>" and each sentence's stripped span inside it."""
  offset = len(title) + 1
  spans = []
  for sentence in sentences:
    start, end = stripped_span(sentence, 0, len(sentence))
    spans.append((offset + start, offset + end))
    offset += len(sentence)
  return title + "\n" + "".join(sentences), spans


def _gold_paragraphs(record) -> list[tuple[str, list[tuple[int, int]]]]:
  """(body, supporting-sentence spans) of each gold paragraph, in context order."""
  wanted: dict[str, set[int]] = {}
  for title, sent_id in record["supporting_facts"]:
    wanted.setdefault(title, set()).add(sent_id)
  gold = []
  for title, sentences in record["context"]:
    if title in wanted:
      body, spans = paragraph_body(title, sentences)
      gold.append((body, [spans[i] for i in sorted(wanted[title]) if spans[i][1] > spans[i][0]]))
  return gold


def _pool_entries(records: Sequence[dict]) -> list[tuple[str, str]]:
  """(title, body) of every paragraph of every record, first occurrence of each title."""
  seen: dict[str, str] = {}
  for record in records:
    for title, sentences in record["context"]:
      if title not in seen:
        seen[title] = paragraph_body(title, sentences)[0]
  return list(seen.items())


def pool_of(path: str) -> list[tuple[str, str]]:
  """The distractor pool of the records in `path` (cached with the file)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"hotpotqa_path={path!r} does not exist: give a HotpotQA JSON file")
  return _pool_cached(path, os.path.getmtime(path))


@functools.lru_cache(maxsize=4)
def _pool_cached(path: str, modified: float) -> list[tuple[str, str]]:
  return _pool_entries(_load_cached(path, modified))


def by_question(path: str) -> dict[str, dict]:
  """{stripped question: record} of the records in `path` (the first record of each question)."""
  load_hotpotqa(path)  # checks and validates the file
  return _by_question_cached(path, os.path.getmtime(path))


@functools.lru_cache(maxsize=4)
def _by_question_cached(path: str, modified: float) -> dict[str, dict]:
  found: dict[str, dict] = {}
  for record in _load_cached(path, modified):
    found.setdefault(record["question"].strip(), record)
  return found


def hotpotqa_example(records: Sequence[dict], index: int, num_docs: Optional[int] = None,
                     target_tokens: Optional[int] = None, tokenizer=None, seed: int = 0,
                     pool: Optional[list[tuple[str, str]]] = None) -> Example:
  """The long-document example of records[index]; distractors come from the other records.

  Give `num_docs` (documents in total) or `target_tokens` (document + question under `tokenizer`).
  """
  record = records[index]
  validate_record(record, index)
  where = _where(record, index)
  own_titles = {title for title, _ in record["context"]}
  pool = _pool_entries(records) if pool is None else pool
  distractors = [body for title, body in pool if title not in own_titles]
  rng = random.Random(f"{TASK}/{record['_id']}/{seed}")
  question_tokens = (len(tokenizer.encode(record["question"]))
                     if target_tokens is not None and tokenizer is not None else 0)
  document, evidence, count = assemble_documents(
      _gold_paragraphs(record), distractors, rng, where, num_docs=num_docs,
      target_tokens=target_tokens, tokenizer=tokenizer, question_tokens=question_tokens)
  return Example(id=str(record["_id"]), task=TASK, question=record["question"],
                 answers=(record["answer"],), document=document, evidence=tuple(evidence),
                 seed=seed, metadata={"num_docs": count, "type": record.get("type", ""),
                                      "level": record.get("level", "")})


def hotpotqa_examples(records_or_path, num_docs: Optional[int] = None,
                      target_tokens: Optional[int] = None, tokenizer=None, seed: int = 0,
                      limit: Optional[int] = None) -> Iterator[Example]:
  """Yields the example of each record in order (the first `limit` records if given)."""
  records = (load_hotpotqa(records_or_path) if isinstance(records_or_path, str)
             else validate_records(list(records_or_path)))
  pool = _pool_entries(records)
  for index in range(len(records) if limit is None else min(limit, len(records))):
    yield hotpotqa_example(records, index, num_docs=num_docs, target_tokens=target_tokens,
                           tokenizer=tokenizer, seed=seed, pool=pool)
