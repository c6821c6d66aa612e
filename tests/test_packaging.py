"""First contact: declared dependencies, the package installed on its own, a quiet console."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "gru_mem")

# Needed at run time but never imported by name: transformers' chat templates need jinja2.
RUNTIME_ONLY = {"jinja2"}

# Start-up lines of TensorFlow, XLA, absl, transformers and orbax that must not reach a user.
NOISE = re.compile(r"oneDNN|cuda|cuInit|absl::InitializeLog|PyTorch was not found|"
                   r"Token indices sequence length|read-only|^[IWE]\d{4} ", re.I | re.M)


def declared_requirements() -> set[str]:
  """Distribution names in setup.py's INSTALL_REQUIRES (read from its AST, nothing run)."""
  tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INSTALL_REQUIRES"
                                            for t in node.targets):
      return {re.split(r"[=<>!~\[; ]", ast.literal_eval(e))[0].lower().replace("_", "-")
              for e in node.value.elts}
  raise AssertionError("setup.py has no INSTALL_REQUIRES list")


def third_party_imports(root: str) -> dict[str, str]:
  """{top-level module name: first file importing it} over every module under `root`, lazy
  imports included, leaving out the standard library and gru_mem itself."""
  found = {}
  for folder, _, files in os.walk(root):
    for name in sorted(files):
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
          names = [node.module]
        else:
          continue
        for module in names:
          top = module.split(".")[0]
          if top not in sys.stdlib_module_names and top not in ("gru_mem", "__future__"):
            found.setdefault(top, os.path.relpath(path, REPO))
  return found


def undeclared(imports: dict[str, str], declared: set[str]) -> list[str]:
  distributions = importlib.metadata.packages_distributions()
  missing = []
  for module, where in sorted(imports.items()):
    names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
    if not names & declared:
      missing.append(f"{module} (imported in {where}; distribution {sorted(names)})")
  return missing


def test_every_third_party_import_is_declared_in_setup_py():
  declared = declared_requirements()
  assert not undeclared(third_party_imports(PACKAGE), declared)
  assert RUNTIME_ONLY <= declared


def test_the_check_catches_an_undeclared_import(tmp_path):
  (tmp_path / "module.py").write_text("def f():\n  import pytest\n  from hypothesis import given\n")
  missing = undeclared(third_party_imports(str(tmp_path)), declared_requirements())
  assert [m.split()[0] for m in missing] == ["hypothesis", "pytest"]


def run_quiet_check(command, cwd, env=None, timeout=600, returncodes=(0,)):
  result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode in returncodes, result.stdout[-3000:] + result.stderr[-3000:]
  assert not NOISE.search(result.stderr), result.stderr[-3000:]
  return result


def test_infer_help_prints_no_startup_noise():
  # absl's --help exits 1 after printing the usage.
  result = run_quiet_check([sys.executable, "-m", "gru_mem.infer", "--help"], REPO,
                           returncodes=(0, 1))
  assert "--document" in result.stdout + result.stderr


def test_installed_package_trains_from_outside_the_repository(tmp_path):
  """A non-editable install (a wheel built from the repository, installed into a folder that
  alone is on the path) runs a config file given by absolute path, from another directory:
  nothing imports `configs/`, and the console carries no start-up noise."""
  wheels, site = tmp_path / "wheels", tmp_path / "site"
  build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(wheels), REPO], capture_output=True, text=True)
  assert build.returncode == 0, build.stderr[-2000:]
  (wheel,) = wheels.glob("gru_mem-*.whl")
  install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                            str(site), str(wheel)], capture_output=True, text=True)
  assert install.returncode == 0, install.stderr[-2000:]
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
  env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  where = subprocess.run([sys.executable, "-c", "import gru_mem, importlib.util; "
                          "print(gru_mem.__file__, importlib.util.find_spec('configs'))"],
                         cwd=outside, env=env, capture_output=True, text=True)
  assert where.stdout.startswith(str(site)) and where.stdout.split()[-1] == "None", where
  run_quiet_check([sys.executable, "-m", "gru_mem.train", "--config",
                   os.path.join(REPO, "configs", "tiny.py"), "--workdir", str(outside / "run"),
                   "--config.train.steps=1", "--config.rl.prompts_per_step=1",
                   "--config.rl.group_size=2", "--config.agent.max_response_tokens=8",
                   "--config.agent.max_answer_tokens=4", "--config.data.context_tokens=96"],
                  cwd=outside, env=env)
  assert os.path.isdir(outside / "run" / "checkpoints" / "1")


@pytest.mark.parametrize("config", ["tiny.py", "qwen2p5_3b_hotpotqa.py:h100x8"])
def test_config_files_load_by_absolute_path_from_anywhere(tmp_path, config):
  code = ("from ml_collections import config_flags; import sys; from absl import flags; "
          f"config_flags.DEFINE_config_file('config', {os.path.join(REPO, 'configs', config)!r}); "
          "flags.FLAGS(sys.argv[:1]); print(flags.FLAGS.config.agent.chunk_tokens)")
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ""})
  assert result.returncode == 0, result.stderr[-2000:]
  assert int(result.stdout.split()[-1]) > 0
