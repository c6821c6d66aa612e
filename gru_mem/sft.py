r"""Stage 1 of the default job: a supervised warm start on scripted memory-agent trajectories.

  python -m gru_mem.sft --config configs/tiny.py --workdir runs/default/sft

A small model trained from scratch knows nothing of the response format, so RL alone would never
see a parseable turn. This stage teaches the format and the copying skill from scripted
trajectories over synthetic examples whose evidence chunks are known:

  memory turn t (gated):   <think>T</think> <check>U</check> <update>M</update> <next>E</next>
  memory turn t (memagent): M
  answer turn:              \boxed{answer}

The scripted memory M is the previous memory plus the evidence text of chunk t, copied from the
document (a needle cut by a chunk boundary is copied piece by piece). The think T states what a
reader notes and decides (`scripted_think`): whether the section holds evidence, and "enough"
once M holds all of it, each followed by the decision it bears on, which the tags repeat. The
decisions are scripted MemAgent-like: U = yes and E = continue, except that U says no with
probability `update_noise` (`update_noise_plain` on a chunk without evidence) and E says end with
probability `exit_noise` (`exit_noise_complete` once the memory holds every evidence). So the
warm-started policy reads, copies and answers, and, sampled, says `no` / `end` now and then, which
RL needs to explore; greedy, it always updates and never exits (every noise below 1/2). Tying the
gates to what the section holds is left to RL: with equal noise the stage-1 gates are blind to it;
the tiny config makes the noise a little higher where no / end would be right, a prior no
stronger than a pretrained reader's, and the policy's greedy gates are still "yes, continue".
A turn whose gate says no writes an empty <update> (the memory is kept, nothing to copy). Half
of the trajectories (`memagent_fraction`) use the MemAgent prompt and response, so the same
weights are the MemAgent baseline of the evaluation.

Before the trajectories, `copy_steps` steps of a copy warm-up (`CopyRows`) grow the in-context
copying a pretrained model would bring, and `fan_in_params` scales a from-scratch init so it does.

The loss is the token mean of -log pi(response token) over all response tokens of the batch,
with exact micro-batch accumulation (sums and counts, as in `rl/learner.py`). Every step's rows
are a pure function of (seed, step), so a resumed run sees exactly the batches a straight run
would.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # clu imports TensorFlow: keep it quiet

import dataclasses
import random
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gru_mem import checkpoint, gates, logs, runtime
from gru_mem.agent import parse
from gru_mem.agent.prompts import EMPTY_MEMORY, PromptBuilder
from gru_mem.agent.rollout import AgentExample
from gru_mem.data import examples as data_examples
from gru_mem.data.tokenizer import IM_END, Tokenizer
from gru_mem.rl import learner, loss

# Padded lengths of SFT batches: multiples of 32 keep the padding of ~250-token turns small.
SFT_LENGTH_BUCKETS = tuple(range(32, 1024 + 1, 32)) + tuple(2 ** i for i in range(11, 16))


THINK_STYLES = ("state", "empty")


@dataclasses.dataclass(frozen=True)
class ScriptSettings:
  """How scripted trajectories are drawn (each a config key under `sft`)."""
  update_noise: float = 0.15  # P(a turn says no): on evidence chunks (and all, by default)
  exit_noise: float = 0.08  # P(a turn says end): before the memory is complete (and always)
  update_noise_plain: Optional[float] = None  # P(no) on chunks without evidence (None: same)
  exit_noise_complete: Optional[float] = None  # P(end) once the memory is complete (None: same)
  memagent_fraction: float = 0.5  # share of trajectories in the MemAgent format
  memory_tokens: int = 1024  # the memory cap (agent.memory_tokens)
  keep_plain_turns: float = 1.0  # P(training on a memory turn whose section holds no evidence)
  think: str = "state"  # "state": say what the section holds (see `scripted_think`) | "empty"

  def __post_init__(self):
    if self.think not in THINK_STYLES:
      raise ValueError(f"sft.think={self.think!r}: use one of {THINK_STYLES}")
    for name in ("update_noise", "exit_noise", "memagent_fraction", "keep_plain_turns",
                 "update_noise_plain", "exit_noise_complete"):
      if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"sft.{name}={getattr(self, name)}: must be in [0, 1]")
    if self.memory_tokens < 1:
      raise ValueError(f"memory_tokens={self.memory_tokens}: must be >= 1")

  def update_noise_for(self, has_evidence: bool) -> float:
    """P(the scripted update gate says no) on a chunk with or without evidence."""
    if has_evidence or self.update_noise_plain is None:
      return self.update_noise
    return self.update_noise_plain

  def exit_noise_for(self, memory_complete: bool) -> float:
    """P(the scripted exit gate says end), before or once the memory holds every evidence."""
    if not memory_complete or self.exit_noise_complete is None:
      return self.exit_noise
    return self.exit_noise_complete


def end_of_turn_id(tokenizer: Tokenizer) -> int:
  """The token that ends an assistant turn: <|im_end|> for ChatML tokenizers, else EOS."""
  im_end = tokenizer.token_id(IM_END)
  return tokenizer.eos_id if im_end is None else im_end


def response_ids(text: str, tokenizer: Tokenizer) -> np.ndarray:
  """encode(text) + the end-of-turn token: what a sampler that stops on it would have produced."""
  return np.asarray(tokenizer.encode(text) + [end_of_turn_id(tokenizer)], np.int32)


def evidence_in_chunk(chunks, chunk_index: int) -> list[tuple[int, np.ndarray, bool]]:
  """(span index, the span's token ids inside chunk `chunk_index`, whether the span started in an
  earlier chunk) for every evidence span that overlaps the chunk, in document order."""
  start, end = chunk_index * chunks.chunk_tokens, (chunk_index + 1) * chunks.chunk_tokens
  pieces = []
  for index, (t0, t1) in enumerate(chunks.evidence_token_spans):
    lo, hi = max(t0, start), min(t1, end)
    if lo < hi:
      pieces.append((index, chunks.token_ids[lo:hi], t0 < start))
  return pieces


def copy_evidence(copied: str, pieces, stored_spans: set, tokenizer: Tokenizer) -> str:
  """The evidence text copied so far (`copied`, unstripped) plus the evidence of this chunk.

  A piece that continues a span whose start was copied is appended as is (a chunk boundary may
  cut a word or a number, or fall just before a space); a new piece is appended after a space.
  The scripted memory is the result, stripped.
  """
  for index, ids, continues in pieces:
    piece = tokenizer.decode(ids)
    if continues and index in stored_spans:
      copied += piece
    else:
      copied = f"{copied.rstrip()} {piece.lstrip()}" if copied.strip() else piece.lstrip()
  return copied


def scripted_think(has_evidence: bool, memory_complete: bool, update: bool, end: bool,
                   style: str) -> str:
  """The <think> of a scripted gated turn: each observation, then the decision it bears on.

  "state": "evidence" or "nothing" (does this section hold evidence?), the update decision
  ("yes" / "no"), "enough" once the candidate memory holds every piece of evidence (it answers
  the question), then the exit decision ("continue" / "end"), e.g. "evidence yes enough end".
  The decisions are the scripted gates (MemAgent-like plus noise) and the <check> / <next> tags
  repeat them. Each decision word comes right after the observation it should follow, where a
  small model's state holds that observation plainly: RL then only has to learn to let the
  decision follow the observation. "empty": an empty think.
  """
  if style == "empty":
    return ""
  return " ".join(["evidence" if has_evidence else "nothing", "yes" if update else "no"]
                  + (["enough"] if memory_complete else []) + ["end" if end else "continue"])


@dataclasses.dataclass
class ScriptedTurn:
  prompt_ids: np.ndarray
  response_ids: np.ndarray
  kind: str  # "memory" | "answer"
  has_evidence: bool = False  # a memory turn whose section holds evidence


def scripted_trajectory(example: AgentExample, builder: PromptBuilder, tokenizer: Tokenizer,
                        rng: random.Random, script: ScriptSettings) -> list[ScriptedTurn]:
  """The turns of one scripted read of `example` in the builder's mode (see the module doc).

  The memory carried from turn to turn is what the rollout would carry: the parsed <update> of a
  `yes` turn (gated) or the whole response (memagent), cut to `memory_tokens`. The answer turn is
  kept only when the final memory holds every evidence piece (else no answer can be scripted).
  """
  gated = builder.gated
  memory_ids = np.zeros((0,), np.int32)
  copied, stored_spans, lost_evidence = "", set(), False
  turns = []
  for chunk_index in range(example.chunks.num_chunks):
    pieces = evidence_in_chunk(example.chunks, chunk_index)
    candidate_copied = copy_evidence(copied, pieces, stored_spans, tokenizer)
    candidate = candidate_copied.strip() or EMPTY_MEMORY
    complete = not lost_evidence and chunk_index >= example.chunks.last_evidence_chunk
    update = not (gated and rng.random() < script.update_noise_for(bool(pieces)))
    say_end = gated and rng.random() < script.exit_noise_for(complete and update)
    prompt = builder.memory_turn(example.question_ids, memory_ids,
                                 example.chunks.chunk(chunk_index))
    if gated:
      think = scripted_think(bool(pieces), complete, update, say_end, script.think)
      text = parse.format_response(think, gates.UPDATE_YES if update else gates.UPDATE_NO,
                                   candidate if update else "",
                                   gates.EXIT_END if say_end else gates.EXIT_CONTINUE)
    else:
      text = candidate
    turns.append(ScriptedTurn(prompt, response_ids(text, tokenizer), "memory",
                              has_evidence=bool(pieces)))
    if update:
      copied = candidate_copied
      memory_ids = np.asarray(parse.cut_to_tokens(candidate, script.memory_tokens, tokenizer)[1],
                              np.int32)
      stored_spans.update(index for index, _, _ in pieces)
    elif pieces:
      lost_evidence = True
    if say_end:
      break
  complete = (not lost_evidence and chunk_index >= example.chunks.last_evidence_chunk
              and len(tokenizer.encode(copied.strip())) <= script.memory_tokens)
  if complete:
    answer_text = "\\boxed{" + ", ".join(example.answers) + "}"
    turns.append(ScriptedTurn(builder.answer_turn(example.question_ids, memory_ids),
                              response_ids(answer_text, tokenizer), "answer"))
  return turns


class ScriptedRows:
  """The learner rows of SFT step s: every turn of the scripted trajectories of examples
  [s * examples_per_step, (s + 1) * examples_per_step) of the `data` stream with seed `seed`."""

  def __init__(self, data_config, tokenizer: Tokenizer, chunk_tokens: int, script: ScriptSettings,
               examples_per_step: int, seed: int):
    if examples_per_step < 1:
      raise ValueError(f"sft.examples_per_step={examples_per_step}: must be >= 1")
    data_examples.check_data_config(data_config)
    self.data_config, self.tokenizer, self.chunk_tokens = data_config, tokenizer, chunk_tokens
    self.script, self.examples_per_step, self.seed = script, examples_per_step, seed
    self.builders = {mode: PromptBuilder(tokenizer, mode) for mode in ("gru_mem", "memagent")}

  def trajectory(self, index: int) -> list[ScriptedTurn]:
    example = data_examples.example_at(self.data_config, self.tokenizer, index, self.seed)
    agent_example = AgentExample.from_example(example, self.tokenizer, self.chunk_tokens)
    rng = random.Random(f"sft/{self.seed}/{index}")
    mode = "memagent" if rng.random() < self.script.memagent_fraction else "gru_mem"
    return scripted_trajectory(agent_example, self.builders[mode], self.tokenizer, rng,
                               self.script)

  def rows(self, step: int) -> list[learner.LearnerRow]:
    """The step's turns. A memory turn whose section holds no evidence (it writes "none" or
    copies the memory forward, the most common and least informative kind) is kept with
    probability keep_plain_turns; the step's first turn always is, so a step is never empty."""
    first = step * self.examples_per_step
    turns = [turn for index in range(first, first + self.examples_per_step)
             for turn in self.trajectory(index)]
    rng = random.Random(f"sft/{self.seed}/keep/{step}")
    turns = [t for i, t in enumerate(turns)
             if i == 0 or t.kind == "answer" or t.has_evidence
             or rng.random() < self.script.keep_plain_turns]
    return [learner.LearnerRow(t.prompt_ids, t.response_ids, 1.0,
                               np.zeros(len(t.response_ids), np.float32)) for t in turns]


