"""Padded sizes: "the smallest bucket >= size", one helper for every caller that pads to buckets.

Padding every array to one of a few sizes bounds how often a jitted function compiles: a run
that pads prompts, responses and batches to `DEFAULT_LENGTH_BUCKETS` compiles each function at
most once per bucket it meets. This module sits at the bottom of the package (numpy-free).
"""

from __future__ import annotations

from typing import Optional, Sequence

DEFAULT_LENGTH_BUCKETS = tuple(2 ** i for i in range(6, 16))  # 64 ... 32768
QUESTION_ALLOWANCE_TOKENS = 512  # a memory turn's question + template around chunk and memory


def budget_buckets(budget: int, step: int, buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS
                   ) -> tuple[int, ...]:
  """`buckets` plus one bucket fitted to a known longest size: ceil(budget / step) * step.

  A GRU-Mem memory turn's prompt is at most chunk + memory + question allowance tokens (6536 in
  the paper's setting); among powers of two it pads to 8192, so a KV cache read at every decode
  step would carry ~20% padding columns. With step = the prefill chunk (a multiple of it keeps
  the chunked prefill) the fitted bucket is 6656. Longer inputs still find the larger buckets.
  """
  if budget < 1 or step < 1:
    raise ValueError(f"budget_buckets(budget={budget}, step={step}): both must be >= 1")
  fitted = -(-budget // step) * step
  return tuple(sorted(set(int(b) for b in buckets) | {fitted}))


def check_buckets(buckets: Sequence[int], name: str = "length_buckets") -> tuple[int, ...]:
  """`buckets` as a tuple of ints; raises unless it is non-empty, strictly increasing, >= 1."""
  buckets = tuple(int(b) for b in buckets)
  if not buckets or buckets[0] < 1 or list(buckets) != sorted(set(buckets)):
    raise ValueError(f"{name}={buckets}: must be a non-empty increasing tuple of sizes >= 1")
  return buckets


def smallest_bucket(size: int, buckets: Sequence[int], what: Optional[str] = None,
                    multiple_of: int = 1, beyond_largest: str = "raise") -> int:
  """min{b in buckets : b >= size}, rounded up to a multiple of `multiple_of`.

  When `size` exceeds the largest bucket: beyond_largest="raise" raises a ValueError naming
  `what` (e.g. "a prompt + response"); "size" returns `size` itself (rounded up likewise).
  """
  if beyond_largest not in ("raise", "size"):
    raise ValueError(f"beyond_largest={beyond_largest!r}: use 'raise' or 'size'")
  if multiple_of < 1:
    raise ValueError(f"multiple_of={multiple_of}: must be >= 1")
  bucket = next((b for b in buckets if b >= size), None)
  if bucket is None:
    if beyond_largest == "size":
      bucket = size
    else:
      largest = buckets[-1] if len(buckets) else None
      raise ValueError(f"{what or 'a size'} of {size} tokens exceeds the largest length bucket "
                       f"{largest}: add a larger bucket to length_buckets or shorten the input")
  return -(-bucket // multiple_of) * multiple_of
