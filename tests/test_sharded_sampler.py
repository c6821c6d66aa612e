"""The sampler on 8 fake CPU devices: sharded runs give the unsharded run's tokens and log-probs.

Checked layouts: the learner's (params per `model.shardings.param_shardings` on a 2x2x2
data/fsdp/tensor mesh, prompts split over data/fsdp, the model's activation constraints active),
and two sampler layouts reached by resharding those learner params device to device:
tensor-parallel (2 x tensor 4) and fully replicated with the batch over 8 devices. Runs in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8; this pytest process keeps one
device.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = """
import jax, numpy as np
from gru_mem import parallel, sampling
from gru_mem.model import config as model_config, transformer
from gru_mem.model import shardings as shardings_lib
assert jax.device_count() == 8, jax.devices()

rng = np.random.default_rng(0)
prompts = [rng.integers(1, 1000, n) for n in (3, 9, 5, 17, 1, 12, 7, 20, 4, 11)]  # 10 rows

def run(config, params, settings, batch_sharding=None):
  out = sampling.generate(config, params, prompts, jax.random.PRNGKey(3), settings,
                          batch_sharding=batch_sharding)
  return out.tokens, out.logprobs, out.sampling_logprobs, out.lengths

def check_same(got, want, what):
  np.testing.assert_array_equal(got[0], want[0], err_msg=what + ': tokens')
  np.testing.assert_array_equal(got[3], want[3], err_msg=what + ': lengths')
  for i in (1, 2):
    np.testing.assert_allclose(got[i], want[i], atol=1e-5, rtol=1e-5, err_msg=what + ': logprobs')
  print('same:', what)

greedy = sampling.SamplingSettings(max_new_tokens=10, temperature=0.0, eos_id=None)
sampled = sampling.SamplingSettings(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9,
                                    eos_id=None)
# Plain layers: greedy and sampled on the learner layout, greedy on two resharded layouts.
# Scanned layers (the big configs' setting): greedy on the learner layout.
for config, modes, reshard in ((model_config.preset('tiny'), ('greedy', 'sampled'), True),
                               (model_config.preset('tiny', scan_layers=True), ('greedy',), False)):
  params = transformer.init_params(config, jax.random.PRNGKey(1))
  single = jax.device_put(params, jax.devices()[0])
  settings = {'greedy': greedy, 'sampled': sampled}
  reference = {name: run(config, single, settings[name]) for name in modes}
  assert len(set(reference['greedy'][0][:, 0].tolist())) > 1  # rows differ: a real comparison

  # The learner's layout on a 2x2x2 mesh, batch over data/fsdp, constraints active.
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  learner_params = parallel.shard_params(params, shardings_lib.param_shardings(config, mesh))
  assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(learner_params))
  traces = sampling.TRACE_COUNTS['prefill']
  with parallel.activate(mesh):
    for name in modes:
      check_same(run(config, learner_params, settings[name], parallel.batch_sharding(mesh)),
                 reference[name],
                 f'{name} 2x2x2 scan={config.scan_layers}')
  assert sampling.TRACE_COUNTS['prefill'] > traces  # compiled anew for the mesh, not reused
  # ... and that program carries the model's activation constraints (not skipped on CPU).
  spec = sampling.DecodeSpec(10, 0.0, 1.0, 0, (), (), 0)
  tokens = jax.device_put(np.ones((8, 64), np.int32), parallel.batch_sharding(mesh))
  rows = jax.device_put(np.arange(8, dtype=np.int32), parallel.batch_sharding(mesh))
  with parallel.activate(mesh):
    hlo = sampling.prefill_jit.lower(learner_params, tokens, tokens > 0, rows, rows,
                                      jax.random.PRNGKey(0), config=config, spec=spec).as_text()
  layer_bodies = 1 if config.scan_layers else config.num_layers  # a scanned body appears once
  assert hlo.count('sharding_constraint') >= 4 * layer_bodies + 2, hlo.count('sharding_constraint')

  if not reshard:
    continue
  # Resharded from the learner's layout to sampler layouts on other meshes.
  tensor_mesh = parallel.make_mesh(data=2, fsdp=1, tensor=4)
  replicated_mesh = parallel.make_mesh(data=8)
  for sampler_mesh, label in ((tensor_mesh, 'tensor=4'), (replicated_mesh, 'replicated')):
    target = shardings_lib.param_shardings(config, sampler_mesh)
    sampler_params = jax.device_put(learner_params, target)  # device to device
    jax.tree.map(lambda leaf, want: np.testing.assert_equal(leaf.sharding, want),
                 sampler_params, target)
    if label == 'replicated':
      assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sampler_params))
    else:  # heads and mlp split 4 ways over 'tensor'
      kernel = sampler_params['layers_0']['mlp']['up_proj']['kernel']
      assert 'tensor' in kernel.sharding.spec, kernel.sharding
    with parallel.activate(sampler_mesh):
      check_same(run(config, sampler_params, greedy, parallel.batch_sharding(sampler_mesh)),
                 reference['greedy'], f'greedy {label}')
print('sharded sampler ok')
"""


def test_sharded_and_resharded_sampler_match_unsharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT)], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.count("same:") == 5, result.stdout
  assert "sharded sampler ok" in result.stdout


_TRAIN_SCRIPT = """
import json, sys
import jax
from configs import tiny
from gru_mem import train
c = tiny.get_config()  # a tiny step: 2 prompts x 2 samples, short documents and budgets
c.data.train_tasks, c.data.context_tokens, c.agent.chunk_tokens = 'niah_single_1', 200, 64
c.agent.memory_tokens, c.agent.max_response_tokens, c.agent.max_answer_tokens = 16, 24, 8
c.rl.group_size, c.rl.prompts_per_step, c.rl.dynamic_sampling = 2, 2, False
c.optim.micro_batch_rows, c.train.steps = 8, 1
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(n) for n in sys.argv[2].split(','))
assert jax.device_count() == c.mesh.data * c.mesh.fsdp * c.mesh.tensor
print(json.dumps(train.train(c, sys.argv[1])))
"""


def train_one_step(workdir, devices, sizes):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(_TRAIN_SCRIPT), str(workdir),
                           sizes], env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout + result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_training_step_on_2x2x2_equals_single_device(tmp_path):
  """One full RL step (sharded rollouts, then the sharded learner) gives the one-device metrics."""
  single = train_one_step(tmp_path / "single", 1, "1,1,1")
  sharded = train_one_step(tmp_path / "sharded", 8, "2,2,2")
  for key, value in single.items():
    if key.startswith(("reward/", "gate/", "agent/", "data/")):
      assert sharded[key] == value, key  # the same rollouts
    elif key.startswith("learner/"):
      assert sharded[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  assert single["learner/tokens"] > 0 and single["learner/entropy"] > 0  # a real forward compared
