"""The chunked rollout: gate rules with a scripted policy, then a real tiny model end to end."""

import re
import types

import jax
import numpy as np
import pytest

from gru_mem import gates
from gru_mem.agent import parse
from gru_mem.agent.prompts import PromptBuilder
from gru_mem.agent.rollout import AgentExample, RolloutSettings, rollout
from gru_mem.agent.chunking import chunk_token_ids
from gru_mem.data.tokenizer import builtin_tokenizer
from gru_mem.data.vocabulary import KEY_NOUNS, VALUE_WORDS

CHUNK_TOKENS = 4


def make_example(tokenizer, name: str, num_chunks: int, evidence_chunks=()):
  """A document whose chunk i is the word VALUE_WORDS[i] four times; question 'what is <name>'."""
  ids = []
  for i in range(num_chunks):
    ids += tokenizer.encode(" " + VALUE_WORDS[i]) * CHUNK_TOKENS
  spans = [(c * CHUNK_TOKENS, c * CHUNK_TOKENS + 1) for c in evidence_chunks]
  chunks = chunk_token_ids(np.asarray(ids), CHUNK_TOKENS, spans)
  question = np.asarray(tokenizer.encode(f"what is {name}"), np.int32)
  return AgentExample(question, chunks, answers=(name,), example_id=name)


class ScriptedPolicy:
  """Stands in for the sampler: reads (example name, chunk) from each prompt, returns a script.

  script[name][chunk] = (update_gate, exit_gate); the candidate memory is "<name> <chunkword>".
  The answer turn answers with the memory's last word, boxed. Records each call's batch size.
  """

  def __init__(self, tokenizer, script, mode="gru_mem"):
    self.tokenizer, self.script, self.mode = tokenizer, script, mode
    self.calls = []
    self.answer_prompts = []

  def __call__(self, prompt_ids, rng, max_new_tokens):
    self.calls.append(len(prompt_ids))
    responses = [self.respond(self.tokenizer.decode(p)) for p in prompt_ids]
    ids = [self.tokenizer.encode(r) + [self.tokenizer.eos_id] for r in responses]
    width = max(len(r) for r in ids)
    return types.SimpleNamespace(
        row=lambda i: ids[i], logprobs=np.full((len(ids), width), -0.5, np.float32))

  def respond(self, prompt):
    name = re.search(r"what is (\w+)", prompt).group(1)
    section = re.search(r"current section:\n(.*?) \n", prompt, re.S)
    memory = re.search(r"memory:\n(.*?) \n", prompt, re.S).group(1)
    if section is None:  # the answer turn
      self.answer_prompts.append((name, memory))
      return f"the answer is \\boxed{{{memory.split()[-1]}}}"
    chunk = VALUE_WORDS.index(section.group(1).split()[0])
    candidate = f"{name} {VALUE_WORDS[chunk]}"
    if self.mode == "memagent":
      return candidate
    update, exit_gate = self.script[name][chunk]
    return parse.format_response("reading", update, candidate, exit_gate)


Y, N = gates.UPDATE_YES, gates.UPDATE_NO
C, E = gates.EXIT_CONTINUE, gates.EXIT_END


def run(mode, script, examples, tokenizer):
  policy = ScriptedPolicy(tokenizer, script, mode)
  memories = {}
  settings = RolloutSettings(mode=mode, memory_tokens=16, max_response_tokens=64,
                             max_answer_tokens=16)
  result = rollout(policy, PromptBuilder(tokenizer, mode), tokenizer, examples,
                   jax.random.PRNGKey(0), settings,
                   on_turn=lambda row, step, turn, memory: memories.__setitem__((row, step), memory))
  return result, memories, policy


def test_memory_follows_the_update_gate_and_exit_stops_reading():
  tok = builtin_tokenizer()
  script = {"apple": [(Y, C), (N, C), (Y, E), (Y, C), (Y, C)]}
  examples = [make_example(tok, "apple", 5, evidence_chunks=(0, 2))]
  result, memories, policy = run("gru_mem", script, examples, tok)
  (trajectory,) = result.trajectories
  # Hand-computed: M0 = apple alpha (yes), M1 = M0 (no), M2 = apple charlie (yes), then end.
  assert [memories[(0, t)] for t in range(3)] == ["apple alpha", "apple alpha", "apple charlie"]
  assert trajectory.chunks_read == 3 and trajectory.last_chunk_read == 2 and trajectory.said_end
  assert policy.answer_prompts == [("apple", "apple charlie")]  # the answer turn sees M_k
  assert trajectory.answer == "charlie"
  assert [t.update_gate for t in trajectory.turns] == [Y, N, Y]
  assert [t.has_evidence for t in trajectory.turns] == [True, False, True]
  assert [t.memory_length for t in trajectory.turns] == [2, 2, 2]
  assert all(t.format_ok for t in trajectory.turns) and trajectory.answer_turn.format_ok
  assert trajectory.last_evidence_chunk == 2


def test_no_exit_mode_reads_every_chunk_and_memagent_always_overwrites():
  tok = builtin_tokenizer()
  script = {"apple": [(Y, E), (N, E), (N, E), (N, C)]}
  examples = [make_example(tok, "apple", 4)]
  result, memories, _ = run("gru_mem_no_exit", script, examples, tok)
  (trajectory,) = result.trajectories
  assert trajectory.chunks_read == 4 and trajectory.last_chunk_read == 3 and not trajectory.said_end
  assert [memories[(0, t)] for t in range(4)] == ["apple alpha"] * 4
  result, memories, _ = run("memagent", script, examples, tok)
  (trajectory,) = result.trajectories
  assert trajectory.chunks_read == 4
  assert [memories[(0, t)] for t in range(4)] == [f"apple {w}" for w in VALUE_WORDS[:4]]
  assert trajectory.answer == "delta"


