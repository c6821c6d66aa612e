"""MemAgent-style long documents from SQuAD v2 JSON (answerable questions only).

The question's paragraph is the gold document and its evidence; distractors are other paragraphs.
Each document is numbered as in HotpotQA: "Document k:\\n<article title>\\n<paragraph>".
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from typing import Iterator, Optional

from gru_mem.data.example import Example, assemble_documents, read_json_file, stripped_span

TASK = "squad"


@dataclasses.dataclass(frozen=True)
class SquadQuestion:
  id: str
  question: str
  answers: tuple[str, ...]  # distinct answer texts, first-seen order
  paragraph: int  # index into SquadData.paragraphs


@dataclasses.dataclass(frozen=True)
class SquadData:
  paragraphs: tuple[tuple[str, str], ...]  # (article title, context)
  questions: tuple[SquadQuestion, ...]  # answerable ones only


def _require(obj, field: str, kind, where: str):
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: is a {type(obj).__name__}, not a JSON object")
  if field not in obj:
    raise ValueError(f"{where}: missing field {field!r}")
  if not isinstance(obj[field], kind):
    raise ValueError(f"{where}: field {field!r} is a {type(obj[field]).__name__}, "
                     f"expected {kind.__name__}")
  return obj[field]


def _parse_question(qa, where: str, paragraph: int) -> Optional[SquadQuestion]:
  """The SquadQuestion of one `qas` entry; None when it is unanswerable."""
  question_id = qa.get("id") if isinstance(qa, dict) else None
  where = f"{where} question {'id=' + repr(question_id) if question_id else '(no id)'}"
  _require(qa, "id", str, where)
  text = _require(qa, "question", str, where)
  answers = _require(qa, "answers", list, where)
  if qa.get("is_impossible", False) or not answers:
    return None
  texts: dict[str, None] = {}
  for answer in answers:
    texts.setdefault(_require(answer, "text", str, f"{where} field 'answers'"), None)
  return SquadQuestion(id=qa["id"], question=text, answers=tuple(texts), paragraph=paragraph)


def parse_squad(data) -> SquadData:
  """Flattens SQuAD's data -> paragraphs -> qas nesting; errors name the article, paragraph, id."""
  articles = _require(data, "data", list, "SQuAD file")
  paragraphs: list[tuple[str, str]] = []
  questions: list[SquadQuestion] = []
  for article_index, article in enumerate(articles):
    where = f"SQuAD article {article_index}"
    title = _require(article, "title", str, where)
    where = f"{where} ({title!r})"
    for paragraph_index, paragraph in enumerate(_require(article, "paragraphs", list, where)):
      paragraph_where = f"{where} paragraph {paragraph_index}"
      context = _require(paragraph, "context", str, paragraph_where)
      if not context.strip():
        raise ValueError(f"{paragraph_where}: field 'context' is empty")
      for qa in _require(paragraph, "qas", list, paragraph_where):
        question = _parse_question(qa, paragraph_where, len(paragraphs))
        if question is not None:
          questions.append(question)
      paragraphs.append((title, context))
  return SquadData(paragraphs=tuple(paragraphs), questions=tuple(questions))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, modified: float) -> SquadData:
  del modified  # part of the cache key only
  return parse_squad(read_json_file(path, "squad_path"))


def load_squad(path: str) -> SquadData:
  """Reads and parses a SQuAD (v1 or v2) JSON file, cached per path and modification time."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"squad_path={path!r} does not exist: give a SQuAD JSON file")
  return _load_cached(path, os.path.getmtime(path))


def paragraph_body(title: str, context: str) -> tuple[str, tuple[int, int]]:
  """"<title>\\n<context>" and the context's stripped span inside it."""
  start, end = stripped_span(context, 0, len(context))
  offset = len(title) + 1
  return f"{title}\n{context}", (offset + start, offset + end)


def squad_example(data: SquadData, index: int, num_docs: Optional[int] = None,
                  target_tokens: Optional[int] = None, tokenizer=None, seed: int = 0) -> Example:
  """The long-document example of data.questions[index]."""
  question = data.questions[index]
  where = f"SQuAD question {index} (id={question.id!r})"
  gold_context = data.paragraphs[question.paragraph][1]
  body, span = paragraph_body(*data.paragraphs[question.paragraph])
  distractors = [paragraph_body(title, context)[0] for title, context in data.paragraphs
                 if context != gold_context]
  rng = random.Random(f"{TASK}/{question.id}/{seed}")
  question_tokens = (len(tokenizer.encode(question.question))
                     if target_tokens is not None and tokenizer is not None else 0)
  document, evidence, count = assemble_documents(
      [(body, [span])], distractors, rng, where, num_docs=num_docs, target_tokens=target_tokens,
      tokenizer=tokenizer, question_tokens=question_tokens)
  return Example(id=question.id, task=TASK, question=question.question, answers=question.answers,
                 document=document, evidence=tuple(evidence), seed=seed,
                 metadata={"num_docs": count, "paragraph": question.paragraph})


def squad_examples(data_or_path, num_docs: Optional[int] = None,
                   target_tokens: Optional[int] = None, tokenizer=None, seed: int = 0,
                   limit: Optional[int] = None) -> Iterator[Example]:
  """Yields the example of each answerable question in file order (the first `limit` if given)."""
  data = load_squad(data_or_path) if isinstance(data_or_path, str) else data_or_path
  if not isinstance(data, SquadData):
    data = parse_squad(data)
  count = len(data.questions) if limit is None else min(limit, len(data.questions))
  for index in range(count):
    yield squad_example(data, index, num_docs=num_docs, target_tokens=target_tokens,
                        tokenizer=tokenizer, seed=seed)
