"""The rollout copy of the policy (gru_mem/rollout_weights.py) and pi_old recompute
(gru_mem/rl/old_logprobs.py) on 8 fake CPU devices, against the learner-layout sampler, the
cast new parameters and the learner's own log-probs."""

import jax
import numpy as np
import pytest
from conftest import run_on_8_fake_devices

from gru_mem import parallel, rollout_weights
from gru_mem.model import config as model_config

_SETUP = """
import json
import jax, jax.numpy as jnp, numpy as np
from gru_mem import continuous, parallel, rollout_weights, sampling
from gru_mem.model import config as model_config, shardings, transformer
from gru_mem.rl import batch as rl_batch, learner, old_logprobs
assert jax.device_count() == 8

config = model_config.preset('tiny')
learner_mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
settings = learner.LearnerSettings(kl_beta=0.0, micro_batch_rows=8, learning_rate=1e-2)
state = learner.create_train_state(transformer.init_params(config, jax.random.PRNGKey(1)),
                                   settings, learner.state_shardings(config, settings,
                                                                     learner_mesh))
rng = np.random.default_rng(0)
prompts = [rng.integers(1, 500, n) for n in (3, 9, 5, 17, 1, 12, 7, 20)]

def sample(weights, settings, slots=0):
  settings = sampling.SamplingSettings(**{**settings, 'slots': slots})
  with weights.activate():
    return continuous.generate(weights.config, weights.params, prompts, jax.random.PRNGKey(3),
                               settings, batch_sharding=weights.batch_sharding)

def learner_rows(out):
  return [rl_batch.LearnerRow(p, out.row(i), advantage=float(i % 3) - 1.0,
                              old_logprobs=out.logprobs[i, :out.lengths[i]])
          for i, p in enumerate(prompts)]
"""

_SAME_AS_LEARNER = _SETUP + """
greedy = dict(max_new_tokens=8, temperature=0.0)
same = rollout_weights.RolloutWeights(
    rollout_weights.rollout_layout(config, learner_mesh, 'float32', None), state.params)
other = rollout_weights.RolloutWeights(
    rollout_weights.rollout_layout(config, learner_mesh, 'float32', {'data': 2, 'tensor': 4}),
    state.params)
assert same.params is state.params and same.layout.same_as_learner
assert not other.layout.same_as_learner and other.layout.mesh.shape['tensor'] == 4
kernel = other.params['layers_0']['mlp']['up_proj']['kernel']
assert kernel.sharding.spec == other.layout.shardings()['layers_0']['mlp']['up_proj']['kernel'].spec
result = {'tensor_split': 'tensor' in str(kernel.sharding.spec),
          'copy_equal': all(np.array_equal(a, b) for a, b in zip(
              jax.tree.leaves(jax.device_get(other.params)),
              jax.tree.leaves(jax.device_get(state.params))))}
for slots in (0, 4):  # the static sampler and continuous batching (the rollout's default)
  want, got = sample(same, greedy, slots), sample(other, greedy, slots)
  result[f'tokens_equal_{slots}'] = bool(np.array_equal(want.tokens, got.tokens))
  result[f'lengths_equal_{slots}'] = bool(np.array_equal(want.lengths, got.lengths))
  result[f'logprob_diff_{slots}'] = float(np.max(np.abs(want.logprobs - got.logprobs)))
  result[f'distinct_first_tokens_{slots}'] = len(set(want.tokens[:, 0].tolist()))
print('RESULT' + json.dumps(result))
"""


def test_float32_copy_in_another_layout_samples_like_the_learner_layout():
  result = run_on_8_fake_devices(_SAME_AS_LEARNER)
  assert result["tensor_split"] and result["copy_equal"]
  for slots in (0, 4):
    assert result[f"distinct_first_tokens_{slots}"] > 1  # rows differ: a real comparison
    assert result[f"tokens_equal_{slots}"] and result[f"lengths_equal_{slots}"]
    assert result[f"logprob_diff_{slots}"] <= 1e-5


