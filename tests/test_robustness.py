"""Bad inputs get a clear answer: out-of-vocabulary generated ids, and the bad-input classes that
no other test file covers (see /work/notes/bad_inputs_table.md for the whole table)."""

import os

import jax
import numpy as np
import pytest

from gru_mem import gates
from gru_mem.agent import parse
from gru_mem.data.tokenizer import (REPLACEMENT_CHARACTER, Tokenizer, builtin_tokenizer,
                                    load_tokenizer)

FFFD = REPLACEMENT_CHARACTER


def qwen2_tokenizer(sample_data) -> Tokenizer:
  return load_tokenizer(os.path.join(sample_data, "qwen2_tokenizer"))


def tokenizers(sample_data):
  return {"builtin": builtin_tokenizer(), "qwen2": qwen2_tokenizer(sample_data)}


# ---------------------------------------------------------------- out-of-vocabulary ids: decode

def reference_decode(tokenizer: Tokenizer, ids) -> str:
  """The rule spelled out: split at ids >= vocab_size, each becomes U+FFFD, the runs between are
  decoded by the HF backend itself."""
  text, run = "", []
  for token_id in list(ids) + [None]:
    if token_id is not None and token_id < tokenizer.vocab_size:
      run.append(token_id)
      continue
    text += tokenizer.hf.decode(run, skip_special_tokens=True) if run else ""
    text += FFFD if token_id is not None else ""
    run = []
  return text


def test_ids_past_the_tokenizer_decode_to_one_replacement_character_each(sample_data):
  for name, tok in tokenizers(sample_data).items():
    n = tok.vocab_size
    ids = tok.encode("the <check>yes</check> caf\u00e9")
    assert tok.decode([n]) == FFFD, name
    assert tok.decode([n, n + 7, 10 ** 6]) == FFFD * 3, name
    mixed = ids[:2] + [n] + ids[2:] + [n + 1]
    assert tok.decode(mixed) == tok.decode(ids[:2]) + FFFD + tok.decode(ids[2:]) + FFFD, name
    assert tok.decode(mixed) == reference_decode(tok, mixed), name
    assert tok.decode(np.asarray(mixed, np.int64)) == tok.decode(mixed), name
    # Special tokens keep their own rule; in-vocabulary text is untouched.
    assert tok.decode([tok.eos_id, n], skip_special_tokens=False) == "<|endoftext|>" + FFFD, name
    assert tok.decode([tok.eos_id, n]) == FFFD, name
    assert tok.decode(ids) == "the <check>yes</check> caf\u00e9", name
    with pytest.raises(ValueError, match="token id -1 is negative"):
      tok.decode([5, -1])
  # Qwen2.5's shape: model vocabulary 151,936, tokenizer 151,646 (151,643 + 3 special tokens).
  assert tokenizers(sample_data)["qwen2"].vocab_size == 151_646


def test_the_backend_never_sees_an_id_it_has_no_token_for():
  """A Python (slow) HF tokenizer raises on such ids; Tokenizer.decode never hands them over."""
  seen = []

  class StrictBackend:
    eos_token_id, pad_token_id = 0, 0
    chat_template = None

    def __len__(self):
      return 4

    def convert_tokens_to_ids(self, token):
      return None

    def decode(self, ids, skip_special_tokens=True):
      seen.append(list(ids))
      return "".join("abcd"[i] for i in ids)  # IndexError past the end, as a slow tokenizer

  tok = Tokenizer(StrictBackend(), name="strict")
  assert tok.decode([1, 2, 4, 3, 99, 5]) == "bc" + FFFD + "d" + FFFD + FFFD
  assert all(max(run, default=0) < 4 for run in seen)


# ---------------------------------------------------------------- out-of-vocabulary ids: parsing

