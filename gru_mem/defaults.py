"""Every config key with its default (the paper's values where the paper gives one).

This is the one set of defaults: `gru_mem.settings` turns a config into the settings objects the
code runs with, and its unknown-key check compares a config against this tree. Experiment configs
(`configs/*.py`) start from `get_config()` and override only what differs. On the command line:
  python -m gru_mem.train --config configs/tiny.py --config.rl.alpha=0.5 --workdir runs/a05
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds params init, data order and sampling

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"  # a gru_mem.model.config preset, used when hf_path is empty
  c.model.hf_path = ""  # a local HF folder (config.json + safetensors) to start from
  c.model.vocab_size = 0  # 0: preset's; the built-in tokenizer sets it to its size when larger
  c.model.param_dtype = "float32"  # weights as stored (bfloat16 on TPU/GPU for 7B)
  c.model.dtype = "float32"  # matmul dtype
  c.model.scan_layers = False  # nn.scan over layers (faster compiles for deep models)
  c.model.remat_policy = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
  c.model.attention = "auto"  # auto | xla | chunked | cudnn (GPU) | splash (TPU): model/attention.py
  c.model.init_workdir = ""  # a run folder (e.g. the SFT stage's) whose latest params start RL

  c.tokenizer = "builtin"  # "builtin" (synthetic tasks) or a local HF tokenizer folder

  c.data = ml_collections.ConfigDict()
  c.data.mixture = ""  # the example stream: a registered task, or tasks mixed round-robin
  #   ("a,b"); names in gru_mem/data/sources.py ("": train_tasks, else task)
  c.data.task = "niah_single_1"  # a task for training prompts (when mixture and train_tasks are "")
  c.data.train_tasks = ""  # comma-separated tasks mixed round-robin (when mixture is "")
  c.data.context_tokens = 2048  # document length in tokens for synthetic tasks
  c.data.evidence_depth = 1.0  # evidence within the first fraction of the document (1 = anywhere)
  c.data.hotpotqa_path = ""  # HotpotQA JSON (distractor format) for hotpotqa tasks
  c.data.squad_path = ""  # SQuAD v2 JSON for squad tasks
  c.data.memagent_path = ""  # MemAgent's training parquet or eval_{num_docs}.json (memagent task)
  c.data.ruler_path = ""  # RULER jsonl (input, outputs, length) for the ruler task
  c.data.essays_path = ""  # essay haystack text file (RULER's Paul Graham essays)
  c.data.num_documents = 200  # HotpotQA/SQuAD documents per example

  c.agent = ml_collections.ConfigDict()
  c.agent.mode = "gru_mem"  # memagent | gru_mem | gru_mem_no_exit
  c.agent.chunk_tokens = 5000  # tokens of document per memory turn (paper: 5000)
  c.agent.memory_tokens = 1024  # memory cap in tokens (paper: 1024)
  c.agent.max_response_tokens = 1536  # budget of one memory-turn response
  c.agent.max_answer_tokens = 256  # budget of the answer turn
  c.agent.prompt = "auto"  # auto | paper (instruct models) | compact (built-in tokenizer) |
  #   minimal (fields only, for a model trained from scratch);
  #   auto: compact for the built-in tokenizer, paper for an HF tokenizer (agent/prompts.py)
  c.agent.prompt_file = ""  # a prompt file of one's own (format: prompts.read_prompt_file)

  c.sampling = ml_collections.ConfigDict()
  c.sampling.temperature = 1.0  # rollout temperature during RL
  c.sampling.top_p = 1.0  # 1.0 disables nucleus filtering
  c.sampling.top_k = 0  # 0 disables top-k filtering
  c.sampling.eval_temperature = 0.0  # evaluation decodes greedily
  c.sampling.prefill_chunk_tokens = 2048  # prefill long prompts this many tokens at a time
  c.sampling.length_buckets = ""  # comma-separated padded prompt lengths ("": powers of two
  #   from 64); a paper config adds one fitted to its prompt budget (buckets.budget_buckets)
  c.sampling.max_batch_rows = 256  # rows per sampler call (more are split into several calls)
  c.sampling.slots = 256  # continuous batching through this many decode slots (0: static batches)
  c.sampling.param_dtype = "auto"  # the rollout copy's weights: auto (bfloat16 on an accelerator,
  #   float32 on CPU) | float32 | bfloat16 (gru_mem/rollout_weights.py)
  c.sampling.mesh = ml_collections.ConfigDict(dict(data=0, fsdp=0, tensor=0))  # the rollout
  #   copy's layout over the same devices (all 0: the learner's mesh; else a 0 counts as 1)
  c.sampling.kv_cache_dtype = "auto"  # the sampler's KV cache: auto (the rollout's compute
  #   dtype) | int8 (8-bit, a float32 scale per token and kv head: half a bfloat16 cache's
  #   bytes per decode step; gru_mem/model/kv_cache.py)

  c.rl = ml_collections.ConfigDict()
  c.rl.group_size = 16  # G rollouts per prompt (paper: 16)
  c.rl.prompts_per_step = 128  # prompts per RL step after dynamic sampling (paper: 128)
  c.rl.alpha = 0.9  # A = alpha * A_traj + (1 - alpha) * A_turn (paper: 0.9; MemAgent: 1.0)
  c.rl.normalize_advantage_std = False  # divide A_traj by the group std (GRPO) or not (paper)
  c.rl.advantage_std_eps = 1e-6  # added to the std when dividing by it
  c.rl.exit_early_penalty = -0.75  # r_exit when exiting before the last evidence chunk
  c.rl.exit_late_penalty = -0.5  # r_exit when exiting after it
  c.rl.outcome_reward_weight = 1.0  # weight of r_out in r_traj
  c.rl.format_reward_weight = 1.0  # weight of r_fmt in r_traj
  c.rl.exit_reward_weight = 1.0  # weight of r_exit in r_traj
  c.rl.update_correct_reward = 1.0  # r_upd when the update gate matches the evidence flag
  c.rl.update_wrong_reward = -1.0  # r_upd otherwise (an unparseable gate is wrong)
  c.rl.answer_match = "exact"  # exact | sub_exact: how r_out compares answers (normalised)
  c.rl.dynamic_sampling = True  # drop groups whose advantages are all zero and refill
  c.rl.dynamic_sampling_atol = 1e-6  # |A| below this counts as zero
  c.rl.max_refill_rounds = 4  # extra prompt draws per step to refill dropped groups
  c.rl.clip_eps_low = 0.2  # rho lower clip 1 - eps_low (DAPO)
  c.rl.clip_eps_high = 0.28  # rho upper clip 1 + eps_high (DAPO clip-higher)
  c.rl.kl_beta = 0.001  # weight of the k3 KL to the frozen reference policy (0: no reference)
  c.rl.clip_ratio_c = 3.0  # dual-clip: for A < 0 the per-token loss is capped at -c * A (verl: 3;
  #   0 disables)
  c.rl.log_ratio_clamp = 20.0  # log(pi / pi_old) and log(pi_ref / pi) clamped to +-this before exp
  #   (0 disables)
  c.rl.kl_clamp = 10.0  # the per-token k3 KL clamped to [-c, c] (verl's low_var_kl: 10; 0 disables)
  c.rl.compute_entropy = True  # log the policy's token-mean entropy (one more pass over logits)
  c.rl.recompute_old_logprobs = ml_collections.config_dict.placeholder(bool)  # pi_old from a
  #   learner forward before the update (None: on when the rollout's dtype or layout differs)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-6  # AdamW peak learning rate (paper: 1e-6)
  c.optim.warmup_steps = 0  # linear warmup steps
  c.optim.lr_schedule = "constant"  # after warmup: constant | cosine (to final_lr_fraction)
  c.optim.decay_steps = 0  # cosine decay length in steps (needed by lr_schedule=cosine)
  c.optim.final_lr_fraction = 0.1  # the cosine ends at this fraction of the peak
  c.optim.weight_decay = 0.01  # AdamW decoupled weight decay
  c.optim.adam_b1 = 0.9  # AdamW beta1
  c.optim.adam_b2 = 0.999  # AdamW beta2
  c.optim.adam_eps = 1e-8  # AdamW epsilon
  c.optim.max_grad_norm = 1.0  # global gradient-norm clip
  c.optim.micro_batch_rows = 8  # learner rows per micro-batch (gradient accumulation)
  c.optim.length_buckets = ""  # comma-separated padded row lengths ("": powers of two from 64)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size (-1: all remaining devices)
  c.mesh.fsdp = 1  # fully-sharded data-parallel axis size
  c.mesh.tensor = 1  # tensor-parallel axis size

  c.sft = ml_collections.ConfigDict()  # stage 1 of the default job (gru_mem.sft)
  c.sft.steps = 0  # supervised steps on scripted trajectories (0: no SFT stage)
  c.sft.examples_per_step = 4  # scripted trajectories per step (all their turns are rows)
  c.sft.copy_steps = 0  # first steps: copy warm-up (response = prompt) instead of trajectories
  c.sft.copy_rows = 32  # rows per copy warm-up step
  c.sft.copy_tokens = 24  # longest random prompt of the copy warm-up
  c.sft.micro_batch_rows = 64  # rows per micro-batch (gradient accumulation)
  c.sft.learning_rate = 1e-3  # AdamW peak learning rate, cosine-decayed over the steps
  c.sft.final_lr_fraction = 0.1  # the cosine ends at this fraction of the peak
  c.sft.warmup_steps = 20  # linear warmup steps
  c.sft.init = "model"  # random init of a preset: model (std 0.02) | fan_in (1/sqrt(fan_in))
  c.sft.weight_decay = 0.0  # AdamW decoupled weight decay
  c.sft.update_noise = 0.15  # P(a scripted turn says no): on evidence chunks (else everywhere)
  c.sft.exit_noise = 0.08  # P(a scripted turn says end): before the memory is complete (else all)
  c.sft.update_noise_non_evidence = ml_collections.config_dict.placeholder(float)  # P(no) on chunks
  #   without evidence (None: update_noise): a prior as weak as a pretrained reader's
  c.sft.exit_noise_complete = ml_collections.config_dict.placeholder(float)  # P(end) once the
  #   memory holds all evidence (None: exit_noise)
  c.sft.memagent_fraction = 0.5  # share of trajectories in MemAgent format (the baseline)
  c.sft.keep_non_evidence_turns = 1.0  # P(keeping a memory turn whose section holds no evidence)
  c.sft.think = "state"  # scripted <think>: state (evidence|nothing [enough]) | empty
  c.sft.seed = 1  # data seed of the scripted examples (RL uses `seed`: disjoint examples)
  c.sft.save_every = 100  # checkpoint every N steps (and at the end)
  c.sft.log_every = 10  # average and log metrics every N steps

  c.eval = ml_collections.ConfigDict()  # gru_mem.evaluate (stage 3 of the default job)
  c.eval.tasks = "niah_single_1"  # comma-separated tasks (synthetic, hotpotqa, squad, memagent,
  #   ruler: the last two are read whole from their files, one cell each)
  c.eval.lengths = "8192"  # comma-separated document + question lengths in tokens
  c.eval.evidence_depths = "1.0"  # comma-separated: evidence within this leading fraction
  c.eval.modes = "memagent,gru_mem_no_exit,gru_mem"  # modes of the evaluated model
  c.eval.baseline_modes = "memagent"  # modes of --baseline_workdir's model (the stage-1 model)
  c.eval.examples = 32  # held-out examples per (task, length, depth)
  c.eval.batch_size = 16  # examples per rollout batch
  c.eval.seed = 7  # held-out data seed (training uses `seed` and `sft.seed`)
  c.eval.min_update_acc = 0.95  # check: update-gate accuracy on evidence / non-evidence chunks
  c.eval.min_exit_exact = 0.8  # check: share of exits exactly at the last evidence chunk
  c.eval.max_accuracy_drop = 0.02  # check: GRU-Mem accuracy at most this below MemAgent's
  c.eval.min_speedup = 3.0  # check: MemAgent / GRU-Mem tokens processed, early evidence
  c.eval.speed_depth = 0.2  # the speed check's cells: evidence within this fraction ...
  c.eval.speed_min_chunks = 32  # ... of documents of at least this many chunks

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100  # RL steps
  c.train.save_every = 50  # checkpoint every N steps (and at the end)
  c.train.keep_checkpoints = 3  # keep the last K checkpoints
  c.train.max_nonfinite_steps = 5  # stop (last good state saved) after this many steps in a row
  #   whose loss or gradients were not finite (each such update is skipped); 0: never stop
  c.train.dry_run = False  # abstract params + AOT compile on fake devices; allocates nothing
  c.train.dry_run_chip = ""  # the chip of the dry run's decode roofline: h100 | tpu_v5p ("": none)
  return c
