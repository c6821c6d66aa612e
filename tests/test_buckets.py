"""buckets.smallest_bucket: the behaviours of the four helpers it replaces."""

import pytest

from gru_mem import buckets


def test_smallest_bucket():
  assert buckets.smallest_bucket(1, (16, 32, 48)) == 16
  assert buckets.smallest_bucket(16, (16, 32, 48)) == 16
  assert buckets.smallest_bucket(17, (16, 32, 48)) == 32
  assert buckets.smallest_bucket(17, (16, 32, 48), multiple_of=24) == 48  # sampling's rounding
  assert buckets.smallest_bucket(50, (16, 32, 48), beyond_largest="size") == 50  # evaluate's
  with pytest.raises(ValueError, match="a response of 50 tokens exceeds the largest length "
                                       "bucket 48"):
    buckets.smallest_bucket(50, (16, 32, 48), "a response")
  with pytest.raises(ValueError, match="beyond_largest='clip'"):
    buckets.smallest_bucket(5, (16,), beyond_largest="clip")


def test_check_buckets():
  assert buckets.check_buckets([16, "32"]) == (16, 32)
  for bad in ((), (0, 16), (32, 16), (16, 16)):
    with pytest.raises(ValueError, match="must be a non-empty increasing tuple"):
      buckets.check_buckets(bad)
  assert buckets.DEFAULT_LENGTH_BUCKETS[0] == 64 and buckets.DEFAULT_LENGTH_BUCKETS[-1] == 32768


def test_budget_buckets_add_one_bucket_fitted_to_the_prompt_budget():
  # The paper's memory turn: chunk 5000 + memory 1024 + allowance 512 = 6536 -> 13 x 512.
  fitted = buckets.budget_buckets(5000 + 1024 + buckets.QUESTION_ALLOWANCE_TOKENS, 512)
  assert fitted == tuple(sorted(buckets.DEFAULT_LENGTH_BUCKETS + (6656,)))
  assert buckets.smallest_bucket(6536, fitted) == 6656 and buckets.smallest_bucket(6657, fitted) == 8192
  assert buckets.budget_buckets(4096, 512) == buckets.DEFAULT_LENGTH_BUCKETS  # already a bucket
  with pytest.raises(ValueError, match="both must be >= 1"):
    buckets.budget_buckets(0, 512)
