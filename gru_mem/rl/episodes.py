"""From rollouts to learning signal: trajectories -> padded reward inputs -> advantages -> rows.

A rollout of B examples x G samples becomes, per example (group), the padded arrays that
`rewards.group_rewards` takes (`alive [B, G, T]` etc.), the advantages of every turn, and then
one `LearnerRow` per turn (every memory turn and the answer turn), each carrying its advantage.
`score_rollout` does all of it once and returns a `ScoredRollout` (training keeps its learner
rows, evaluation its metrics).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from gru_mem import gates
from gru_mem.agent import modes
from gru_mem.agent.rollout import Trajectory
from gru_mem.data import metrics
from gru_mem.rl import advantages, rewards
from gru_mem.rl.batch import LearnerRow

MATCHERS = {"exact": "exact_match", "sub_exact": "sub_exact_match", "needles": "needles"}


@dataclasses.dataclass
class GroupArrays:
  """Reward inputs of B groups of G trajectories, padded to T = the most memory turns."""
  correct: np.ndarray  # [B, G] bool
  memory_format_ok: np.ndarray  # [B, G, T] bool
  answer_format_ok: np.ndarray  # [B, G] bool
  alive: np.ndarray  # [B, G, T] bool: turn t exists
  update_decision: np.ndarray  # [B, G, T] int (gates.*)
  exit_decision: np.ndarray  # [B, G, T] int (gates.*)
  chunk_has_evidence: np.ndarray  # [B, G, T] bool
  last_evidence_chunk: np.ndarray  # [B, G] int
  evidence_known: np.ndarray  # [B, G] bool: the example has evidence (else no gate rewards)
  memory_length: np.ndarray  # [B, G, T] int


def is_correct(answer, gold: Sequence[str], answer_mode: str = "any", answer_match: str = "exact"
               ) -> bool:
  """r_out's test: the boxed answer matches a gold answer after normalisation.

  answer_mode "all" (multi-value / multi-query needles) needs every gold value in the answer.
  """
  if answer is None:
    return False
  metric = "needles" if answer_mode == "all" else MATCHERS[answer_match]
  return metrics.score_answer(answer, gold, answer_mode)[metric] >= 1.0


def group_arrays(trajectories: Sequence[Trajectory], examples: Sequence, group_size: int,
                 answer_match: str = "exact") -> GroupArrays:
  """Packs example-major trajectories (B * G of them) of `examples` into padded per-group arrays."""
  if len(trajectories) % group_size:
    raise ValueError(f"{len(trajectories)} trajectories is not a multiple of group_size={group_size}")
  if answer_match not in MATCHERS:
    raise ValueError(f"answer_match={answer_match!r}: use one of {sorted(MATCHERS)}")
  B, G = len(trajectories) // group_size, group_size
  T = max(max(len(t.turns) for t in trajectories), 1)
  out = GroupArrays(
      correct=np.zeros((B, G), bool), memory_format_ok=np.ones((B, G, T), bool),
      answer_format_ok=np.zeros((B, G), bool), alive=np.zeros((B, G, T), bool),
      update_decision=np.full((B, G, T), gates.INVALID, np.int32),
      exit_decision=np.full((B, G, T), gates.INVALID, np.int32),
      chunk_has_evidence=np.zeros((B, G, T), bool), last_evidence_chunk=np.zeros((B, G), np.int32),
      evidence_known=np.zeros((B, G), bool), memory_length=np.zeros((B, G, T), np.int32))
  for i, trajectory in enumerate(trajectories):
    b, g = divmod(i, G)
    out.correct[b, g] = is_correct(trajectory.answer, examples[b].answers,
                                   examples[b].answer_mode, answer_match)
    out.answer_format_ok[b, g] = trajectory.answer_turn is not None and trajectory.answer_turn.format_ok
    out.last_evidence_chunk[b, g] = trajectory.last_evidence_chunk
    out.evidence_known[b, g] = trajectory.last_evidence_chunk >= 0
    for t, turn in enumerate(trajectory.turns):
      out.alive[b, g, t] = True
      out.memory_format_ok[b, g, t] = turn.format_ok
      out.update_decision[b, g, t] = turn.update_gate
      out.exit_decision[b, g, t] = turn.exit_gate
      out.chunk_has_evidence[b, g, t] = turn.has_evidence
      out.memory_length[b, g, t] = turn.memory_length
  return out


def compute_rewards_and_advantages(arrays: GroupArrays, rl, mode: str) -> dict[str, np.ndarray]:
  """Rewards (outcome, format, exit, update) and advantages for every turn, by the config `rl`:
  r_out, r_fmt, r_exit, r_traj [B, G], r_upd [B, G, T], exit_timing [B, G], memory_advantage
  [B, G, T], answer_advantage [B, G], zero_advantage_group [B]."""
  gated = modes.is_gated(mode)
  out = rewards.group_rewards(
      arrays.correct, arrays.memory_format_ok, arrays.answer_format_ok, arrays.alive,
      arrays.update_decision, arrays.chunk_has_evidence, arrays.last_evidence_chunk,
      use_exit_reward=modes.exit_enabled(mode), use_update_reward=gated,
      exit_early_penalty=rl.exit_early_penalty, exit_late_penalty=rl.exit_late_penalty,
      outcome_reward_weight=rl.outcome_reward_weight, format_reward_weight=rl.format_reward_weight,
      exit_reward_weight=rl.exit_reward_weight, update_correct_reward=rl.update_correct_reward,
      update_wrong_reward=rl.update_wrong_reward, evidence_known=arrays.evidence_known)
  memory_advantage, answer_advantage = advantages.group_advantages(
      out["r_traj"], out["r_upd"], arrays.alive, alpha=rl.alpha if gated else 1.0,
      normalize_advantage_std=rl.normalize_advantage_std, advantage_std_eps=rl.advantage_std_eps)
  zero_groups = advantages.zero_advantage_groups(memory_advantage, answer_advantage,
                                                 dynamic_sampling_atol=rl.dynamic_sampling_atol)
  result = {k: np.asarray(v) for k, v in out.items()}
  result.update(memory_advantage=np.asarray(memory_advantage),
                answer_advantage=np.asarray(answer_advantage),
                zero_advantage_group=np.asarray(zero_groups))
  return result


def learner_rows(trajectories: Sequence[Trajectory], signal: dict[str, np.ndarray], group_size: int,
                 keep_groups: np.ndarray) -> list[LearnerRow]:
  """One row per turn of every kept group; each response token gets its turn's advantage."""
  rows = []
  for i, trajectory in enumerate(trajectories):
    b, g = divmod(i, group_size)
    if not keep_groups[b]:
      continue
    for t, turn in enumerate(trajectory.turns):
      rows.append(_row(turn, float(signal["memory_advantage"][b, g, t])))
    if trajectory.answer_turn is not None:
      rows.append(_row(trajectory.answer_turn, float(signal["answer_advantage"][b, g])))
  return [r for r in rows if len(r.response_ids)]


