"""gru_mem vs google-tunix 0.1.7 side by side, in one process, on the same random HF Qwen2.

  python benchmarks/peers.py [--venv /tmp/gru_mem_peers_venv] [--repeats 5] [--smoke]
      [--parts decode,agent,learner] [--setup_only]

google-tunix 0.1.7 pins safetensors < 0.8 (gru_mem pins 0.8.0), so the measuring runs in its own
venv, made by this script when DIR has none (`--setup_only` makes it and stops): `python -m venv
DIR`, then `DIR/bin/python -m pip install -r benchmarks/peers_requirements.txt` (tunix plus
gru_mem's jax/flax/optax/orbax/numpy pins; no torch; a few minutes from a package index). A
failed install removes the half-made DIR; an existing venv is used only if it has every pinned
version (else the error names what differs). gru_mem is imported there from this checkout
(PYTHONPATH).

This (parent) process writes the model with transformers: a random Qwen2 (hidden 256, 4 layers,
vocab 32k, tied embeddings) with random q/k/v biases; a freshly initialised one decodes
degenerately (greedy rows repeat a few tokens), so the layer weights (not the embedding or the
norms) are scaled by 1, 2, 4, ... until transformers' own greedy rows show many distinct tokens
(`MIN_DISTINCT_FRACTION` of each row on average); the scale and the count go into the JSON. Then
it re-runs itself with `--child` in the peers venv (benchmarks/peers_measure.py: both sides load
the folder with their own HF loader, alternate within that one process, N >= 5 repeats), and
saves benchmarks/results/peers.json (`common.save_results`): per part, the median over repeats
of tunix seconds / our seconds with its spread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common  # noqa: E402  (benchmarks/ is not a package)

DEFAULT_VENV = "/tmp/gru_mem_peers_venv"
REQUIREMENTS = os.path.join(HERE, "peers_requirements.txt")
MODEL = dict(vocab_size=32768, hidden_size=256, intermediate_size=768, num_layers=4,
             num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
             max_position_embeddings=2048)
SMOKE_MODEL = dict(MODEL, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                   head_dim=16)
MIN_DISTINCT_FRACTION = 0.5
SCALES = (1.0, 2.0, 4.0, 8.0, 16.0)
PARTS = ("decode", "agent", "learner")


def pinned_versions(path: str = REQUIREMENTS) -> dict[str, str]:
  """{name: version} of the `name==version` lines of a requirements file (names lower case,
  `_` as `-`, as package metadata compares them)."""
  pins = {}
  with open(path) as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line:
        name, sep, version = line.partition("==")
        if not sep:
          raise ValueError(f"{path}: {line!r} is not pinned as name==version")
        pins[name.strip().lower().replace("_", "-")] = version.strip()
  return pins


def venv_mismatches(python: str, pins: dict[str, str]) -> list[str]:
  """The pins `python`'s environment does not hold: 'name==want (have X)' or '(missing)'."""
  script = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n  try: return m.version(n)\n  except m.PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in json.loads(sys.argv[1])}))")
  out = subprocess.run([python, "-c", script, json.dumps(sorted(pins))], check=True,
                       capture_output=True, text=True).stdout
  have = json.loads(out)
  return [f"{n}=={want} ({'missing' if have[n] is None else 'have ' + have[n]})"
          for n, want in sorted(pins.items()) if have[n] != want]


