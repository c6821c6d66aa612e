r"""GRU-Mem RL on HotpotQA with Qwen2.5-7B-Instruct: the paper's setting, on a TPU v5p-64 slice or
an 8xH100 node. The argument after ':' picks the mesh.

  python -m gru_mem.dry_run --config configs/qwen2p5_7b_hotpotqa.py:h100x8     # no weights needed
  python -m gru_mem.train --config configs/qwen2p5_7b_hotpotqa.py:h100x8 --workdir runs/7b \
      --config.model.hf_path=/models/Qwen2.5-7B-Instruct \
      --config.data.hotpotqa_path=/data/hotpot_train_v1.1.json

Paper values: chunk 5000 tokens, memory 1024, group 16, 128 prompts per step, lr 1e-6,
alpha 0.9, k3-KL 0.001, clip eps 0.2 / 0.28 (configs/base.py holds them as defaults; they are
restated here so this file reads as the experiment).

Meshes (`('data', 'fsdp', 'tensor')`, data = -1 takes the devices left, so more nodes or slices
add data parallelism):
  h100x8       one node of 8 H100s: fsdp=8. NVLink all-gathers the 1/8 shards each layer.
  tpu_v5p_64   a v5p-64 slice = 64 TensorCores = 32 chips (JAX devices), 8 hosts: fsdp=8 x
               tensor=4 (heads, kv heads, mlp and vocab over 4 chips of a host's neighbourhood).

Rollout copy (`gru_mem/rollout_weights.py`): the sampler decodes with its own bfloat16 copy of
the policy on its own mesh, tensor=4 (28 heads and 4 kv heads split 4 ways) x data over the
rest, no fsdp: nothing is gathered inside the decode loop and a device holds a quarter of the
bfloat16 weights. The learner's float32 fsdp=8 parameters would be gathered whole onto every
device before decoding. pi_old is recomputed by the learner (rl.recompute_old_logprobs: on,
since the rollout differs). `python -m gru_mem.dry_run` reports both layouts side by side.

Numerics: weights are stored in float32 and matmuls run in bfloat16. bfloat16 *storage* would
make lr 1e-6 a no-op: AdamW moves a weight by about lr per step, and bfloat16 keeps 8 significant
bits, so 0.02 + 1e-6 rounds back to 0.02 (the spacing there is 1.2e-4). Set
--config.model.param_dtype=bfloat16 only with a larger learning rate.
"""

from gru_mem import buckets
from gru_mem import defaults as base

# mesh sizes and learner rows per micro-batch (a multiple of data * fsdp) for each target
# and the rollout: its mesh, its decode slots (the sampler batch the freed memory allows: the
# dry run's sampler peak with the train state is 45 GiB of an H100's 80 at 128 slots, 35 GiB of
# a v5p chip's 95 at 512) and the chip of the dry run's roofline.
TARGETS = {
    "h100x8": dict(mesh=dict(data=-1, fsdp=8, tensor=1), micro_batch_rows=8, chip="h100",
                   rollout_mesh=dict(data=-1, fsdp=1, tensor=4), slots=128),
    "tpu_v5p_64": dict(mesh=dict(data=-1, fsdp=8, tensor=4), micro_batch_rows=8, chip="tpu_v5p",
                       rollout_mesh=dict(data=-1, fsdp=1, tensor=4), slots=512),
}
MODEL_PLACEHOLDER = "/path/to/Qwen2.5-7B-Instruct"  # a local HF folder; set with --config.model.hf_path
HOTPOTQA_PLACEHOLDER = "/path/to/hotpot_train_v1.1.json"  # HotpotQA distractor-format JSON


def get_config(arg: str = "h100x8"):
  if arg not in TARGETS:
    raise ValueError(f"unknown target {arg!r}: use one of {sorted(TARGETS)} "
                     "(e.g. --config configs/qwen2p5_7b_hotpotqa.py:tpu_v5p_64)")
  target = TARGETS[arg]
  c = base.get_config()
  c.model.preset = "qwen2.5-7b"  # the shape the dry run uses while hf_path does not exist
  c.model.hf_path = MODEL_PLACEHOLDER
  c.model.param_dtype = "float32"  # master weights (see the module docstring)
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True  # one compiled layer: compile time does not grow with depth
  c.model.remat_policy = "full"  # recompute each layer in the backward pass
  c.tokenizer = ""  # the tokenizer files in model.hf_path

  c.data.task = "hotpotqa"
  c.data.train_tasks = ""
  c.data.hotpotqa_path = HOTPOTQA_PLACEHOLDER

  c.agent.mode = "gru_mem"
  c.agent.chunk_tokens = 5000
  c.agent.memory_tokens = 1024

  c.rl.group_size = 16
  c.rl.prompts_per_step = 128
  c.rl.alpha = 0.9
  c.rl.kl_beta = 0.001
  c.rl.clip_eps_low = 0.2
  c.rl.clip_eps_high = 0.28

  c.optim.learning_rate = 1e-6
  # Sampler memory per device ~ rows/device x heads x prefill chunk x (prompt + new) x 4 bytes.
  c.sampling.slots = target["slots"]  # continuous batching: decode rows, and the largest group
  c.sampling.max_batch_rows = target["slots"]  # ... prefilled at once
  c.sampling.prefill_chunk_tokens = 512
  # Prompt buckets: the powers of two plus one fitted to a memory turn's prompt budget, chunk +
  # memory + question allowance = 6536 -> 6656 (a multiple of the prefill chunk) instead of 8192:
  # the decode cache has 6656 + 1536 = 8192 columns, not 9728 (a sixth fewer KV bytes per step).
  c.sampling.length_buckets = ",".join(str(b) for b in buckets.budget_buckets(
      c.agent.chunk_tokens + c.agent.memory_tokens + buckets.QUESTION_ALLOWANCE_TOKENS,
      c.sampling.prefill_chunk_tokens))
  c.optim.micro_batch_rows = target["micro_batch_rows"]

  for axis, size in target["mesh"].items():
    setattr(c.mesh, axis, size)
  c.sampling.param_dtype = "bfloat16"  # the rollout copy (an accelerator's "auto")
  # 8-bit KV cache (a float32 scale per token and kv head, gru_mem/model/kv_cache.py): the cache
  # is 2/3 of what an h100x8 decode step reads at 128 slots; int8 halves it (7.00 -> 3.61 GiB per
  # device), 10.55 -> 7.16 GiB read per step: the learner layout's 36.63 GiB / 7.16 = 5.1x its
  # roofline decode tokens/s instead of 3.5x (benchmarks/results/rollout_layout.json). pi_old is
  # recomputed by the learner anyway, so the sampler's slightly different log-probs do not bias
  # the ratio; `--config.sampling.kv_cache_dtype=auto` restores the bfloat16 cache.
  c.sampling.kv_cache_dtype = "int8"
  for axis, size in target["rollout_mesh"].items():
    setattr(c.sampling.mesh, axis, size)
  c.train.dry_run_chip = target["chip"]
  return c
