"""The run skeleton that RL training (`train`) and stage 1 (`sft`) share.

  stage = Stage("train", workdir, total_steps, save_every, keep, metadata, console_keys=...)
  state, rng, data_position, start = stage.resume(state, rng, data_position)
  for step in range(start, total_steps):
    state, metrics = one_step(...)
    if stage.end_of_step(step + 1, state, rng, data_position, metrics, tokens):
      break                       # SIGTERM or too many non-finite steps: saved, stop cleanly
  stage.finish(last_step, state, rng, data_position)
  stage.close()                   # in a finally: waits for the writes

What it owns: the checkpoint manager (resume from the latest complete step; a save every
`save_every` steps, asynchronous, and a forced final save), the metric logger (TensorBoard,
metrics.jsonl, the one-line console progress), and stopping early:

  * SIGTERM (preemption of a spot VM, maintenance, a Slurm time limit): the step in flight
    finishes, a checkpoint of it is written, the run exits 0 with a line saying where it stopped.
    On several hosts every host stops after the same step: the hosts all-gather their SIGTERM
    flags after each step, so a signal to any one host stops them all there.
  * A run of `max_nonfinite_steps` consecutive steps whose loss or gradients were not finite
    (the learner skips such an update and reports it in `nonfinite_metric`; SFT logs a mean over
    `sft.log_every` steps, so there a run of such windows counts): the last good state is saved
    and the run stops with a message.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Mapping, Optional

import jax
import numpy as np

from gru_mem import checkpoint, logs
from gru_mem.rl import learner



class Stage:
  """One resumable stage in `workdir` (see the module doc)."""

  def __init__(self, name: str, workdir: str, total_steps: int, save_every: int,
               keep: Optional[int], metadata: Mapping[str, Any],
               console_keys: Optional[Mapping[str, str]] = None, max_nonfinite_steps: int = 0,
               nonfinite_metric: str = "learner/nonfinite", show_token_rate: bool = True):
    self.name, self.workdir, self.total_steps = name, workdir, total_steps
    self.metadata, self.console_keys = dict(metadata), console_keys
    self.show_token_rate = show_token_rate
    self.max_nonfinite_steps, self.nonfinite_metric = max_nonfinite_steps, nonfinite_metric
    self.manager = checkpoint.CheckpointManager(workdir, save_every, keep)
    self.logger: Optional[logs.MetricLogger] = None
    self.stopped_at: Optional[int] = None
    self.stop_reason = ""
    self._nonfinite_run = 0
    self._terminated = threading.Event()
    self._previous_handler = None

  # -------------------------------------------------------------------------- checkpoints

  @staticmethod
  def _items(state: learner.TrainState, rng) -> dict:
    items = {"params": state.params, "opt_state": state.opt_state, "step": state.step}
    if rng is not None:  # as numpy: a host-local key cannot be saved on several hosts
      items["rng"] = np.asarray(jax.device_get(rng))
    return items

  def resume(self, state: learner.TrainState, rng=None, data_position: Optional[dict] = None
             ) -> tuple[learner.TrainState, Any, dict, int]:
    """(state, rng, data position, first step): the latest checkpoint's, else the given ones.
    Starts the logger and the SIGTERM handler."""
    data_position = dict(data_position or {})
    start = 0
    if self.manager.latest_step() is not None:  # resume
      restored, data_position, _ = self.manager.restore(abstract_state=self._items(state, rng))
      state = learner.TrainState(restored["params"], restored["opt_state"], restored["step"])
      rng = restored.get("rng")
      start = int(self.manager.latest_step())
      print(f"[{self.name}] resumed from step {start} in {self.workdir}", flush=True)
    self.logger = logs.MetricLogger(self.workdir, max(self.total_steps, 1), start_step=start,
                                    console_keys=self.console_keys,
                                    show_token_rate=self.show_token_rate)
    self._install_sigterm_handler()
    return state, rng, data_position, start

  def save(self, step: int, state: learner.TrainState, rng, data_position: Mapping,
           force: bool = False) -> bool:
    return self.manager.save(step, self._items(state, rng), data_position, self.metadata,
                             force=force)

  # -------------------------------------------------------------------------- the loop

  def end_of_step(self, step: int, state: learner.TrainState, rng, data_position: Mapping,
                  metrics: Optional[Mapping[str, Any]] = None, tokens: Optional[float] = None
                  ) -> bool:
    """Logs `metrics` (when given), saves on the cadence, and says whether to stop now (then the
    step's checkpoint is already written)."""
    if metrics is not None:
      self.logger.log(step, metrics, tokens=tokens)
      if metrics.get(self.nonfinite_metric):
        self._nonfinite_run += 1
      elif self.nonfinite_metric in metrics:
        self._nonfinite_run = 0
    self.save(step, state, rng, data_position)
    reason = ""
    if self.max_nonfinite_steps and self._nonfinite_run >= self.max_nonfinite_steps:
      reason = (f"{self._nonfinite_run} consecutive steps had a non-finite loss or gradient "
                "(their updates were skipped); the last good state is saved. Lower the learning "
                "rate or check the data, then restart from this checkpoint")
    elif self._preempted(step):
      reason = "SIGTERM received"
    if not reason:
      return False
    if self.manager.latest_step() != step:
      self.save(step, state, rng, data_position, force=True)
    self.manager.wait_until_finished()
    self.stopped_at, self.stop_reason = step, reason
    print(f"[{self.name}] stopped after step {step} of {self.total_steps}: {reason}; "
          f"checkpoint {step} in {checkpoint.checkpoint_dir(self.workdir)}. Run the same "
          "command again to resume.", flush=True)
    return True

  def finish(self, step: int, state: learner.TrainState, rng, data_position: Mapping) -> None:
    """The forced save of the last step run (unless the run stopped early and saved already)."""
    if self.stopped_at is None and step > 0 and self.manager.latest_step() != step:
      self.save(step, state, rng, data_position, force=True)

  def close(self) -> None:
    """Waits for pending saves and closes the manager and the logger (idempotent)."""
    self._restore_sigterm_handler()
    if self.manager is not None:
      self.manager.close()
      self.manager = None
    if self.logger is not None:
      self.logger.close()
      self.logger = None

  # -------------------------------------------------------------------------- preemption

  def _install_sigterm_handler(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # signals reach the main thread only

    def on_sigterm(signum, frame):
      del signum, frame
      self._terminated.set()

    self._previous_handler = signal.signal(signal.SIGTERM, on_sigterm)

  def _restore_sigterm_handler(self) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def _preempted(self, step: int) -> bool:
    """This process got SIGTERM, or (several hosts) any host did: the hosts all-gather their
    flags after every step, so every host stops after the same step and saves it."""
    del step
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      flags = multihost_utils.process_allgather(np.int32(self._terminated.is_set()))
      return bool(np.any(flags))
    return self._terminated.is_set()

