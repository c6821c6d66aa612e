"""Integer codes for the two gate decisions, shared by the parser (agent/) and the rewards (rl/).

A memory turn's response carries `<check>yes|no</check>` (update gate U_t) and
`<next>continue|end</next>` (exit gate E_t). The parser turns each into one of these small ints
so that decisions travel as int arrays `[..., G, T]` through jit; `INVALID` marks a gate that is
missing or holds anything else, and the update reward counts it as a wrong decision.
"""

INVALID = -1

UPDATE_NO = 0  # <check>no</check>: keep M_{t-1}
UPDATE_YES = 1  # <check>yes</check>: M_t = the candidate in <update>

EXIT_CONTINUE = 0  # <next>continue</next>: read the next chunk
EXIT_END = 1  # <next>end</next>: stop reading and answer

UPDATE_WORDS = {"yes": UPDATE_YES, "no": UPDATE_NO}
EXIT_WORDS = {"continue": EXIT_CONTINUE, "end": EXIT_END}
