"""Checkpoints: keep-last-K, exact round trip, crash safety, params-only export, resharding."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from gru_mem import checkpoint
from gru_mem.model import config as model_config
from gru_mem.model import transformer

CONFIG = model_config.preset("tiny", num_layers=1)


_TX = optax.adamw(1e-2)
_init_params = jax.jit(lambda rng: transformer.init_params(CONFIG, rng))


@jax.jit
def _adamw_step(params, opt_state, grad_value):
  grads = jax.tree.map(lambda p: jnp.full_like(p, grad_value), params)
  updates, opt_state = _TX.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def train_state(step: int):
  """A state that differs per step: params, AdamW state after `step` real updates, rng, step."""
  params = _init_params(jax.random.PRNGKey(0))
  opt_state = _TX.init(params)
  for i in range(step):
    params, opt_state = _adamw_step(params, opt_state, 0.1 * (i + 1))
  return {"params": params, "opt_state": opt_state, "rng": jax.random.PRNGKey(100 + step),
          "step": jnp.asarray(step, jnp.int32)}


def experiment_config():
  config = ml_collections.ConfigDict()
  config.model = "tiny"
  config.lr = 1e-6
  config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
  config.model_config = CONFIG  # a dataclass inside: stored as its fields
  return config


def assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def save_three_steps(workdir, keep=2):
  states = {step: train_state(step) for step in (1, 2, 3)}
  with checkpoint.CheckpointManager(workdir, save_every=1, keep=keep) as manager:
    for step, state in states.items():
      assert manager.save(step, state, {"prompts_consumed": 8 * step, "epoch": 0, "seed": 7},
                          experiment_config())
  return states


def test_keeps_last_k_and_restores_exactly(tmp_path):
  states = save_three_steps(str(tmp_path), keep=2)
  manager = checkpoint.CheckpointManager(str(tmp_path), save_every=1, keep=2)
  assert manager.all_steps() == [2, 3]
  assert manager.latest_step() == 3
  assert sorted(os.listdir(checkpoint.checkpoint_dir(str(tmp_path)))) == ["2", "3"]

  for step in (None, 2):
    want = states[step or 3]
    state, data_position, config = manager.restore(
        step, abstract_state=checkpoint.abstract_like(want))
    assert_trees_equal(state, want)  # optax namedtuples come back as namedtuples
    assert isinstance(state["opt_state"][0], optax.ScaleByAdamState)
    assert data_position == {"prompts_consumed": 8 * (step or 3), "epoch": 0, "seed": 7}
    assert config["lr"] == 1e-6 and config["mesh"] == {"data": -1, "fsdp": 1, "tensor": 1}
    assert config["model_config"]["hidden_size"] == CONFIG.hidden_size

  # Without a target: same numbers, optax state as plain containers.
  state, _, _ = manager.restore()
  np.testing.assert_array_equal(state["rng"], states[3]["rng"])
  mu = state["opt_state"][0]["mu"]["layers_0"]["mlp"]["up_proj"]["kernel"]
  saved_mu = states[3]["opt_state"][0].mu["layers_0"]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_array_equal(mu, saved_mu)
  assert np.abs(mu).max() > 0  # real optimizer statistics, not zeros
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 1"):
    manager.restore(1)
  manager.close()


def test_save_every_and_force(tmp_path):
  state = train_state(0)
  with checkpoint.CheckpointManager(str(tmp_path), save_every=2, keep=5) as manager:
    assert not manager.save(1, state, {}, None)
    assert manager.save(2, state, {}, None)
    assert not manager.save(3, state, {}, None)
    assert manager.save(3, state, {}, None, force=True, wait=True)
    assert manager.all_steps() == [2, 3]


def test_crash_mid_save_keeps_latest_good_checkpoint(tmp_path):
  states = save_three_steps(str(tmp_path))
  # What a process killed while writing step 4 leaves: a temporary folder with part of the items.
  partial = os.path.join(checkpoint.checkpoint_dir(str(tmp_path)), "4.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(partial, "params"))
  with open(os.path.join(partial, "params", "garbage"), "wb") as f:
    f.write(b"\x00" * 100)

  reader = checkpoint.CheckpointManager(str(tmp_path), read_only=True)
  assert reader.latest_step() == 3
  assert os.path.isdir(partial)  # a reader never deletes
  reader.close()

  manager = checkpoint.CheckpointManager(str(tmp_path), save_every=1, keep=2)
  assert manager.latest_step() == 3
  state, data_position, _ = manager.restore(
      abstract_state=checkpoint.abstract_like(states[3]))
  assert_trees_equal(state, states[3])
  assert data_position["prompts_consumed"] == 24
  assert manager.save(4, states[1], {"prompts_consumed": 32}, None, wait=True)
  assert manager.all_steps() == [3, 4]
  # The writer removed the leftover (orbax does it in the background, before its first save).
  assert sorted(os.listdir(checkpoint.checkpoint_dir(str(tmp_path)))) == ["3", "4"]
  assert_trees_equal(manager.restore(4, checkpoint.abstract_like(states[1]))[0], states[1])
  manager.close()


def test_run_folder_reads_params_alone_and_resolves_steps(tmp_path):
  from gru_mem import run_folder
  states = save_three_steps(str(tmp_path))
  params = run_folder.load_params(str(tmp_path))
  assert_trees_equal(params, states[3]["params"])
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
  assert_trees_equal(run_folder.load_params(str(tmp_path), step=2), states[2]["params"])
  assert run_folder.resolve_step(str(tmp_path)) == 3
  assert run_folder.completed_steps(str(tmp_path)) == 3
  assert run_folder.completed_steps(str(tmp_path / "elsewhere")) is None
  with pytest.raises(FileNotFoundError, match="has no checkpoint for step 7; available: \\[2, 3\\]"):
    run_folder.resolve_step(str(tmp_path), 7)
  with pytest.raises(FileNotFoundError, match="elsewhere has no checkpoints/ folder"):
    run_folder.load_params(str(tmp_path / "elsewhere"))


def test_bad_inputs_fail_before_writing(tmp_path):
  manager = checkpoint.CheckpointManager(str(tmp_path), save_every=1)
  with pytest.raises(TypeError, match="typed PRNG key"):
    manager.save(1, {"rng": jax.random.key(0)}, {}, None)
  with pytest.raises(ValueError, match="reserved"):
    manager.save(1, {"config": jnp.zeros(2)}, {}, None)
  with pytest.raises(ValueError, match="save_every=0"):
    checkpoint.CheckpointManager(str(tmp_path), save_every=0)
  assert manager.latest_step() is None
  manager.close()


_RESHARD_SCRIPT = """
import jax, numpy as np, optax
from gru_mem import checkpoint, parallel
from gru_mem.model import config as model_config, transformer
from gru_mem.model import shardings as shardings_lib
workdir = {workdir!r}
config = model_config.preset('tiny', num_layers=1)
save_mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
params = shardings_lib.init_sharded_params(config, jax.random.PRNGKey(0), save_mesh)
with checkpoint.CheckpointManager(workdir, save_every=1) as manager:
  manager.save(1, {{'params': params}}, {{}}, None, wait=True)