def _row(turn, advantage: float) -> LearnerRow:
  return LearnerRow(prompt_ids=turn.prompt_ids, response_ids=turn.response_ids,
                    advantage=advantage, old_logprobs=turn.logprobs)


def rollout_metrics(arrays: GroupArrays, signal: dict[str, np.ndarray]) -> dict[str, float]:
  """Per-step numbers a researcher plots: rewards by part, gate accuracies, exits, memory. Gate
  accuracies and exits count only examples with evidence (`data/examples_with_evidence` of the
  batch's examples have it)."""
  known = arrays.evidence_known
  alive = arrays.alive
  evidence = alive & arrays.chunk_has_evidence & known[..., None]
  non_evidence = alive & ~arrays.chunk_has_evidence & known[..., None]
  said_yes = arrays.update_decision == gates.UPDATE_YES
  said_no = arrays.update_decision == gates.UPDATE_NO
  timing = signal["exit_timing"][known]
  chunks_read = alive.sum(-1)
  return {
      "reward/outcome": float(signal["r_out"].mean()),
      "reward/format": float(signal["r_fmt"].mean()),
      "reward/exit": float(signal["r_exit"].mean()),
      "reward/trajectory": float(signal["r_traj"].mean()),
      "reward/update": float(signal["r_upd"].sum() / max(alive.sum(), 1)),
      "gate/update_acc_evidence": _fraction(said_yes & evidence, evidence),
      "gate/update_acc_non_evidence": _fraction(said_no & non_evidence, non_evidence),
      "gate/exit_early": float((timing < 0).mean()) if timing.size else float("nan"),
      "gate/exit_exact": float((timing == 0).mean()) if timing.size else float("nan"),
      "gate/exit_late": float((timing > 0).mean()) if timing.size else float("nan"),
      "data/examples_with_evidence": float(known[:, 0].sum()) if known.size else 0.0,
      "agent/chunks_read": float(chunks_read.mean()),
      "agent/memory_tokens": float(arrays.memory_length[alive].mean()) if alive.any() else 0.0,
      "agent/format_ok": float(arrays.memory_format_ok[alive].mean()) if alive.any() else 0.0,
      "agent/accuracy": float(arrays.correct.mean()),
  }


def _fraction(hits: np.ndarray, total: np.ndarray) -> float:
  count = total.sum()
  return float(hits.sum() / count) if count else float("nan")


@dataclasses.dataclass
class ScoredRollout:
  """A rollout of B groups of G trajectories, scored once: the reward inputs (`arrays`), the
  rewards and advantages (`signal`, see `compute_rewards_and_advantages`), the per-step
  `metrics` (`rollout_metrics`)."""
  trajectories: Sequence[Trajectory]
  group_size: int
  arrays: GroupArrays
  signal: dict[str, np.ndarray]
  metrics: dict[str, float]

  @property
  def zero_advantage_group(self) -> np.ndarray:
    """[B] bool: every advantage of the group is 0 (no gradient; dynamic sampling drops it)."""
    return self.signal["zero_advantage_group"]

  def learner_rows(self, keep_groups: Optional[np.ndarray] = None) -> list[LearnerRow]:
    """One row per turn of each kept group ([B] bool; default all), see `learner_rows`."""
    if keep_groups is None:
      keep_groups = np.ones(len(self.zero_advantage_group), bool)
    return learner_rows(self.trajectories, self.signal, self.group_size, keep_groups)


def score_rollout(trajectories: Sequence[Trajectory], examples: Sequence, group_size: int,
                  rl_config, mode: str) -> ScoredRollout:
  """Example-major trajectories (B * G) of `examples` -> rewards, advantages and metrics, by the
  config section `rl_config` (answer_match, reward weights, alpha, ...) and the agent `mode`."""
  arrays = group_arrays(trajectories, examples, group_size, rl_config.answer_match)
  signal = compute_rewards_and_advantages(arrays, rl_config, mode)
  return ScoredRollout(trajectories, group_size, arrays, signal, rollout_metrics(arrays, signal))
