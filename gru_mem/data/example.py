"""The Example every data source yields, and the numbered multi-document layout of HotpotQA/SQuAD.

An Example is a question over one long `document`, its gold `answers`, and `evidence`: the
character spans [start, end) of the document text that hold the facts needed to answer.
`answer_mode` says how `answers` are scored: "any" (one of them is the answer: HotpotQA, SQuAD,
single-needle tasks) or "all" (every one is needed: RULER multi-value / multi-query).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional, Sequence

import numpy as np

ANSWER_MODES = ("any", "all")


@dataclasses.dataclass(frozen=True)
class Example:
  """One long-context QA example; `evidence` holds (start, end) character spans into `document`."""
  id: str
  task: str
  question: str
  answers: tuple[str, ...]
  document: str
  evidence: tuple[tuple[int, int], ...]
  seed: int = 0
  answer_mode: str = "any"
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, "answers", tuple(str(a) for a in self.answers))
    object.__setattr__(self, "evidence", tuple((int(s), int(e)) for s, e in self.evidence))
    where = f"example {self.id!r} of task {self.task!r}"
    if self.answer_mode not in ANSWER_MODES:
      raise ValueError(f"{where}: answer_mode={self.answer_mode!r}: must be one of {ANSWER_MODES}")
    if not self.answers:
      raise ValueError(f"{where}: field 'answers' is empty: give at least one gold answer")
    for start, end in self.evidence:
      if not 0 <= start <= end <= len(self.document):
        raise ValueError(f"{where}: evidence span ({start}, {end}) is outside the document "
                         f"of {len(self.document)} characters")

  def evidence_texts(self) -> list[str]:
    """The document text of each evidence span, in order."""
    return [self.document[start:end] for start, end in self.evidence]

  def to_features(self) -> dict[str, Any]:
    """A flat dict of numpy-friendly values (the seqio / tf.data feature layout).

    Strings stay `str`; `answers` is a list of strings; `evidence` is int32 [num_spans, 2].
    `targets_pretokenized` (the answers, one per line) is what seqio's evaluator reads.
    """
    return {
        "id": self.id,
        "task": self.task,
        "question": self.question,
        "document": self.document,
        "answers": list(self.answers),
        "evidence": np.asarray(self.evidence, dtype=np.int32).reshape(-1, 2),
        "answer_mode": self.answer_mode,
        "seed": np.int64(self.seed),
        "targets_pretokenized": "\n".join(self.answers),
    }

  @classmethod
  def from_features(cls, features: Mapping[str, Any]) -> "Example":
    """Inverse of `to_features`; also accepts the bytes / numpy values that tf.data yields."""
    def text(value) -> str:
      return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    evidence = np.asarray(features["evidence"]).reshape(-1, 2)
    return cls(id=text(features["id"]), task=text(features["task"]),
               question=text(features["question"]),
               answers=tuple(text(a) for a in features["answers"]),
               document=text(features["document"]),
               evidence=tuple((int(s), int(e)) for s, e in evidence),
               seed=int(features["seed"]), answer_mode=text(features["answer_mode"]))


def document_header(number: int) -> str:
  """The line that opens the `number`-th (1-based) document of a multi-document text."""
  return f"Document {number}:\n"


DOCUMENT_SEPARATOR = "\n\n"


def join_documents(bodies: Sequence[str]) -> tuple[str, list[int]]:
  """Numbers and joins document bodies: "Document 1:\\n<body>\\n\\nDocument 2:\\n<body>...".

  Returns the text and the character offset at which each body starts.
  """
  parts: list[str] = []
  body_starts: list[int] = []
  offset = 0
  for number, body in enumerate(bodies, start=1):
    if number > 1:
      parts.append(DOCUMENT_SEPARATOR)
      offset += len(DOCUMENT_SEPARATOR)
    header = document_header(number)
    parts.append(header)
    offset += len(header)
    body_starts.append(offset)
    parts.append(body)
    offset += len(body)
  return "".join(parts), body_starts


def stripped_span(text: str, start: int, end: int) -> tuple[int, int]:
  """The span [start, end) of `text` without its leading and trailing whitespace."""
  piece = text[start:end]
  left = len(piece) - len(piece.lstrip())
  right = len(piece.rstrip())
  if right <= left:
    return start, start
  return start + left, start + right


def _pick_for_tokens(pool: Sequence[str], order: Sequence[int], budget: int, tokenizer,
                     header_tokens: int) -> list[int]:
  """Pool indices, in `order`, that fit in `budget` tokens with a header each (first fit: a
  paragraph too big for what is left is skipped; 64 skips in a row end the search)."""
  chosen: list[int] = []
  used = 0
  skipped = 0
  for batch_start in range(0, len(order), 64):
    batch = list(order[batch_start:batch_start + 64])
    counts = [len(ids) for ids in tokenizer.encode_batch([pool[i] for i in batch])]
    for index, count in zip(batch, counts):
      if used + count + header_tokens > budget:
        skipped += 1
        if skipped >= 64:
          return chosen
        continue
      skipped = 0
      chosen.append(index)
      used += count + header_tokens
  return chosen


def assemble_documents(gold: Sequence[tuple[str, Sequence[tuple[int, int]]]], pool: Sequence[str],
                       rng, where: str, num_docs: Optional[int] = None,
                       target_tokens: Optional[int] = None, tokenizer=None,
                       question_tokens: int = 0) -> tuple[str, list[tuple[int, int]], int]:
  """Gold bodies plus distractors from `pool`, shuffled, numbered and joined.

  gold: (body, evidence spans relative to the body). Either `num_docs` (total documents) or
  `target_tokens` (document + question tokens, filled with whole distractors) sets the size.
  Returns the text, the evidence spans in it (sorted) and the number of documents.
  """
  if (num_docs is None) == (target_tokens is None):
    raise ValueError(f"{where}: give exactly one of num_docs or target_tokens")
  gold_bodies = [body for body, _ in gold]
  if num_docs is not None:
    needed = num_docs - len(gold)
    if needed < 0:
      raise ValueError(f"{where}: num_docs={num_docs} is fewer than its {len(gold)} gold "
                       "paragraphs: raise num_docs")
    if needed > len(pool):
      raise ValueError(f"{where}: num_docs={num_docs} needs {needed} distractor paragraphs but "
                       f"only {len(pool)} are available: lower num_docs or use a larger data file")
    chosen = rng.sample(range(len(pool)), needed)
  else:
    if tokenizer is None:
      raise ValueError(f"{where}: target_tokens needs a tokenizer")
    header_tokens = len(tokenizer.encode(DOCUMENT_SEPARATOR + document_header(100)))
    gold_tokens = sum(len(ids) + header_tokens for ids in tokenizer.encode_batch(gold_bodies))
    budget = target_tokens - question_tokens - gold_tokens
    if budget < 0:
      raise ValueError(f"{where}: target_tokens={target_tokens} is shorter than the question "
                       f"and gold paragraphs ({question_tokens + gold_tokens} tokens): raise it")
    chosen = _pick_for_tokens(pool, rng.sample(range(len(pool)), len(pool)), budget, tokenizer,
                              header_tokens)
  entries = [(body, spans) for body, spans in gold] + [(pool[i], ()) for i in chosen]
  rng.shuffle(entries)
  text, body_starts = join_documents([body for body, _ in entries])
  evidence = sorted((start + s, start + e) for start, (_, spans) in zip(body_starts, entries)
                    for s, e in spans)
  return text, evidence, len(entries)


def read_json_file(path: str, key: str) -> Any:
  """The JSON value in `path`; a file that is not UTF-8 JSON is a ValueError naming the config
  key (`key`, e.g. "hotpotqa_path"), the file and where the problem is."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except UnicodeDecodeError as e:
    raise ValueError(f"{key}={path!r} is not UTF-8 text (byte {e.start}): give the JSON file "
                     "as it was downloaded") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{key}={path!r} is not valid JSON ({e.msg} at line {e.lineno}, column "
                     f"{e.colno}): give the JSON file as it was downloaded") from None
