"""Tokenize a document once, cut its ids into fixed-size chunks, and mark the chunks with evidence.

Chunk c covers token ids [c * chunk_tokens, (c + 1) * chunk_tokens) (the last one may be shorter).
A chunk holds evidence iff one of its tokens overlaps an evidence character span; a token
[tok_start, tok_end) overlaps a span [start, end) iff tok_start < end and tok_end > start.

Memory: the document's ids are one int32 array; `chunk(i)` is a view into it, so a document of
millions of tokens costs its ids plus whatever one chunk the caller copies.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ChunkedDocument:
  """Token ids of one document, cut into chunks of `chunk_tokens`, with evidence chunk indices."""
  token_ids: np.ndarray  # int32 [num_tokens]
  chunk_tokens: int
  evidence_chunks: tuple[int, ...]  # sorted, unique
  evidence_token_spans: tuple[tuple[int, int], ...]  # [t0, t1) per evidence span

  @property
  def num_tokens(self) -> int:
    return int(self.token_ids.shape[0])

  @property
  def num_chunks(self) -> int:
    return -(-self.num_tokens // self.chunk_tokens)

  @property
  def last_evidence_chunk(self) -> int:
    """Index of the last chunk holding evidence; -1 if no chunk does."""
    return self.evidence_chunks[-1] if self.evidence_chunks else -1

  def chunk(self, index: int) -> np.ndarray:
    """The ids of chunk `index` (a view, not a copy). int32 [<= chunk_tokens]."""
    if not 0 <= index < self.num_chunks:
      raise IndexError(f"chunk index {index} out of range: the document has {self.num_chunks} chunks")
    return self.token_ids[index * self.chunk_tokens:(index + 1) * self.chunk_tokens]

  def chunks(self) -> Iterator[np.ndarray]:
    """Yields each chunk's ids (views) in order."""
    for index in range(self.num_chunks):
      yield self.chunk(index)

  def evidence_mask(self) -> np.ndarray:
    """bool [num_chunks]: True where the chunk overlaps evidence."""
    mask = np.zeros(self.num_chunks, dtype=bool)
    mask[list(self.evidence_chunks)] = True
    return mask


def _check_chunk_tokens(chunk_tokens: int) -> None:
  if int(chunk_tokens) != chunk_tokens or chunk_tokens < 1:
    raise ValueError(f"chunk_tokens={chunk_tokens}: must be an integer >= 1")


def chunk_token_ids(token_ids, chunk_tokens: int,
                    evidence_token_spans: Sequence[tuple[int, int]] = ()) -> ChunkedDocument:
  """Chunks already-tokenized ids; evidence is given as token spans [t0, t1).

  Chunks holding evidence: for each non-empty span, t0 // chunk_tokens .. (t1 - 1) // chunk_tokens.
  """
  _check_chunk_tokens(chunk_tokens)
  token_ids = np.asarray(token_ids)
  if token_ids.dtype != np.int32:
    token_ids = token_ids.astype(np.int32)
  if token_ids.ndim != 1:
    raise ValueError(f"token_ids has shape {token_ids.shape}: must be one flat sequence")
  if token_ids.shape[0] == 0:
    raise ValueError("the document is empty (0 tokens): give a non-empty document")
  chunks: set[int] = set()
  spans = []
  for t0, t1 in evidence_token_spans:
    t0, t1 = int(t0), int(t1)
    if not 0 <= t0 <= t1 <= token_ids.shape[0]:
      raise ValueError(f"evidence token span ({t0}, {t1}) is outside the document of "
                       f"{token_ids.shape[0]} tokens")
    spans.append((t0, t1))
    if t1 > t0:
      chunks.update(range(t0 // chunk_tokens, (t1 - 1) // chunk_tokens + 1))
  return ChunkedDocument(token_ids=token_ids, chunk_tokens=int(chunk_tokens),
                         evidence_chunks=tuple(sorted(chunks)), evidence_token_spans=tuple(spans))


def tokenize_with_offsets(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Token ids int32 [n] and each token's character [start, end) as int64 [n] arrays.

  Uses the fast tokenizer's offset mapping when it has one; otherwise accumulates the lengths of
  the tokens decoded one by one (exact for text whose characters are never split across tokens).
  """
  try:
    encoding = tokenizer.hf(text, return_offsets_mapping=True, add_special_tokens=False)
  except (NotImplementedError, TypeError, ValueError):
    encoding = None
  if encoding is not None and encoding.get("offset_mapping") is not None:
    ids = np.asarray(encoding["input_ids"], dtype=np.int32)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    del encoding
    return ids, offsets[:, 0].copy(), offsets[:, 1].copy()
  ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
  lengths = np.fromiter((len(tokenizer.decode([int(i)], skip_special_tokens=False)) for i in ids),
                        dtype=np.int64, count=ids.shape[0])
  ends = np.cumsum(lengths)
  return ids, ends - lengths, ends


def char_to_token_spans(token_starts: np.ndarray, token_ends: np.ndarray,
                        char_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
  """For each character span [start, end), the token span [t0, t1) of the tokens overlapping it.

  t0 = first token with tok_end > start; t1 = 1 + last token with tok_start < end (offsets are
  non-decreasing, so both are binary searches). A span no token overlaps gives (t0, t0).
  """
  spans = []
  for start, end in char_spans:
    t0 = int(np.searchsorted(token_ends, start, side="right"))
    t1 = int(np.searchsorted(token_starts, end, side="left"))
    spans.append((t0, max(t0, t1)) if end > start else (t0, t0))
  return spans


def chunk_document(document: str, tokenizer, chunk_tokens: int,
                   evidence: Sequence[tuple[int, int]] = ()) -> ChunkedDocument:
  """Tokenizes `document` once and chunks it; `evidence` are character spans into the document."""
  _check_chunk_tokens(chunk_tokens)
  if not document:
    raise ValueError("the document is empty: give a non-empty document")
  for start, end in evidence:
    if not 0 <= start <= end <= len(document):
      raise ValueError(f"evidence span ({start}, {end}) is outside the document of "
                       f"{len(document)} characters")
  ids, token_starts, token_ends = tokenize_with_offsets(tokenizer, document)
  token_spans = char_to_token_spans(token_starts, token_ends, evidence)
  del token_starts, token_ends
  return chunk_token_ids(ids, chunk_tokens, token_spans)


def chunk_example(example, tokenizer, chunk_tokens: int) -> ChunkedDocument:
  """`chunk_document` of an Example's document and evidence."""
  if not example.document:
    raise ValueError(f"example {example.id!r} of task {example.task!r}: field 'document' is empty")
  return chunk_document(example.document, tokenizer, chunk_tokens, example.evidence)
