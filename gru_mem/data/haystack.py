"""Haystack sentences and the length-targeted layout of needles inside them.

Length targeting without re-tokenizing per sentence: each haystack sentence's token count (with the
space that joins it) is counted once in batches; because the pre-tokenizer splits at spaces, the
document's token count is, up to a token or two, the sum of its pieces' counts. So a prefix sum
picks the sentences, the last one is cut at a word boundary to fill the remainder, and one full
encode checks the total; a second pass corrects the rare miss.
"""

from __future__ import annotations

import functools
import random
import re
import weakref
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from gru_mem.data import vocabulary

# Repeated filler of niah_single_1 (every word is one built-in token).
NOISE_SENTENCES = ("the sky is clear.", "the sea is calm.", "the wind is soft.",
                   "the sun is warm.", "the day is long.")
HAYSTACK_KINDS = ("noise", "words", "essay", "needles")

_ESSAY_COUNTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def count_tokens(tokenizer, sentences: Sequence[str]) -> np.ndarray:
  """int64 [n]: tokens of " " + sentence for each sentence (its cost inside running text)."""
  if not sentences:
    return np.zeros(0, dtype=np.int64)
  encoded = tokenizer.encode_batch([" " + s for s in sentences])
  return np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(sentences))


@functools.lru_cache(maxsize=4)
def essay_sentences(path: str) -> tuple[str, ...]:
  """The sentences of a text file: whitespace collapsed, split after '.', '!' or '?'."""
  try:
    with open(path, encoding="utf-8") as f:
      text = " ".join(f.read().split())
  except OSError as e:
    raise FileNotFoundError(f"essays_path={path!r}: cannot read it ({e}); give a UTF-8 text file") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"essays_path={path!r} is not UTF-8 text (byte {e.start}): convert it, e.g. "
                     "iconv -f latin1 -t utf-8") from None
  sentences = tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if s)
  if not sentences:
    raise ValueError(f"essays_path={path!r}: the file has no text")
  return sentences


def _essay_counts(tokenizer, path: str) -> np.ndarray:
  per_tokenizer = _ESSAY_COUNTS.setdefault(tokenizer, {})
  if path not in per_tokenizer:
    per_tokenizer[path] = count_tokens(tokenizer, essay_sentences(path))
  return per_tokenizer[path]


class SentenceStream:
  """An endless, deterministic run of haystack sentences with their token counts."""

  def __init__(self, next_batch: Callable[[int], tuple[list[str], np.ndarray]], cuttable: bool):
    self._next_batch = next_batch
    self.cuttable = cuttable  # may the last sentence be cut at a word boundary?
    self.sentences: list[str] = []
    self._counts: list[np.ndarray] = []
    self.total_tokens = 0

  def counts(self) -> np.ndarray:
    if len(self._counts) > 1:
      self._counts = [np.concatenate(self._counts)]
    return self._counts[0] if self._counts else np.zeros(0, dtype=np.int64)

  def ensure_tokens(self, tokens: int) -> None:
    """Pulls sentences until they hold more than `tokens` tokens."""
    while self.total_tokens <= tokens:
      per_sentence = self.total_tokens / len(self.sentences) if self.sentences else 16.0
      size = int(min(200_000, max(64, 1.1 * (tokens - self.total_tokens) / max(per_sentence, 1.0))))
      sentences, counts = self._next_batch(size)
      self.sentences.extend(sentences)
      self._counts.append(counts)
      self.total_tokens += int(counts.sum())


def _cut_to_tokens(tokenizer, sentence: str, tokens: int) -> str:
  """The longest word prefix of `sentence` with at most `tokens` tokens (binary search)."""
  words = sentence.split(" ")
  low, high = 0, len(words)  # invariant: prefix of `low` words fits
  while low < high:
    middle = (low + high + 1) // 2
    if len(tokenizer.encode(" " + " ".join(words[:middle]))) <= tokens:
      low = middle
    else:
      high = middle - 1
  return " ".join(words[:low])


def take_haystack(stream: SentenceStream, tokenizer, budget: int) -> tuple[list[str], np.ndarray]:
  """Haystack sentences holding about `budget` tokens, and their counts."""
  if budget <= 0:
    return [], np.zeros(0, dtype=np.int64)
  stream.ensure_tokens(budget)
  counts = stream.counts()
  cumulative = np.cumsum(counts)
  whole = int(np.searchsorted(cumulative, budget, side="right"))  # sentences with cum <= budget
  remainder = budget - (int(cumulative[whole - 1]) if whole else 0)
  sentences = stream.sentences[:whole]
  taken = counts[:whole]
  if remainder > 0 and whole < len(stream.sentences):
    nxt = stream.sentences[whole]
    if stream.cuttable:
      piece = _cut_to_tokens(tokenizer, nxt, remainder)
      if piece:
        sentences = sentences + [piece]
        taken = np.append(taken, len(tokenizer.encode(" " + piece)))
    elif 2 * remainder > counts[whole]:
      sentences = sentences + [nxt]
      taken = counts[:whole + 1]
  return sentences, taken


def _cycle(sentences: Sequence[str], counts: np.ndarray, start: int):
  """next(size) -> (the next `size` sentences, their token counts), cycling from `start`."""
  position = [start]

  def next_sentences(size):
    indices = (position[0] + np.arange(size)) % len(sentences)
    position[0] += size
    return [sentences[i] for i in indices], counts[indices]
  return next_sentences


