"""The task registry: every example stream of training, SFT and evaluation, by name, and seqio.

A task makes example k of its source from a data seed: `TaskSpec.make(k, data_seed)`. A mixture
interleaves tasks round-robin. One rule fixes every stream (a task is a mixture of one):

  example i of stream (name, seed):  member = members[i % n],  k = i // n,
                                     data_seed = seed * 1_000_003 + i

so example i is a pure function of (name, seed, i) and a run resumed after i examples continues
with exactly the examples it would have seen (`stream(name, seed, start=i)`). The "train" split
is that stream with the training seed, endless (file tasks cycle over their records); the
"validation" split is the stream of one task with its `eval_seed`, `eval_examples` long (file
tasks: at most their records, in file order).

Names: `gru_mem.<ruler task>_<length>` (e.g. gru_mem.niah_single_1_8k, lengths 8k ... 1m),
`gru_mem.hotpotqa_<n>docs` and `gru_mem.squad_<n>docs` (n = 50 ... 6400) from `register_tasks`;
`sources.register_config_tasks` registers the tasks a config names (`data.mixture`). Registering
is cheap: a file is read and an example generated only when a stream is iterated. Data files come
from arguments, never from a download.

  register_tasks(hotpotqa_path=..., squad_path=..., essays_path=..., tokenizer=...)
  for example in examples("gru_mem.niah_single_1_8k", "validation"): ...     # no TensorFlow
  register_seqio("gru_mem.hotpotqa_200docs")  # seqio.get_mixture_or_task(name).get_dataset(...)

The seqio view of a task or mixture yields the same examples as `stream` (tests/test_tasks.py);
the trainer iterates `stream` directly (no TensorFlow import, no tf.data in the rollout loop).
seqio's own Mixture samples members at random rates, so a mixture is registered with seqio as
one Task whose dataset is the round-robin stream.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Iterator, Mapping, Optional, Union

from gru_mem.data import hotpotqa, metrics, squad, synthetic
from gru_mem.data.example import Example

PREFIX = "gru_mem."
RULER_LENGTHS: dict[str, int] = {"8k": 8192, "16k": 16384, "32k": 32768, "64k": 65536,
                                 "128k": 131072, "256k": 262144, "512k": 524288, "1m": 1048576}
DOC_COUNTS = (50, 100, 200, 400, 800, 1600, 3200, 6400)
DEFAULT_EVAL_EXAMPLES = 100
DEFAULT_EVAL_SEED = 7  # = defaults.eval.seed: validation streams are disjoint from training's
DATA_SEED_STRIDE = 1_000_003  # example i of seed s has data seed s * stride + i
SPLITS = ("train", "validation")
QA_METRICS = ("exact_match", "sub_exact_match", "f1")
NEEDLE_METRICS = ("needles", "sub_exact_match", "exact_match")

PathArg = Union[None, str, Mapping[str, str]]


def data_seed(seed: int, index: int) -> int:
  """The data seed of example `index` of a stream with `seed` (the one rule, module doc)."""
  return seed * DATA_SEED_STRIDE + index


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A registered task: `make(k, data_seed)` is its example k; `size()` the number of distinct
  source records (None: generated, endless)."""
  name: str
  family: str  # "ruler" | "hotpotqa" | "squad" | "memagent" | "ruler_file"
  make: Callable[[int, int], Example]
  size: Callable[[], Optional[int]]
  metric_names: tuple[str, ...]
  seed: int = 0  # the train split's seed
  eval_seed: int = DEFAULT_EVAL_SEED  # the validation split's seed
  eval_examples: int = DEFAULT_EVAL_EXAMPLES
  splits: tuple[str, ...] = SPLITS


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Registered tasks interleaved round-robin (train split only)."""
  name: str
  members: tuple[str, ...]
  seed: int = 0
  splits: tuple[str, ...] = ("train",)
  specs: tuple = dataclasses.field(default=(), compare=False, repr=False)  # resolved members


_REGISTRY: dict[str, Union[TaskSpec, Mixture]] = {}


def full_name(name: str) -> str:
  return name if name.startswith(PREFIX) else PREFIX + name


def register(spec: Union[TaskSpec, Mixture]) -> str:
  """Adds (or replaces) a task or mixture; a mixture's members must be registered tasks."""
  if isinstance(spec, Mixture):
    if not spec.members:
      raise ValueError(f"mixture {spec.name!r} has no members: name one or more tasks")
    for member in spec.members:
      if not isinstance(get(member), TaskSpec):
        raise ValueError(f"mixture {spec.name!r}: member {member!r} is a mixture; mixtures "
                         "hold tasks only")
    if not spec.specs:
      spec = dataclasses.replace(spec, specs=tuple(get_task(m) for m in spec.members))
  _REGISTRY[spec.name] = spec
  return spec.name


