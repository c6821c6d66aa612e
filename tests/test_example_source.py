"""The one example source: the default job's streams and prompts as before the seqio switch, the
seqio view equal to the trainer's stream, resume, and the readers of the paper's data files."""

import hashlib
import json
import os
import re

import numpy as np
import pytest

from gru_mem import evaluate, settings
from gru_mem.agent.prompts import PromptBuilder
from gru_mem.agent.rollout import AgentExample
from gru_mem.agent.scripted import ScriptedRows
from gru_mem.data import files, hotpotqa, sources, tasks
from gru_mem.data.tokenizer import builtin_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fingerprints of the default job's data, recorded by this test's code run on the tree before
# the example source moved onto the task registry (commit 75d31ba): the train stream (seed 0),
# the SFT examples (sft.seed) and their scripted rows, the held-out evaluation examples of every
# cell, and the compact prompts of every mode.
BEFORE = {
    "train": "83ca7c6d035ba2563973e8603afb1f873b80cbdea0109fe63d53fa6d780fadde",
    "sft_examples": "25259b3caaa9f626a41db62cf7d0de7529d33cd4531f9ddfed74e0b0cbe10c4f",
    "sft_rows": "5d324565f9e90bcb2150ceccb3579c520c3b409d4dc69c25b51304921aec51a0",
    "eval": "7d9e3d86eb0fb7f3dba2af0ba462eab3ae45a40ebd96aa1f76808049345ad31f",
    "prompts": "830c0703738ef34b1e0f94180a63f8349772765d0d06cf9d56f41f8c7ae25332",
}


