"""Hugging Face checkpoint import/export (safetensors only; nothing is ever unpickled).

HF name (per layer i)                       ours (`layers_{i}/...`, or `layers/...` when scanned)
model.embed_tokens.weight [V, E]            embed_tokens [V, E]
model.layers.i.self_attn.q_proj.weight      self_attn/q_proj/kernel [E, H, D]   (transpose, split)
model.layers.i.self_attn.q_proj.bias        self_attn/q_proj/bias [H, D]
  (k_proj, v_proj the same with KV heads)
model.layers.i.self_attn.o_proj.weight      self_attn/o_proj/kernel [H, D, E]
model.layers.i.mlp.{gate,up}_proj.weight    mlp/{gate,up}_proj/kernel [E, F]
model.layers.i.mlp.down_proj.weight         mlp/down_proj/kernel [F, E]
model.layers.i.{input,post_attention}_layernorm.weight   .../weight [E]
model.norm.weight                           norm/weight [E]
lm_head.weight [V, E]                       lm_head [E, V]   (absent when embeddings are tied)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from gru_mem.model import transformer
from gru_mem.model.config import DTYPES, ModelConfig, from_hf_config, to_hf_config

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


def _layer_tensors(config: ModelConfig) -> list[tuple[str, tuple, Callable, Callable]]:
  """(HF suffix, our path inside a layer, hf->ours, ours->hf) for every per-layer tensor."""
  e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim

  def proj_in(heads):  # HF [heads*d, e] -> ours [e, heads, d]
    return (lambda w: w.T.reshape(e, heads, d)), (lambda k: k.reshape(e, heads * d).T)

  def bias(heads):
    return (lambda b: b.reshape(heads, d)), (lambda b: b.reshape(heads * d))

  transposed = (lambda w: w.T), (lambda k: k.T)
  same = (lambda w: w), (lambda w: w)
  out = [
      ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), *proj_in(h)),
      ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), *bias(h)),
      ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), *proj_in(kv)),
      ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), *bias(kv)),
      ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), *proj_in(kv)),
      ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), *bias(kv)),
      ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"),
       lambda w: w.T.reshape(h, d, e), lambda k: k.reshape(h * d, e).T),
      ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), *transposed),
      ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), *transposed),
      ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), *transposed),
      ("input_layernorm.weight", ("input_layernorm", "weight"), *same),
      ("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), *same),
  ]
  return out


def _hf_shapes(config: ModelConfig) -> dict[str, tuple]:
  e, h, kv, d, f = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                    config.intermediate_size)
  per_layer = {
      "self_attn.q_proj.weight": (h * d, e), "self_attn.q_proj.bias": (h * d,),
      "self_attn.k_proj.weight": (kv * d, e), "self_attn.k_proj.bias": (kv * d,),
      "self_attn.v_proj.weight": (kv * d, e), "self_attn.v_proj.bias": (kv * d,),
      "self_attn.o_proj.weight": (e, h * d),
      "mlp.gate_proj.weight": (f, e), "mlp.up_proj.weight": (f, e), "mlp.down_proj.weight": (e, f),
      "input_layernorm.weight": (e,), "post_attention_layernorm.weight": (e,),
  }
  shapes = {"model.embed_tokens.weight": (config.vocab_size, e), "model.norm.weight": (e,)}
  if not config.tie_word_embeddings:
    shapes["lm_head.weight"] = (config.vocab_size, e)
  for i in range(config.num_layers):
    for suffix, shape in per_layer.items():
      shapes[f"model.layers.{i}.{suffix}"] = shape
  return shapes


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _safetensors_files(path: str) -> dict[str, str]:
  """Maps every tensor name to the safetensors file holding it."""
  index_path = os.path.join(path, SAFE_INDEX)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index_path}: no 'weight_map' object; the index is malformed")
    missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(path, v))})
    if missing:
      raise FileNotFoundError(f"{index_path} names shard files that are not in {path}: {missing}")
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, SAFE_SINGLE)
  if os.path.exists(single):
    with safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}
  pickles = [p for p in PICKLE_FILES if os.path.exists(os.path.join(path, p))]
  if pickles:
    raise ValueError(
        f"{path} holds a pickle checkpoint ({pickles[0]}) and no safetensors: gru_mem never unpickles "
        "weights. Convert it once with transformers (from_pretrained(...).save_pretrained(dir, "
        "safe_serialization=True)) in an environment you trust.")
  raise FileNotFoundError(f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX} found")


def read_hf_config(path: str) -> dict:
  config_path = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"HF checkpoint folder {path!r} does not exist")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{path} has no config.json: point at an HF model folder")
  with open(config_path) as f:
    return json.load(f)


def load_hf_checkpoint(path: str, dtype: str = "float32", **config_overrides
                       ) -> tuple[ModelConfig, Any]:
  """Reads a local HF Qwen2 folder into (ModelConfig, params) with params stored as `dtype`.

  Every tensor's presence and shape is checked against the config before any array is built, so a
  bad folder fails with the file and key named and nothing half-loaded.
  """
  config = from_hf_config(read_hf_config(path), param_dtype=dtype, **config_overrides)
  files = _safetensors_files(path)
  expected = _hf_shapes(config)
  missing = [name for name in expected if name not in files]
  if missing:
    raise KeyError(f"{path}: tensors missing from the checkpoint: {missing[:5]}"
                   f"{' ...' if len(missing) > 5 else ''}")
  handles = {}
  try:
    for file in sorted(set(files[name] for name in expected)):
      handles[file] = safe_open(file, framework="numpy")
    for name, shape in expected.items():
      found = tuple(handles[files[name]].get_slice(name).get_shape())
      if found != shape:
        raise ValueError(f"{files[name]}: tensor {name} has shape {found}, the config implies {shape}")
    np_dtype = np.dtype(jnp.dtype(DTYPES[dtype]))
    read = lambda name: handles[files[name]].get_tensor(name)
    params = _hf_to_params(config, read, np_dtype)
  finally:
    handles.clear()
  if config.scan_layers:
    params = transformer.stack_layers(params, config.num_layers)
  return config, params


def _hf_to_params(config: ModelConfig, read: Callable[[str], np.ndarray], np_dtype) -> dict:
  def convert(x):
    return jnp.asarray(np.asarray(x, np.float32).astype(np_dtype))

  params: dict = {"embed_tokens": convert(read("model.embed_tokens.weight")),
                  "norm": {"weight": convert(read("model.norm.weight"))}}
  if not config.tie_word_embeddings:
    params["lm_head"] = convert(read("lm_head.weight").T)
  for i in range(config.num_layers):
    for suffix, path, to_ours, _ in _layer_tensors(config):
      _set(params, (f"layers_{i}", *path), convert(to_ours(read(f"model.layers.{i}.{suffix}"))))
  return params


def params_to_hf(config: ModelConfig, params) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF tensor name, numpy array) in HF layout, one tensor at a time."""
  params = jax.tree.map(lambda x: x, params)
  if "layers" in params:
    params = transformer.unstack_layers(params, config.num_layers)
  yield "model.embed_tokens.weight", np.asarray(params["embed_tokens"])
  for i in range(config.num_layers):
    for suffix, path, _, to_hf in _layer_tensors(config):
      yield f"model.layers.{i}.{suffix}", np.asarray(to_hf(np.asarray(_get(params[f"layers_{i}"], path))))
  yield "model.norm.weight", np.asarray(params["norm"]["weight"])
  if not config.tie_word_embeddings:
    yield "lm_head.weight", np.asarray(params["lm_head"]).T


