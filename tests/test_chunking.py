"""Chunk boundaries, evidence chunk flags by hand, memory on a 2M-token document, bad input."""

import tracemalloc

import numpy as np
import pytest

from gru_mem.data import chunking
from gru_mem.data.example import Example
from gru_mem.data.tokenizer import builtin_tokenizer


def test_chunk_boundaries_exact():
  doc = chunking.chunk_token_ids(np.arange(10), 4)
  assert doc.num_chunks == 3 and doc.num_tokens == 10
  assert [c.tolist() for c in doc.chunks()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  assert doc.token_ids.dtype == np.int32
  assert doc.evidence_chunks == () and doc.last_evidence_chunk == -1
  assert chunking.chunk_token_ids(np.arange(8), 4).num_chunks == 2
  assert chunking.chunk_token_ids(np.arange(3), 100).num_chunks == 1
  with pytest.raises(IndexError, match="chunk index 3 out of range"):
    doc.chunk(3)


def test_evidence_chunks_from_token_spans():
  # [5, 6) -> chunk 1; [3, 5) crosses the 0|1 boundary -> 0 and 1; [9, 10) -> 2; empty -> none.
  doc = chunking.chunk_token_ids(np.arange(10), 4, [(5, 6), (9, 10), (3, 5), (7, 7)])
  assert doc.evidence_chunks == (0, 1, 2)
  assert doc.last_evidence_chunk == 2
  assert doc.evidence_mask().tolist() == [True, True, True]
  assert chunking.chunk_token_ids(np.arange(10), 4, [(4, 8)]).evidence_chunks == (1,)
  assert chunking.chunk_token_ids(np.arange(10), 4, [(7, 7)]).last_evidence_chunk == -1


def test_evidence_chunks_by_hand_on_text():
  tok = builtin_tokenizer()
  text = "the sky is clear. the sea is calm."
  # Tokens (each vocabulary word is one token, with its leading space):
  # 0 "the" 1 " sky" 2 " is" 3 " clear" 4 "." | 5 " the" 6 " sea" 7 " is" 8 " calm" 9 "."
  ids = tok.encode(text)
  assert [tok.decode([i]) for i in ids] == ["the", " sky", " is", " clear", ".", " the", " sea",
                                             " is", " calm", "."]
  sea = text.index("sea")
  doc = chunking.chunk_document(text, tok, 4, [(sea, sea + 3)])
  assert doc.evidence_token_spans == ((6, 7),) and doc.evidence_chunks == (1,)
  clear_the = text.index("clear")  # "clear. the" = tokens 3..5 -> chunks 0 and 1
  doc = chunking.chunk_document(text, tok, 4, [(clear_the, clear_the + len("clear. the"))])
  assert doc.evidence_token_spans == ((3, 6),) and doc.evidence_chunks == (0, 1)
  doc = chunking.chunk_document(text, tok, 3, [(len(text) - 1, len(text))])  # the final "."
  assert doc.evidence_chunks == (3,) and doc.last_evidence_chunk == 3 == doc.num_chunks - 1
  assert np.array_equal(doc.token_ids, ids)


class _NoOffsets:
  """A tokenizer without offset mappings (forces the decoded-length fallback)."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer

  def hf(self, *args, **kwargs):
    raise NotImplementedError("no offsets")

  def encode(self, text):
    return self._tokenizer.encode(text)

  def decode(self, ids, skip_special_tokens=True):
    return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_fallback_offsets_match_fast_offsets():
  tok = builtin_tokenizer()
  text = "Zyxw went to the market. The magic number is 12345!\n\nthe end"
  fast = chunking.tokenize_with_offsets(tok, text)
  slow = chunking.tokenize_with_offsets(_NoOffsets(tok), text)
  for a, b in zip(fast, slow):
    assert np.array_equal(a, b)
  assert fast[2][-1] == len(text)


def test_chunk_example_and_errors():
  tok = builtin_tokenizer()
  with pytest.raises(ValueError, match="chunk_tokens=0: must be"):
    chunking.chunk_document("the sky", tok, 0)
  with pytest.raises(ValueError, match="chunk_tokens=-3"):
    chunking.chunk_token_ids(np.arange(4), -3)
  with pytest.raises(ValueError, match="document is empty"):
    chunking.chunk_document("", tok, 4)
  with pytest.raises(ValueError, match="document is empty"):
    chunking.chunk_token_ids(np.zeros(0, np.int32), 4)
  with pytest.raises(ValueError, match=r"evidence span \(3, 99\) is outside"):
    chunking.chunk_document("the sky is", tok, 4, [(3, 99)])
  example = Example(id="x1", task="t", question="q", answers=("sky",), document="the sky is blue",
                    evidence=((4, 7),))
  assert chunking.chunk_example(example, tok, 1).evidence_chunks == (1,)
  empty = Example(id="x2", task="t", question="q", answers=("a",), document="", evidence=())
  with pytest.raises(ValueError, match="example 'x2' of task 't': field 'document' is empty"):
    chunking.chunk_example(empty, tok, 4)


def test_two_million_tokens_chunk_as_views_with_bounded_memory():
  ids = (np.arange(2_000_000, dtype=np.int64) % 50_000).astype(np.int32)  # 8 MB of ids
  tracemalloc.start()
  before = tracemalloc.get_traced_memory()[0]
  doc = chunking.chunk_token_ids(ids, 5000, [(1_234_567, 1_240_001), (5, 6)])
  checksum = 0
  for chunk in doc.chunks():
    assert np.shares_memory(chunk, ids)  # a view into the one id array, never a copy
    checksum += int(chunk[-1])
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak - before < 200_000  # far below one copy of the ids (8 MB)
  assert doc.token_ids is ids
  assert doc.num_chunks == 400
  # Tokens 1,234,567 .. 1,240,000 lie in chunks 1,234,567 // 5000 = 246 .. 1,240,000 // 5000 = 248.
  assert doc.evidence_chunks == (0, 246, 247, 248)
  assert checksum == sum(int(ids[min((c + 1) * 5000, 2_000_000) - 1]) for c in range(400))