class CopyRows:
  """Rows of the copy warm-up: a prompt of random tokens, the response is the same tokens.

  A model trained from scratch has none of the in-context copying a pretrained LM brings; this
  dense copy signal (every response token is a copy) grows it in a few hundred cheap steps (at
  hidden 64 with `fan_in_params`, a phase change near step 500), and the scripted trajectories
  then only have to say *what* to copy. Each token is a digit with probability `digit_fraction`,
  else a word of the built-in vocabulary: runs of digits repeat tokens, so copying them needs
  more than the last token, as a 7-digit needle value does. Step s is a pure function of
  (seed, s).
  """

  def __init__(self, tokenizer: Tokenizer, rows_per_step: int, max_tokens: int, seed: int,
               digit_fraction: float = 0.5):
    if rows_per_step < 1 or max_tokens < 4:
      raise ValueError(f"sft.copy_rows={rows_per_step} must be >= 1 and sft.copy_tokens="
                       f"{max_tokens} >= 4")
    from gru_mem.data import vocabulary  # pylint: disable=import-outside-toplevel
    words = [tokenizer.encode(" " + w) for w in vocabulary.all_words()]
    self.words = np.asarray([ids[0] for ids in words if len(ids) == 1], np.int32)
    self.digits = np.asarray([tokenizer.encode(str(d))[0] for d in range(10)], np.int32)
    self.rows_per_step, self.max_tokens, self.seed = rows_per_step, max_tokens, seed
    self.digit_fraction = digit_fraction
    self.end_id = end_of_turn_id(tokenizer)

  def rows(self, step: int) -> list[learner.LearnerRow]:
    rng = np.random.default_rng([self.seed, step])
    rows = []
    for _ in range(self.rows_per_step):
      length = rng.integers(4, self.max_tokens + 1)
      tokens = np.where(rng.random(length) < self.digit_fraction,
                        rng.choice(self.digits, length), rng.choice(self.words, length))
      copy = np.append(tokens, self.end_id).astype(np.int32)  # the end token separates them
      rows.append(learner.LearnerRow(copy, copy, 1.0, np.zeros(len(copy), np.float32)))
    return rows