def get(name: str) -> Union[TaskSpec, Mixture]:
  """The TaskSpec or Mixture of `name` (the "gru_mem." prefix may be left out)."""
  full = full_name(name)
  if full not in _REGISTRY:
    raise KeyError(f"task or mixture {name!r} is not registered ({len(_REGISTRY)} are): call "
                   "gru_mem.data.tasks.register_tasks(...) or sources.register_config_tasks(...) "
                   "first, with the data paths it needs")
  return _REGISTRY[full]


def get_task(name: str) -> TaskSpec:
  """The TaskSpec of `name` (a KeyError names what to register)."""
  spec = get(name)
  if not isinstance(spec, TaskSpec):
    raise KeyError(f"{name!r} is a mixture, not a task")
  return spec


Source = Union[str, TaskSpec, Mixture]


def members(source: Source) -> tuple[TaskSpec, ...]:
  """The tasks of a task or mixture, given by name or as the registered object (an object keeps
  reading the tasks it was made with, whatever is registered later under the same names)."""
  spec = get(source) if isinstance(source, str) else source
  if isinstance(spec, TaskSpec):
    return (spec,)
  return spec.specs or tuple(get_task(m) for m in spec.members)


def example_at(source: Source, index: int, seed: int) -> Example:
  """Example `index` of the train stream of a task or mixture with `seed` (module doc)."""
  tasks = members(source)
  return tasks[index % len(tasks)].make(index // len(tasks), data_seed(seed, index))


def stream(source: Source, seed: Optional[int] = None, start: int = 0) -> Iterator[Example]:
  """Examples `start`, `start + 1`, ... of the train stream, forever (seed: registration's)."""
  spec = get(source) if isinstance(source, str) else source
  seed = spec.seed if seed is None else seed
  resolved = members(spec)  # unknown names fail here, not at the first next()
  source = spec if isinstance(spec, TaskSpec) else dataclasses.replace(spec, specs=resolved)
  return (example_at(source, index, seed) for index in itertools.count(start))


def validation_count(spec: TaskSpec) -> int:
  size = spec.size()
  return spec.eval_examples if size is None else min(spec.eval_examples, size)


def examples(task_name: str, split: str = "validation", seed: Optional[int] = None,
             num_examples: Optional[int] = None) -> Iterator[Example]:
  """The task's Examples for `split`, in order, without TensorFlow (seed: the split's if None)."""
  spec = get(task_name)
  if split not in spec.splits:
    raise ValueError(f"task {spec.name!r} has no split {split!r}: its splits are {spec.splits}")
  if split == "train":
    iterator = stream(spec.name, seed)
  else:
    seed = spec.eval_seed if seed is None else seed
    iterator = (spec.make(k, data_seed(seed, k)) for k in range(validation_count(spec)))
  return iterator if num_examples is None else itertools.islice(iterator, num_examples)


def cycle(size: Callable[[], int], make_record: Callable[[int, int], Example], name: str
          ) -> Callable[[int, int], Example]:
  """`make` of a file task: example k is record k % size (training cycles over the file)."""
  def make(k: int, seed: int) -> Example:
    count = size()
    if not count:
      raise ValueError(f"task {name!r}: its data file holds no usable records")
    return make_record(k % count, seed)
  return make


# --- the paper's grid ------------------------------------------------------------------------


def resolve_tokenizer(tokenizer) -> Callable[[], object]:
  """A cached getter, so that the tokenizer is only built when data is first needed."""
  cache: list = []

  def get_tokenizer():
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
  return get_tokenizer


def synthetic_task(name: str, task: str, tokens: int, get_tokenizer, essays_path=None,
                   evidence_depth: float = 1.0, **kwargs) -> TaskSpec:
  """A RULER-style needle task of `tokens` tokens (document + question)."""
  def make(k: int, seed: int) -> Example:
    del k  # a generated example is a function of its data seed
    return synthetic.generate(task, tokens, get_tokenizer(), seed=seed,
                              evidence_within=evidence_depth, essays_path=essays_path)
  return TaskSpec(full_name(name), "ruler", make, lambda: None, NEEDLE_METRICS, **kwargs)


def document_task(name: str, family: str, path: str, num_docs: Optional[int] = None,
                  target_tokens: Optional[int] = None, get_tokenizer=None, **kwargs) -> TaskSpec:
  """HotpotQA / SQuAD long documents built from `path` (`num_docs` documents or `target_tokens`
  tokens each)."""
  tokenizer = (lambda: None) if get_tokenizer is None else get_tokenizer
  if family == "hotpotqa":
    def size():
      return len(hotpotqa.load_hotpotqa(path))

    def make_record(index, seed):
      records = hotpotqa.load_hotpotqa(path)
      return hotpotqa.hotpotqa_example(records, index, num_docs=num_docs, seed=seed,
                                       target_tokens=target_tokens, tokenizer=tokenizer(),
                                       pool=hotpotqa.pool_of(path))
  elif family == "squad":
    def size():
      return len(squad.load_squad(path).questions)

    def make_record(index, seed):
      return squad.squad_example(squad.load_squad(path), index, num_docs=num_docs, seed=seed,
                                 target_tokens=target_tokens, tokenizer=tokenizer())
  else:
    raise ValueError(f"family {family!r}: use hotpotqa or squad")
  name = full_name(name)
  return TaskSpec(name, family, cycle(size, make_record, name), size, QA_METRICS, **kwargs)


def register_tasks(hotpotqa_path: Optional[str] = None, squad_path: Optional[str] = None,
                   essays_path: Optional[str] = None, tokenizer=None, seed: int = 0,
                   lengths: Optional[Mapping[str, int]] = None, doc_counts=DOC_COUNTS,
                   eval_examples: int = DEFAULT_EVAL_EXAMPLES, eval_seed: int = DEFAULT_EVAL_SEED,
                   with_seqio: bool = True) -> list[str]:
  """(Re)registers the paper's grid; calling again replaces the earlier registration.

  Args:
    hotpotqa_path / squad_path: a JSON file; None leaves those tasks out.
    essays_path: text whose sentences are the essay haystack; None uses random vocabulary sentences.
    tokenizer: a Tokenizer, a local tokenizer folder, or None (the built-in one) for lengths.
    seed / eval_seed: the train and validation splits' seeds.
    with_seqio: also register seqio Tasks (imports TensorFlow, ~10 s on first use).
  """
  lengths = RULER_LENGTHS if lengths is None else dict(lengths)
  if eval_examples < 1:
    raise ValueError(f"eval_examples={eval_examples}: must be >= 1")
  get_tokenizer = resolve_tokenizer(tokenizer)
  common = dict(seed=seed, eval_seed=eval_seed, eval_examples=eval_examples)
  specs = [synthetic_task(f"{task}_{length_name}", task, tokens, get_tokenizer, essays_path,
                          **common)
           for task in synthetic.TASKS for length_name, tokens in lengths.items()]
  for family, path in (("hotpotqa", hotpotqa_path), ("squad", squad_path)):
    if path:
      specs += [document_task(f"{family}_{n}docs", family, path, num_docs=n, **common)
                for n in doc_counts]
  names = [register(spec) for spec in specs]
  if with_seqio:
    for name in names:
      register_seqio(name)
  return names


def task_names(family: Optional[str] = None) -> list[str]:
  """Registered task names (of one family if given), sorted."""
  return sorted(name for name, spec in _REGISTRY.items()
                if isinstance(spec, TaskSpec) and family in (None, spec.family))


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


def register_seqio(name: str) -> str:
  """Adds task or mixture `name` to seqio.TaskRegistry as a Task (replacing one of that name)
  whose splits yield `examples(name, split)`'s features; returns the seqio name."""
  import seqio
  import tensorflow as tf
  spec = get(name)
  metric_names = (spec.metric_names if isinstance(spec, TaskSpec)
                  else tuple(dict.fromkeys(m for t in members(name) for m in t.metric_names)))

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    del shuffle_files, seed  # the content is fixed by the registration seed; seqio shuffles

    def generate():
      for example in examples(spec.name, split):
        yield example.to_features()
    return tf.data.Dataset.from_generator(generate, output_signature=_feature_signature())

  known = ({"validation": validation_count(spec)}
           if isinstance(spec, TaskSpec) and spec.size() is None else None)
  source = seqio.FunctionDataSource(dataset_fn, splits=spec.splits, num_input_examples=known,
                                    caching_permitted=False)
  if spec.name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(spec.name)
  seqio.TaskRegistry.add(spec.name, source, output_features={}, postprocess_fn=postprocess,
                         metric_fns=[_metric_fn(m) for m in metric_names])
  return spec.name