def sentence_stream(kind: str, tokenizer, rng: random.Random, essays_path: Optional[str] = None,
                    make_needle: Optional[Callable[[random.Random], str]] = None) -> SentenceStream:
  """The haystack of `kind`: noise | words | essay (needs essays_path) | needles (needs make_needle)."""
  if kind == "noise":
    return SentenceStream(_cycle(NOISE_SENTENCES, count_tokens(tokenizer, NOISE_SENTENCES), 0),
                          cuttable=False)
  if kind == "words":
    words = vocabulary.HAYSTACK_WORDS

    def next_words(size):
      sentences = [" ".join(rng.choices(words, k=rng.randint(6, 14))) + "." for _ in range(size)]
      return sentences, count_tokens(tokenizer, sentences)
    return SentenceStream(next_words, cuttable=True)
  if kind == "essay":
    if not essays_path:
      raise ValueError("haystack 'essay' needs essays_path (a text file of essays)")
    sentences = essay_sentences(essays_path)
    return SentenceStream(_cycle(sentences, _essay_counts(tokenizer, essays_path),
                                 rng.randrange(len(sentences))), cuttable=True)
  if kind == "needles":
    if make_needle is None:
      raise ValueError("haystack 'needles' needs a needle-making task (not multi-hop)")

    def next_needles(size):
      sentences = [make_needle(rng) for _ in range(size)]
      return sentences, count_tokens(tokenizer, sentences)
    return SentenceStream(next_needles, cuttable=True)  # a cut distractor names no gold key
  raise ValueError(f"haystack={kind!r}: must be one of {HAYSTACK_KINDS}")


def fact_span(needle: str) -> tuple[int, int]:
  """[start, end) of the fact a needle sentence states: the sentence without a leading "the "
  and its closing period ("special magic number for amber falcon is 4821907"). A chunk that
  holds only a needle's opening "the" or its period tells a reader nothing, so the evidence
  spans (and the evidence chunks they mark) cover the fact alone."""
  start = 4 if needle.startswith("the ") else 0
  end = len(needle) - 1 if needle.endswith(".") else len(needle)
  return start, end


def _assemble(haystack: Sequence[str], placed: Sequence[tuple[int, float, str, bool]]
              ) -> tuple[str, list[tuple[int, int]]]:
  """Joins haystack sentences with " ", inserting each needle before sentence `boundary`.

  placed: (boundary, position, text, is_evidence), sorted. Returns text and the evidence char
  spans (each evidence needle's `fact_span`).
  """
  pieces: list[str] = []
  spans: list[tuple[int, int]] = []
  offset = 0

  def add(text: str, is_evidence: bool) -> None:
    nonlocal offset
    if pieces:
      offset += 1
    if is_evidence:
      start, end = fact_span(text)
      spans.append((offset + start, offset + end))
    pieces.append(text)
    offset += len(text)

  needle_iter: Iterator = iter(placed)
  pending = next(needle_iter, None)
  for index in range(len(haystack) + 1):
    while pending is not None and pending[0] == index:
      add(pending[2], pending[3])
      pending = next(needle_iter, None)
    if index < len(haystack):
      add(haystack[index], False)
  return " ".join(pieces), spans


def build_document(stream: SentenceStream, tokenizer, evidence_needles: Sequence[str],
                   distractor_needles: Sequence[str], document_tokens: int,
                   evidence_within: float, rng: random.Random, too_short: str
                   ) -> tuple[str, list[tuple[int, int]]]:
  """A document of about `document_tokens` tokens with the needles placed at random depths.

  Evidence needle k sits at haystack token position u_k * limit (u_k ~ U[0, 1)), snapped down to a
  sentence boundary, with limit = all haystack tokens when evidence_within = 1, else
  evidence_within * document_tokens minus every needle's tokens (so the needle starts inside the
  leading fraction even if all others precede it). Distractors go anywhere.
  """
  needle_counts = count_tokens(tokenizer, list(evidence_needles) + list(distractor_needles))
  needle_tokens = int(needle_counts.sum())
  budget = document_tokens - needle_tokens
  if budget < 0:
    raise ValueError(too_short)
  tolerance = max(2, int(0.002 * document_tokens))
  evidence_limit = evidence_within * (document_tokens - tolerance) - needle_tokens - 2
  if evidence_within < 1.0 and evidence_limit < 0:
    raise ValueError(f"evidence_within={evidence_within}: the first {evidence_within:.0%} of a "
                     f"{document_tokens}-token document cannot hold the needles ({needle_tokens} "
                     "tokens): raise evidence_within or target_tokens")
  draws = [(rng.random(), text, True) for text in evidence_needles]
  draws += [(rng.random(), text, False) for text in distractor_needles]
  best = None
  for _ in range(4):
    haystack, counts = take_haystack(stream, tokenizer, budget)
    haystack_tokens = int(counts.sum())
    boundaries = np.concatenate([[0], np.cumsum(counts)])
    placed = []
    for fraction, text, is_evidence in draws:
      limit = haystack_tokens if evidence_within >= 1.0 or not is_evidence else min(
          haystack_tokens, evidence_limit)
      position = fraction * limit
      boundary = int(np.searchsorted(boundaries, position, side="right")) - 1
      placed.append((boundary, position, text, is_evidence))
    placed.sort(key=lambda item: (item[0], item[1]))
    document, spans = _assemble(haystack, placed)
    error = document_tokens - len(tokenizer.encode(document))
    if best is None or abs(error) < abs(best[0]):
      best = (error, document, spans)
    if abs(error) <= tolerance:
      break
    budget = max(0, budget + error)
  return best[1], best[2]