# ----------------------------------------------------------------------------- the step


def _nll_terms(params, micro: learner.Batch, config):
  """Sums over one micro-batch: nll_sum = -sum log pi(response token), token_count, and
  correct_count (tokens that greedy decoding would have produced)."""
  logits = learner._response_logits(config, params, micro)  # pylint: disable=protected-access
  logp = loss.token_log_probs(logits, micro.response_tokens)  # [rows, response]
  mask = micro.response_mask
  nll_sum = -jnp.sum(jnp.where(mask, logp, 0.0))
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == micro.response_tokens) & mask)
  return nll_sum, {"nll_sum": nll_sum, "token_count": jnp.sum(mask).astype(jnp.float32),
                   "correct_count": correct.astype(jnp.float32)}


def _sft_step(state: learner.TrainState, batch: learner.Batch, *, config,
              settings: learner.LearnerSettings):
  """theta <- AdamW(clip(sum_micro grad nll_sum / token_count)): the gradient of the token-mean
  NLL of the whole batch, however it is cut into micro-batches."""
  grad_fn = jax.grad(_nll_terms, has_aux=True)
  zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  zero_terms = {k: jnp.zeros((), jnp.float32) for k in ("nll_sum", "token_count", "correct_count")}

  def add_micro_batch(index, carry):
    grad_sum, terms_sum = carry
    grads, terms = grad_fn(state.params, batch.micro_batch(index), config)
    return (jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads),
            jax.tree.map(jnp.add, terms_sum, terms))

  rows = batch.tokens.shape[1]
  num_micro = (jnp.asarray(batch.num_rows, jnp.int32) + rows - 1) // rows
  grad_sum, terms = jax.lax.fori_loop(0, num_micro, add_micro_batch, (zero_grads, zero_terms))
  tokens = jnp.maximum(terms["token_count"], 1.0)
  grads = jax.tree.map(lambda g, p: (g / tokens).astype(p.dtype), grad_sum, state.params)
  updates, opt_state = learner.make_optimizer(settings).update(grads, state.opt_state, state.params)
  new_state = learner.TrainState(optax.apply_updates(state.params, updates), opt_state,
                                 state.step + 1)
  metrics = {"loss": terms["nll_sum"] / tokens, "token_accuracy": terms["correct_count"] / tokens,
             "grad_norm": optax.global_norm(grads), "tokens": terms["token_count"],
             "learning_rate": learner.learning_rate_at(settings, state.step)}
  return new_state, metrics


