"""Model hyper-parameters for the Qwen2 family, with presets and HF config conversion."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from gru_mem.model.attention import IMPLEMENTATIONS
from gru_mem.model.kv_cache import check_kv_cache_dtype

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SUPPORTED_MODEL_TYPES = ("qwen2",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Qwen2-style decoder.

  `param_dtype` is how weights are stored, `dtype` the dtype matmuls run in
  (norms, softmax and the final logits always run in float32). `attention` picks the attention
  implementation (`attention.py`); it changes speed and memory, not the function computed.
  """

  vocab_size: int = 151936
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_layers: int = 24
  num_heads: int = 14
  num_kv_heads: int = 2
  head_dim: int = 64
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 32768
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  attention: str = "auto"  # an attention.IMPLEMENTATIONS name (how, not what: no HF counterpart)
  kv_cache_dtype: str = "auto"  # the KV cache's storage, a kv_cache.KV_CACHE_DTYPES name

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)}: must be >= 1")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}: grouped-query attention needs it to be")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim}: rotary embeddings need an even head_dim")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat_policy={self.remat_policy!r}: use one of {REMAT_POLICIES}")
    if self.attention not in IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.attention={self.attention!r}: use one of {IMPLEMENTATIONS}")
    check_kv_cache_dtype(self.kv_cache_dtype, "ModelConfig.kv_cache_dtype")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: use one of {tuple(DTYPES)}")

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def queries_per_kv_head(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
    q = self.num_heads * self.head_dim
    attention = h * q + q + 2 * (h * kv + kv) + q * h
    mlp = 3 * h * self.intermediate_size
    per_layer = attention + mlp + 2 * h
    embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * per_layer + embeddings + h


# Shapes of the public Qwen2.5 checkpoints (the paper fine-tunes the 3B and 7B Instruct models).
PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": ModelConfig(),
    "qwen2.5-1.5b": ModelConfig(hidden_size=1536, intermediate_size=8960, num_layers=28,
                                num_heads=12, num_kv_heads=2, head_dim=128),
    "qwen2.5-3b": ModelConfig(hidden_size=2048, intermediate_size=11008, num_layers=36,
                              num_heads=16, num_kv_heads=2, head_dim=128),
    "qwen2.5-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                              tie_word_embeddings=False),
    "qwen2.5-14b": ModelConfig(vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                               num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
                               rms_norm_eps=1e-5, tie_word_embeddings=False),
    # A model small enough to train from scratch on a laptop CPU.
    "tiny": ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=192, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0,
                        tie_word_embeddings=True, max_position_embeddings=4096),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}: use one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def from_hf_config(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """Builds a ModelConfig from an HF `config.json` dict (or a transformers config's to_dict())."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is not supported: gru_mem implements "
                     f"{SUPPORTED_MODEL_TYPES} (Qwen2 / Qwen2.5 checkpoints)")
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads") if k not in hf]
  if missing:
    raise ValueError(f"HF config is missing {missing}")
  num_heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      rope_theta=float(_rope_theta(hf)),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def _rope_theta(hf: Mapping[str, Any]) -> float:
  if "rope_theta" in hf:
    return hf["rope_theta"]
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", None):
    raise ValueError(f"rope_type={rope_type!r} is not supported: only default rotary embeddings are")
  return rope.get("rope_theta", 10_000.0)


def to_hf_config(config: ModelConfig, **extra: Any) -> dict[str, Any]:
  """The `config.json` dict that transformers' Qwen2ForCausalLM reads back to the same model."""
  hf = {
      "architectures": ["Qwen2ForCausalLM"],
      "model_type": "qwen2",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      "rms_norm_eps": config.rms_norm_eps,
      "tie_word_embeddings": config.tie_word_embeddings,
      "max_position_embeddings": config.max_position_embeddings,
      "attention_dropout": 0.0,
      "use_sliding_window": False,
      "use_cache": True,
      "torch_dtype": config.param_dtype,
      "dtype": config.param_dtype,
  }
  hf.update(extra)
  return hf
