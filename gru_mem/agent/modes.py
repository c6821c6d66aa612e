"""The three ways the agent reads a document (`agent.mode`).

  memagent         MemAgent, no gates: M_t = the response, every chunk is read.
  gru_mem          GRU-Mem: M_t = candidate if U_t = yes else M_{t-1}; reading stops at E_t = end.
  gru_mem_no_exit  the gates are written and U_t applies, E_t is ignored: every chunk is read.
"""

MEMAGENT, GRU_MEM, GRU_MEM_NO_EXIT = "memagent", "gru_mem", "gru_mem_no_exit"
MODES = (MEMAGENT, GRU_MEM, GRU_MEM_NO_EXIT)


def check_mode(mode: str, what: str = "agent.mode") -> str:
  """`mode` if it is one of MODES, else a ValueError naming `what` and the choices."""
  if mode not in MODES:
    raise ValueError(f"{what}={mode!r}: use one of {MODES}")
  return mode


def is_gated(mode: str) -> bool:
  """The response carries the update and exit gates (every mode but MemAgent)."""
  return check_mode(mode) != MEMAGENT


def exit_enabled(mode: str) -> bool:
  """The exit gate stops reading (only `gru_mem`)."""
  return check_mode(mode) == GRU_MEM
