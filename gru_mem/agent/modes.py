"""The three agent modes and what each one turns on.

  memagent         no gates: the response is the new memory, every chunk is read (baseline).
  gru_mem          update gate U_t and exit gate E_t (both gate rewards).
  gru_mem_no_exit  update gate only: every chunk is read, no exit reward.
"""

from __future__ import annotations

MODES = ("memagent", "gru_mem", "gru_mem_no_exit")


def _check(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: use one of {MODES}")


def is_gated(mode: str) -> bool:
  """Whether turns carry <check>/<update>/<next> tags (the update gate, and the update reward)."""
  _check(mode)
  return mode != "memagent"


def exit_enabled(mode: str) -> bool:
  """Whether the exit gate may stop reading (and the exit reward is given)."""
  _check(mode)
  return mode == "gru_mem"
