"""Readers of the paper's data files: MemAgent's training parquet and evaluation JSON, RULER jsonl.

MemAgent training parquet (read with pyarrow), one row per question:
  context                     the document: "Document 1:\\n<title>\\n<text>\\n\\nDocument 2:..."
  prompt[0].content           the question
  reward_model.ground_truth   the gold answers (a list)
  extra_info.num_docs         documents in the context
MemAgent evaluation JSON (`eval_{num_docs}.json`): a list of records
  {context, input (the question), answers (a list), num_docs, index}
RULER jsonl, one record a line: {input (the whole prompt: context, then the question on its last
  line), outputs (the gold values, a list), length}; `context` and `query` fields, when present,
  are used instead of splitting `input`.

Evidence, where it can be recovered (else the example has none, `Example.evidence == ()`):
  * MemAgent (HotpotQA documents): the supporting paragraphs by title, when the record names them
    (`supporting_facts` or `extra_info.supporting_facts`: [[title, sent_id], ...] or titles), else the
    supporting sentences of the record with the same question in a HotpotQA file given alongside
    (`data.hotpotqa_path`); each paragraph is found by its "Document k:\\n<title>\\n" header.
  * RULER: each gold value's needle sentence, the sentence around its first occurrence in the
    context (every value must be found).
Every problem is a ValueError naming the config key, the file, the record index and the field.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Optional, Sequence

from gru_mem.data import hotpotqa
from gru_mem.data.example import Example, read_json_file, stripped_span

MEMAGENT_TRAIN_FIELDS = ("context", "prompt", "reward_model", "extra_info")
MEMAGENT_EVAL_FIELDS = ("context", "input", "answers", "num_docs", "index")
RULER_FIELDS = ("input", "outputs", "length")
_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")


def read_records(path: str, key: str) -> list:
  """The records of a .parquet (pyarrow), .jsonl (one JSON object a line) or .json (a list) file."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"data.{key}={path!r} does not exist: give the local data file")
  return list(_read_cached(path, key, os.path.getmtime(path)))


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, key: str, modified: float) -> tuple:
  del modified  # part of the cache key only
  if path.endswith(".parquet"):
    import pyarrow.parquet
    try:
      return tuple(pyarrow.parquet.read_table(path).to_pylist())
    except Exception as e:  # pyarrow raises several kinds for a damaged file
      raise ValueError(f"data.{key}={path!r} is not a readable parquet file ({e})") from None
  if path.endswith(".jsonl"):
    records = []
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f):
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"data.{key}={path!r} line {number + 1} is not JSON ({e.msg})") from None
    return tuple(records)
  data = read_json_file(path, key)
  if not isinstance(data, list):
    raise ValueError(f"data.{key}={path!r} holds a JSON {type(data).__name__}: expected a list "
                     "of records")
  return tuple(data)


def _field(record: Any, names: Sequence[str], where: str) -> Any:
  """record[names[0]][names[1]]..., or a ValueError naming the missing or malformed field."""
  value, path = record, ""
  for name in names:
    path = f"{path}.{name}" if path else str(name)
    if isinstance(name, int):
      if not isinstance(value, (list, tuple)) or len(value) <= name:
        raise ValueError(f"{where}: field {path!r} is missing (expected a non-empty list)")
    elif not isinstance(value, dict) or name not in value:
      raise ValueError(f"{where}: missing field {path!r}")
    value = value[name]
  return value


def _text_field(record, names, where: str) -> str:
  value = _field(record, names, where)
  if not isinstance(value, str) or not value.strip():
    raise ValueError(f"{where}: field {'.'.join(map(str, names))!r} must be a non-empty string")
  return value


def _answers_field(record, names, where: str) -> tuple[str, ...]:
  value = _field(record, names, where)
  if hasattr(value, "tolist"):
    value = value.tolist()
  if not isinstance(value, (list, tuple)) or not value:
    raise ValueError(f"{where}: field {'.'.join(map(str, names))!r} must be a non-empty list of "
                     f"answers (got {type(value).__name__})")
  return tuple(str(a) for a in value)


# --- MemAgent -----------------------------------------------------------------------------------


def memagent_fields(record, index: int, path: str) -> dict:
  """{id, question, answers, context, num_docs, titles} of one record of either MemAgent layout."""
  where = f"data.memagent_path={path!r} record {index}"
  if not isinstance(record, dict):
    raise ValueError(f"{where}: is a {type(record).__name__}, not an object")
  training = "prompt" in record or "reward_model" in record
  if training:
    question = _text_field(record, ("prompt", 0, "content"), where)
    answers = _answers_field(record, ("reward_model", "ground_truth"), where)
    num_docs = _field(record, ("extra_info", "num_docs"), where)
    facts = (record.get("extra_info") or {}).get("supporting_facts")
    record_id = str((record.get("extra_info") or {}).get("index", index))
  else:
    question = _text_field(record, ("input",), where)
    answers = _answers_field(record, ("answers",), where)
    num_docs = _field(record, ("num_docs",), where)
    record_id = str(_field(record, ("index",), where))
    facts = record.get("supporting_facts")
  context = _text_field(record, ("context",), where)
  titles = tuple(dict.fromkeys(str(f if isinstance(f, str) else f[0]) for f in facts)
                 ) if facts else ()
  return {"id": record_id, "question": question.strip(), "answers": answers, "context": context,
          "num_docs": int(num_docs), "titles": titles}