def test_invalid_gates_keep_memory_and_continue():
  tok = builtin_tokenizer()
  examples = [make_example(tok, "apple", 2)]

  class Garbled(ScriptedPolicy):
    def respond(self, prompt):
      if "current section" not in prompt:
        return super().respond(prompt)
      return "<think>x</think><check>maybe</check><update>junk</update><next>stop</next>"

  policy = Garbled(tok, {})
  result = rollout(policy, PromptBuilder(tok, "gru_mem"), tok, examples, jax.random.PRNGKey(0),
                   RolloutSettings(memory_tokens=16, max_response_tokens=64))
  (trajectory,) = result.trajectories
  assert trajectory.chunks_read == 2  # `stop` is not `end`: treated as continue
  assert all(t.update_gate == gates.INVALID and not t.format_ok for t in trajectory.turns)
  assert all(t.memory_length == 0 for t in trajectory.turns)  # `maybe` is not yes: memory kept


def test_exited_rows_stop_costing_compute():
  tok = builtin_tokenizer()
  names = list(KEY_NOUNS[:8])
  # Half the rows say `end` at step 1, the others read all 4 chunks.
  script = {n: [(Y, C), (Y, E if i % 2 else C), (Y, C), (Y, C)] for i, n in enumerate(names)}
  examples = [make_example(tok, n, 4) for n in names]
  result, _, policy = run("gru_mem", script, examples, tok)
  assert result.rows_generated_per_step == [8, 8, 4, 4]
  assert policy.calls == [8, 8, 4, 4, 8]  # one sampler call per step, then the answer turn
  assert [t.chunks_read for t in result.trajectories] == [4, 2] * 4


def test_groups_and_documents_of_different_lengths():
  tok = builtin_tokenizer()
  script = {"apple": [(Y, C)] * 3, "badge": [(Y, C)] * 5}
  examples = [make_example(tok, "apple", 3), make_example(tok, "badge", 5)]
  policy = ScriptedPolicy(tok, script)
  result = rollout(policy, PromptBuilder(tok, "gru_mem"), tok, examples, jax.random.PRNGKey(0),
                   RolloutSettings(memory_tokens=16, max_response_tokens=64, samples_per_example=2))
  assert [(t.example_index, t.sample_index) for t in result.trajectories] == [
      (0, 0), (0, 1), (1, 0), (1, 1)]
  assert [t.chunks_read for t in result.trajectories] == [3, 3, 5, 5]
  assert result.rows_generated_per_step == [4, 4, 4, 2, 2]


def test_bad_input_is_a_clear_error():
  with pytest.raises(ValueError, match="mode='nope'"):
    RolloutSettings(mode="nope")
  with pytest.raises(ValueError, match="no examples"):
    rollout(None, None, None, [], jax.random.PRNGKey(0), RolloutSettings())


@pytest.mark.parametrize("mode", ["memagent", "gru_mem", "gru_mem_no_exit"])
def test_real_tiny_model_end_to_end(mode):
  """A random tiny model through the real sampler: per-turn log-probs equal a teacher-forced pass."""
  from gru_mem import sampling
  from gru_mem.agent.rollout import sampler_policy
  from gru_mem.data import synthetic
  from gru_mem.model import transformer
  from gru_mem.model.config import preset

  tok = builtin_tokenizer()
  config = preset("tiny", vocab_size=-(-tok.vocab_size // 64) * 64)
  params = transformer.init_params(config, jax.random.PRNGKey(1))
  examples = [AgentExample.from_example(synthetic.generate("niah_single_1", 160, tok, seed=s),
                                        tok, chunk_tokens=48) for s in range(2)]
  settings = RolloutSettings(mode=mode, memory_tokens=8, max_response_tokens=12,
                             max_answer_tokens=6, samples_per_example=2)
  policy = sampler_policy(config, params, sampling.SamplingSettings(
      temperature=1.0, eos_id=tok.stop_ids, pad_id=tok.pad_id))
  result = rollout(policy, PromptBuilder(tok, mode), tok, examples, jax.random.PRNGKey(2), settings)
  assert len(result.trajectories) == 4
  for trajectory in result.trajectories:
    num_chunks = examples[trajectory.example_index].chunks.num_chunks
    assert 1 <= trajectory.chunks_read <= num_chunks
    if mode != "gru_mem":
      assert trajectory.chunks_read == num_chunks
    assert [t.chunk_index for t in trajectory.turns] == list(range(trajectory.chunks_read))
    for turn in trajectory.turns + [trajectory.answer_turn]:
      assert 1 <= len(turn.response_ids) <= (12 if turn.chunk_index >= 0 else 6)
      assert turn.logprobs.shape == turn.response_ids.shape
      assert turn.memory_length <= 8
      tokens = np.concatenate([turn.prompt_ids, turn.response_ids])[None]
      logits, _ = transformer.forward(config, params, tokens)
      log_probs = jax.nn.log_softmax(logits[0, len(turn.prompt_ids) - 1:-1], axis=-1)
      expected = np.take_along_axis(np.asarray(log_probs), turn.response_ids[:, None], 1)[:, 0]
      np.testing.assert_allclose(turn.logprobs, expected, atol=1e-4)
  steps = len(result.rows_generated_per_step)
  assert steps == max(t.chunks_read for t in result.trajectories)
