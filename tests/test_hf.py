"""HF import/export against transformers' own Qwen2ForCausalLM (the independent reference)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from conftest import tiny_hf_model
from gru_mem.model import hf, transformer

VOCAB = 97


def _tokens_and_mask(batch=3, length=13, seed=0):
  """Random tokens with left padding: row b has `2 * b` pad slots (pad id 0)."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(1, VOCAB, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), bool)
  for b in range(batch):
    mask[b, :2 * b] = False
  return np.where(mask, tokens, 0), mask


def _hf_logits(model, tokens, mask):
  """transformers' logits with the positions its generate() uses for left padding."""
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(config, params, tokens, mask):
  return transformer.forward(config, params, tokens, mask=mask)[0]


def _our_logits(config, params, tokens, mask):
  return np.asarray(_jit_forward(config, params, jnp.asarray(tokens), jnp.asarray(mask)))


def _flat(params):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _assert_params_equal(a, b):
  flat_a, flat_b = _flat(a), _flat(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    assert flat_a[key].dtype == flat_b[key].dtype, key
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


# (num_heads, num_kv_heads, head_dim, tied, rope_theta): query/kv ratios 1, 2, 4; head_dims that
# are not hidden_size / num_heads (32 / heads); both rope bases.
PARITY_CASES = [
    (4, 4, 8, False, 1e4),
    (4, 2, 10, True, 1e6),
    (8, 2, 14, False, 1e6),
    (8, 2, 6, True, 1e4),
    (6, 3, 12, False, 1e4),
    (4, 1, 16, True, 1e6),
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,tied,rope_theta", PARITY_CASES)
def test_logits_match_transformers(hf_model_dir, heads, kv_heads, head_dim, tied, rope_theta):
  folder, model = hf_model_dir(seed=heads + head_dim, num_attention_heads=heads,
                               num_key_value_heads=kv_heads, head_dim=head_dim,
                               tie_word_embeddings=tied, rope_theta=rope_theta)
  config, params = hf.load_hf_checkpoint(folder)
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (heads, kv_heads, head_dim)
  assert (config.tie_word_embeddings, config.rope_theta) == (tied, rope_theta)
  assert ("lm_head" in params) == (not tied)
  tokens, mask = _tokens_and_mask(batch=3, length=24, seed=heads)
  ours = _our_logits(config, params, tokens, mask)
  ref = _hf_logits(model, tokens, mask)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0)
  # The reference logits are far from zero, so a 1e-4 match is not trivially met.
  assert np.abs(ref[mask]).max() > 0.1


def test_left_padding_does_not_change_real_tokens(hf_model_dir):
  """A left-padded row gives the logits of the same row run alone without padding."""
  folder, _ = hf_model_dir(seed=3)
  config, params = hf.load_hf_checkpoint(folder)
  tokens, mask = _tokens_and_mask(batch=3, length=11, seed=1)
  padded = _our_logits(config, params, tokens, mask)
  alone = _our_logits(config, params, tokens[2:, 4:], mask[2:, 4:])
  np.testing.assert_allclose(padded[2, 4:], alone[0], atol=1e-5, rtol=0)


def test_save_round_trip_through_transformers(hf_model_dir, tmp_path):
  folder, model = hf_model_dir(seed=5)
  config, params = hf.load_hf_checkpoint(folder)
  out = hf.save_hf_checkpoint(config, params, str(tmp_path / "export"))
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", hf.SAFE_SINGLE]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert isinstance(reloaded, transformers.Qwen2ForCausalLM)
  tokens, mask = _tokens_and_mask(seed=2)
  np.testing.assert_allclose(_hf_logits(reloaded, tokens, mask)[mask],
                             _hf_logits(model, tokens, mask)[mask], atol=1e-5, rtol=0)
  config_again, params_again = hf.load_hf_checkpoint(out)
  assert config_again == config
  _assert_params_equal(params_again, params)


def test_multi_shard_export_writes_an_index(hf_model_dir, tmp_path):
  folder, model = hf_model_dir(seed=6, tie_word_embeddings=True)
  config, params = hf.load_hf_checkpoint(folder)
  out = hf.save_hf_checkpoint(config, params, str(tmp_path / "sharded"), max_shard_bytes=20_000)
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  with open(os.path.join(out, hf.SAFE_INDEX)) as f:
    index = json.load(f)
  assert sorted(set(index["weight_map"].values())) == shards
  stored = {}
  for shard in shards:
    stored.update(load_file(os.path.join(out, shard)))
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in stored.values())
  # Every tensor transformers expects is there (tied: no lm_head), each shard within the limit
  # unless it holds a single larger tensor.
  expected = {name for name in model.state_dict() if name != "lm_head.weight"}
  assert set(stored) == expected
  for shard in shards:
    arrays = load_file(os.path.join(out, shard))
    assert len(arrays) == 1 or sum(a.nbytes for a in arrays.values()) <= 20_000
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens, mask = _tokens_and_mask(seed=3)
  np.testing.assert_allclose(_hf_logits(reloaded, tokens, mask)[mask],
                             _hf_logits(model, tokens, mask)[mask], atol=1e-5, rtol=0)
  _assert_params_equal(hf.load_hf_checkpoint(out)[1], params)


def test_bfloat16_round_trip(hf_model_dir, tmp_path):
  folder, model = hf_model_dir(seed=7)
  config, params = hf.load_hf_checkpoint(folder, dtype="bfloat16")
  assert config.param_dtype == "bfloat16"
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
  out = hf.save_hf_checkpoint(config, params, str(tmp_path / "bf16"))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  # transformers sees exactly the fp32 reference weights rounded to bfloat16.
  original = model.state_dict()
  for name, tensor in reloaded.state_dict().items():
    assert tensor.dtype == torch.bfloat16, name
    assert torch.equal(tensor, original[name].to(torch.bfloat16)), name
  config_again, params_again = hf.load_hf_checkpoint(out, dtype="bfloat16")
  assert config_again == config
  _assert_params_equal(params_again, params)