def test_a_replacement_character_breaks_a_tag_or_gate_word_and_survives_in_memory():
  tok = builtin_tokenizer()
  good = parse.format_response("t", gates.UPDATE_YES, "alpha beta", gates.EXIT_END)
  assert parse.parse_response(good, 16, tok).format_ok
  # A non-token inside a tag: the part is absent (not glued back into a tag).
  broken_tag = good.replace("<check>", "<che" + FFFD + "ck>")
  parsed = parse.parse_response(broken_tag, 16, tok)
  assert (parsed.update_gate, parsed.exit_gate, parsed.format_ok) == (
      gates.INVALID, gates.EXIT_END, False)
  # Inside a gate word: that gate is INVALID (acts as continue), the rest is read.
  parsed = parse.parse_response(good.replace(">end<", ">e" + FFFD + "nd<"), 16, tok)
  assert (parsed.update_gate, parsed.exit_gate, parsed.format_ok) == (
      gates.UPDATE_YES, gates.INVALID, False)
  # Inside the memory: kept as text, its ids are ordinary in-vocabulary ids that decode back.
  for mode in ("gru_mem", "memagent"):
    memory = "al" + FFFD + "pha beta"
    text = good.replace("alpha beta", memory) if mode == "gru_mem" else memory
    parsed = parse.parse_response(text, 16, tok, mode=mode)
    assert parsed.candidate_memory == memory, mode
    assert max(parsed.candidate_memory_ids) < tok.vocab_size, mode
    assert tok.decode(parsed.candidate_memory_ids) == parsed.candidate_memory, mode
  # Nothing but non-tokens: memagent's memory is that text; its cut stays within the cap.
  parsed = parse.parse_response(FFFD * 20, 5, tok, mode="memagent")
  assert len(parsed.candidate_memory_ids) <= 5 and set(parsed.candidate_memory) == {FFFD}
  assert parse.parse_answer(FFFD * 3) == (None, False)
  assert parse.parse_answer("\\boxed{a" + FFFD + "}") == ("a" + FFFD, True)


# ---------------------------------------------------------------- out-of-vocabulary ids: rollout

def force_out_of_vocabulary(config, params, tokenizer: Tokenizer, logit_bias: float):
  """Tied-embedding params whose next-token logits are ~logit_bias on every id >= the tokenizer's
  size and ~0 on the others, whatever the input.

  Every embedding row gets 100 in hidden unit 0, which then dominates the residual stream, so the
  final RMSNorm gives h ~ sqrt(hidden) e_0 and logits_j = h . E_j ~ sqrt(hidden) E[j, 0]: a
  constant for in-vocabulary ids plus logit_bias for the others.
  """
  assert config.tie_word_embeddings
  embedding = np.array(params["embed_tokens"])
  embedding[:, 0] = 100.0
  embedding[tokenizer.vocab_size:, 0] += logit_bias / np.sqrt(config.hidden_size)
  return dict(params, embed_tokens=jax.numpy.asarray(embedding))


def out_of_vocabulary_mass(config, params, tokenizer, prompt_ids) -> np.ndarray:
  """P(an id >= tokenizer.vocab_size) at each prompt position (a teacher-forced pass)."""
  from gru_mem.model import transformer
  logits, _ = transformer.forward(config, params, np.asarray(prompt_ids, np.int32)[None])
  probs = np.asarray(jax.nn.softmax(logits[0].astype(np.float32), axis=-1))
  return probs[:, tokenizer.vocab_size:].sum(-1)


