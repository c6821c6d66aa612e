"""The task registry: names, the plain iterator, and the seqio layer (TensorFlow imported here only)."""

import os

import numpy as np
import pytest

from gru_mem.data import hotpotqa, synthetic, tasks
from gru_mem.data.example import Example
from gru_mem.data.tokenizer import builtin_tokenizer, load_tokenizer


@pytest.fixture
def paths(sample_data):
  return dict(hotpotqa_path=os.path.join(sample_data, "hotpotqa_dev_sample.json"),
              squad_path=os.path.join(sample_data, "squad_v2_dev_sample.json"),
              essays_path=os.path.join(sample_data, "paul_graham_essays.txt"))


def test_names_and_plain_iterator(paths):
  names = tasks.register_tasks(**paths, eval_examples=3, with_seqio=False)
  assert len(names) == len(synthetic.TASKS) * 8 + 2 * 8
  for name in ("gru_mem.niah_single_1_8k", "gru_mem.niah_multihop_1m", "gru_mem.niah_multiquery_128k",
               "gru_mem.hotpotqa_200docs", "gru_mem.squad_6400docs"):
    assert name in names
  assert len([n for n in tasks.task_names("hotpotqa") if n.endswith("docs")]) == 8
  validation = list(tasks.examples("niah_single_2_8k", "validation"))
  assert len(validation) == 3 and len({e.document for e in validation}) == 3
  assert validation == list(tasks.examples("gru_mem.niah_single_2_8k"))  # deterministic
  train = list(tasks.examples("niah_single_2_8k", "train", num_examples=2))
  assert {e.document for e in train}.isdisjoint({e.document for e in validation})
  reseeded = next(tasks.examples("niah_single_2_8k", seed=9))
  assert reseeded.document != validation[0].document
  tok = builtin_tokenizer()
  tokens = len(tok.encode(validation[0].document)) + len(tok.encode(validation[0].question))
  assert abs(tokens - 8192) <= 0.02 * 8192
  hotpot = next(tasks.examples("hotpotqa_50docs"))
  records = hotpotqa.load_hotpotqa(paths["hotpotqa_path"])
  assert hotpot == hotpotqa.hotpotqa_example(  # validation: the eval seed, by the one rule
      records, 0, num_docs=50, seed=tasks.data_seed(tasks.DEFAULT_EVAL_SEED, 0))
  assert validation[1].seed == tasks.data_seed(tasks.DEFAULT_EVAL_SEED, 1)
  assert train[1].seed == tasks.data_seed(0, 1)
  squad_example = next(tasks.examples("squad_100docs"))
  assert squad_example.metadata["num_docs"] == 100


def test_tokenizer_folder_and_errors(sample_data):
  folder = os.path.join(sample_data, "qwen2_tokenizer")
  tasks.register_tasks(tokenizer=folder, lengths={"2k": 2048}, eval_examples=1, with_seqio=False)
  assert tasks.get_task("niah_multikey_3_2k").family == "ruler"
  example = next(tasks.examples("niah_multikey_3_2k"))
  qwen2 = load_tokenizer(folder)  # lengths must count under the registered tokenizer
  tokens = len(qwen2.encode(example.document)) + len(qwen2.encode(example.question))
  assert abs(tokens - 2048) <= 0.02 * 2048
  with pytest.raises(KeyError, match="'nope_8k' is not registered"):
    tasks.examples("nope_8k")
  with pytest.raises(ValueError, match="has no split 'test'"):
    tasks.examples("niah_multikey_3_2k", "test")
  with pytest.raises(ValueError, match="eval_examples=0: must be >= 1"):
    tasks.register_tasks(eval_examples=0, with_seqio=False)


def test_score_by_hand(paths):
  tasks.register_tasks(**paths, lengths={"8k": 8192}, eval_examples=2, with_seqio=False)
  gold = [Example(id="a", task="t", question="q", answers=("Tim Burton",), document="d",
                  evidence=()),
          Example(id="b", task="t", question="q", answers=("cat",), document="d", evidence=())]
  scores = tasks.score("hotpotqa_50docs", [r"it is \boxed{Tim Burton}", "a black cat"], gold)
  assert scores == pytest.approx({"exact_match": 50.0, "sub_exact_match": 100.0,
                                  "f1": 100 * (1.0 + 2 * 0.5 / 1.5) / 2})


def test_seqio_layer(paths):
  import seqio
  names = tasks.register_tasks(**paths, lengths={"8k": 8192}, doc_counts=(50,), eval_examples=2)
  again = tasks.register_tasks(**paths, lengths={"8k": 8192}, doc_counts=(50,), eval_examples=2)
  assert names == again  # idempotent: replaced, not duplicated
  for name in ("gru_mem.niah_multivalue_8k", "gru_mem.hotpotqa_50docs"):
    task = seqio.get_mixture_or_task(name)
    assert task.splits == tasks.get_task(name).splits
    features = list(task.get_dataset(None, split="validation", shuffle=False).take(2)
                    .as_numpy_iterator())
    expected = list(tasks.examples(name, num_examples=2))
    assert len(features) == 2
    for got, example in zip(features, expected):
      restored = Example.from_features(got)
      assert restored == Example(**{**example.__dict__, "metadata": {}})
      assert got["evidence"].dtype == np.int32 and got["evidence"].shape == (len(example.evidence), 2)
    targets = [task.postprocess_fn(f["targets_pretokenized"], example=f, is_target=True)
               for f in features]
    right = task.postprocess_fn(r"done: \boxed{" + ", ".join(expected[0].answers) + "}")
    predictions = [right, "I do not know"]
    results = {}
    for metric_fn in task.metric_fns:
      results.update(metric_fn(targets, predictions))
    first = "needles" if name.startswith("gru_mem.niah") else "f1"
    assert results[first] == pytest.approx(50.0)  # one right, one wrong
    assert results["exact_match"] == pytest.approx(50.0)
