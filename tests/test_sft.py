"""Stage 1: scripted trajectories (against the generator's needles and the rollout itself), the
SFT step (against a plain forward and an unsplit batch), and exact resume of the stage."""

import dataclasses
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from gru_mem import gates, run_folder, runtime, sampling, settings, sft
from gru_mem.agent import parse, scripted
from gru_mem.agent.prompts import EMPTY_MEMORY, PromptBuilder
from gru_mem.agent.rollout import AgentExample, RolloutSettings, rollout
from gru_mem.data import synthetic
from gru_mem.data.tokenizer import builtin_tokenizer
from gru_mem.model import config as model_config
from gru_mem.model import transformer
from gru_mem.rl import batch as rl_batch
from gru_mem.rl import learner

CHUNK_TOKENS = 32
NO_NOISE = scripted.ScriptSettings(update_noise=0.0, exit_noise=0.0, memory_tokens=64)


@pytest.fixture(scope="module")
def tokenizer():
  return builtin_tokenizer()


def example(tokenizer, task="niah_single_1", seed=3, tokens=256):
  raw = synthetic.generate(task, tokens, tokenizer, seed=seed)
  return raw, AgentExample.from_example(raw, tokenizer, CHUNK_TOKENS)


def decode_turns(tokenizer, turns):
  return [tokenizer.decode(t.response_ids) for t in turns]


@pytest.mark.parametrize("task,seed", [("niah_single_1", 3), ("niah_multihop_1", 1),
                                       ("niah_multihop_1", 4)])
def test_scripted_gated_trajectory_copies_exactly_the_needles(tokenizer, task, seed):
  raw, agent_example = example(tokenizer, task, seed)
  turns = scripted.scripted_trajectory(agent_example, PromptBuilder(tokenizer, "gru_mem"), tokenizer,
                                  random.Random(0), NO_NOISE)
  chunks = agent_example.chunks
  assert len(turns) == chunks.num_chunks + 1 and turns[-1].kind == "answer"
  needles_in_order = [raw.document[s:e] for s, e in sorted(raw.evidence)]
  assert sorted(needles_in_order) == sorted(raw.metadata["evidence_texts"])
  for index, text in enumerate(decode_turns(tokenizer, turns[:-1])):
    parsed = parse.parse_response(text)
    assert parsed.format_ok and parsed.update_gate == gates.UPDATE_YES
    assert parsed.exit_gate == gates.EXIT_CONTINUE
    if index < chunks.evidence_chunks[0]:
      assert parsed.candidate_memory == EMPTY_MEMORY
    if index >= chunks.last_evidence_chunk:  # every needle read: the memory is them, in order
      assert parsed.candidate_memory == " ".join(needles_in_order)
  thinks = [parse.parse_response(t).think for t in decode_turns(tokenizer, turns[:-1])]
  for index, think in enumerate(thinks):  # what the section holds; "enough" once memory is full
    observed = "evidence" if index in chunks.evidence_chunks else "nothing"
    enough = ["enough"] if index >= chunks.last_evidence_chunk else []
    assert think.split() == [observed, "yes"] + enough + ["continue"]
  assert tokenizer.decode(turns[-1].response_ids) == "\\boxed{" + raw.answers[0] + "}"
  assert turns[-1].response_ids[-1] == tokenizer.token_id("<|im_end|>")


def test_scripted_memagent_trajectory_is_the_memory_itself(tokenizer):
  raw, agent_example = example(tokenizer, "niah_single_1", 5)
  turns = scripted.scripted_trajectory(agent_example, PromptBuilder(tokenizer, "memagent"), tokenizer,
                                  random.Random(0), NO_NOISE)
  texts = decode_turns(tokenizer, turns[:-1])
  last = agent_example.chunks.last_evidence_chunk
  assert texts[last:] == [raw.metadata["evidence_texts"][0]] * (len(texts) - last)
  assert set(texts[:agent_example.chunks.evidence_chunks[0]]) <= {EMPTY_MEMORY}


def test_noisy_gates_keep_the_memory_and_stop_reading(tokenizer):
  _, agent_example = example(tokenizer, "niah_single_1", 3)
  never_update = scripted.ScriptSettings(update_noise=1.0, exit_noise=0.0, memory_tokens=64)
  turns = scripted.scripted_trajectory(agent_example, PromptBuilder(tokenizer, "gru_mem"), tokenizer,
                                  random.Random(0), never_update)
  parsed = [parse.parse_response(t) for t in decode_turns(tokenizer, turns)]
  assert all(p.update_gate == gates.UPDATE_NO and p.candidate_memory == "" for p in parsed)
  assert all(p.think.split()[1] == "no" for p in parsed)  # the think states the decision too
  assert all(t.kind == "memory" for t in turns)  # the evidence was never stored: no answer turn
  always_end = scripted.ScriptSettings(update_noise=0.0, exit_noise=1.0, memory_tokens=64)
  turns = scripted.scripted_trajectory(agent_example, PromptBuilder(tokenizer, "gru_mem"), tokenizer,
                                  random.Random(0), always_end)
  parsed = parse.parse_response(tokenizer.decode(turns[0].response_ids))
  assert len(turns) == 1 and parsed.exit_gate == gates.EXIT_END
  assert parsed.think.split()[-1] == "end"