def run_forced_rollout(tok, vocab_size, mode, temperature, logit_bias, seed=0):
  from gru_mem import sampling
  from gru_mem.agent.prompts import PromptBuilder
  from gru_mem.agent.rollout import AgentExample, RolloutSettings, rollout, sampler_policy
  from gru_mem.data import synthetic
  from gru_mem.model import transformer
  from gru_mem.model.config import preset

  config = preset("tiny", vocab_size=vocab_size)
  assert config.vocab_size > tok.vocab_size
  params = force_out_of_vocabulary(config, transformer.init_params(config, jax.random.PRNGKey(1)),
                                   tok, logit_bias)
  examples = [AgentExample.from_example(synthetic.generate("niah_single_1", 120, tok, seed=seed),
                                        tok, chunk_tokens=48)]
  settings = RolloutSettings(mode=mode, memory_tokens=8, max_response_tokens=10,
                             max_answer_tokens=6, samples_per_example=2)
  policy = sampler_policy(config, params, sampling.SamplingSettings(
      temperature=temperature, eos_id=tok.stop_ids, pad_id=tok.pad_id))
  memories = {}
  def on_turn(row, step, turn, memory):
    memories[(row, step)] = memory
  result = rollout(policy, PromptBuilder(tok, mode), tok, examples, jax.random.PRNGKey(2), settings,
                   on_turn=on_turn)
  return config, params, examples, result, memories


def check_rollout(tok, config, params, examples, result, memories, mode, greedy, logit_bias):
  n = tok.vocab_size
  # The manipulation does what it says: P(id >= n) = k e^b / (k e^b + n), k = ids past the end.
  k = config.vocab_size - n
  expected = k * np.exp(logit_bias) / (k * np.exp(logit_bias) + n)
  first_prompt = result.trajectories[0].turns[0].prompt_ids
  np.testing.assert_allclose(out_of_vocabulary_mass(config, params, tok, first_prompt),
                             expected, atol=0.01)
  oov_ids = in_vocab_ids = 0
  for trajectory in result.trajectories:
    num_chunks = examples[0].chunks.num_chunks
    for turn in trajectory.turns + [trajectory.answer_turn]:
      response = turn.response_ids
      oov_ids += int((response >= n).sum())
      in_vocab_ids += int((response < n).sum())
      # Every prompt -- the next turn's included, with the memory fed back -- is in the tokenizer.
      assert turn.prompt_ids.max() < n
      text = tok.decode(response)
      assert text == reference_decode(tok, response)
      if greedy:  # the forced model emits only ids past the tokenizer's end
        assert response.min() >= n and text == FFFD * len(response)
    for step, turn in enumerate(trajectory.turns):
      memory = memories[(trajectory.example_index * 2 + trajectory.sample_index, step)]
      assert turn.memory_length <= 8
      if greedy and mode == "memagent":  # M_t = the response: only U+FFFD, re-encoded in-vocab
        assert turn.memory_length > 0 and set(memory) == {FFFD}
      if greedy and mode != "memagent":  # no readable gates: keep memory, continue
        assert (turn.update_gate, turn.exit_gate, turn.format_ok) == (
            gates.INVALID, gates.INVALID, False)
        assert memory == "" and turn.memory_length == 0
    if greedy:
      assert trajectory.chunks_read == num_chunks and not trajectory.said_end
      assert trajectory.answer is None and not trajectory.answer_turn.format_ok
  assert oov_ids > 0
  if not greedy:
    assert in_vocab_ids > 0


