"""Dry run: its figures against hand computations and the compiler's own argument count, the
7B / 3B paper configs on fake CPU devices, and where the model shape comes from.

Dry runs go in subprocesses (fresh JAX with 8 or 32 fake CPU devices); this process keeps one.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from configs import qwen2p5_3b_hotpotqa, qwen2p5_7b_hotpotqa, tiny
from gru_mem import dry_run, settings
from gru_mem.model import config as model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30


def run_module(args, timeout=600):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def printed(stdout, key):
  """The integer printed on the report line of `key`."""
  match = re.search(rf"^\s*{key}\s+(\d+)\b", stdout, re.MULTILINE)
  assert match, (key, stdout)
  return int(match.group(1))


def check_against_compiler(report):
  """The train step's arguments are exactly the state and batch shards we counted."""
  assert report["train_step_argument_bytes"] == (
      report["params_bytes_per_device"] + report["optimizer_bytes_per_device"]
      + report["batch_bytes_per_device"] + 4)  # + the int32 step counter
  assert report["train_step_alias_bytes"] >= report["params_bytes_per_device"]  # donated state
  assert report["train_step_temp_bytes"] > 0


def test_tiny_dry_run_through_train_matches_hand_computation(tmp_path):
  """configs/tiny.py on a 2x2x2 mesh via `gru_mem.train --config.train.dry_run=True`."""
  workdir = tmp_path / "run"
  stdout = run_module(["gru_mem.train", "--config", "configs/tiny.py", "--workdir", str(workdir),
                       "--config.train.dry_run=True", "--config.mesh.data=2",
                       "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                       # the sampler shapes of the hand computation below
                       "--config.rl.group_size=4", "--config.agent.chunk_tokens=64",
                       "--config.agent.max_response_tokens=96", "--config.rl.kl_beta=0"])
  report = json.loads((workdir / "dry_run.json").read_text())
  assert sorted(os.listdir(workdir)) == ["dry_run.json"]  # nothing trained, nothing saved

  config = model_config.preset("tiny")
  h, mlp, vocab, layers = config.hidden_size, config.intermediate_size, config.vocab_size, 2
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  # Kernels and the embedding have an embed dim (fsdp=2) and a heads/mlp/vocab dim (tensor=2):
  # split 4 ways. q/k/v biases have only heads (tensor): split 2 ways. Norms are replicated.
  matrices = layers * (h * q + 2 * h * kv + q * h + 3 * h * mlp) + vocab * h
  biases = layers * (q + 2 * kv)
  norms = layers * 2 * h + h
  assert matrices + biases + norms == config.num_params() == report["num_params"]
  params_per_device = 4 * (matrices // 4 + biases // 2 + norms)  # float32
  assert report["params_bytes_per_device"] == params_per_device
  assert printed(stdout, "params_bytes_per_device") == params_per_device
  assert printed(stdout, "num_params") == config.num_params()
  # AdamW keeps mu and nu like the params, plus a few replicated int32 counts.
  assert 0 <= report["optimizer_bytes_per_device"] - 2 * params_per_device <= 16
  assert report["reference_bytes_per_device"] == 0  # kl_beta = 0: no reference copy
  check_against_compiler(report)

  # Sampler: 4 prompts x 4 samples = 16 rows over data*fsdp = 4; prompt bucket of
  # chunk 64 + memory 48 + 512 question allowance = 1024; 96 new tokens; kv heads over tensor.
  assert report["shapes"]["sampler_batch"] == 16 and report["shapes"]["sampler_prompt"] == 1024
  kv_cache = 2 * layers * (16 // 4) * (1024 + 96) * (config.num_kv_heads // 2) * config.head_dim * 4
  assert report["kv_cache_bytes_per_device"] == kv_cache
  assert printed(stdout, "kv_cache_bytes_per_device") == kv_cache
  # Continuous batching (slots > 0): the prefill returns its group's cache of prompt columns,
  # copied into the slots' cache.
  assert report["sampler_prefill_output_bytes"] >= kv_cache * 1024 // (1024 + 96)
  assert "lower + compile: train_step" in stdout
  # Attention's share of the learner's temporaries (1024-token rows: auto runs xla here).
  attention = report["attention"]
  assert attention["resolved"] == "xla" and attention["length"] == report["shapes"]["length"]
  assert attention["attention_temp_bytes"] == attention["xla_attention_temp_bytes"] > 0
  assert attention["share_of_learner_temp"] == (attention["attention_temp_bytes"]
                                                / report["train_step_temp_bytes"])
  assert f"{attention['share_of_learner_temp']:.1%} of the train step temporaries" in stdout


def seven_b_per_device_params(mesh_fsdp):
  """Qwen2.5-7B on fsdp only: every kernel and both embeddings split over fsdp (3584 divides
  by 8), biases and norms replicated."""
  c = model_config.preset("qwen2.5-7b")
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  vectors = c.num_layers * (q + 2 * kv + 2 * c.hidden_size) + c.hidden_size
  return c.num_params(), 4 * ((c.num_params() - vectors) // mesh_fsdp + vectors)


def test_7b_h100x8_dry_run_fits_an_h100(tmp_path):
  out = tmp_path / "7b.json"
  stdout = run_module(["gru_mem.dry_run", "--config", "configs/qwen2p5_7b_hotpotqa.py:h100x8",
                       "--nosampler", "--out", str(out)])
  report = json.loads(out.read_text())
  num_params, params_per_device = seven_b_per_device_params(8)
  assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert report["devices"] == "8 fake CPU devices"
  assert "preset 'qwen2.5-7b'" in report["model_source"]  # the placeholder folder does not exist
  assert report["num_params"] == num_params == 7_615_616_512
  assert report["params_bytes_per_device"] == params_per_device
  assert printed(stdout, "params_bytes_per_device") == params_per_device
  assert report["reference_bytes_per_device"] == params_per_device  # kl_beta = 0.001
  assert report["shapes"]["length"] == 8192 and report["shapes"]["response"] == 2048
  check_against_compiler(report)
  # The paper's learner micro-batch fits in an H100's 80 GB (CPU estimate).
  assert report["learner_peak_bytes_per_device"] < 80e9
  assert report["train_step_compile_s"] < 240
  # auto runs chunked on CPU devices at 8K rows: attention holds a small part of the
  # temporaries, xla's quadratic scores would be [1 row, 28 heads, 8192, 8192] float32 and more.
  attention = report["attention"]
  assert attention["resolved"] == "chunked" and attention["share_of_learner_temp"] < 0.5
  assert attention["xla_attention_temp_bytes"] >= 28 * 8192 * 8192 * 4
  assert attention["attention_temp_bytes"] < attention["xla_attention_temp_bytes"] / 4


@pytest.mark.slow
@pytest.mark.parametrize("config_arg,devices", [("qwen2p5_7b_hotpotqa.py:tpu_v5p_64", 32),
                                                ("qwen2p5_3b_hotpotqa.py:h100x8", 8),
                                                ("qwen2p5_3b_hotpotqa.py:tpu_v5p_64", 32)])
def test_paper_config_dry_runs(tmp_path, config_arg, devices):
  out = tmp_path / "report.json"
  stdout = run_module(["gru_mem.dry_run", "--config", f"configs/{config_arg}", "--out", str(out)])
  report = json.loads(out.read_text())
  assert report["devices"] == f"{devices} fake CPU devices"
  assert math.prod(report["mesh"].values()) == devices
  preset = "qwen2.5-7b" if "7b" in config_arg else "qwen2.5-3b"
  assert report["num_params"] == model_config.preset(preset).num_params()
  check_against_compiler(report)
  assert report["kv_cache_bytes_per_device"] > 0 and "sampler_prefill_compile_s" in report
  assert "learner_peak_bytes_per_device" in stdout


def test_model_shape_from_hf_config_json_or_preset(tmp_path):
  c = tiny.get_config()
  c.model.preset = "qwen2.5-0.5b"
  c.model.hf_path = str(tmp_path / "missing")
  shape, source = dry_run.dry_run_model_config(c)
  assert shape.num_layers == 24 and "has no config.json" in source
  folder = tmp_path / "model"
  folder.mkdir()
  hf = model_config.to_hf_config(model_config.preset("qwen2.5-0.5b", num_layers=3))
  (folder / "config.json").write_text(json.dumps(hf))
  c.model.hf_path = str(folder)
  c.model.scan_layers = True
  shape, source = dry_run.dry_run_model_config(c)
  assert shape.num_layers == 3 and shape.scan_layers and source.endswith("config.json")


def test_too_few_devices_in_a_started_process_is_a_clear_error():
  have = len(jax.devices("cpu"))  # this process's JAX is running now
  with pytest.raises(RuntimeError, match="fresh process"):
    dry_run.fake_cpu_devices(have + 7)
  assert dry_run.mesh_device_count({"data": -1, "fsdp": 8, "tensor": 4}) == 32
  assert dry_run.mesh_device_count({"data": -1, "fsdp": 8, "tensor": 4}, devices=64) == 64


@pytest.mark.parametrize("module", [qwen2p5_7b_hotpotqa, qwen2p5_3b_hotpotqa])
def test_paper_configs(module):
  for arg, mesh in (("h100x8", (-1, 8, 1)), ("tpu_v5p_64", (-1, 8, 4))):
    c = module.get_config(arg)
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == mesh
    assert (c.agent.chunk_tokens, c.agent.memory_tokens) == (5000, 1024)
    assert (c.rl.group_size, c.rl.prompts_per_step, c.rl.alpha, c.rl.kl_beta) == (16, 128, 0.9,
                                                                                   0.001)
    assert (c.rl.clip_eps_low, c.rl.clip_eps_high, c.optim.learning_rate) == (0.2, 0.28, 1e-6)
    assert c.model.scan_layers and c.model.remat_policy == "full"
    assert (c.model.param_dtype, c.model.dtype) == ("float32", "bfloat16")
    assert c.optim.micro_batch_rows % (c.mesh.fsdp * max(c.mesh.data, 1)) == 0
    assert c.sampling.param_dtype == "bfloat16" and c.sampling.mesh.fsdp == 1
    assert c.sampling.mesh.tensor == (4 if module is qwen2p5_7b_hotpotqa else 2)
    assert c.train.dry_run_chip == ("h100" if arg == "h100x8" else "tpu_v5p")
    assert not settings.unknown_keys(c)  # only keys configs/base.py defines
  with pytest.raises(ValueError, match="unknown target"):
    module.get_config("v4-8")


def test_placeholder_paths_fail_validation_clearly(tmp_path):
  c = qwen2p5_7b_hotpotqa.get_config("h100x8")
  with pytest.raises(FileNotFoundError, match="model.hf_path='/path/to/Qwen2.5-7B-Instruct'"):
    settings.validate(c)
  folder = tmp_path / "qwen"
  folder.mkdir()
  (folder / "config.json").write_text("{}")
  c.model.hf_path = str(folder)
  c.mesh.fsdp = 1  # this process has one device
  c.sampling.mesh.data = c.sampling.mesh.fsdp = c.sampling.mesh.tensor = 0  # (the learner's)
  with pytest.raises(FileNotFoundError, match="hotpotqa_path"):
    settings.validate(c)


def test_bfloat16_weights_would_not_move_at_the_papers_learning_rate():
  """Why the paper configs keep float32 master weights (see their docstring)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  weights = jnp.array([0.02, -0.05, 0.01], jnp.bfloat16)
  assert bool(jnp.all(weights + jnp.bfloat16(1e-6) == weights))
  assert not bool(jnp.all(weights.astype(jnp.float32) + 1e-6 == weights.astype(jnp.float32)))


def rollout_weight_bytes(c, tensor: int, itemsize: int = 2) -> int:
  """Hand count of the rollout copy per device: heads, kv heads (when tensor divides them),
  mlp and vocab dims split over tensor, everything else replicated (no fsdp)."""
  kv_split = tensor if c.num_kv_heads % tensor == 0 else 1
  q, kv, h = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size
  per_layer = (h * q + q + q * h) // tensor + 2 * (h * kv + kv) // kv_split \
      + 3 * h * c.intermediate_size // tensor + 2 * h
  embeddings = c.vocab_size * h * (1 if c.tie_word_embeddings else 2) // tensor
  return itemsize * (c.num_layers * per_layer + embeddings + h)


SMALL_7B_LIKE = model_config.ModelConfig(  # 7B's head layout (heads and kv heads split by 4)
    vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=8,
    num_kv_heads=4, head_dim=16, tie_word_embeddings=False, max_position_embeddings=4096)


def test_decode_loop_with_the_paper_rollout_layout_small_shapes(tmp_path):
  """The 7B h100x8 config's two layouts (learner: float32, fsdp=8; rollout: bfloat16, data=2 x
  tensor=4) on a small model with 7B's head layout: from the compiled text, the rollout's decode
  loop gathers no weight and the learner layout's does; the figures match hand counts."""
  folder = tmp_path / "model"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(model_config.to_hf_config(SMALL_7B_LIKE)))
  out = tmp_path / "small.json"
  stdout = run_module(["gru_mem.dry_run", "--config", "configs/qwen2p5_7b_hotpotqa.py:h100x8",
                       f"--config.model.hf_path={folder}", "--config.sampling.slots=16",
                       "--config.sampling.kv_cache_dtype=auto",  # the bfloat16 cache, counted below
                       "--sampler_prompt=128", "--sampler_new_tokens=16", "--nolearner",
                       "--out", str(out)])
  report = json.loads(out.read_text())
  rollout, learner_layout = report["rollout"], report["learner_layout"]
  c = SMALL_7B_LIKE
  assert rollout["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
  assert learner_layout["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert rollout["rows"] == learner_layout["rows"] == 16
  assert report["rollout_weight_bytes_per_device"] == rollout_weight_bytes(c, 4)
  assert printed(stdout, "rollout_weight_bytes_per_device") == rollout_weight_bytes(c, 4)
  # KV cache (bfloat16): 16 rows over data=2 x 4 kv heads over tensor=4, or rows over fsdp=8.
  columns = 128 + 16
  kv = 2 * c.num_layers * 16 * columns * c.num_kv_heads * c.head_dim * 2 // 8
  assert rollout["kv_cache_bytes"] == learner_layout["kv_cache_bytes"] == kv
  # From the compiled text: no weight is gathered for the rollout layout; the learner layout
  # gathers its weights, and a token step then reads at least a bfloat16 copy of every matmul.
  assert rollout["weight_gathers"]["count"] == 0
  # A token step reads the rollout weights as stored and the decode state (+ a few loop
  # temporaries), nothing gathered.
  assert rollout["bytes_per_token_step"] <= 1.02 * (rollout["weight_bytes"]
                                                    + rollout["decode_state_bytes"])
  assert learner_layout["weight_gathers"]["count"] > 0
  matmul_params = c.num_params() - c.vocab_size * c.hidden_size
  assert learner_layout["bytes_per_token_step"] >= kv + 2 * matmul_params
  assert rollout["collectives_per_token_step"]["all-reduce"]["count"] > 0  # tensor parallel
  assert report["rollout_vs_learner_layout_decode_tokens_per_s"] > 1
  assert "roofline on NVIDIA H100 SXM" in stdout and "weight all-gathers: 0" in stdout


def test_sampling_mesh_that_does_not_fit_fails_before_compiling():
  for flag, message in (("--config.sampling.mesh.tensor=8", "does not divide the model's 28"),
                        ("--config.sampling.mesh.data=3", "does not fit the 8 devices")):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-m", "gru_mem.dry_run", "--config",
                             "configs/qwen2p5_7b_hotpotqa.py:h100x8", flag], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "lower + compile" not in result.stdout  # nothing was compiled


def test_7b_h100x8_rollout_decode_loop_gathers_no_weight(tmp_path):
  """The paper config's rollout layout at 7B shapes (128 slots x 8192 cache columns): the compiled
  decode loop holds no all-gather of a weight, a device holds a quarter of the bfloat16
  weights (plus the replicated norms and biases), and the KV cache is int8 (hand count)."""
  out = tmp_path / "7b.json"
  run_module(["gru_mem.dry_run", "--config", "configs/qwen2p5_7b_hotpotqa.py:h100x8",
              "--nolearner", "--nolearner_layout", "--out", str(out)])
  report = json.loads(out.read_text())
  rollout = report["rollout"]
  c = model_config.preset("qwen2.5-7b")
  assert rollout["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4} and rollout["rows"] == 128
  assert rollout["weight_gathers"] == {"count": 0, "in_loop": 0, "bytes": 0}
  assert rollout["weight_bytes"] == rollout_weight_bytes(c, 4)
  assert rollout["weight_bytes"] <= 1.1 * 2 * c.num_params() / 4
  assert rollout["sampler_peak_bytes"] < 80e9  # fits an H100 with the train state
  # The int8 KV cache (sampling.kv_cache_dtype): k, v int8 + float32 scales [.., 1], rows over
  # data=2 and the 4 kv heads over tensor=4; written in place (2 scatters per layer for k, v).
  rows, heads, columns = 128 // 2, c.num_kv_heads // 4, 8192
  assert rollout["kv_cache_dtype"] == "int8"
  assert rollout["kv_cache_bytes"] == 2 * c.num_layers * rows * columns * heads * (c.head_dim + 4)
  assert rollout["loop_ops_of_cache_shape"] == {"fusion(scatter)": 2 * c.num_layers}


def test_decode_loop_writes_the_cache_in_place_with_columns_fitted_to_the_prompt_budget():
  """The compiled slot decode loop of a scanned float32 model (chunked attention): its cache has
  the fitted bucket + new-token columns (hand count), and the only ops of the loop whose result
  has the stacked cache's shape are the per-slot scatters that write k and v of each layer (no
  copy, broadcast, transpose, pad or slice of the whole cache at a token step)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from gru_mem import buckets, dry_run_sampler, parallel, rollout_weights  # pylint: disable=import-outside-toplevel
  from gru_mem.model import transformer  # pylint: disable=import-outside-toplevel
  config = model_config.preset("tiny").replace(scan_layers=True, attention="chunked")
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  layout = rollout_weights.rollout_layout(config, mesh, "float32", None)
  params = dry_run_sampler.abstract(nn.meta.unbox(transformer.abstract_params(layout.config)),
                                    layout.shardings())
  prompt_budget = 64 + 48 + buckets.QUESTION_ALLOWANCE_TOKENS  # chunk + memory + allowance
  fitted = buckets.budget_buckets(prompt_budget, 128)
  assert 640 in fitted and set(buckets.DEFAULT_LENGTH_BUCKETS) < set(fitted)
  prompt, new_tokens, rows = buckets.smallest_bucket(prompt_budget, fitted), 384, 4
  report = dry_run_sampler.layout_report(
      layout.config, params, layout.mesh, rows=rows, prompt=prompt, new_tokens=new_tokens,
      prefill_chunk=128, slots=True, train_state_bytes=0, copy_bytes=0, prefill=False)
  columns = 640 + 384  # a multiple of chunked's 512-slot key block: blocks sliced in place
  assert report["cache_columns"] == columns
  layers, kv, d = config.num_layers, config.num_kv_heads, config.head_dim
  assert report["cache_dims_per_device"] == [layers, rows, columns, kv, d]
  assert report["kv_cache_bytes"] == 2 * layers * rows * columns * kv * d * 4
  assert report["loop_ops_of_cache_shape"] == {"fusion(scatter)": 2 * layers}  # in place
