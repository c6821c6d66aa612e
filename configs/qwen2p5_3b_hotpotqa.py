r"""GRU-Mem RL on HotpotQA with Qwen2.5-3B-Instruct: the 7B experiment with the smaller model.

  python -m gru_mem.dry_run --config configs/qwen2p5_3b_hotpotqa.py:tpu_v5p_64
  python -m gru_mem.train --config configs/qwen2p5_3b_hotpotqa.py:h100x8 --workdir runs/3b \
      --config.model.hf_path=/models/Qwen2.5-3B-Instruct \
      --config.data.hotpotqa_path=/data/hotpot_train_v1.1.json

Targets (h100x8, tpu_v5p_64), paper hyper-parameters and numerics as in qwen2p5_7b_hotpotqa.py.
With 2 kv heads, tensor=4 keeps the k/v projections replicated over the tensor axis. The
rollout copy therefore uses tensor=2 (data over the rest): its KV cache is split over both kv
heads, and the cache, not the 3 GB of bfloat16 weights, is what a decode step mostly reads.
"""

import importlib.util
import os


def _load_sibling(name: str):
  """The experiment file `name`.py next to this one (config files are loaded by path, so
  `configs` need not be an importable package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"gru_mem_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


qwen2p5_7b_hotpotqa = _load_sibling("qwen2p5_7b_hotpotqa")

MODEL_PLACEHOLDER = "/path/to/Qwen2.5-3B-Instruct"  # a local HF folder; set with --config.model.hf_path


def get_config(arg: str = "h100x8"):
  c = qwen2p5_7b_hotpotqa.get_config(arg)
  c.model.preset = "qwen2.5-3b"
  c.model.hf_path = MODEL_PLACEHOLDER
  c.sampling.mesh.tensor = 2  # = the kv heads (see the module docstring)
  return c
