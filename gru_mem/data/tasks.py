"""The task registry: the paper's grid of tasks x lengths, as plain iterators and as seqio Tasks.

Names: `gru_mem.<ruler task>_<length>` (e.g. gru_mem.niah_single_1_8k, lengths 8k ... 1m),
`gru_mem.hotpotqa_<n>docs` and `gru_mem.squad_<n>docs` (n = 50 ... 6400). Registering is cheap: an
example is generated only when a split is iterated. Data files come from arguments, never from a
download.

  register_tasks(hotpotqa_path=..., squad_path=..., essays_path=..., tokenizer=...)
  for example in examples("gru_mem.niah_single_1_8k", "validation"): ...     # no TensorFlow
  seqio.get_mixture_or_task("gru_mem.hotpotqa_200docs").get_dataset(None, split="validation")

Splits: synthetic tasks have "train" (endless) and "validation" (`eval_examples` examples), each
example's seed derived from (task, split, seed, index). HotpotQA / SQuAD tasks have one split per
file given (a plain path is the "validation" split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Callable, Iterator, Mapping, Optional, Union

from gru_mem.data import hotpotqa, metrics, squad, synthetic
from gru_mem.data.example import Example

PREFIX = "gru_mem."
RULER_LENGTHS: dict[str, int] = {"8k": 8192, "16k": 16384, "32k": 32768, "64k": 65536,
                                 "128k": 131072, "256k": 262144, "512k": 524288, "1m": 1048576}
DOC_COUNTS = (50, 100, 200, 400, 800, 1600, 3200, 6400)
DEFAULT_EVAL_EXAMPLES = 100

PathArg = Union[None, str, Mapping[str, str]]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A registered task: `iterate(split, seed)` yields its Examples lazily."""
  name: str
  family: str  # "ruler" | "hotpotqa" | "squad"
  splits: tuple[str, ...]
  iterate: Callable[[str, int], Iterator[Example]]
  num_examples: Mapping[str, Optional[int]]  # None: endless or known only after loading
  metric_names: tuple[str, ...]
  seed: int = 0


_REGISTRY: dict[str, TaskSpec] = {}