def save_hf_checkpoint(config: ModelConfig, params, out_dir: str, tokenizer=None,
                       max_shard_bytes: int = 2 * 1024**3, generation_config: Optional[dict] = None
                       ) -> str:
  """Writes an HF folder that `AutoModelForCausalLM.from_pretrained(out_dir)` loads.

  config.json, safetensors shards of at most `max_shard_bytes` with their index,
  generation_config.json and, when given, the tokenizer files. The folder is written beside
  `out_dir` and renamed into place at the end, so a crash never leaves a half-written export.
  """
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; an export is an ordinary folder
  try:
    _write_shards(config, params, staging, max_shard_bytes)
    eos = tokenizer.eos_id if tokenizer is not None else None
    hf_config = to_hf_config(config, **({"eos_token_id": eos, "bos_token_id": eos} if eos is not None else {}))
    with open(os.path.join(staging, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    gen = {"_from_model_config": True}
    if eos is not None:
      gen.update(eos_token_id=eos, bos_token_id=eos, pad_token_id=tokenizer.pad_id)
    gen.update(generation_config or {})
    with open(os.path.join(staging, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)
    if tokenizer is not None:
      tokenizer.save(staging)
    _swap_into_place(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out_dir


def _swap_into_place(staging: str, out_dir: str) -> None:
  """Renames `staging` to `out_dir`; an existing `out_dir` is put back if the rename fails."""
  if not os.path.exists(out_dir):
    os.rename(staging, out_dir)
    return
  backup = staging + ".old"  # unique: staging's name came from mkdtemp
  os.rename(out_dir, backup)
  try:
    os.rename(staging, out_dir)
  except BaseException:
    os.rename(backup, out_dir)
    raise
  shutil.rmtree(backup)


def _write_shards(config: ModelConfig, params, out_dir: str, max_shard_bytes: int) -> None:
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in params_to_hf(config, params):
    array = np.ascontiguousarray(array)
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  total = sum(a.nbytes for shard in shards for a in shard.values())
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, SAFE_SINGLE), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in shard})
  with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
