"""Learner rows and their packing into bucketed micro-batches (host-side numpy, no optimizer).

Rows. Every (prompt, response) turn of every trajectory is one `LearnerRow`. `pack_rows`
right-pads prompt + response into `tokens [micro, rows, length]` and lays the response out in
its own `[micro, rows, response]` arrays (tokens, mask, pi_old and pi_ref log-probs), with
`predict_positions` saying which position's hidden state predicts each response token
(prompt length - 1 + j for response token j). `length` and `response` are each the smallest
of `length_buckets` that fits, and the micro-batch count is rounded up to a power of two with
all-padding micro-batches, so a step compiles at most (#buckets)^2 x (1 + log2(most
micro-batches)) times.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import struct

from gru_mem import buckets as buckets_lib
from gru_mem import parallel

DEFAULT_LENGTH_BUCKETS = buckets_lib.DEFAULT_LENGTH_BUCKETS


@dataclasses.dataclass
class LearnerRow:
  """One turn: prompt ids, response ids, the turn's advantage, pi_old (and optionally pi_ref)
  log-probs of each response token ([len(response_ids)] float arrays)."""
  prompt_ids: np.ndarray
  response_ids: np.ndarray
  advantage: float
  old_logprobs: np.ndarray
  ref_logprobs: Optional[np.ndarray] = None


@struct.dataclass
class Batch:
  """Packed rows. Row k of the input is row k % rows of micro-batch k // rows.

  tokens, input_mask: [micro, rows, length] prompt + response, right-padded; mask = real tokens.
  predict_positions: [micro, rows, response] int32, the position whose hidden state predicts
  response token j (prompt length - 1 + j). response_tokens, response_mask, old_logprobs,
  ref_logprobs (None when absent): [micro, rows, response]. advantages: [micro, rows].
  num_rows: [] int32, the number of real rows (padding rows follow them, mask all false).
  """
  tokens: Any
  input_mask: Any
  predict_positions: Any
  response_tokens: Any
  response_mask: Any
  advantages: Any
  old_logprobs: Any
  ref_logprobs: Any
  num_rows: Any

  def micro_batch(self, index):
    """Micro-batch `index` (may be traced): every [micro, ...] field indexed at `index`."""
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False),
                        self.replace(num_rows=None))


def check_row(index: int, row: LearnerRow, with_ref: bool) -> None:
  """Raises a ValueError naming row `index` if its arrays disagree or its advantage is not
  finite."""
  prompt, response = np.asarray(row.prompt_ids), np.asarray(row.response_ids)
  if prompt.ndim != 1 or prompt.size == 0:
    raise ValueError(f"row {index}: prompt_ids must be a non-empty 1-D array, got shape "
                     f"{prompt.shape}")
  if response.ndim != 1 or response.size == 0:
    raise ValueError(f"row {index}: response_ids must be a non-empty 1-D array, got shape "
                     f"{response.shape}; drop turns with empty responses")
  if np.shape(row.old_logprobs) != response.shape:
    raise ValueError(f"row {index}: old_logprobs has shape {np.shape(row.old_logprobs)}, want one "
                     f"per response token {response.shape}")
  if (row.ref_logprobs is not None) != with_ref:
    raise ValueError(f"row {index}: give ref_logprobs for every row or for none")
  if with_ref and np.shape(row.ref_logprobs) != response.shape:
    raise ValueError(f"row {index}: ref_logprobs has shape {np.shape(row.ref_logprobs)}, want "
                     f"{response.shape}")
  if not np.isfinite(row.advantage):
    raise ValueError(f"row {index}: advantage {row.advantage} is not finite")


def pack_rows(rows: Sequence[LearnerRow], length_buckets: Sequence[int], micro_batch_rows: int,
              pad_id: int = 0, mesh=None) -> Batch:
  """Rows -> a `Batch` [micro, micro_batch_rows, bucketed length] (see `Batch`).

  Without a mesh the fields are numpy arrays; with one they are placed on it with the rows
  (axis 1) split over parallel.BATCH_AXES, `num_rows` replicated, so micro_batch_rows must be a
  multiple of data * fsdp.
  """
  if not rows:
    raise ValueError("rows is empty: pass at least one LearnerRow")
  if micro_batch_rows < 1:
    raise ValueError(f"micro_batch_rows={micro_batch_rows}: must be >= 1")
  if mesh is not None:
    shards = math.prod(mesh.shape[a] for a in parallel.BATCH_AXES)
    if micro_batch_rows % shards:
      raise ValueError(f"micro_batch_rows={micro_batch_rows} is not divisible by data*fsdp = "
                       f"{shards}: use a multiple of {shards}")
  with_ref = rows[0].ref_logprobs is not None
  for i, row in enumerate(rows):
    check_row(i, row, with_ref)
  length = buckets_lib.smallest_bucket(
      max(len(r.prompt_ids) + len(r.response_ids) for r in rows), length_buckets,
      "a prompt + response")
  response = buckets_lib.smallest_bucket(max(len(r.response_ids) for r in rows), length_buckets,
                                         "a response")
  num_micro = 1 << (math.ceil(len(rows) / micro_batch_rows) - 1).bit_length()
  total = num_micro * micro_batch_rows
  arrays = {
      "tokens": np.full((total, length), pad_id, np.int32),
      "input_mask": np.zeros((total, length), bool),
      "predict_positions": np.zeros((total, response), np.int32),
      "response_tokens": np.full((total, response), pad_id, np.int32),
      "response_mask": np.zeros((total, response), bool),
      "advantages": np.zeros((total,), np.float32),
      "old_logprobs": np.zeros((total, response), np.float32),
      "ref_logprobs": np.zeros((total, response), np.float32) if with_ref else None,
  }
  for k, row in enumerate(rows):
    prompt_len, response_len = len(row.prompt_ids), len(row.response_ids)
    arrays["tokens"][k, :prompt_len] = row.prompt_ids
    arrays["tokens"][k, prompt_len:prompt_len + response_len] = row.response_ids
    arrays["input_mask"][k, :prompt_len + response_len] = True
    arrays["predict_positions"][k, :response_len] = np.arange(prompt_len - 1,
                                                              prompt_len - 1 + response_len)
    arrays["response_tokens"][k, :response_len] = row.response_ids
    arrays["response_mask"][k, :response_len] = True
    arrays["advantages"][k] = row.advantage
    arrays["old_logprobs"][k, :response_len] = row.old_logprobs
    if with_ref:
      arrays["ref_logprobs"][k, :response_len] = row.ref_logprobs
  arrays = {name: None if a is None else a.reshape(num_micro, micro_batch_rows, *a.shape[1:])
            for name, a in arrays.items()}
  batch = Batch(**arrays, num_rows=np.int32(len(rows)))
  return batch if mesh is None else parallel.shard_batch(batch, mesh, batch_axis=1)


def response_values(batch: Batch, values) -> list[np.ndarray]:
  """Per real row, the entries of `values [micro, rows, response]` on its response tokens."""
  values = np.asarray(values).reshape(-1, np.shape(values)[-1])
  mask = np.asarray(batch.response_mask).reshape(values.shape)
  return [values[k, mask[k]] for k in range(int(batch.num_rows))]
