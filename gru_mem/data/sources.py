"""A deterministic, resumable stream of training examples from the `data` config section.

Example i of a run is a pure function of (task family, i, seed), so a resumed run continues with
exactly the examples it would have seen (`start` = examples already consumed). Task families:
the RULER-style needle tasks of `synthetic.TASKS`, `hotpotqa` and `squad` (real files whose
paths come from the config, never from a download).
"""

from __future__ import annotations

import itertools
from typing import Iterator

from gru_mem.data import synthetic
from gru_mem.data.example import Example

REAL_TASKS = ("hotpotqa", "squad")


def task_families(data_config) -> list[str]:
  names = data_config.train_tasks or data_config.task
  return [n.strip() for n in names.split(",") if n.strip()]


def check_data_config(data_config) -> None:
  """Clear errors for unknown tasks, missing files and impossible lengths, before any work."""
  import os
  families = task_families(data_config)
  if not families:
    raise ValueError("data.task is empty: name a task, e.g. niah_single_1 or hotpotqa")
  for name in families:
    if name in REAL_TASKS:
      path = data_config.hotpotqa_path if name == "hotpotqa" else data_config.squad_path
      if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"data.task={name!r} needs data.{name}_path to point at the "
                                f"local JSON file (got {path!r})")
    elif name not in synthetic.TASKS:
      raise ValueError(f"data task {name!r} is unknown: use one of "
                       f"{sorted(synthetic.TASKS) + list(REAL_TASKS)}")
  if data_config.context_tokens < 64:
    raise ValueError(f"data.context_tokens={data_config.context_tokens}: must be >= 64")
  if not 0.0 < data_config.evidence_depth <= 1.0:
    raise ValueError(f"data.evidence_depth={data_config.evidence_depth}: must be in (0, 1]")
  essays = data_config.essays_path
  if essays and not os.path.isfile(essays):
    raise FileNotFoundError(f"data.essays_path={essays!r} does not exist")


def example_at(data_config, tokenizer, index: int, seed: int) -> Example:
  """The `index`-th example of the stream (families are interleaved round-robin)."""
  families = task_families(data_config)
  family = families[index % len(families)]
  example_seed = seed * 1_000_003 + index
  if family == "hotpotqa":
    from gru_mem.data import hotpotqa
    records = hotpotqa.load_hotpotqa(data_config.hotpotqa_path)
    return hotpotqa.hotpotqa_example(records, (index // len(families)) % len(records),
                                     num_docs=data_config.num_documents, seed=example_seed)
  if family == "squad":
    from gru_mem.data import squad
    data = squad.load_squad(data_config.squad_path)
    return squad.squad_example(data, (index // len(families)) % len(data.questions),
                               num_docs=data_config.num_documents, seed=example_seed)
  return synthetic.generate(family, data_config.context_tokens, tokenizer, seed=example_seed,
                            evidence_within=data_config.evidence_depth,
                            essays_path=data_config.essays_path or None)


def example_stream(data_config, tokenizer, seed: int, start: int = 0) -> Iterator[Example]:
  """Examples `start`, `start + 1`, ... forever."""
  for index in itertools.count(start):
    yield example_at(data_config, tokenizer, index, seed)