_AFTER_A_STEP = _SETUP + """
sampled = dict(max_new_tokens=8, temperature=1.0)
layout = rollout_weights.rollout_layout(config, learner_mesh, 'bfloat16', {'data': 2, 'tensor': 4})
weights = rollout_weights.RolloutWeights(layout, state.params)
out = sample(weights, sampled, slots=4)
batch = rl_batch.pack_rows(learner_rows(out), settings.length_buckets, 8, mesh=learner_mesh)
step = learner.make_train_step(config, settings, learner_mesh)
result = {}
# Without recompute the bfloat16 sampler's log-probs are pi_old; with it the learner's are.
with_recompute, gap = old_logprobs.recompute(config, state.params, batch, learner_mesh)
result['gap'] = gap['rollout/logprob_gap']
host = jax.device_get(with_recompute)
mask = np.asarray(host.response_mask)
result['gap_by_hand'] = float(np.abs(np.asarray(jax.device_get(batch.old_logprobs))
                                     - host.old_logprobs)[mask].mean())
initial = jax.device_get(state.params)
copy_state = jax.tree.map(jnp.copy, state)
_, plain = step(copy_state, batch)
old_copy = weights.params
new_state, metrics = step(state, with_recompute)
result['ratio_mean_recomputed'] = float(metrics['ratio_mean'])
result['clip_fraction_recomputed'] = float(metrics['clip_fraction'])
result['ratio_mean_sampler'] = float(plain['ratio_mean'])
weights.refresh(new_state.params)
want = jax.tree.map(lambda x: np.asarray(jax.device_get(x)).astype(jnp.bfloat16),
                    new_state.params)
got = jax.device_get(weights.params)
result['refresh_exact'] = all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in
                              zip(jax.tree.leaves(got), jax.tree.leaves(want)))
result['shardings'] = all(a.sharding == b for a, b in
                          zip(jax.tree.leaves(weights.params), jax.tree.leaves(layout.shardings())))
result['old_copy_donated'] = all(x.is_deleted() for x in jax.tree.leaves(old_copy))
result['params_changed'] = sum(int(np.sum(a != np.asarray(b).astype(jnp.bfloat16)))
                               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(initial)))
print('RESULT' + json.dumps(result))
"""


def test_after_a_learner_step_the_copy_is_the_cast_new_params_and_recompute_gives_ratio_one():
  result = run_on_8_fake_devices(_AFTER_A_STEP)
  # pi_old recomputed: the ratio of the unchanged policy is 1 though the rollout was bfloat16.
  assert result["ratio_mean_recomputed"] == pytest.approx(1.0, abs=1e-6)
  assert result["clip_fraction_recomputed"] == 0.0
  assert result["gap"] == pytest.approx(result["gap_by_hand"], rel=1e-5)
  assert result["gap"] > 1e-4  # the bfloat16 sampler's log-probs are not the learner's ...
  assert abs(result["ratio_mean_sampler"] - 1.0) > 1e-6  # ... and its ratio is not 1
  # After the step the copy holds exactly the new parameters cast to bfloat16, in its layout.
  assert result["refresh_exact"] and result["shardings"]
  assert result["params_changed"] > 0  # the step moved the weights: a real comparison
  assert result["old_copy_donated"]  # its buffers went to the new copy


def test_sampling_mesh_that_does_not_fit_is_a_clear_error_before_compiling():
  one_device = parallel.make_mesh(data=1, devices=jax.devices()[:1])
  tiny = model_config.preset("tiny")
  with pytest.raises(ValueError, match=r"sampling.mesh=.*does not fit the 1 devices"):
    rollout_weights.rollout_layout(tiny, one_device, "bfloat16", {"data": 1, "fsdp": 1,
                                                                  "tensor": 2})
  with pytest.raises(ValueError, match="does not divide the model's 28 attention heads"):
    rollout_weights.check_heads(model_config.preset("qwen2.5-7b"), 8)
  with pytest.raises(ValueError, match="sampling.param_dtype='int8'"):
    rollout_weights.resolve_param_dtype("int8")
  assert rollout_weights.resolve_param_dtype("auto", "cpu") == "float32"
  assert rollout_weights.resolve_param_dtype("auto", "gpu") == "bfloat16"
  assert rollout_weights.mesh_sizes({"data": 0, "fsdp": 0, "tensor": 0}) is None
  assert rollout_weights.mesh_sizes({"data": -1, "fsdp": 0, "tensor": 4}) == {
      "data": -1, "fsdp": 1, "tensor": 4}