@pytest.mark.parametrize("task,seed", [("niah_single_1", 3), ("niah_multihop_1", 4)])
def test_noise_by_chunk_kind_gives_the_ideal_gates_at_the_extremes(tokenizer, task, seed):
  """update_noise_non_evidence=1 and exit_noise_complete=1 (with no other noise) script the ideal gates:
  yes exactly on evidence chunks, end exactly at the last evidence chunk, then the answer."""
  raw, agent_example = example(tokenizer, task, seed)
  ideal = scripted.ScriptSettings(update_noise=0.0, exit_noise=0.0, update_noise_non_evidence=1.0,
                             exit_noise_complete=1.0, memory_tokens=64)
  turns = scripted.scripted_trajectory(agent_example, PromptBuilder(tokenizer, "gru_mem"), tokenizer,
                                  random.Random(0), ideal)
  chunks = agent_example.chunks
  parsed = [parse.parse_response(t) for t in decode_turns(tokenizer, turns[:-1])]
  assert len(parsed) == chunks.last_evidence_chunk + 1 and turns[-1].kind == "answer"
  assert [p.update_gate == gates.UPDATE_YES for p in parsed] == [
      i in chunks.evidence_chunks for i in range(len(parsed))]
  assert [p.exit_gate for p in parsed] == [gates.EXIT_CONTINUE] * (len(parsed) - 1) + [
      gates.EXIT_END]
  assert parsed[-1].candidate_memory == " ".join(raw.document[a:b] for a, b in sorted(raw.evidence))
  assert tokenizer.decode(turns[-1].response_ids) == "\\boxed{" + raw.answers[0] + "}"
  with pytest.raises(ValueError, match="update_noise_non_evidence"):
    scripted.ScriptSettings(update_noise_non_evidence=-0.1)


@pytest.mark.parametrize("mode", ["gru_mem", "memagent"])
def test_scripted_prompts_are_the_prompts_the_rollout_builds(tokenizer, mode):
  """Replaying the scripted responses through the real rollout gives the same prompts, so what
  SFT trains on is exactly what the agent sees at inference."""
  noisy = scripted.ScriptSettings(update_noise=0.3, exit_noise=0.1, memory_tokens=64)
  _, agent_example = example(tokenizer, "niah_multihop_1", 4)
  turns = scripted.scripted_trajectory(agent_example, PromptBuilder(tokenizer, mode), tokenizer,
                                  random.Random(7), noisy)
  replies = iter(turns)
  no_answer = scripted.response_ids("\\boxed{?}", tokenizer)  # when the script has no answer turn

  def policy(prompt_ids, rng, max_new_tokens):
    ids = [getattr(next(replies, None), "response_ids", no_answer) for _ in prompt_ids]
    width = max(len(r) for r in ids)
    tokens = np.zeros((len(ids), width), np.int32)
    for i, r in enumerate(ids):
      tokens[i, :len(r)] = r
    return sampling.Generation(tokens, np.array([len(r) for r in ids]),
                               np.zeros((len(ids), width), np.float32),
                               np.zeros((len(ids), width), np.float32),
                               np.array(["eos"] * len(ids)))

  result = rollout(policy, PromptBuilder(tokenizer, mode), tokenizer, [agent_example],
                   jax.random.PRNGKey(0), RolloutSettings(mode=mode, memory_tokens=64))
  replayed = result.trajectories[0].turns
  memory_turns = [t for t in turns if t.kind == "memory"]
  assert len(replayed) == len(memory_turns)
  for got, want in zip(replayed, memory_turns):
    np.testing.assert_array_equal(got.prompt_ids, want.prompt_ids)
  if turns[-1].kind == "answer":
    np.testing.assert_array_equal(result.trajectories[0].answer_turn.prompt_ids,
                                  turns[-1].prompt_ids)
    assert result.trajectories[0].answer in agent_example.answers


def test_step_rows_keep_evidence_and_answer_turns_and_thin_the_rest(tokenizer):
  config = tiny.get_config()
  script = dataclasses.replace(settings.script_settings(config), keep_non_evidence_turns=0.0)
  rows = scripted.ScriptedRows(config.data, tokenizer, CHUNK_TOKENS, script, 3, seed=1)
  every = [t for index in range(3) for t in rows.trajectory(index)]
  want = [t for i, t in enumerate(every) if i == 0 or t.kind == "answer" or t.has_evidence]
  assert len(want) < len(every)
  assert [prompt.tolist() for prompt, _ in rows.rows(0)] == [t.prompt_ids.tolist() for t in want]