def make_sft_step(config, settings: learner.LearnerSettings):
  """`sft_step(state, batch) -> (new state, metrics)`, jitted, the state donated. metrics: loss
  (token-mean NLL), token_accuracy, grad_norm, tokens, learning_rate."""
  step = jax.jit(lambda s, b: _sft_step(s, b, config=config, settings=settings), donate_argnums=0)

  def sft_step(state, batch):
    if np.shape(batch.tokens)[1] != settings.micro_batch_rows:
      raise ValueError(f"batch has {np.shape(batch.tokens)[1]} rows per micro-batch but "
                       f"micro_batch_rows={settings.micro_batch_rows}: pack with the same value")
    return step(state, batch)
  return sft_step


def eval_nll(config, params, batch: learner.Batch) -> dict:
  """Token-mean NLL and greedy token accuracy of `params` on a packed batch (no update)."""
  totals = {"nll_sum": 0.0, "token_count": 0.0, "correct_count": 0.0}
  terms_fn = jax.jit(lambda p, m: _nll_terms(p, m, config)[1])
  rows = np.shape(batch.tokens)[1]
  for index in range(-(-int(batch.num_rows) // rows)):
    terms = jax.device_get(terms_fn(params, batch.micro_batch(index)))
    totals = {k: totals[k] + float(terms[k]) for k in totals}
  count = max(totals["token_count"], 1.0)
  return {"loss": totals["nll_sum"] / count, "token_accuracy": totals["correct_count"] / count}


# ----------------------------------------------------------------------------- the stage

INITS = ("model", "fan_in")
_RESIDUAL_OUTPUTS = ("o_proj", "down_proj")  # projections that write into the residual stream


def fan_in_params(params, num_layers: int, model_init_std: float = 0.02):
  """Rescales a fresh `transformer.init_params` draw (normal, std 0.02 everywhere, Qwen's
  choice for wide models) to std 1/sqrt(fan_in) for every kernel, further divided by
  sqrt(2 * num_layers) for the projections that write into the residual stream, and
  1/sqrt(hidden) for the embedding. At hidden 64, 0.02 is 6x below 1/sqrt(fan_in) and a model
  trained from scratch sits for hundreds of steps near that small-weight saddle before it learns
  to copy from its context; biases and norms keep their init.
  """
  def rescale(path, x):
    names = [str(getattr(p, "key", p)) for p in path]
    if names[-1] == "embed_tokens":
      return x * (1.0 / np.sqrt(x.shape[-1]) / model_init_std)
    if names[-1] != "kernel":
      return x
    residual = any(n in _RESIDUAL_OUTPUTS for n in names)
    fan_in = int(np.prod(x.shape[:-1])) if residual else int(x.shape[0])
    std = 1.0 / np.sqrt(fan_in) / (np.sqrt(2.0 * num_layers) if residual else 1.0)
    return x * (std / model_init_std)
  return jax.tree_util.tree_map_with_path(rescale, params)



def sft_learner_settings(config) -> learner.LearnerSettings:
  s, o = config.sft, config.optim
  return learner.LearnerSettings(
      learning_rate=s.learning_rate, warmup_steps=s.warmup_steps, lr_schedule="cosine",
      decay_steps=max(s.steps - s.warmup_steps, 1), final_lr_fraction=s.final_lr_fraction,
      weight_decay=s.weight_decay, adam_b1=o.adam_b1, adam_b2=o.adam_b2,
      max_grad_norm=o.max_grad_norm, kl_beta=0.0, micro_batch_rows=s.micro_batch_rows,
      length_buckets=SFT_LENGTH_BUCKETS, compute_entropy=False)


def script_settings(config) -> ScriptSettings:
  s = config.sft
  return ScriptSettings(update_noise=s.update_noise, exit_noise=s.exit_noise,
                        update_noise_plain=s.get("update_noise_plain"),
                        exit_noise_complete=s.get("exit_noise_complete"),
                        memagent_fraction=s.memagent_fraction,
                        memory_tokens=config.agent.memory_tokens,
                        keep_plain_turns=s.keep_plain_turns, think=s.think)


def validate(config) -> None:
  """Bad settings fail here, before any model is built or compiled."""
  if config.sft.steps < 1:
    raise ValueError(f"sft.steps={config.sft.steps}: must be >= 1 to run the SFT stage")
  if config.sft.examples_per_step < 1 or config.sft.micro_batch_rows < 1:
    raise ValueError(f"sft.examples_per_step={config.sft.examples_per_step} and "
                     f"sft.micro_batch_rows={config.sft.micro_batch_rows}: both must be >= 1")
  if not 0 <= config.sft.copy_steps < config.sft.steps:
    raise ValueError(f"sft.copy_steps={config.sft.copy_steps}: must be in [0, sft.steps="
                     f"{config.sft.steps}) (the copy warm-up comes first, then the trajectories)")
  if config.sft.init not in INITS:
    raise ValueError(f"sft.init={config.sft.init!r}: use one of {INITS}")
  if config.sft.save_every < 1:
    raise ValueError(f"sft.save_every={config.sft.save_every}: must be >= 1")
  script_settings(config)
  sft_learner_settings(config)
  data_examples.check_data_config(config.data)


def train_sft(config, workdir: str, on_step=None) -> dict:
  """Runs (or resumes) stage 1 in `workdir`; returns the last logged metrics.

  The run folder has the layout of an RL run (checkpoints/ with params and the model config,
  tokenizer/, metrics.jsonl, tensorboard/), so `runtime.load_run` and `model.init_workdir` read it.
  `on_step(step, metrics)` is called after every step (progress bars, tests).
  """
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = runtime.build_tokenizer(config)
  model_config = runtime.model_config_from(config, tokenizer)
  tokenizer.save(os.path.join(workdir, runtime.TOKENIZER_DIR))
  settings = sft_learner_settings(config)
  rng = jax.random.PRNGKey(config.seed)
  params = runtime.initial_params(config, model_config, rng)
  if config.sft.init == "fan_in" and not (config.model.hf_path or config.model.init_workdir):
    params = fan_in_params(params, model_config.num_layers)
  state = learner.create_train_state(params, settings)
  manager = checkpoint.CheckpointManager(workdir, config.sft.save_every, keep=2)
  start_step = 0
  if manager.latest_step() is not None:
    restored, _, _ = manager.restore(abstract_state={
        "params": state.params, "opt_state": state.opt_state, "step": state.step})
    state = learner.TrainState(restored["params"], restored["opt_state"], restored["step"])
    start_step = int(state.step)
    print(f"[sft] resumed from step {start_step} in {workdir}")
  rows = ScriptedRows(config.data, tokenizer, config.agent.chunk_tokens, script_settings(config),
                      config.sft.examples_per_step, config.sft.seed)
  copy_rows = CopyRows(tokenizer, config.sft.copy_rows, config.sft.copy_tokens, config.sft.seed)
  sft_step = make_sft_step(model_config, settings)
  total = config.sft.steps
  logger = logs.MetricLogger(workdir, total, start_step=start_step,
                             console_keys=("loss", "token_accuracy"))
  metadata = runtime.run_metadata(config, model_config)
  metrics: dict = {}
  window: list = []
  try:
    for step in range(start_step, total):
      start = time.perf_counter()
      step_rows = (copy_rows.rows(step) if step < config.sft.copy_steps
                   else rows.rows(step - config.sft.copy_steps))
      batch = learner.pack(step_rows, settings, pad_id=tokenizer.pad_id)
      state, step_metrics = sft_step(state, batch)
      window.append(step_metrics)
      if (step + 1) % config.sft.log_every == 0 or step + 1 == total:
        host = jax.device_get(window)
        metrics = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        metrics["time/step_s"] = time.perf_counter() - start
        logger.log(step + 1, metrics, tokens=int(sum(m["tokens"] for m in host)))
        window = []
      if on_step is not None:
        on_step(step + 1, metrics)
      manager.save(step + 1, {"params": state.params, "opt_state": state.opt_state,
                              "step": state.step}, {"examples_consumed": (step + 1)
                                                    * config.sft.examples_per_step}, metadata)
    if total > start_step and manager.latest_step() != total:
      manager.save(total, {"params": state.params, "opt_state": state.opt_state,
                           "step": state.step},
                   {"examples_consumed": total * config.sft.examples_per_step}, metadata,
                   force=True)
  finally:
    manager.close()
    logger.close()
  return metrics


def completed_steps(workdir: str) -> Optional[int]:
  """The latest checkpointed step of a run folder, or None when it has none."""
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    return None
  manager = checkpoint.CheckpointManager(workdir, read_only=True)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)
  train_sft(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "experiment config file")
  flags.DEFINE_string("workdir", None, "run folder of the SFT stage", required=True)
  app.run(main)