def tiny_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(REPO, "configs/tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def fingerprinted_config():
  """The tiny config with the data, script and prompt settings the fingerprints were recorded
  with (the default job of commit 75d31ba: a 1:1 task mix, exit noise 0.3, the compact prompts);
  today's default job mixes two-hop documents 2:1 and uses the minimal prompts."""
  c = tiny_config()
  c.data.train_tasks = "niah_single_word,niah_multihop_1"
  c.sft.exit_noise_complete = 0.3
  c.agent.prompt = "compact"
  return c


def example_digest(e) -> str:
  return hashlib.sha256(json.dumps([e.id, e.task, e.question, list(e.answers), e.document,
                                    [list(s) for s in e.evidence], int(e.seed),
                                    e.answer_mode]).encode()).hexdigest()


def ids_digest(arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.asarray(a, np.int64).tobytes())
    h.update(b"|")
  return h.hexdigest()


def joined(digests) -> str:
  return hashlib.sha256("".join(digests).encode()).hexdigest()


def default_job_fingerprints() -> dict:
  c, tok = fingerprinted_config(), builtin_tokenizer()
  out = {"train": joined(example_digest(e) for e, _ in
                         zip(sources.example_stream(c.data, tok, seed=c.seed), range(12))),
         "sft_examples": joined(example_digest(sources.example_at(c.data, tok, i, c.sft.seed))
                                for i in range(8))}
  rows = ScriptedRows(c.data, tok, c.agent.chunk_tokens, settings.script_settings(c),
                      c.sft.examples_per_step, c.sft.seed)
  out["sft_rows"] = ids_digest([a for s in range(3) for pair in rows.rows(s) for a in pair])
  c.eval.examples = 4
  out["eval"] = joined(example_digest(e) for cell in evaluate.cells(c.eval)
                       for e in evaluate.held_out_examples(c, tok, cell))
  prompts = []
  for mode in ("gru_mem", "memagent", "gru_mem_no_exit"):
    b = PromptBuilder(tok, mode)
    for e, _ in zip(sources.example_stream(c.data, tok, seed=c.seed), range(3)):
      a = AgentExample.from_example(e, tok, c.agent.chunk_tokens)
      prompts.append(b.memory_turn(a.question_ids, [], a.chunks.chunk(0)))
      prompts.append(b.memory_turn(a.question_ids, a.question_ids[:5], a.chunks.chunk(1)))
      prompts.append(b.answer_turn(a.question_ids, a.question_ids[:3]))
    prompts.append(np.asarray(tok.encode(b.memory_turn_text("q?", "", "c")), np.int64))
    prompts.append(np.asarray(tok.encode(b.answer_turn_text("q?", "m")), np.int64))
    prompts.append([b.turn_overhead_tokens, b.answer_overhead_tokens])
  out["prompts"] = ids_digest(prompts)
  return out


def test_default_job_sees_the_same_examples_and_prompts_as_before():
  assert settings.prompt_set(fingerprinted_config(), builtin_tokenizer()).name == "compact"
  assert settings.prompt_set(tiny_config(), builtin_tokenizer()).name == "minimal"
  assert default_job_fingerprints() == BEFORE


def test_seqio_task_yields_the_trainer_stream():
  c, tok = tiny_config(), builtin_tokenizer()
  source = sources.register_config_tasks(c.data, tok, seed=c.seed)
  assert isinstance(source, tasks.Mixture)
  assert [m.name for m in tasks.members(source)] == ["gru_mem.niah_single_word",
                                                     "gru_mem.niah_multihop_1",
                                                     "gru_mem.niah_multihop_1"]
  import seqio
  name = tasks.register_seqio(source.name)
  dataset = seqio.get_mixture_or_task(name).get_dataset(None, split="train", shuffle=False)
  from gru_mem.data.example import Example
  from_seqio = [Example.from_features(f) for f in dataset.take(6).as_numpy_iterator()]
  trainer = [e for e, _ in zip(sources.example_stream(c.data, tok, seed=c.seed), range(6))]
  assert from_seqio == [Example(**{**e.__dict__, "metadata": {}}) for e in trainer]
  assert [e.task for e in trainer] == ["niah_single_word", "niah_multihop_1",
                                       "niah_multihop_1"] * 2
  assert [e.seed for e in trainer] == [tasks.data_seed(c.seed, i) for i in range(6)]


def test_resume_after_k_examples_continues_identically(sample_data):
  c, tok = tiny_config(), builtin_tokenizer()
  c.data.mixture = "niah_single_word,hotpotqa"
  c.data.hotpotqa_path = os.path.join(sample_data, "hotpotqa_dev_sample.json")
  c.data.num_documents = 4
  sources.check_data_config(c.data)
  whole = [e for e, _ in zip(sources.example_stream(c.data, tok, seed=3), range(7))]
  for k in (1, 4):
    resumed = [e for e, _ in zip(sources.example_stream(c.data, tok, seed=3, start=k),
                                 range(7 - k))]
    assert resumed == whole[k:]
  records = hotpotqa.load_hotpotqa(c.data.hotpotqa_path)
  assert whole[3] == hotpotqa.hotpotqa_example(records, 1, num_docs=4,
                                               seed=tasks.data_seed(3, 3))


# --- readers, each on a small file in the exact layout ------------------------------------------

CONTEXT = ("Document 1:\nAlpha Town\nAlpha Town is a town. It was founded in 1850.\n\n"
           "Document 2:\nBeta River\nThe Beta River flows north. It is 300 km long.")


def memagent_train_rows():
  return [{"context": CONTEXT,
           "prompt": [{"role": "user", "content": "When was Alpha Town founded?"}],
           "reward_model": {"ground_truth": ["1850"], "style": "rule"},
           "extra_info": {"num_docs": 2, "index": 0,
                          "supporting_facts": ["Alpha Town"]}},
          {"context": CONTEXT,
           "prompt": [{"role": "user", "content": "How long is the Beta River?"}],
           "reward_model": {"ground_truth": ["300 km", "300 kilometres"], "style": "rule"},
           "extra_info": {"num_docs": 2, "index": 1}}]


def test_memagent_training_parquet(tmp_path):
  import pyarrow
  import pyarrow.parquet
  path = str(tmp_path / "hotpotqa_train.parquet")
  pyarrow.parquet.write_table(pyarrow.Table.from_pylist(memagent_train_rows()), path)
  records = files.memagent_records(path)
  first, second = (files.memagent_example(r) for r in records)
  assert first.question == "When was Alpha Town founded?" and first.answers == ("1850",)
  assert first.document == CONTEXT and first.metadata["num_docs"] == 2
  # the paragraph named by its supporting fact, from after its title line to its end
  assert first.evidence_texts() == ["Alpha Town is a town. It was founded in 1850."]
  assert second.answers == ("300 km", "300 kilometres") and second.evidence == ()


def test_memagent_eval_json_and_ruler_jsonl(tmp_path):
  path = tmp_path / "eval_2.json"
  path.write_text(json.dumps([{"context": CONTEXT, "input": "How long is the Beta River?",
                               "answers": ["300 km"], "num_docs": 2, "index": 7}]))
  (example,) = [files.memagent_example(r) for r in files.memagent_records(str(path))]
  assert (example.id, example.question, example.answers, example.evidence) == (
      "7", "How long is the Beta River?", ("300 km",), ())
  haystack = "The grass is green. The sky is blue.\nOne of the special magic numbers for kite is: "
  ruler = tmp_path / "niah.jsonl"
  ruler.write_text(json.dumps({
      "index": 0, "input": "Read the text.\n" + haystack + "4242.\nThe sun is warm. One of the "
      "special magic numbers for kite is: 17.\nWhat are the special magic numbers for kite?",
      "outputs": ["4242", "17"], "length": 60}) + "\n")
  (needles,) = [files.ruler_example(r) for r in files.ruler_records(str(ruler))]
  assert needles.question == "What are the special magic numbers for kite?"
  assert needles.answer_mode == "all" and needles.metadata["length"] == 60
  assert needles.evidence_texts() == ["One of the special magic numbers for kite is: 4242.",
                                      "One of the special magic numbers for kite is: 17."]


@pytest.mark.parametrize("record, message", [
    ({"input": "q", "answers": ["a"], "num_docs": 1, "index": 0}, r"record 1: missing field 'context'"),
    ({"context": "  ", "input": "q", "answers": ["a"], "num_docs": 1, "index": 0},
     r"record 1: field 'context' must be a non-empty string"),
    ({"context": "c", "input": "q", "answers": "a", "num_docs": 1, "index": 0},
     r"record 1: field 'answers' must be a non-empty list of answers \(got str\)"),
])
def test_bad_records_name_file_record_and_field(tmp_path, record, message):
  good = {"context": "c", "input": "q", "answers": ["a"], "num_docs": 1, "index": 0}
  path = tmp_path / "eval_1.json"
  path.write_text(json.dumps([good, record]))
  c = tiny_config()
  c.data.mixture, c.data.memagent_path = "memagent", str(path)
  with pytest.raises(ValueError, match=re.escape(f"data.memagent_path='{path}' ") + message):
    sources.check_data_config(c.data)
  c.eval.tasks = "memagent"
  with pytest.raises(ValueError, match=message):
    evaluate.check_eval_config(c)
  c.data.mixture = "memagent,niah_nope"
  with pytest.raises(ValueError, match="data task 'niah_nope' is unknown"):
    sources.check_data_config(c.data)


# --- evidence recovery on the real HotpotQA sample ----------------------------------------------


def test_our_hotpotqa_documents_are_in_memagent_format(sample_data):
  path = os.path.join(sample_data, "hotpotqa_dev_sample.json")
  records = hotpotqa.load_hotpotqa(path)
  example = hotpotqa.hotpotqa_example(records, 0, num_docs=5, seed=1)
  documents = example.document.split("\n\n")
  assert len(documents) == 5
  titles = {title: "".join(sentences) for r in records for title, sentences in r["context"]}
  for number, document in enumerate(documents, start=1):
    header, title, text = document.split("\n", 2)
    assert header == f"Document {number}:" and titles[title] == text


def test_evidence_recovered_from_the_hotpotqa_file(sample_data, tmp_path):
  hotpot_path = os.path.join(sample_data, "hotpotqa_dev_sample.json")
  built = list(hotpotqa.hotpotqa_examples(hotpot_path, num_docs=6, seed=2, limit=12))
  path = tmp_path / "eval_6.json"
  path.write_text(json.dumps([{"context": e.document, "input": e.question,
                               "answers": list(e.answers), "num_docs": 6, "index": i}
                              for i, e in enumerate(built)]))
  c = tiny_config()
  c.data.mixture, c.data.memagent_path, c.data.hotpotqa_path = "memagent", str(path), hotpot_path
  source = sources.register_config_tasks(c.data, builtin_tokenizer())
  recovered = [tasks.example_at(source, i, 0) for i in range(len(built))]
  for example, original in zip(recovered, built):
    assert example.evidence == original.evidence and example.evidence  # the builder's spans
  c.data.hotpotqa_path = ""  # nothing to recover from: no evidence, outcome and format only
  source = sources.register_config_tasks(c.data, builtin_tokenizer())
  assert tasks.example_at(source, 0, 0).evidence == ()