def ensure_venv(venv: str) -> str:
  """The python of `venv`: made with the pinned requirements when `venv` has none, checked
  against the pins when it exists. Raises SystemExit saying what to do when either fails."""
  python = os.path.join(venv, "bin", "python")
  if not os.path.exists(python):
    if os.path.exists(venv) and os.listdir(venv):
      raise SystemExit(f"--venv {venv}: the folder exists but holds no bin/python; pass a new "
                       "folder (the script makes the venv there) or an existing venv")
    print(f"creating the peers venv {venv}: python -m venv, then pip install -r {REQUIREMENTS} "
          "(tunix and its pins; a few minutes)", flush=True)
    try:
      subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    except subprocess.CalledProcessError as e:
      shutil.rmtree(venv, ignore_errors=True)
      raise SystemExit(f"`{sys.executable} -m venv {venv}` failed (exit {e.returncode}, output "
                       "above): this Python needs its venv module with ensurepip (Debian/Ubuntu: "
                       "the python3-venv package)") from e
    try:
      subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                      REQUIREMENTS], check=True)
    except subprocess.CalledProcessError as e:
      shutil.rmtree(venv, ignore_errors=True)
      raise SystemExit(f"pip could not install {REQUIREMENTS} into {venv} (exit {e.returncode}, "
                       "pip's output above); the half-made venv was removed. Check that a package "
                       "index is reachable (pip config, PIP_INDEX_URL) and that every pin exists for "
                       f"Python {sys.version_info.major}.{sys.version_info.minor}") from e
  if bad := venv_mismatches(python, pinned_versions()):
    raise SystemExit(f"the peers venv {venv} lacks pinned versions: {'; '.join(bad)}. Install "
                     f"them with `{python} -m pip install -r {REQUIREMENTS}`, or pass a new --venv "
                     "folder for the script to make")
  return python