def memagent_records(path: str) -> list[dict]:
  """Every record of a MemAgent file, validated (errors name the record and field)."""
  return [memagent_fields(r, i, path) for i, r in enumerate(read_records(path, "memagent_path"))]


def paragraph_span(context: str, title: str) -> Optional[tuple[int, int]]:
  """The [start, end) of the text of the document titled `title` (after its title line)."""
  match = re.search(r"(?:^|\n)Document \d+:\n" + re.escape(title) + "\n", context)
  if match is None:
    return None
  end = context.find("\n\nDocument ", match.end())
  return stripped_span(context, match.end(), len(context) if end < 0 else end)


def hotpotqa_evidence(context: str, titles: Sequence[str], hotpot_record: Optional[dict] = None
                      ) -> list[tuple[int, int]]:
  """Evidence spans in a MemAgent context: the supporting sentences of `hotpot_record` inside
  their paragraphs (a sentence not found: its whole paragraph), or the paragraphs of `titles`."""
  spans = []
  if hotpot_record is not None:
    sentences = {title: s for title, s in hotpot_record["context"]}
    wanted: dict[str, list[int]] = {}
    for title, sent_id in hotpot_record["supporting_facts"]:
      wanted.setdefault(title, []).append(sent_id)
    for title, ids in wanted.items():
      paragraph = paragraph_span(context, title)
      if paragraph is None:
        continue
      for sent_id in sorted(set(ids)):
        sentence = sentences[title][sent_id].strip()
        if sentence:
          at = context.find(sentence, *paragraph)
          spans.append((at, at + len(sentence)) if at >= 0 else paragraph)
  else:
    spans = [s for s in (paragraph_span(context, t) for t in titles) if s is not None]
  return sorted(set(s for s in spans if s[1] > s[0]))


def memagent_example(fields: dict, seed: int = 0, hotpotqa_path: str = "") -> Example:
  """The Example of one MemAgent record; evidence as `hotpotqa_evidence` recovers it."""
  hotpot_record = None
  if not fields["titles"] and hotpotqa_path:
    hotpot_record = hotpotqa.by_question(hotpotqa_path).get(fields["question"])
  evidence = (hotpotqa_evidence(fields["context"], fields["titles"], hotpot_record)
              if fields["titles"] or hotpot_record is not None else [])
  return Example(id=fields["id"], task="memagent", question=fields["question"],
                 answers=fields["answers"], document=fields["context"], evidence=tuple(evidence),
                 seed=seed, metadata={"num_docs": fields["num_docs"]})


# --- RULER --------------------------------------------------------------------------------------


def ruler_fields(record, index: int, path: str) -> dict:
  """{id, question, context, answers, length} of one RULER record."""
  where = f"data.ruler_path={path!r} record {index}"
  if not isinstance(record, dict):
    raise ValueError(f"{where}: is a {type(record).__name__}, not an object")
  text = _text_field(record, ("input",), where)
  answers = _answers_field(record, ("outputs",), where)
  length = _field(record, ("length",), where)
  if isinstance(record.get("context"), str) and isinstance(record.get("query"), str):
    context, question = record["context"], record["query"]
  else:
    lines = text.rstrip().split("\n")
    question, context = lines[-1], "\n".join(lines[:-1])
  if not context.strip():
    raise ValueError(f"{where}: field 'input' holds no context before its question line")
  return {"id": str(record.get("index", index)), "question": question.strip(), "context": context,
          "answers": answers, "length": int(length)}


def ruler_records(path: str) -> list[dict]:
  return [ruler_fields(r, i, path) for i, r in enumerate(read_records(path, "ruler_path"))]


def needle_span(context: str, value: str) -> Optional[tuple[int, int]]:
  """The sentence holding the first occurrence of `value`: from after the previous sentence end
  (". ", "! ", "? " or a newline) to the next one, inclusive."""
  at = context.find(value)
  if at < 0:
    return None
  start = 0
  for match in _SENTENCE_END.finditer(context, 0, at):
    start = match.end()
  after = _SENTENCE_END.search(context, at + len(value))
  end = len(context) if after is None else after.end()
  return stripped_span(context, start, end)


def ruler_example(fields: dict, seed: int = 0) -> Example:
  """The Example of one RULER record; evidence: every value's needle sentence, or none."""
  spans = [needle_span(fields["context"], value) for value in fields["answers"]]
  evidence = sorted(set(spans)) if all(s is not None for s in spans) else []
  return Example(id=fields["id"], task="ruler", question=fields["question"],
                 answers=fields["answers"], document=fields["context"], evidence=tuple(evidence),
                 seed=seed, answer_mode="all" if len(fields["answers"]) > 1 else "any",
                 metadata={"length": fields["length"]})