def test_scanned_params_export_like_unscanned(hf_model_dir, tmp_path):
  folder, _ = hf_model_dir(seed=8)
  config, params = hf.load_hf_checkpoint(folder, scan_layers=True)
  assert "layers" in params and params["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == 2
  out = hf.save_hf_checkpoint(config, params, str(tmp_path / "scanned"))
  for name, array in load_file(os.path.join(folder, hf.SAFE_SINGLE)).items():
    np.testing.assert_array_equal(load_file(os.path.join(out, hf.SAFE_SINGLE))[name], array)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file or key, raised before any parameter array is built.


@pytest.fixture
def no_params_built(monkeypatch):
  """Fails the test if load_hf_checkpoint starts converting tensors into parameters."""
  def refuse(*args, **kwargs):
    raise AssertionError("parameters were built before the checkpoint was validated")
  monkeypatch.setattr(hf, "_hf_to_params", refuse)


def _write_state(folder, tensors):
  save_file({k: v.detach().numpy() for k, v in tensors.items()},
            os.path.join(folder, hf.SAFE_SINGLE), metadata={"format": "pt"})


def test_missing_config_json(hf_model_dir, no_params_built):
  folder, _ = hf_model_dir()
  os.remove(os.path.join(folder, "config.json"))
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    hf.load_hf_checkpoint(folder)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load_hf_checkpoint(os.path.join(folder, "nowhere"))


def test_unsupported_model_type(hf_model_dir, no_params_built):
  folder, _ = hf_model_dir()
  config_path = os.path.join(folder, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config["model_type"] = "llama"
  with open(config_path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"model_type='llama' is not supported"):
    hf.load_hf_checkpoint(folder)


def test_missing_tensor_is_named(hf_model_dir, no_params_built):
  folder, model = hf_model_dir()
  state = dict(model.state_dict())
  del state["model.layers.1.mlp.up_proj.weight"]
  _write_state(folder, state)
  with pytest.raises(KeyError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.load_hf_checkpoint(folder)


def test_shape_mismatch_names_file_and_tensor(hf_model_dir, no_params_built):
  folder, model = hf_model_dir()
  state = dict(model.state_dict())
  state["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(5)
  _write_state(folder, state)
  with pytest.raises(ValueError) as error:
    hf.load_hf_checkpoint(folder)
  message = str(error.value)
  assert hf.SAFE_SINGLE in message and "model.layers.0.self_attn.k_proj.bias" in message
  assert "(5,)" in message and "(16,)" in message


def test_missing_shard_file_is_named(hf_model_dir, tmp_path, no_params_built):
  folder, _ = hf_model_dir()
  with open(os.path.join(folder, hf.SAFE_INDEX), "w") as f:
    json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    hf.load_hf_checkpoint(folder)


def test_pickle_checkpoint_is_refused(hf_model_dir, no_params_built):
  folder, model = hf_model_dir()
  os.remove(os.path.join(folder, hf.SAFE_SINGLE))
  torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
  with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never unpickles"):
    hf.load_hf_checkpoint(folder)


def test_folder_without_weights(hf_model_dir, no_params_built):
  folder, _ = hf_model_dir()
  os.remove(os.path.join(folder, hf.SAFE_SINGLE))
  with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
    hf.load_hf_checkpoint(folder)


# ---------------------------------------------------------------------------------------------
# A failed export never loses the folder it would have replaced.


def _snapshot(folder):
  contents = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      contents[name] = f.read()
  return contents


@pytest.fixture
def previous_export(hf_model_dir, tmp_path):
  folder, _ = hf_model_dir(seed=9)
  config, params = hf.load_hf_checkpoint(folder)
  out = hf.save_hf_checkpoint(config, params, str(tmp_path / "exports" / "model"))
  return config, params, out, _snapshot(out)


def test_failed_write_keeps_old_export(previous_export, monkeypatch):
  config, params, out, before = previous_export

  def broken_writer(*args, **kwargs):
    raise OSError("disk full (simulated)")
  monkeypatch.setattr(hf, "_write_shards", broken_writer)
  zeroed = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(OSError, match="simulated"):
    hf.save_hf_checkpoint(config, zeroed, out)
  assert _snapshot(out) == before
  assert os.listdir(os.path.dirname(out)) == ["model"]  # no staging or backup folder left


def test_failed_final_rename_restores_old_export(previous_export, monkeypatch):
  config, params, out, before = previous_export
  real_rename = os.rename
  failed = []

  def rename(src, dst):  # the first rename onto `out` (the new folder's) fails
    if dst == out and not failed:
      failed.append(src)
      raise OSError("rename failed (simulated)")
    return real_rename(src, dst)
  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(OSError, match="simulated"):
    hf.save_hf_checkpoint(config, jax.tree.map(jnp.zeros_like, params), out)
  assert os.path.basename(failed[0]).startswith(".export-")
  assert _snapshot(out) == before
  assert os.listdir(os.path.dirname(out)) == ["model"]


def test_overwrite_replaces_old_export(previous_export):
  config, params, out, before = previous_export
  halved = jax.tree.map(lambda x: x / 2, params)
  hf.save_hf_checkpoint(config, halved, out)
  assert _snapshot(out) != before
  _assert_params_equal(hf.load_hf_checkpoint(out)[1], halved)
  assert os.listdir(os.path.dirname(out)) == ["model"]
