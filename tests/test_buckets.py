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