@pytest.mark.parametrize("mode", ["gru_mem", "memagent"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_builtin_tokenizer_model_forced_past_the_tokenizer_runs_a_whole_rollout(mode, temperature):
  """The tiny preset padded to a multiple of 64 (1,664 ids) over the built-in tokenizer's 1,623.
  Greedy: every generated id is past the end; temperature 1 with the bias at the log-odds
  log(in-vocabulary / out-of-vocabulary ids): about half are."""
  tok = builtin_tokenizer()
  vocab = -(-tok.vocab_size // 64) * 64
  bias = 10.0 if temperature == 0 else float(np.log(tok.vocab_size / (vocab - tok.vocab_size)))
  out = run_forced_rollout(tok, vocab, mode, temperature, bias)
  check_rollout(tok, *out, mode=mode, greedy=temperature == 0, logit_bias=bias)


@pytest.mark.parametrize("mode", ["gru_mem", "memagent"])
def test_qwen_vocabulary_model_forced_past_the_tokenizer_runs_a_whole_rollout(sample_data, mode):
  """A random model with Qwen2.5's 151,936-id vocabulary over the real Qwen2 tokenizer (151,646)."""
  tok = qwen2_tokenizer(sample_data)
  out = run_forced_rollout(tok, 151_936, mode, temperature=0.0, logit_bias=10.0)
  check_rollout(tok, *out, mode=mode, greedy=True, logit_bias=10.0)


# ---------------------------------------------------------------- bad configs: nothing written

def smoke_config(**changes):
  from configs import smoke
  config = smoke.get_config()
  for key, value in changes.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.mark.parametrize("changes, error, message", [
    ({"rl.alhpa": 0.5}, ValueError, r"config keys \['rl.alhpa'\] are not defined"),
    ({"rl.group_size": 1}, ValueError, r"rl.group_size=1: must be >= 2"),
    ({"rl.alpha": 1.5}, ValueError, r"rl.alpha=1.5: must be in \[0, 1\]"),
    ({"model.hf_path": "/nonexistent/Qwen2.5-7B"}, FileNotFoundError,
     r"model.hf_path='/nonexistent/Qwen2.5-7B' has no config.json"),
    ({"data.train_tasks": "hotpotqa", "data.hotpotqa_path": "/no/hotpot.json"}, FileNotFoundError,
     r"data.task='hotpotqa' needs data.hotpotqa_path .* \(got '/no/hotpot.json'\)"),
    ({"data.train_tasks": "squad"}, FileNotFoundError, r"data.task='squad' needs data.squad_path"),
    ({"data.essays_path": "/no/essays.txt"}, FileNotFoundError,
     r"data.essays_path='/no/essays.txt' does not exist"),
    ({"data.train_tasks": "niah_single_9"}, ValueError, r"data task 'niah_single_9' is unknown"),
])
@pytest.mark.parametrize("entry", ["train", "sft"])
def test_bad_config_is_refused_before_the_workdir_is_made(tmp_path, entry, changes, error, message):
  from gru_mem import sft, train
  if entry == "sft" and {"rl.group_size", "rl.alpha"} & set(changes):
    pytest.skip("an RL setting: stage 1 does not read it")
  workdir = tmp_path / "run"
  run = train.train if entry == "train" else sft.train_sft
  config = smoke_config(**changes)
  config.sft.steps, config.sft.copy_steps = 4, 0  # smoke has no stage 1 of its own
  with pytest.raises(error, match=message):
    run(config, str(workdir))
  assert not workdir.exists()


def test_missing_tokenizer_folder_is_a_clear_error_before_the_workdir_is_made(tmp_path):
  from gru_mem import train
  workdir = tmp_path / "run"
  config = smoke_config()
  config.tokenizer = "/no/tokenizer"
  with pytest.raises(FileNotFoundError, match="tokenizer='/no/tokenizer' does not exist"):
    train.train(config, str(workdir))
  assert not workdir.exists()


# ---------------------------------------------------------------- run folders without a checkpoint

@pytest.mark.parametrize("left_behind", ["nothing", "a kill during the first save"])
def test_a_run_folder_without_a_complete_checkpoint_is_a_clear_error(tmp_path, left_behind):
  """checkpoints/ exists (the run started) but holds no complete step: every reader says so,
  export writes nothing, and the unfinished save is left for training to clean up."""
  from gru_mem import export_hf, infer, run_folder, runtime
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  if left_behind != "nothing":  # what orbax leaves when the process dies mid-save
    (workdir / "checkpoints" / "1.orbax-checkpoint-tmp").mkdir()
  entries = sorted(os.listdir(workdir / "checkpoints"))
  no_checkpoint = f"no complete checkpoint in {workdir / 'checkpoints'}"
  for read in (run_folder.load_params, run_folder.read_run, run_folder.resolve_step,
               lambda w: runtime.load_model(workdir=w)):
    with pytest.raises(FileNotFoundError, match=no_checkpoint):
      read(str(workdir))
  assert run_folder.completed_steps(str(workdir)) is None
  out = tmp_path / "export"
  with pytest.raises(FileNotFoundError, match=no_checkpoint):
    export_hf.export(str(workdir), str(out))
  assert not out.exists()
  document = tmp_path / "doc.txt"
  document.write_text("the number is 7.")
  with pytest.raises(FileNotFoundError, match=no_checkpoint):
    infer.prepare(None, str(workdir), None, str(document), "what is the number?")
  assert sorted(os.listdir(workdir / "checkpoints")) == entries


# ---------------------------------------------------------------- a run of non-finite steps

def test_a_run_of_nonfinite_steps_stops_with_the_last_good_state_saved(tmp_path, capsys):
  """Stage counts consecutive steps whose `nonfinite` metric is 1 (a finite step resets the
  count); at train.max_nonfinite_steps it saves the state it was given -- the learner returns
  its input state for a skipped step, so the last good one -- and says to stop."""
  import jax.numpy as jnp
  from gru_mem import checkpoint, stage
  from gru_mem.rl import learner

  def state(value):
    return learner.TrainState({"w": jnp.full(3, value, jnp.float32)}, {"m": jnp.zeros(3)},
                              jnp.asarray(value, jnp.int32))

  run = stage.Stage("train", str(tmp_path), total_steps=20, save_every=100, keep=3, metadata={},
                    max_nonfinite_steps=3)
  current, _, position, start = run.resume(state(0), None, {"examples_consumed": 0})
  assert start == 0
  # step: 1 good, 2-3 non-finite (a run of 2), 4 good (resets), 5-7 non-finite: stop after 7.
  nonfinite = {1: 0.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 1.0, 6: 1.0, 7: 1.0}
  stopped = None
  for step, flag in nonfinite.items():
    if not flag:
      current = state(step)  # an applied update
    position = {"examples_consumed": step * 2}
    if run.end_of_step(step, current, None, position, {"learner/nonfinite": flag}):
      stopped = step
      break
  run.close()
  assert stopped == 7
  assert ("[train] stopped after step 7 of 20: 3 consecutive steps had a non-finite loss or "
          "gradient (their updates were skipped); the last good state is saved"
          ) in capsys.readouterr().out
  with checkpoint.CheckpointManager(str(tmp_path), read_only=True) as manager:
    assert manager.all_steps() == [7]  # save_every=100: only the stop's forced save
    restored, saved_position, _ = manager.restore()
  np.testing.assert_array_equal(restored["params"]["w"], np.full(3, 4.0, np.float32))
  assert int(restored["step"]) == 4 and saved_position == {"examples_consumed": 14}


# ---------------------------------------------------------------- data files that exist but are bad

def test_an_empty_essays_file_is_named(tmp_path):
  from gru_mem.data import synthetic
  empty = tmp_path / "empty.txt"
  empty.write_text(" \n")
  with pytest.raises(ValueError, match=rf"essays_path='{empty}': the file has no text"):
    synthetic.generate("niah_single_2", 400, builtin_tokenizer(), seed=0, essays_path=str(empty))


def test_an_essays_file_that_is_not_utf8_is_named(tmp_path):
  from gru_mem.data import synthetic
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes(b"An essay. Caf\xe9 society. " * 40)
  with pytest.raises((FileNotFoundError, ValueError), match=rf"essays_path='{latin1}'.*UTF-8"):
    synthetic.generate("niah_single_2", 400, builtin_tokenizer(), seed=0, essays_path=str(latin1))


@pytest.mark.parametrize("content", [b'[{"_id": "a", "question": "q"', b"\xff\xfe not json"])
@pytest.mark.parametrize("dataset", ["hotpotqa", "squad"])
def test_a_data_file_that_is_not_json_names_the_file(tmp_path, dataset, content):
  from gru_mem.data import hotpotqa, squad
  path = tmp_path / f"{dataset}.json"
  path.write_bytes(content)
  load = hotpotqa.load_hotpotqa if dataset == "hotpotqa" else squad.load_squad
  with pytest.raises(ValueError, match=f"{dataset}_path='{path}'"):
    load(str(path))
