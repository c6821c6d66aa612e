"""Mesh, sharding rules and sharded forward on 8 fake CPU devices.

The sharded checks run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8,
so this pytest process keeps its single device.
"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from gru_mem import parallel

_PRELUDE = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from gru_mem import parallel
from gru_mem.model import config as model_config, transformer
from gru_mem.model import shardings as shardings_lib
assert jax.device_count() == 8, jax.devices()
mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
"""


def run_on_8_devices(body: str) -> str:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body)], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def test_mesh_sizes_fill_and_errors():
  assert parallel._fill_mesh_sizes({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {
      "data": 2, "fsdp": 2, "tensor": 2}
  assert parallel._fill_mesh_sizes({"data": 1, "fsdp": -1, "tensor": 1}, 8)["fsdp"] == 8
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    parallel._fill_mesh_sizes({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="multiply to 4 but there are 8 devices"):
    parallel._fill_mesh_sizes({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    parallel._fill_mesh_sizes({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="must be >= 1"):
    parallel._fill_mesh_sizes({"data": 0, "fsdp": 1, "tensor": 1}, 8)
  mesh = parallel.make_mesh()  # this process: one device
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_fit_spec_replicates_dims_that_do_not_divide():
  class FakeMesh:
    shape = {"data": 2, "fsdp": 2, "tensor": 4}
  P = parallel.P
  assert parallel.fit_spec_to_shape(P("fsdp", "tensor"), (8, 2), FakeMesh) == P("fsdp", None)
  assert parallel.fit_spec_to_shape(P(("data", "fsdp"), None), (2, 3), FakeMesh) == P("data", None)
  assert parallel.fit_spec_to_shape(P(("data", "fsdp")), (8, 5), FakeMesh) == P(("data", "fsdp"),
                                                                                 None)


def test_mesh_on_8_devices():
  run_on_8_devices("""
  assert dict(parallel.make_mesh(data=-1, fsdp=2, tensor=2).shape) == {
      'data': 2, 'fsdp': 2, 'tensor': 2}
  assert dict(parallel.make_mesh(tensor=4).shape) == {'data': 2, 'fsdp': 1, 'tensor': 4}
  assert dict(parallel.mesh_from_config({'data': 1, 'fsdp': -1, 'tensor': 2}).shape) == {
      'data': 1, 'fsdp': 4, 'tensor': 2}
  try:
    parallel.make_mesh(data=3, fsdp=1, tensor=2)
    raise AssertionError('expected an error for 3*1*2 != 8')
  except ValueError as e:
    assert 'multiply to 6 but there are 8 devices' in str(e), e
  # Per-host feeding on one process: this host loads every row; same array as shard_batch.
  assert parallel.host_local_batch_slice(8, mesh) == slice(0, 8)
  rows = np.arange(8 * 3).reshape(8, 3)
  global_rows = parallel.make_global_array({'x': rows}, mesh)['x']
  assert global_rows.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 2)
  np.testing.assert_array_equal(np.asarray(global_rows), rows)
  assert global_rows.addressable_shards[0].data.shape == (2, 3)
  try:
    parallel.shard_batch({'x': np.zeros((6, 2))}, mesh)
    raise AssertionError('expected an error for batch 6 on data*fsdp=4')
  except ValueError as e:
    assert 'not divisible by data*fsdp = 4' in str(e), e
  # The learner's [micro, rows, ...] layout: rows (dim 1) split, a 0-d row count replicated.
  learner_batch = parallel.shard_batch({'tokens': np.zeros((2, 8, 5)), 'num_rows': np.int32(7)},
                                       mesh, batch_axis=1)
  assert learner_batch['tokens'].sharding.spec == P(None, ('data', 'fsdp'))
  assert learner_batch['tokens'].addressable_shards[0].data.shape == (2, 2, 5)
  assert learner_batch['num_rows'].sharding.is_fully_replicated
  try:
    parallel.shard_batch({'x': np.zeros((2, 6))}, mesh, batch_axis=1)
    raise AssertionError('expected an error for 6 rows on data*fsdp=4')
  except ValueError as e:
    assert 'dim 1 of shape (2, 6) is not divisible by data*fsdp = 4' in str(e), e
  """)


def test_parallel_does_not_import_the_model():
  import ast  # pylint: disable=import-outside-toplevel
  tree = ast.parse(open(parallel.__file__).read())
  imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
              for alias in node.names]
  imported += [node.module or '' for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
  assert not [name for name in imported if name.startswith('gru_mem')], imported


def test_param_and_optimizer_state_shardings():
  run_on_8_devices("""
  config = model_config.preset('tiny')
  shardings = shardings_lib.param_shardings(config, mesh)
  spec = lambda s: tuple(s.spec)
  attn = shardings['layers_0']['self_attn']
  expected = {
      'embed_tokens': (('tensor', 'fsdp'), shardings['embed_tokens']),
      'q_proj kernel': (('fsdp', 'tensor', None), attn['q_proj']['kernel']),
      'q_proj bias': (('tensor', None), attn['q_proj']['bias']),
      'k_proj kernel': (('fsdp', 'tensor', None), attn['k_proj']['kernel']),
      'o_proj kernel': (('tensor', None, 'fsdp'), attn['o_proj']['kernel']),
      'gate_proj kernel': (('fsdp', 'tensor'), shardings['layers_0']['mlp']['gate_proj']['kernel']),
      'down_proj kernel': (('tensor', 'fsdp'), shardings['layers_0']['mlp']['down_proj']['kernel']),
      'norm weight': ((None,), shardings['norm']['weight']),
  }
  for name, (want, got) in expected.items():
    assert spec(got) == want, (name, got.spec)

  # One kv head cannot be split over tensor=2: that dim is replicated, the rest still sharded.
  one_kv = shardings_lib.param_shardings(config.replace(num_kv_heads=1), mesh)
  assert spec(one_kv['layers_0']['self_attn']['k_proj']['kernel']) == ('fsdp', None, None)
  assert spec(one_kv['layers_0']['self_attn']['q_proj']['kernel']) == ('fsdp', 'tensor', None)
  # Scanned layers get a replicated leading 'layers' dim.
  scanned = shardings_lib.param_shardings(config.replace(scan_layers=True), mesh)
  assert spec(scanned['layers']['self_attn']['q_proj']['kernel']) == (None, 'fsdp', 'tensor', None)
  # Untied head: lm_head [embed, vocab].
  untied = shardings_lib.param_shardings(config.replace(tie_word_embeddings=False), mesh)
  assert spec(untied['lm_head']) == ('fsdp', 'tensor')

  params = jax.jit(lambda r: transformer.init_params(config, r))(jax.random.PRNGKey(0))
  sharded = parallel.shard_params(params, shardings)
  embed = sharded['embed_tokens']
  assert embed.addressable_shards[0].data.shape == (config.vocab_size // 2, config.hidden_size // 2)
  np.testing.assert_array_equal(np.asarray(embed), np.asarray(params['embed_tokens']))
  created = shardings_lib.init_sharded_params(config, jax.random.PRNGKey(0), mesh)
  np.testing.assert_allclose(np.asarray(created['embed_tokens']),
                             np.asarray(params['embed_tokens']), atol=1e-6)
  assert created['embed_tokens'].sharding.is_equivalent_to(shardings['embed_tokens'], 2)

  tx = optax.adamw(1e-3)
  state_shardings = parallel.optimizer_state_shardings(
      tx, transformer.abstract_params(config), shardings)
  state = jax.jit(tx.init, out_shardings=state_shardings)(sharded)
  adam = state[0]
  for moments in (adam.mu, adam.nu):
    flat_moments = jax.tree.leaves(moments)
    flat_params = jax.tree.leaves(sharded)
    assert len(flat_moments) == len(flat_params)
    for m, p in zip(flat_moments, flat_params):
      assert m.sharding.is_equivalent_to(p.sharding, p.ndim), (m.sharding, p.sharding)
  assert adam.count.sharding.is_fully_replicated
  assert state_shardings[0].mu['layers_1']['mlp']['up_proj']['kernel'].spec == P('fsdp', 'tensor')
  """)


def test_sharded_forward_matches_unsharded_and_constraints_apply():
  run_on_8_devices("""
  for config in (model_config.preset('tiny'), model_config.preset('tiny', num_kv_heads=1)):
    params = jax.jit(lambda r: transformer.init_params(config, r))(jax.random.PRNGKey(1))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 8), 0, config.vocab_size)
    mask = jnp.ones((4, 8), bool).at[1, :3].set(False)  # one left-padded row
    forward = lambda p, t, m: transformer.forward(config, p, t, mask=m)[0]
    plain = jax.jit(forward).lower(params, tokens, mask)
    assert 'sharding_constraint' not in plain.as_text()  # no mesh + rules: constraints are off
    reference = np.asarray(plain.compile()(params, tokens, mask))

    sharded_params = parallel.shard_params(params, shardings_lib.param_shardings(config, mesh))
    batch = parallel.shard_batch({'tokens': tokens, 'mask': mask}, mesh)
    with parallel.activate(mesh):
      lowered = jax.jit(forward).lower(sharded_params, batch['tokens'], batch['mask'])
    logits = lowered.compile()(sharded_params, batch['tokens'], batch['mask'])
    hlo = lowered.as_text()
    # embeddings, q, attention out, mlp hidden, residual per layer, logits
    constraints = hlo.count('sharding_constraint')
    assert constraints >= 1 + 4 * config.num_layers + 1, constraints
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5, rtol=1e-5)
    # The last constraint (logits: batch, length, vocab) decides the output's layout.
    want = NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor'))
    assert logits.sharding.is_equivalent_to(want, 3), logits.sharding
  print('ok')
  """)


_HOST_SCRIPT = """
import sys
import jax
import jax.numpy as jnp
import numpy as np
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
from gru_mem import parallel
process_id, port = int(sys.argv[1]), sys.argv[2]
assert parallel.initialize_distributed(f'localhost:{port}', num_processes=2, process_id=process_id)
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
rows = parallel.host_local_batch_slice(8, mesh)
assert rows == parallel.host_local_batch_slice(8) == slice(4 * process_id, 4 * process_id + 4), rows
global_batch = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # what the data pipeline yields
batch = parallel.make_global_array({'x': global_batch[rows]}, mesh)['x']
assert batch.shape == (8, 3)
# A row-weighted sum on the device: only right if every host's rows land in the right place.
weighted = jax.jit(lambda x: (x * jnp.arange(8.0)[:, None]).sum())(batch)
assert float(weighted) == float((global_batch * np.arange(8)[:, None]).sum()), float(weighted)
print('ok', process_id)
"""


def test_two_processes_each_feed_their_rows():
  """Two CPU processes of 4 devices each form one 8-device mesh (jax.distributed, gloo)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  workers = [subprocess.Popen([sys.executable, "-c", _HOST_SCRIPT, str(i), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  outputs = [w.communicate(timeout=300)[0] for w in workers]
  for i, (worker, output) in enumerate(zip(workers, outputs)):
    assert worker.returncode == 0 and f"ok {i}" in output, output
