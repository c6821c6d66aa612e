"""The house, read from the AST of gru_mem/: imports flow one way (no cycles, nothing imports a
higher layer, lazy imports included), modules meet through public names, files stay small.

The layers are those of docs/design.md, lowest first; a module may import its own layer or lower.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 400

# (layer, module names or package prefixes ending in "."), lowest first.
LAYERS = (
    ("foundation", ("gru_mem", "gru_mem.console", "gru_mem.buckets", "gru_mem.gates",
                    "gru_mem.defaults")),
    ("infrastructure", ("gru_mem.parallel", "gru_mem.checkpoint", "gru_mem.logs",
                        "gru_mem.hlo_text")),
    ("model and data", ("gru_mem.model.", "gru_mem.data.")),
    ("sampler", ("gru_mem.sampling", "gru_mem.continuous", "gru_mem.rollout_weights")),
    ("agent", ("gru_mem.agent.",)),
    ("rl", ("gru_mem.rl.",)),
    ("run plumbing", ("gru_mem.run_folder", "gru_mem.runtime", "gru_mem.settings",
                      "gru_mem.stage", "gru_mem.eval_report", "gru_mem.sweep_summary")),
    ("entry points", ("gru_mem.train", "gru_mem.sft", "gru_mem.evaluate", "gru_mem.infer",
                      "gru_mem.export_hf", "gru_mem.dry_run", "gru_mem.dry_run_sampler",
                      "gru_mem.dry_run_learner")),
    ("the default job", ("gru_mem.default_job",)),
)


def modules() -> dict[str, str]:
  found = {}
  for folder, _, files in os.walk(os.path.join(REPO, "gru_mem")):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        found[module.removesuffix(".__init__")] = path
  return found


MODULES = modules()


def layer_of(module: str) -> int:
  for rank, (_, members) in enumerate(LAYERS):
    for member in members:
      if module == member or (member.endswith(".") and module.startswith(member)) or (
          member.endswith(".") and module == member[:-1]):
        return rank
  raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to docs/design.md")


def resolve(name: str):
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(module: str):
  """(imported gru_mem module, alias or None, line) for every import in `module`, lazy ones too,
  and the private names it takes from other gru_mem modules."""
  path = MODULES[module]
  tree = ast.parse(open(path).read())
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  edges, private, aliases = [], [], {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        target = resolve(alias.name)
        if target:
          edges.append((target, node.lineno))
          aliases[alias.asname or alias.name] = target
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        target = resolve(full) if full in MODULES else resolve(base)
        if not target:
          continue
        edges.append((target, node.lineno))
        if full in MODULES:
          aliases[alias.asname or alias.name] = full
        elif alias.name.startswith("_") and not alias.name.startswith("__"):
          private.append(f"{module}:{node.lineno} from {base} import {alias.name}")
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and aliases[node.value.id] != module
        and node.attr.startswith("_") and not node.attr.startswith("__")):
      private.append(f"{module}:{node.lineno} {node.value.id}.{node.attr}")
  return [(t, line) for t, line in edges if t != module], private


def test_every_module_is_in_a_layer_and_imports_only_its_own_layer_or_lower():
  upward = []
  for module in sorted(MODULES):
    for target, line in imports_of(module)[0]:
      if target != "gru_mem" and layer_of(target) > layer_of(module):
        upward.append(f"{module}:{line} imports {target} "
                      f"({LAYERS[layer_of(module)][0]} -> {LAYERS[layer_of(target)][0]})")
  assert not upward


def test_no_import_cycles():
  graph = {m: {t for t, _ in imports_of(m)[0] if t != "gru_mem"} for m in MODULES}
  cycles, state = [], {}

  def visit(node, path):
    state[node] = "open"
    for target in sorted(graph[node]):
      if state.get(target) == "open":
        cycles.append(path[path.index(target):] + [target])
      elif target not in state:
        visit(target, path + [target])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles


def test_no_private_names_used_across_modules():
  assert not [p for m in sorted(MODULES) for p in imports_of(m)[1]]


def test_no_file_over_400_lines():
  long = {os.path.relpath(p, REPO): n for p in MODULES.values()
          if (n := len(open(p).read().splitlines())) > MAX_LINES}
  assert not long


def test_the_checks_see_a_violation(tmp_path, monkeypatch):
  """The reader flags an upward import, a private reach-in and a lazy cycle."""
  fake = {"gru_mem.sampling": tmp_path / "sampling.py", "gru_mem.train": tmp_path / "train.py"}
  fake["gru_mem.sampling"].write_text("def f():\n  from gru_mem import train\n  train._loop()\n")
  fake["gru_mem.train"].write_text("from gru_mem import sampling\n")
  monkeypatch.setattr(__import__(__name__), "MODULES", {k: str(v) for k, v in fake.items()})
  edges, private = imports_of("gru_mem.sampling")
  assert [t for t, _ in edges] == ["gru_mem.train"]
  assert private == ["gru_mem.sampling:3 train._loop"]
  assert layer_of("gru_mem.train") > layer_of("gru_mem.sampling")
  with pytest.raises(AssertionError):
    test_no_import_cycles()