load_mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
shardings = shardings_lib.param_shardings(config, load_mesh)
target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      params, shardings)
manager = checkpoint.CheckpointManager(workdir, save_every=1)
state, _, _ = manager.restore(abstract_state={{'params': target}})
manager.close()
for got, want, sharding in zip(jax.tree.leaves(state['params']), jax.tree.leaves(params),
                               jax.tree.leaves(shardings)):
  assert got.sharding.is_equivalent_to(sharding, got.ndim), (got.sharding, sharding)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
embed = state['params']['embed_tokens']
assert embed.addressable_shards[0].data.shape == (config.vocab_size // 2, config.hidden_size // 2)
print('ok')
"""


def test_restore_onto_a_different_mesh(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  script = textwrap.dedent(_RESHARD_SCRIPT.format(workdir=str(tmp_path)))
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "ok" in result.stdout


def test_params_saved_across_8_devices_restore_whole_on_a_one_device_process(tmp_path):
  """A run on another device count (a multi-host job, an 8-GPU node) is read back on a laptop:
  every array comes back whole and equal to what was saved."""
  from conftest import run_on_8_fake_devices  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  run_on_8_fake_devices(f"""
import json, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gru_mem import checkpoint
mesh = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
params = {{"w": jax.device_put(np.arange(64, dtype=np.float32).reshape(16, 4),
                               NamedSharding(mesh, P("fsdp", None))),
           "b": jax.device_put(np.ones(3, np.float32), NamedSharding(mesh, P()))}}
with checkpoint.CheckpointManager({workdir!r}, save_every=1) as manager:
  manager.save(1, {{"params": params}}, {{}}, force=True, wait=True)
print("RESULT" + json.dumps({{"devices": len(params["w"].sharding.device_set)}}))
""")
  assert len(jax.devices()) == 1
  with checkpoint.CheckpointManager(workdir, read_only=True) as manager:
    restored = manager.restore_params()
  np.testing.assert_array_equal(np.asarray(restored["w"]),
                                np.arange(64, dtype=np.float32).reshape(16, 4))
  np.testing.assert_array_equal(np.asarray(restored["b"]), np.ones(3, np.float32))
