"""The example source of training, SFT, evaluation and the default job: the `data` config section
-> registered tasks (`gru_mem.data.tasks`) -> one deterministic, resumable stream.

`data.mixture` names the stream: a task or a comma-separated list of tasks mixed round-robin
(empty: `data.train_tasks`, else `data.task`, the older keys). A name is one of
  * a RULER-style needle family of `synthetic.TASKS` (documents of `data.context_tokens` tokens,
    evidence within `data.evidence_depth`, haystack from `data.essays_path`);
  * a file task: `hotpotqa` (`data.hotpotqa_path`, `data.num_documents` documents per example),
    `squad` (`data.squad_path`), `memagent` (`data.memagent_path`, MemAgent's parquet or JSON;
    evidence recovered through `data.hotpotqa_path` when given) or `ruler` (`data.ruler_path`,
    RULER jsonl); see `data/files.py`;
  * a task of the paper's grid (`tasks.register_tasks`), e.g. niah_single_1_8k, hotpotqa_200docs.
Example i of a run with seed s is `tasks.example_at(stream, i, s)` (the one rule in tasks.py), so
a resumed run continues with exactly the examples it would have seen (`start` = examples
already consumed). Files are read and validated by `check_data_config`, before any model is built.
"""

from __future__ import annotations

import os
from typing import Iterator, Union

from gru_mem.data import files, synthetic, tasks
from gru_mem.data.example import Example

FILE_KEYS = {"hotpotqa": "hotpotqa_path", "squad": "squad_path", "memagent": "memagent_path",
             "ruler": "ruler_path"}
REAL_TASKS = tuple(FILE_KEYS)
FIXED_LENGTH_TASKS = ("memagent", "ruler")  # documents come whole from the file
Source = Union[tasks.TaskSpec, tasks.Mixture]


def task_families(data_config) -> list[str]:
  """The names of the config's stream (data.mixture, else data.train_tasks, else data.task)."""
  names = data_config.get("mixture", "") or data_config.train_tasks or data_config.task
  return [n.strip().removeprefix(tasks.PREFIX) for n in names.split(",") if n.strip()]


def _grid_name(name: str) -> bool:
  return any(name == f"{t}_{length}" for t in synthetic.TASKS for length in tasks.RULER_LENGTHS) \
      or any(name == f"{f}_{n}docs" for f in ("hotpotqa", "squad") for n in tasks.DOC_COUNTS)


def check_data_config(data_config) -> None:
  """Clear errors for unknown tasks, missing or malformed files and impossible lengths, before
  any work: every named data file is read and each record validated."""
  families = task_families(data_config)
  if not families:
    raise ValueError("data.mixture is empty: name a task or mixture, e.g. niah_single_1, "
                     "hotpotqa, memagent or niah_single_word,niah_multihop_1")
  file_families = []
  for name in families:  # every name first, then the files
    family = name.split("_")[0] if _grid_name(name) and name.split("_")[0] in REAL_TASKS else name
    if family in FILE_KEYS:
      file_families.append(family)
    elif name not in synthetic.TASKS and not _grid_name(name):
      raise ValueError(f"data task {name!r} is unknown: use one of "
                       f"{sorted(synthetic.TASKS) + list(REAL_TASKS)}, a grid task such as "
                       "niah_single_1_8k or hotpotqa_200docs, or a comma-separated list of them")
  for family in dict.fromkeys(file_families):
    check_file(data_config, family)
  if data_config.context_tokens < 64:
    raise ValueError(f"data.context_tokens={data_config.context_tokens}: must be >= 64")
  if not 0.0 < data_config.evidence_depth <= 1.0:
    raise ValueError(f"data.evidence_depth={data_config.evidence_depth}: must be in (0, 1]")
  essays = data_config.essays_path
  if essays and not os.path.isfile(essays):
    raise FileNotFoundError(f"data.essays_path={essays!r} does not exist")


