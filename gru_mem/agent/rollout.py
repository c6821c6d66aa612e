"""The chunked memory-agent rollout: B examples x G samples read their documents chunk by chunk.

Modes:
  memagent         no gates: M_t = response, every chunk is read.
  gru_mem          M_t = candidate if U_t = yes else M_{t-1}; reading stops after E_t = end.
  gru_mem_no_exit  the gates are written and U_t applies, E_t is ignored: every chunk is read.

The agent state is an explicit carry (`AgentState`: memory ids, alive mask, next chunk, last
chunk read per row). `rollout_step` is one step of the recurrence: it builds the prompt of every live row,
makes ONE sampler call for all of them (rows that exited or ran out of chunks are not in it, so
they stop costing compute; the sampler pads the live batch to a bucket size) and folds the parsed
responses into the next state. `rollout` drives the steps, then makes the answer turn.

The sampler is injected as `policy(prompts, rng, max_new_tokens) -> Generation` (see
`sampler_policy`), so tests can script responses at that interface.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from gru_mem import gates
from gru_mem.agent import modes, parse, prompts

Policy = Callable[[list, jax.Array, int], "object"]  # (prompts, rng, max_new_tokens) -> Generation


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  mode: str = "gru_mem"
  memory_tokens: int = 1024  # the memory cap: a longer candidate is cut to it
  max_response_tokens: int = 1536  # a memory turn's response budget (think + tags + memory)
  max_answer_tokens: int = 256  # the answer turn's budget
  samples_per_example: int = 1  # G, the group size

  def __post_init__(self):
    modes.check_mode(self.mode, "mode")
    for name in ("memory_tokens", "max_response_tokens", "max_answer_tokens", "samples_per_example"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")

  @property
  def gated(self) -> bool:
    return modes.is_gated(self.mode)

  @property
  def exit_enabled(self) -> bool:
    return modes.exit_enabled(self.mode)


@dataclasses.dataclass
class AgentExample:
  """What a rollout needs of an example: question ids, the chunked document, gold answers."""
  question_ids: np.ndarray  # [question_tokens]
  chunks: "object"  # gru_mem.agent.chunking.ChunkedDocument: num_chunks, chunk(i), evidence flags
  answers: tuple[str, ...] = ()
  answer_mode: str = "any"  # "all": every gold value is needed (multi-value needles)
  example_id: str = ""

  @classmethod
  def from_example(cls, example, tokenizer, chunk_tokens: int) -> "AgentExample":
    """Tokenizes a data.Example once: question ids and the chunked document with evidence flags."""
    from gru_mem.agent.chunking import chunk_example
    question_ids = np.asarray(tokenizer.encode(example.question), np.int32)
    if not len(question_ids):
      raise ValueError(f"example {example.id!r}: field 'question' is empty")
    return cls(question_ids, chunk_example(example, tokenizer, chunk_tokens),
               tuple(example.answers), example.answer_mode, example.id)


@dataclasses.dataclass
class Turn:
  """One (prompt, response) of a trajectory; `chunk_index` is -1 for the answer turn."""
  prompt_ids: np.ndarray
  response_ids: np.ndarray
  logprobs: np.ndarray  # sampler log-probs of the response tokens at temperature 1 (pi_old)
  chunk_index: int
  has_evidence: bool
  update_gate: int = gates.INVALID
  exit_gate: int = gates.INVALID
  format_ok: bool = True
  memory_length: int = 0  # tokens in M_t after this turn


@dataclasses.dataclass
class Trajectory:
  example_index: int
  sample_index: int
  turns: list  # memory turns in order
  answer_turn: Optional[Turn] = None
  answer: Optional[str] = None  # the last \boxed{} of the answer turn, None when absent
  last_chunk_read: int = -1  # the chunk after which reading stopped
  num_chunks: int = 0
  last_evidence_chunk: int = -1
  said_end: bool = False  # the exit gate said `end` (else the trajectory ran out of chunks)

  @property
  def chunks_read(self) -> int:
    return len(self.turns)


@dataclasses.dataclass
class AgentState:
  """The carry of the recurrence, one entry per row (row = example * G + sample)."""
  memory: list  # [rows] of int32 arrays, M_{t-1}
  alive: np.ndarray  # [rows] bool: still reading
  next_chunk: np.ndarray  # [rows] int: the chunk this row reads next
  last_chunk_read: np.ndarray  # [rows] int: the last chunk read so far (-1 before the first)
  said_end: np.ndarray  # [rows] bool


@dataclasses.dataclass
class RolloutResult:
  trajectories: list  # [B * G] Trajectory, example-major
  rows_generated_per_step: list  # live rows in each memory step's sampler call
  step_seconds: list
  answer_seconds: float
  total_seconds: float


def initial_state(examples: Sequence[AgentExample], samples_per_example: int) -> AgentState:
  rows = len(examples) * samples_per_example
  return AgentState(
      memory=[np.zeros((0,), np.int32) for _ in range(rows)],
      alive=np.ones(rows, bool),
      next_chunk=np.zeros(rows, np.int64),
      last_chunk_read=np.full(rows, -1, np.int64),
      said_end=np.zeros(rows, bool))


def rollout_step(policy: Policy, builder, tokenizer, examples: Sequence[AgentExample],
                 state: AgentState, rng: jax.Array, settings: RolloutSettings
                 ) -> tuple[AgentState, dict[int, Turn]]:
  """One memory step for every live row; returns the next state and {row: Turn}.

  Memory rule: M_t = candidate if (memagent or U_t = yes) else M_{t-1}.
  Exit rule (mode gru_mem only): alive_{t+1} = alive_t and E_t != end and chunks remain.
  """
  G = settings.samples_per_example
  live = [r for r in range(len(state.alive)) if state.alive[r]]
  if not live:
    return state, {}
  prompts_ids = []
  for row in live:
    example = examples[row // G]
    chunk_ids = example.chunks.chunk(int(state.next_chunk[row]))
    prompts_ids.append(builder.memory_turn(example.question_ids, state.memory[row], chunk_ids))
  generation = policy(prompts_ids, rng, settings.max_response_tokens)

  memory = list(state.memory)
  alive, next_chunk = state.alive.copy(), state.next_chunk.copy()
  last_chunk_read, said_end = state.last_chunk_read.copy(), state.said_end.copy()
  turns = {}
  for i, row in enumerate(live):
    example = examples[row // G]
    chunk_index = int(state.next_chunk[row])
    response_ids = np.asarray(generation.row(i), np.int32)
    text = tokenizer.decode(response_ids)
    parsed = parse.parse_response(text, settings.memory_tokens, tokenizer, mode=settings.mode)
    update_gate, exit_gate, format_ok = parsed.update_gate, parsed.exit_gate, parsed.format_ok
    if parse.effective_update(update_gate):  # always in memagent
      memory[row] = np.asarray(parsed.candidate_memory_ids, np.int32)
    stop = settings.exit_enabled and parse.effective_exit(exit_gate)
    last_chunk_read[row] = chunk_index
    next_chunk[row] = chunk_index + 1
    said_end[row] = stop
    alive[row] = (not stop) and next_chunk[row] < example.chunks.num_chunks
    turns[row] = Turn(
        prompt_ids=np.asarray(prompts_ids[i], np.int32), response_ids=response_ids,
        logprobs=np.asarray(generation.logprobs[i, :len(response_ids)], np.float32),
        chunk_index=chunk_index, has_evidence=chunk_index in example.chunks.evidence_chunks,
        update_gate=int(update_gate), exit_gate=int(exit_gate), format_ok=bool(format_ok),
        memory_length=len(memory[row]))
  return AgentState(memory, alive, next_chunk, last_chunk_read, said_end), turns


def rollout(policy: Policy, builder, tokenizer, examples: Sequence[AgentExample], rng: jax.Array,
            settings: RolloutSettings, on_turn: Optional[Callable[[int, int, Turn, str], None]] = None
            ) -> RolloutResult:
  """Reads every example's document with G samples each, then answers from the final memory.

  `on_turn(row, step, turn, memory_text)` is called after each memory turn (for --trace).
  """
  if not examples:
    raise ValueError("rollout: no examples given")
  for index, example in enumerate(examples):
    if example.chunks.num_chunks < 1:
      raise ValueError(f"example {index} ({example.example_id!r}): the document has no chunks")
  start = time.perf_counter()
  G = settings.samples_per_example
  state = initial_state(examples, G)
  trajectories = [
      Trajectory(example_index=row // G, sample_index=row % G, turns=[],
                 num_chunks=examples[row // G].chunks.num_chunks,
                 last_evidence_chunk=int(examples[row // G].chunks.last_evidence_chunk))
      for row in range(len(state.alive))]
  rows_per_step, step_seconds = [], []
  step = 0
  while state.alive.any():
    step_start = time.perf_counter()
    rows_per_step.append(int(state.alive.sum()))
    state, turns = rollout_step(policy, builder, tokenizer, examples, state,
                                jax.random.fold_in(rng, step), settings)
    for row, turn in turns.items():
      trajectories[row].turns.append(turn)
      if on_turn is not None:
        on_turn(row, step, turn, tokenizer.decode(state.memory[row]))
    step_seconds.append(time.perf_counter() - step_start)
    step += 1

  answer_start = time.perf_counter()
  answer_prompts = [builder.answer_turn(examples[row // G].question_ids, state.memory[row])
                    for row in range(len(trajectories))]
  generation = policy(answer_prompts, jax.random.fold_in(rng, 1_000_003),
                      settings.max_answer_tokens)
  for row, trajectory in enumerate(trajectories):
    response_ids = np.asarray(generation.row(row), np.int32)
    answer, answer_ok = parse.parse_answer(tokenizer.decode(response_ids))
    trajectory.answer = answer
    trajectory.answer_turn = Turn(
        prompt_ids=np.asarray(answer_prompts[row], np.int32), response_ids=response_ids,
        logprobs=np.asarray(generation.logprobs[row, :len(response_ids)], np.float32),
        chunk_index=-1, has_evidence=False, format_ok=bool(answer_ok),
        memory_length=len(state.memory[row]))
    trajectory.last_chunk_read = int(state.last_chunk_read[row])
    trajectory.said_end = bool(state.said_end[row])
  end = time.perf_counter()
  return RolloutResult(trajectories, rows_per_step, step_seconds, end - answer_start, end - start)


def sampler_policy(config, params, sampling_settings, batch_sharding=None) -> Policy:
  """The real policy: `gru_mem.continuous.generate` (static batches when settings.slots is 0)."""
  from gru_mem import continuous

  def policy(prompt_ids, rng, max_new_tokens):
    settings = dataclasses.replace(sampling_settings, max_new_tokens=max_new_tokens)
    kwargs = {} if batch_sharding is None else {"batch_sharding": batch_sharding}
    return continuous.generate(config, params, prompt_ids, rng, settings, **kwargs)
  return policy


def check_budget(builder, example: AgentExample, settings: RolloutSettings, chunk_tokens: int,
                 max_prompt_tokens: int, index: int = 0) -> None:
  """Fails early when a memory turn could not fit: question + memory + chunk + template."""
  question = len(example.question_ids)
  need = question + settings.memory_tokens + chunk_tokens + builder.turn_overhead_tokens
  if need > max_prompt_tokens:
    raise ValueError(
        f"example {index} ({example.example_id!r}): a memory turn needs up to {need} prompt tokens "
        f"(question {question} + memory {settings.memory_tokens} + chunk {chunk_tokens} + template "
        f"{builder.turn_overhead_tokens}) but the model allows {max_prompt_tokens}: shorten the "
        "question or lower chunk_tokens / memory_tokens")