def example_seed(task_name: str, split: str, seed: int, index: int) -> int:
  """A stable 31-bit seed for example `index` (the same on every machine and Python run)."""
  digest = hashlib.sha256(f"{task_name}/{split}/{seed}/{index}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _as_splits(path: PathArg) -> dict[str, str]:
  if path is None:
    return {}
  if isinstance(path, str):
    return {"validation": path}
  return dict(path)


def _resolve_tokenizer(tokenizer) -> Callable[[], object]:
  """A cached getter, so that the tokenizer is only built when data is first needed."""
  cache: list = []

  def get():
    if not cache:
      if tokenizer is None:
        from gru_mem.data.tokenizer import builtin_tokenizer
        cache.append(builtin_tokenizer())
      elif isinstance(tokenizer, str):
        from gru_mem.data.tokenizer import load_tokenizer
        cache.append(load_tokenizer(tokenizer))
      else:
        cache.append(tokenizer)
    return cache[0]
  return get


def _ruler_spec(task: str, length_name: str, tokens: int, get_tokenizer, essays_path,
                eval_examples: int, seed: int) -> TaskSpec:
  name = f"{PREFIX}{task}_{length_name}"

  def iterate(split: str, seed: int) -> Iterator[Example]:
    count = None if split == "train" else eval_examples
    indices = itertools.count() if count is None else range(count)
    tokenizer = get_tokenizer()
    for index in indices:
      yield synthetic.generate(task, tokens, tokenizer, seed=example_seed(name, split, seed, index),
                               essays_path=essays_path)
  return TaskSpec(name, "ruler", ("train", "validation"), iterate,
                  {"train": None, "validation": eval_examples},
                  ("needles", "sub_exact_match", "exact_match"), seed)


def _document_spec(family: str, num_docs: int, paths: dict[str, str], seed: int) -> TaskSpec:
  name = f"{PREFIX}{family}_{num_docs}docs"
  make = hotpotqa.hotpotqa_examples if family == "hotpotqa" else squad.squad_examples

  def iterate(split: str, seed: int) -> Iterator[Example]:
    if split not in paths:
      raise ValueError(f"task {name!r} has no split {split!r}: its splits are {sorted(paths)}")
    return make(paths[split], num_docs=num_docs, seed=seed)
  return TaskSpec(name, family, tuple(paths), iterate, {split: None for split in paths},
                  ("exact_match", "sub_exact_match", "f1"), seed)


def register_tasks(hotpotqa_path: PathArg = None, squad_path: PathArg = None,
                   essays_path: Optional[str] = None, tokenizer=None, seed: int = 0,
                   lengths: Optional[Mapping[str, int]] = None, doc_counts=DOC_COUNTS,
                   eval_examples: int = DEFAULT_EVAL_EXAMPLES, with_seqio: bool = True
                   ) -> list[str]:
  """(Re)registers every task; calling again replaces the earlier registration. Returns the names.

  Args:
    hotpotqa_path / squad_path: a JSON file (the "validation" split) or {split: file}; None leaves
      those tasks out.
    essays_path: text whose sentences are the essay haystack; None uses random vocabulary sentences.
    tokenizer: a Tokenizer, a local tokenizer folder, or None (the built-in one) for lengths.
    with_seqio: also register seqio Tasks (imports TensorFlow, ~10 s on first use).
  """
  lengths = RULER_LENGTHS if lengths is None else dict(lengths)
  if eval_examples < 1:
    raise ValueError(f"eval_examples={eval_examples}: must be >= 1")
  get_tokenizer = _resolve_tokenizer(tokenizer)
  specs = [_ruler_spec(task, length_name, tokens, get_tokenizer, essays_path, eval_examples, seed)
           for task in synthetic.TASKS for length_name, tokens in lengths.items()]
  for family, path in (("hotpotqa", hotpotqa_path), ("squad", squad_path)):
    paths = _as_splits(path)
    if paths:
      specs += [_document_spec(family, num_docs, paths, seed) for num_docs in doc_counts]
  for spec in specs:
    _REGISTRY[spec.name] = spec
  if with_seqio:
    for spec in specs:
      _register_seqio(spec)
  return [spec.name for spec in specs]


def task_names(family: Optional[str] = None) -> list[str]:
  """Registered task names (of one family if given), sorted."""
  return sorted(name for name, spec in _REGISTRY.items() if family in (None, spec.family))


def get_task(name: str) -> TaskSpec:
  """The TaskSpec of `name` (the "gru_mem." prefix may be left out)."""
  full = name if name.startswith(PREFIX) else PREFIX + name
  if full not in _REGISTRY:
    raise KeyError(f"task {name!r} is not registered ({len(_REGISTRY)} tasks are): call "
                   "gru_mem.data.tasks.register_tasks(...) first, with the data paths it needs")
  return _REGISTRY[full]


def examples(task_name: str, split: str = "validation", seed: Optional[int] = None,
             num_examples: Optional[int] = None) -> Iterator[Example]:
  """The task's Examples for `split`, in order, without TensorFlow (seed: registration's if None)."""
  spec = get_task(task_name)
  if split not in spec.splits:
    raise ValueError(f"task {spec.name!r} has no split {split!r}: its splits are {spec.splits}")
  iterator = spec.iterate(split, spec.seed if seed is None else seed)
  return iterator if num_examples is None else itertools.islice(iterator, num_examples)


def score(task_name: str, predictions, targets: list[Example]) -> dict[str, float]:
  """Mean metrics (in %) of raw model outputs against Examples; the last \\boxed{} is the answer."""
  spec = get_task(task_name)
  if len(predictions) != len(targets):
    raise ValueError(f"{len(predictions)} predictions for {len(targets)} examples: give one each")
  totals = dict.fromkeys(spec.metric_names, 0.0)
  for prediction, example in zip(predictions, targets):
    answer = metrics.extract_boxed(prediction)
    scores = metrics.score_answer(prediction if answer is None else answer, example.answers,
                                  example.answer_mode)
    for key in totals:
      totals[key] += scores[key]
  return {key: 100.0 * value / max(len(targets), 1) for key, value in totals.items()}


# --- seqio layer (TensorFlow is imported only here) -------------------------------------------


def _feature_signature():
  import tensorflow as tf
  text = tf.TensorSpec([], tf.string)
  return {"id": text, "task": text, "question": text, "document": text,
          "answers": tf.TensorSpec([None], tf.string), "evidence": tf.TensorSpec([None, 2], tf.int32),
          "answer_mode": text, "seed": tf.TensorSpec([], tf.int64), "targets_pretokenized": text}


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def postprocess(output, example=None, is_target: bool = False):
  """seqio postprocess_fn: a target becomes {answers, answer_mode} read from the example; a
  prediction becomes its last \\boxed{} content (or the stripped text when there is none)."""
  if is_target:
    return {"answers": [_text(a) for a in example["answers"]],
            "answer_mode": _text(example["answer_mode"])}
  output = _text(output)
  answer = metrics.extract_boxed(output)
  return output.strip() if answer is None else answer


def _metric_fn(metric_name: str):
  def metric_fn(targets, predictions) -> dict[str, float]:
    values = [metrics.score_answer(p, t["answers"], t["answer_mode"])[metric_name]
              for t, p in zip(targets, predictions)]
    return {metric_name: 100.0 * sum(values) / max(len(values), 1)}
  metric_fn.__name__ = f"{metric_name}_metric"
  return metric_fn


def _register_seqio(spec: TaskSpec) -> None:
  """Adds `spec` to seqio.TaskRegistry (replacing a task of the same name)."""
  import seqio
  import tensorflow as tf

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    del shuffle_files, seed  # the content is fixed by the registration seed; seqio shuffles

    def generate():
      for example in examples(spec.name, split):
        yield example.to_features()
    return tf.data.Dataset.from_generator(generate, output_signature=_feature_signature())

  known = {split: n for split, n in spec.num_examples.items() if n is not None}
  source = seqio.FunctionDataSource(dataset_fn, splits=spec.splits,
                                    num_input_examples=known or None, caching_permitted=False)
  if spec.name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(spec.name)
  seqio.TaskRegistry.add(spec.name, source, output_features={}, postprocess_fn=postprocess,
                         metric_fns=[_metric_fn(name) for name in spec.metric_names])