def check_file(data_config, family: str) -> None:
  """Reads and validates the file of task `family` (errors name the file, record and field)."""
  key = FILE_KEYS[family]
  path = data_config.get(key, "")
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"data.task={family!r} needs data.{key} to point at the local data "
                            f"file (got {path!r})")
  if family == "hotpotqa":
    from gru_mem.data import hotpotqa
    hotpotqa.load_hotpotqa(path)
  elif family == "squad":
    from gru_mem.data import squad
    squad.load_squad(path)
  elif family == "memagent":
    files.memagent_records(path)
    if data_config.hotpotqa_path:
      check_file(data_config, "hotpotqa")
  else:
    files.ruler_records(path)


def file_task(name: str, family: str, data_config, **kwargs) -> tasks.TaskSpec:
  """The task of a MemAgent or RULER file (records in file order, cycled when training)."""
  path = data_config.get(FILE_KEYS[family], "")
  name = tasks.full_name(name)
  if family == "memagent":
    hotpotqa_path = data_config.hotpotqa_path

    def make_record(index: int, seed: int) -> Example:
      return files.memagent_example(files.memagent_records(path)[index], seed, hotpotqa_path)
    size = lambda: len(files.memagent_records(path))  # noqa: E731
  else:
    def make_record(index: int, seed: int) -> Example:
      return files.ruler_example(files.ruler_records(path)[index], seed)
    size = lambda: len(files.ruler_records(path))  # noqa: E731
  metric_names = tasks.QA_METRICS if family == "memagent" else tasks.NEEDLE_METRICS
  return tasks.TaskSpec(name, family, tasks.cycle(size, make_record, name), size, metric_names,
                        **kwargs)


def family_task(name: str, data_config, tokenizer, length=None, depth=None,
                **kwargs) -> tasks.TaskSpec:
  """The registered task of one name of the config (module doc); `length` (tokens of document +
  question) and `depth` replace data.context_tokens / data.evidence_depth (evaluation cells)."""
  get_tokenizer = tasks.resolve_tokenizer(tokenizer)
  suffix = "" if length is None else f"_{length}" + ("" if depth is None else f"_depth{depth:g}")
  if name in synthetic.TASKS:
    spec = tasks.synthetic_task(
        name + suffix, name, data_config.context_tokens if length is None else length,
        get_tokenizer, data_config.essays_path or None,
        data_config.evidence_depth if depth is None else depth, **kwargs)
  elif name in ("hotpotqa", "squad"):
    size = ({"num_docs": data_config.num_documents} if length is None
            else {"target_tokens": length, "get_tokenizer": get_tokenizer})
    spec = tasks.document_task(name + suffix, name, data_config.get(FILE_KEYS[name]), **size,
                               **kwargs)
  elif name in FIXED_LENGTH_TASKS:
    spec = file_task(name, name, data_config, **kwargs)
  else:
    tasks.register_tasks(hotpotqa_path=data_config.hotpotqa_path or None,
                         squad_path=data_config.squad_path or None,
                         essays_path=data_config.essays_path or None, tokenizer=tokenizer,
                         with_seqio=False)
    return tasks.get_task(name)
  tasks.register(spec)
  return spec


def register_config_tasks(data_config, tokenizer, seed: int = 0) -> Source:
  """Registers the tasks `data` names and returns the stream's task (one name) or mixture."""
  specs = [family_task(name, data_config, tokenizer, seed=seed)
           for name in task_families(data_config)]
  if len(specs) == 1:
    return specs[0]
  mixture = tasks.Mixture(tasks.PREFIX + "mixture." + ".".join(task_families(data_config)),
                          tuple(spec.name for spec in specs), seed, specs=tuple(specs))
  tasks.register(mixture)
  return mixture


def example_at(data_config, tokenizer, index: int, seed: int) -> Example:
  """Example `index` of the config's stream with `seed` (registers its tasks on every call: a
  loop should call `register_config_tasks` once and then `tasks.example_at`)."""
  return tasks.example_at(register_config_tasks(data_config, tokenizer), index, seed)


def example_stream(data_config, tokenizer, seed: int, start: int = 0) -> Iterator[Example]:
  """Examples `start`, `start + 1`, ... of the config's stream, forever."""
  return tasks.stream(register_config_tasks(data_config, tokenizer, seed), seed, start)
