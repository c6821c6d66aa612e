"""RULER-style needle-in-a-haystack generators with exact evidence spans and token-length targets.

Tasks (in the spirit of RULER's NIAH family, plus one two-hop task):
  niah_single_1     one needle in a repeated-noise haystack, number value
  niah_single_2     one needle in an essay haystack, number value
  niah_single_3     one needle in an essay haystack, uuid value
  niah_single_word  one needle in a repeated-noise haystack, one-word value (a tiny model copies
                    a word far sooner than seven digits in order)
  niah_multikey_1   essay haystack with 3 distractor needles under other keys
  niah_multikey_2   a haystack made entirely of distractor needles
  niah_multikey_3   a needle haystack whose keys and values are uuids
  niah_multivalue   4 values under the same key; all are the answer
  niah_multiquery   4 keys asked at once; all values are the answer
  niah_multihop     "the key of A points to B." + "the secret value of B is V."; asks for A's value
  niah_multihop_1   niah_multihop with one chain and no distractor chains (evidence order does
                    not matter: an agent can tell evidence when it sees it)

Each evidence span covers its needle's fact, the sentence without the opening "the" and the
period (`haystack.fact_span`): a chunk that only holds those two tokens of a needle cut by a chunk
boundary tells nothing and is not an evidence chunk.

The "essay" haystack is the sentences of a text file (e.g. Paul Graham's essays) when a path is
given, else lowercase sentences of random `vocabulary.HAYSTACK_WORDS` (each word one token for the
built-in tokenizer). Lengths count tokens of the document plus the question, like RULER's
sequence length without the chat template.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import uuid
from typing import Callable, Optional


from gru_mem.data import haystack as haystack_lib
from gru_mem.data import vocabulary
from gru_mem.data.example import Example


@dataclasses.dataclass(frozen=True)
class NeedleTask:
  """How one needle task builds its needles and haystack."""
  haystack: str  # "noise" | "essay" | "needles"
  key_kind: str = "words"  # "words" ("amber falcon") | "uuid"
  value_kind: str = "number"  # "number" (7 digits) | "uuid" | "word"
  num_keys: int = 1  # distinct keys with needles in the document, queried ones included
  num_values: int = 1  # values (needles) per queried key
  num_queries: int = 1  # keys the question asks about
  multihop: bool = False


TASKS: dict[str, NeedleTask] = {
    "niah_single_1": NeedleTask("noise"),
    "niah_single_2": NeedleTask("essay"),
    "niah_single_3": NeedleTask("essay", value_kind="uuid"),
    "niah_single_word": NeedleTask("noise", value_kind="word"),
    "niah_multikey_1": NeedleTask("essay", num_keys=4),
    "niah_multikey_2": NeedleTask("needles"),
    "niah_multikey_3": NeedleTask("needles", key_kind="uuid", value_kind="uuid"),
    "niah_multivalue": NeedleTask("essay", num_values=4),
    "niah_multiquery": NeedleTask("essay", num_keys=4, num_queries=4),
    "niah_multihop": NeedleTask("essay", value_kind="word", num_keys=4, multihop=True),
    "niah_multihop_1": NeedleTask("essay", value_kind="word", num_keys=1, multihop=True),
}

_VALUE_NOUN = {"number": ("number", "numbers"), "uuid": ("id", "ids"), "word": ("word", "words")}


@dataclasses.dataclass
class _Needles:
  """The needle sentences of one example: evidence first, then distractors."""
  question: str
  answers: list[str]
  evidence: list[str]
  distractors: list[str]
  make_distractor: Optional[Callable[[random.Random], str]]  # for the "needles" haystack


@functools.lru_cache(maxsize=1)
def _word_key_pool() -> tuple[str, ...]:
  """Every "adjective noun" key, e.g. "amber falcon"."""
  return tuple(f"{adjective} {noun}" for adjective in vocabulary.KEY_ADJECTIVES
               for noun in vocabulary.KEY_NOUNS)


def _word_keys(rng: random.Random, count: int) -> list[str]:
  pool = _word_key_pool()
  if count == 1:
    return [pool[rng.randrange(len(pool))]]
  if count > len(pool):
    raise ValueError(f"num_keys={count}: at most {len(pool)} distinct word keys exist")
  return rng.sample(pool, count)


def _uuid(rng: random.Random) -> str:
  return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _values(kind: str, rng: random.Random, count: int) -> list[str]:
  if kind == "number":
    return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), count)]
  if kind == "uuid":
    return [_uuid(rng) for _ in range(count)]
  if kind == "word":
    if count > len(vocabulary.VALUE_WORDS):
      raise ValueError(f"{count} word values asked: at most {len(vocabulary.VALUE_WORDS)} exist")
    return rng.sample(vocabulary.VALUE_WORDS, count)
  raise ValueError(f"value_kind={kind!r}: must be 'number', 'uuid' or 'word'")


def _keys(kind: str, rng: random.Random, count: int) -> list[str]:
  if kind == "words":
    return _word_keys(rng, count)
  if kind == "uuid":
    return [_uuid(rng) for _ in range(count)]
  raise ValueError(f"key_kind={kind!r}: must be 'words' or 'uuid'")


def _needle(spec: NeedleTask, key: str, value: str) -> str:
  """'the special magic number for amber falcon is 4821907.'"""
  return f"the special magic {_VALUE_NOUN[spec.value_kind][0]} for {key} is {value}."


def _join_keys(keys: list[str]) -> str:
  return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def _multihop_needles(spec: NeedleTask, rng: random.Random) -> _Needles:
  """Chains A -> B -> V; the question names A of chain 0, the others are distractor chains."""
  keys = _word_keys(rng, 2 * spec.num_keys)
  starts, bridges = keys[:spec.num_keys], keys[spec.num_keys:]
  values = _values(spec.value_kind, rng, spec.num_keys)
  links = [(f"the key of {a} points to {b}.", f"the secret value of {b} is {v}.")
           for a, b, v in zip(starts, bridges, values)]
  question = f"what is the secret value of the key that {starts[0]} points to?"
  distractors = [text for link in links[1:] for text in link]
  return _Needles(question, [values[0]], list(links[0]), distractors, None)


def _make_needles(spec: NeedleTask, rng: random.Random) -> _Needles:
  if spec.multihop:
    return _multihop_needles(spec, rng)
  if spec.value_kind not in _VALUE_NOUN:
    raise ValueError(f"value_kind={spec.value_kind!r}: needle tasks take one of "
                     f"{sorted(_VALUE_NOUN)}")
  if not 1 <= spec.num_queries <= spec.num_keys:
    raise ValueError(f"num_queries={spec.num_queries}: must be in [1, num_keys={spec.num_keys}]")
  keys = _keys(spec.key_kind, rng, spec.num_keys)
  values = _values(spec.value_kind, rng, spec.num_keys * spec.num_values)
  queried = keys[:spec.num_queries]
  evidence, answers, distractors = [], [], []
  for index, key in enumerate(keys):
    key_values = values[index * spec.num_values:(index + 1) * spec.num_values]
    needles = [_needle(spec, key, value) for value in key_values]
    if index < spec.num_queries:
      evidence.extend(needles)
      answers.extend(key_values)
    else:
      distractors.extend(needles)
  singular, plural = _VALUE_NOUN[spec.value_kind]
  if len(answers) == 1:
    question = f"what is the special magic {singular} for {queried[0]} in the document?"
  elif spec.num_queries == 1:
    question = f"what are all the special magic {plural} for {queried[0]} in the document?"
  else:
    question = f"what are the special magic {plural} for {_join_keys(queried)} in the document?"
  used_keys, used_values = set(keys), set(values)

  def make_distractor(distractor_rng: random.Random) -> str:
    while True:  # any key/value but the example's own (collisions are rare; redraw)
      key = _keys(spec.key_kind, distractor_rng, 1)[0]
      value = _values(spec.value_kind, distractor_rng, 1)[0]
      if key not in used_keys and value not in used_values:
        return _needle(spec, key, value)

  return _Needles(question, answers, evidence, distractors, make_distractor)


def _check_arguments(task: str, target_tokens: int, evidence_within: float) -> NeedleTask:
  if task not in TASKS:
    raise ValueError(f"task={task!r}: unknown; choose one of {sorted(TASKS)}")
  if int(target_tokens) != target_tokens or target_tokens < 1:
    raise ValueError(f"target_tokens={target_tokens}: must be an integer >= 1")
  if not 0.0 < evidence_within <= 1.0:
    raise ValueError(f"evidence_within={evidence_within}: must be in (0, 1] (1 = anywhere)")
  return TASKS[task]


def generate(task: str, target_tokens: int, tokenizer=None, seed: int = 0,
             evidence_within: float = 1.0, essays_path: Optional[str] = None,
             **overrides) -> Example:
  """One needle example whose document + question is `target_tokens` tokens long.

  The length is met to a few tokens (at worst half of one uncuttable haystack word, e.g. a uuid).

  Args:
    task: a key of TASKS.
    target_tokens: tokens of document + question under `tokenizer` (default: the built-in one).
    seed: the example is a pure function of (task, target_tokens, tokenizer, seed, ...).
    evidence_within: every evidence needle starts within this leading fraction of the document's
      tokens (1.0: needles anywhere, uniformly).
    essays_path: a text file whose sentences form the "essay" haystack; None uses random
      vocabulary sentences instead.
    overrides: NeedleTask fields to change, e.g. num_keys=8, num_values=2, num_queries=2.
  """
  spec = dataclasses.replace(_check_arguments(task, target_tokens, evidence_within), **overrides)
  if tokenizer is None:
    from gru_mem.data.tokenizer import builtin_tokenizer
    tokenizer = builtin_tokenizer()
  needles = _make_needles(spec, random.Random(f"{task}/{seed}/needles"))
  question_tokens = len(tokenizer.encode(needles.question))
  document_tokens = target_tokens - question_tokens
  kind = spec.haystack if spec.haystack != "essay" or essays_path else "words"
  layout_rng = random.Random(f"{task}/{seed}/layout")
  stream = haystack_lib.sentence_stream(kind, tokenizer, random.Random(f"{task}/{seed}/haystack"),
                                        essays_path=essays_path,
                                        make_needle=needles.make_distractor)
  document, evidence = haystack_lib.build_document(
      stream, tokenizer, needles.evidence, needles.distractors, document_tokens,
      evidence_within, layout_rng,
      too_short=(f"task {task!r}: target_tokens={target_tokens} is shorter than the question "
                 f"({question_tokens} tokens) plus the needles: raise target_tokens"))
  return Example(
      id=f"{task}/{target_tokens}/{seed}", task=task, question=needles.question,
      answers=tuple(needles.answers), document=document, evidence=tuple(evidence), seed=seed,
      answer_mode="all" if len(needles.answers) > 1 else "any",
      metadata={"haystack": kind, "target_tokens": target_tokens,
                "evidence_within": evidence_within, "tokenizer": tokenizer.name,
                "evidence_texts": tuple(text[slice(*haystack_lib.fact_span(text))]
                                          for text in needles.evidence)})