def greedy_rows(model, prompts, new_tokens: int):
  """transformers' greedy continuations [rows, new_tokens] (no EOS)."""
  import torch
  with torch.no_grad():
    out = model.generate(torch.tensor(prompts), attention_mask=torch.ones(len(prompts),
                         len(prompts[0]), dtype=torch.long), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
  return out[:, len(prompts[0]):].numpy()


def distinct_fraction(rows) -> float:
  """Mean over rows of (distinct tokens in the row) / (row length)."""
  return float(sum(len(set(r.tolist())) for r in rows) / (len(rows) * len(rows[0])))


def write_hf_model(folder: str, shape: dict = MODEL, rows: int = 8, prompt: int = 16,
                   new_tokens: int = 32, seed: int = 0) -> dict:
  """Writes the random Qwen2 of `shape` to `folder` with the first layer-weight scale in SCALES
  whose greedy rows are not degenerate; returns {scale, distinct_fraction per scale tried, ...}."""
  import numpy as np
  import torch
  import transformers
  config = transformers.Qwen2Config(
      vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
      head_dim=shape["head_dim"], tie_word_embeddings=shape["tie_word_embeddings"],
      rope_theta=1e6, max_position_embeddings=shape["max_position_embeddings"])
  prompts = np.random.RandomState(seed).randint(1, shape["vocab_size"], (rows, prompt)).tolist()
  tried = {}
  for scale in SCALES:
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
      for name, tensor in model.named_parameters():
        if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
          tensor.normal_(0.0, 0.1)
        if ".layers." in name and name.endswith("proj.weight"):
          tensor.mul_(scale)
    out = greedy_rows(model, prompts, new_tokens)
    tried[str(scale)] = distinct_fraction(out)
    if tried[str(scale)] >= MIN_DISTINCT_FRACTION:
      break
  else:
    raise RuntimeError(f"greedy rows stay degenerate at every scale: {tried}")
  model.save_pretrained(folder)
  return {"layer_weight_scale": scale, "qkv_bias_std": 0.1, "distinct_fraction_by_scale": tried,
          "distinct_tokens_in_greedy_rows": int(len(np.unique(out))),
          "greedy_check": {"rows": rows, "prompt": prompt, "new_tokens": new_tokens},
          "min_distinct_fraction": MIN_DISTINCT_FRACTION}


def summarise(raw: dict) -> dict:
  """Raw child times -> figures: per part, tunix seconds / ours per repeat (median, spread),
  and each side's throughput at the median."""
  out = {}
  for batch, part in raw.get("decode", {}).items():
    times = part["times_s"]
    out.setdefault("decode", {})[batch] = {
        "ours_tokens_per_s": part["tokens_per_call"] / common.spread(times["ours"])["median"],
        "tunix_tokens_per_s": part["tokens_per_call"] / common.spread(times["tunix"])["median"],
        "ours_over_tunix": common.speed_ratio(times["ours"], times["tunix"]),
        "agreement": part["agreement"]}
  if "agent" in raw:
    part, times = raw["agent"], raw["agent"]["times_s"]
    out["agent"] = {
        "ours_rows_per_s": part["rows"] / common.spread(times["ours"])["median"],
        "tunix_rows_per_s": part["rows"] / common.spread(times["tunix"])["median"],
        "ours_over_tunix": common.speed_ratio(times["ours"], times["tunix"]),
        "greedy_rows_equal_fraction": part["greedy_rows_equal_fraction"]}
  if "learner" in raw:
    times = raw["learner"]["times_s"]
    tokens = raw["learner"]["rows"] * (raw["learner"]["prompt"] + raw["learner"]["response"])
    out["learner"] = {
        "ours_step_s": common.spread(times["ours"])["median"],
        "tunix_step_s": common.spread(times["tunix"])["median"],
        "ours_tokens_per_s": tokens / common.spread(times["ours"])["median"],
        "ours_over_tunix": common.speed_ratio(times["ours"], times["tunix"]),
        "first_step": raw["learner"]["first_step"]}
  return out


def run_child(python: str, folder: str, args) -> dict:
  raw_path = os.path.join(folder, "raw.json")
  command = [python, os.path.abspath(__file__), "--child", folder, "--repeats",
             str(args.repeats), "--parts", args.parts] + (["--smoke"] if args.smoke else [])
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  subprocess.run(command, check=True, env=env, cwd=REPO)
  with open(raw_path) as f:
    return json.load(f)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--venv", default=DEFAULT_VENV, help="venv with google-tunix (made if missing)")
  parser.add_argument("--repeats", type=int, default=common.MIN_REPEATS)
  parser.add_argument("--parts", default=",".join(PARTS))
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (the test's run)")
  parser.add_argument("--name", default="", help="results name (default peers / peers_smoke)")
  parser.add_argument("--out_dir", default=common.RESULTS_DIR, help="where the JSON goes")
  parser.add_argument("--setup_only", action="store_true",
                      help="make (or check) the --venv, then stop")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # the folder, in the venv
  args = parser.parse_args(argv)
  parts = args.parts.split(",")
  if unknown := set(parts) - set(PARTS):
    raise SystemExit(f"--parts: unknown {sorted(unknown)}; use some of {','.join(PARTS)}")
  if args.child:
    import peers_measure  # pylint: disable=import-outside-toplevel  (needs tunix)
    peers_measure.measure(args.child, os.path.join(args.child, "raw.json"), args.smoke,
                          args.repeats, parts)
    return None
  if not args.smoke and args.repeats < common.MIN_REPEATS:
    raise SystemExit(f"--repeats {args.repeats}: the protocol asks for >= {common.MIN_REPEATS}")
  python = ensure_venv(args.venv)
  if args.setup_only:
    print(f"the peers venv {args.venv} holds every pin of {REQUIREMENTS}")
    return None
  protocol = common.Protocol()
  with tempfile.TemporaryDirectory() as folder:
    model = write_hf_model(folder, SMOKE_MODEL if args.smoke else MODEL)
    print(f"model: {model}", flush=True)
    raw = run_child(python, folder, args)
  figures = {"model": SMOKE_MODEL if args.smoke else MODEL, "model_check": model,
             "venv": args.venv, **summarise(raw), "raw": raw}
  path = common.save_results(args.name or ("peers_smoke" if args.smoke else "peers"), figures,
                             protocol, directory=args.out_dir)
  print(json.dumps({k: v for k, v in figures.items() if k not in ("raw",)}, indent=1))
  print(f"saved {path}")
  return path


if __name__ == "__main__":
  main()
