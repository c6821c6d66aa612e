"""Shared test fixtures: sample-data location, tiny HF reference models."""

import os

# Quiet TensorFlow (pulled in by seqio) and keep JAX on the CPU.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample_data_dir() -> str:
  """The folder GRU_MEM_SAMPLE_DATA names ("" when unset: the tests that need it skip)."""
  return os.environ.get("GRU_MEM_SAMPLE_DATA", "")


@pytest.fixture
def sample_data():
  """The folder of real public samples; a missing folder skips, except under CI=true where it fails."""
  path = sample_data_dir()
  if not os.path.isdir(path):
    if os.environ.get("CI") == "true":
      pytest.fail(f"sample data folder {path!r} is missing (set GRU_MEM_SAMPLE_DATA)")
    pytest.skip(f"sample data folder {path!r} not found (set GRU_MEM_SAMPLE_DATA)")
  return path


def tiny_hf_model(seed: int = 0, **overrides):
  """A random transformers Qwen2ForCausalLM (fp32, eval mode) for parity checks."""
  import torch
  import transformers
  kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e4,
                tie_word_embeddings=False, max_position_embeddings=512)
  kwargs.update(overrides)
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs)).eval()
  # Random (not zero) biases, so a mis-mapped bias is caught.
  with torch.no_grad():
    for layer in model.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        proj.bias.normal_(0, 0.5)
      for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        norm.weight.normal_(1, 0.2)
  return model


@pytest.fixture
def hf_model_dir(tmp_path):
  """Saves a tiny random Qwen2 to a temp folder; returns (folder, torch model)."""
  def make(seed: int = 0, **overrides):
    model = tiny_hf_model(seed, **overrides)
    folder = tmp_path / f"hf_{seed}_{abs(hash(tuple(sorted(overrides.items()))))}"
    model.save_pretrained(folder)
    return str(folder), model
  return make


def run_on_8_fake_devices(script: str, timeout: int = 600) -> dict:
  """Runs `script` in a fresh process with 8 fake CPU devices (XLA optimisation level 0, which
  compiles 3-4x faster; every run compared shares it) and returns the dict it printed after
  "RESULT"."""
  import json, subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  return json.loads(line[len("RESULT"):])

