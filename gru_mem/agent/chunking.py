"""Tokenize a document slice by slice, cut its ids into fixed-size chunks, mark evidence chunks.

Chunk c covers token ids [c * chunk_tokens, (c + 1) * chunk_tokens) (the last one may be shorter).
A chunk holds evidence iff one of its tokens overlaps an evidence character span; a token
[tok_start, tok_end) overlaps a span [start, end) iff tok_start < end and tok_end > start.

Streaming. `chunk_document` does not encode the whole text at once (a fast tokenizer returns
Python lists of ids and offsets: ~200 bytes a token). It cuts the text into slices of about
`slice_chars` characters at cuts where BPE pre-tokenization cannot merge across, so the slices'
ids, joined, are the whole text's ids:
  * right before a space that follows a non-space and precedes a non-space ("word| next"): with
    Qwen2's (and GPT-2's) pre-tokenizer no pre-token holds a non-space followed by a space, and
    " next" starts a pre-token in both the whole text and the slice;
  * right after a newline that precedes a non-space ("...\n|Next"): no pre-token runs from a
    newline into a non-space character.
Every cut is also checked on the text around it (encode(left + right) == encode(left) +
encode(right), 64 characters a side); a tokenizer for which a cut fails (e.g. one that prefixes
each text with a space marker) is encoded whole instead.

Memory: the document's ids are one int32 array (plus one slice's Python lists while tokenizing);
`chunk(i)` is a view into it, so a document of millions of tokens costs its text, its ids and
whatever one chunk the caller copies.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Sequence

import numpy as np

# Characters tokenized at a time (~50k tokens of English text). Measured on 5M tokens: resident
# memory stays flat at this size, while with 1M-character slices it crept up ~17 MB a slice.
SLICE_CHARS = 1 << 18
_CHECK_CHARS = 64  # text checked on each side of a cut
# A cut before " x" that follows a non-space, or before a non-space that follows a newline.
_SAFE_CUT = re.compile(r"(?<=\S) (?=\S)|(?<=[\r\n])(?=\S)")


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
    encoding = tokenizer.hf(text, return_offsets_mapping=True, add_special_tokens=False,
                            verbose=False)  # a slice may exceed the model's window: expected
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


def slice_cuts(text: str, slice_chars: int = SLICE_CHARS) -> list[int]:
  """Slice boundaries 0 = c_0 < c_1 < ... < c_k = len(text) for streaming tokenization.

  c_i (0 < i < k) is the first safe cut (see the module docstring) at or after c_{i-1} +
  slice_chars; a text with no safe cut past that point ends the last slice, however long.
  """
  if int(slice_chars) != slice_chars or slice_chars < 1:
    raise ValueError(f"slice_chars={slice_chars}: must be an integer >= 1")
  cuts = [0]
  while cuts[-1] + slice_chars < len(text):
    match = _SAFE_CUT.search(text, cuts[-1] + slice_chars)
    if match is None:
      break
    cuts.append(match.start())
  cuts.append(len(text))
  return cuts


def cut_is_exact(tokenizer, text: str, cut: int) -> bool:
  """Whether encoding the text on each side of `cut` separately gives the ids of encoding it whole.

  Checked on the `_CHECK_CHARS` characters either side: both encodings start and end at the same
  window edges, so only the cut itself can make them differ.
  """
  left = text[max(0, cut - _CHECK_CHARS):cut]
  right = text[cut:cut + _CHECK_CHARS]
  return tokenizer.encode(left + right) == tokenizer.encode(left) + tokenizer.encode(right)


def tokenize_in_slices(tokenizer, text: str, char_spans: Sequence[tuple[int, int]] = (),
                       slice_chars: int = SLICE_CHARS) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """Token ids int32 [n] of `text`, encoded one slice at a time, and each char span's token span.

  Token span of [start, end): t0 = #tokens with tok_end <= start, t1 = #tokens with tok_start <
  end, giving (t0, max(t0, t1)), or (t0, t0) for an empty span. Offsets are non-decreasing and a
  slice's offsets plus its first character's position are the whole text's, so both counts are
  sums over slices, and the spans equal `char_to_token_spans` on the whole text's offsets.
  """
  cuts = slice_cuts(text, slice_chars)
  if not all(cut_is_exact(tokenizer, text, cut) for cut in cuts[1:-1]):
    cuts = [0, len(text)]  # this tokenizer merges across the cuts: encode the text whole
  span_starts = np.asarray([start for start, _ in char_spans], np.int64)
  span_ends = np.asarray([end for _, end in char_spans], np.int64)
  tokens_before_start = np.zeros(len(span_starts), np.int64)  # t0 per span
  tokens_before_end = np.zeros(len(span_ends), np.int64)  # t1 per span
  id_slices = []
  for slice_start, slice_end in zip(cuts[:-1], cuts[1:]):
    ids, token_starts, token_ends = tokenize_with_offsets(tokenizer, text[slice_start:slice_end])
    tokens_before_start += np.searchsorted(token_ends, span_starts - slice_start, side="right")
    tokens_before_end += np.searchsorted(token_starts, span_ends - slice_start, side="left")
    id_slices.append(ids)
    del token_starts, token_ends
  token_ids = id_slices[0] if len(id_slices) == 1 else np.concatenate(id_slices)
  spans = []
  for t0, t1, start, end in zip(tokens_before_start, tokens_before_end, span_starts, span_ends):
    spans.append((int(t0), int(max(t0, t1))) if end > start else (int(t0), int(t0)))
  return token_ids, spans


def chunk_document(document: str, tokenizer, chunk_tokens: int,
                   evidence: Sequence[tuple[int, int]] = (),
                   slice_chars: int = SLICE_CHARS) -> ChunkedDocument:
  """Tokenizes `document` (slice by slice) and chunks it; `evidence` are character spans into it.

  The ids and evidence spans equal those of encoding the document whole (see the module
  docstring); `slice_chars` only bounds the memory that tokenizing takes.
  """
  _check_chunk_tokens(chunk_tokens)
  if not document:
    raise ValueError("the document is empty: give a non-empty document")
  for start, end in evidence:
    if not 0 <= start <= end <= len(document):
      raise ValueError(f"evidence span ({start}, {end}) is outside the document of "
                       f"{len(document)} characters")
  ids, token_spans = tokenize_in_slices(tokenizer, document, evidence, slice_chars)
  return chunk_token_ids(ids, chunk_tokens, token_spans)


def chunk_example(example, tokenizer, chunk_tokens: int) -> ChunkedDocument:
  """`chunk_document` of an Example's document and evidence."""
  if not example.document:
    raise ValueError(f"example {example.id!r} of task {example.task!r}: field 'document' is empty")
  return chunk_document(example.document, tokenizer, chunk_tokens, example.evidence)