def test_copy_rows_respond_with_their_prompt(tokenizer):
  rows = scripted.CopyRows(tokenizer, rows_per_step=64, max_tokens=12, seed=0).rows(3)
  digits = {tokenizer.encode(str(d))[0] for d in range(10)}
  copied = [prompt[:-1] for prompt, _ in rows]
  for prompt, response in rows:
    np.testing.assert_array_equal(prompt, response)
    assert response[-1] == tokenizer.token_id("<|im_end|>")
    assert 5 <= len(prompt) <= 13
  share = np.mean([t in digits for c in copied for t in c])
  assert 0.4 < share < 0.6  # digit_fraction 0.5
  again = scripted.CopyRows(tokenizer, 64, 12, 0).rows(3)
  assert [p.tolist() for p, _ in again] == [p.tolist() for p, _ in rows]  # pure in (seed, step)


# ----------------------------------------------------------------------------- the SFT step

CONFIG = model_config.preset("tiny", vocab_size=64)


def random_rows(seed, count=5):
  """Rows of random prompts and responses of different lengths (advantage and pi_old unused)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(count):
    response = rng.integers(1, 64, rng.integers(1, 6))
    rows.append(rl_batch.LearnerRow(rng.integers(1, 64, rng.integers(3, 12)), response, 1.0,
                                   np.zeros(len(response), np.float32)))
  return rows


def reference_nll(params, rows):
  """Token-mean -log pi(response) from one plain forward per row."""
  total, count = 0.0, 0
  for row in rows:
    tokens = jnp.asarray(np.concatenate([row.prompt_ids, row.response_ids]))[None]
    logits, _ = transformer.forward(CONFIG, params, tokens)
    logp = jax.nn.log_softmax(logits[0], axis=-1)
    start = len(row.prompt_ids)
    for j, token in enumerate(row.response_ids):
      total -= float(logp[start - 1 + j, token])
      count += 1
  return total / count


def test_sft_step_loss_matches_a_plain_forward_and_micro_batching_is_exact():
  rows = random_rows(0)
  params = transformer.init_params(CONFIG, jax.random.PRNGKey(0))
  results = []
  for micro_rows in (2, 8):
    settings = learner.LearnerSettings(learning_rate=1e-2, micro_batch_rows=micro_rows,
                                       length_buckets=(8, 16, 32), kl_beta=0.0, adam_eps=1e-4)
    state = learner.create_train_state(params, settings)
    batch = rl_batch.pack_rows(rows, settings.length_buckets, settings.micro_batch_rows)
    state, metrics = learner.make_train_step(CONFIG, settings, objective=learner.NLL)(state, batch)
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  want = reference_nll(params, rows)
  assert results[0][1] == pytest.approx(want, rel=1e-5)
  assert results[1][1] == pytest.approx(want, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][0],
               results[1][0])


def test_sft_steps_fit_a_fixed_batch():
  rows = random_rows(1, 4)
  settings = learner.LearnerSettings(learning_rate=1e-2, micro_batch_rows=4,
                                     length_buckets=(8, 16, 32), kl_beta=0.0)
  state = learner.create_train_state(transformer.init_params(CONFIG, jax.random.PRNGKey(1)),
                                     settings)
  batch, step = rl_batch.pack_rows(rows, settings.length_buckets, settings.micro_batch_rows), learner.make_train_step(CONFIG, settings, objective=learner.NLL)
  losses = []
  for _ in range(60):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.2 * losses[0]
  assert float(metrics["token_accuracy"]) == 1.0


# ----------------------------------------------------------------------------- the stage


def small_config(steps):
  c = tiny.get_config()
  c.data.train_tasks = "niah_single_1"
  c.data.context_tokens = 96
  c.agent.chunk_tokens = CHUNK_TOKENS
  c.agent.memory_tokens = 24
  c.sft.steps = steps
  c.sft.copy_steps = min(1, steps - 1)  # step 0: copy warm-up; then trajectories
  c.sft.copy_rows, c.sft.copy_tokens = 4, 8
  c.sft.examples_per_step = 1
  c.sft.micro_batch_rows = 4
  c.sft.save_every = 1
  c.sft.log_every = 1
  c.sft.warmup_steps = 1
  return c


def test_train_sft_resumes_exactly_and_leaves_a_loadable_run(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  metrics = sft.train_sft(small_config(3), straight)
  assert {"loss", "token_accuracy", "grad_norm"} <= set(metrics)
  sft.train_sft(small_config(2), resumed)
  sft.train_sft(small_config(3), resumed)
  a, b = run_folder.load_params(straight), run_folder.load_params(resumed)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert run_folder.completed_steps(straight) == 3
  info, _ = run_folder.load_run(straight)
  model_config, tok = info.model_config, info.tokenizer
  assert model_config.vocab_size >= tok.vocab_size
  config = small_config(3)
  config.model.init_workdir = straight
  started = runtime.initial_params(config, model_config, jax.random.PRNGKey(5))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(started), a)


def test_bad_settings_fail_before_any_work():
  config = small_config(0)
  with pytest.raises(ValueError, match="sft.steps=0"):
    settings.validate_sft(config)
  with pytest.raises(ValueError, match="update_noise"):
    scripted.ScriptSettings(update_noise=1.5)
