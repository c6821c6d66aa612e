"""Shared benchmark helpers: timing, machine and version info, and the JSON every figure goes to.

Each benchmark saves `benchmarks/results/<name>.json` holding its figures plus the machine, the
package versions and the command line that produced them.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PACKAGES = ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "safetensors")


def machine_info() -> dict[str, Any]:
  """CPU model, core count, memory, load average and the JAX devices of this machine."""
  info: dict[str, Any] = {
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "cpu_model": _cpu_model(),
      "load_average_1_5_15": list(os.getloadavg()),
  }
  try:
    with open("/proc/meminfo") as f:
      info["memory_gib"] = round(int(f.readline().split()[1]) / 1024**2, 1)
  except OSError:
    pass
  if "jax" in sys.modules:
    import jax
    info["jax_devices"] = [str(d) for d in jax.devices()]
  return info


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def package_versions(packages=PACKAGES) -> dict[str, str]:
  versions = {}
  for name in packages:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  return versions


def command_line() -> str:
  return " ".join(shlex.quote(arg) for arg in [os.path.basename(sys.executable), *sys.argv])


def time_call(fn: Callable[[], Any], warmup: int = 1, iterations: int = 3) -> dict[str, Any]:
  """Runs `fn` (which must block until its work is done) `warmup` times, then times it.

  Returns {"median_s", "min_s", "times_s"}.
  """
  if iterations < 1:
    raise ValueError(f"iterations={iterations}: must be >= 1")
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iterations):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def matmul_peak_flops(size: int = 2048, iterations: int = 5) -> dict[str, Any]:
  """Dense float32 matmul rate through JAX: 2 * size^3 FLOP per [size, size] @ [size, size]."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  timing = time_call(lambda: matmul(a, b).block_until_ready(), warmup=2, iterations=iterations)
  flops = 2 * size**3
  return {"size": size, "flop_per_s": flops / timing["min_s"],
          "flop_per_s_median": flops / timing["median_s"], **timing}


def save_results(name: str, figures: dict[str, Any], protocol: "Protocol | None" = None,
                 directory: str = RESULTS_DIR) -> str:
  """Writes figures plus machine, versions, command and date to benchmarks/results/<name>.json.

  With a `Protocol`, the JSON also holds its load bookkeeping ("protocol": {..., "loaded": ...}).
  """
  record = {
      "benchmark": name,
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": command_line(),
      "machine": machine_info(),
      "versions": package_versions(),
      **figures,
  }
  if protocol is not None:
    record["protocol"] = protocol.record()
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{name}.json")
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  return path


def rss_bytes() -> int:
  """This process's resident memory now (VmRSS, Linux)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise OSError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (ru_maxrss, kB on Linux)."""
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024



# ----------------------------------------------------------------------------------------------
# The measurement protocol every speed figure follows.
#
# Two (or more) sides are timed alternately within one process, N >= 5 repeats, the order of the
# sides reversed on every other repeat (ABBA...), so slow drift of the machine (another process,
# thermal, a page cache) falls on both sides alike. Every repeat is kept in the JSON. A figure is
# the median over repeats of the per-repeat ratio, with its spread (min, max, interquartile range).
# The load average before and after is recorded; a run that starts above the core count says so
# loudly and its JSON is marked "loaded": true.
# ----------------------------------------------------------------------------------------------

MIN_REPEATS = 5


def thread_settings() -> dict[str, Any]:
  """What decides how many threads each side uses: cores usable here, env, torch's setting."""
  settings: dict[str, Any] = {
      "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                               "JAX_PLATFORMS") if os.environ.get(k) is not None},
  }
  if "torch" in sys.modules:
    settings["torch_num_threads"] = sys.modules["torch"].get_num_threads()
    settings["torch_num_interop_threads"] = sys.modules["torch"].get_num_interop_threads()
  return settings


class Protocol:
  """Load bookkeeping of one benchmark run: create at start, pass to `save_results` at the end.

  >>> protocol = Protocol()              # prints a loud warning when the machine is loaded
  >>> figures = alternate({"ours": f, "theirs": g}, repeats=5)
  >>> save_results("name", {...}, protocol)
  """

  def __init__(self, max_load: float | None = None):
    self.cores = os.cpu_count() or 1
    self.max_load = float(self.cores if max_load is None else max_load)
    self.load_before = list(os.getloadavg())
    self.loaded = self.load_before[0] > self.max_load
    if self.loaded:
      print(f"\n*** LOADED MACHINE: load average {self.load_before[0]:.2f} > {self.max_load:g} "
            f"({self.cores} cores). Figures from this run are marked loaded and must not go into "
            f"the README. ***\n", file=sys.stderr, flush=True)

  def record(self) -> dict[str, Any]:
    # The run itself keeps about `cores` threads busy, so the load after it counts as loaded only
    # above cores + 1 (at least one other busy process).
    load_after = list(os.getloadavg())
    loaded = self.loaded or load_after[0] > self.max_load + 1
    if loaded and not self.loaded:
      print(f"\n*** LOADED MACHINE: load average rose to {load_after[0]:.2f} during the run; "
            f"figures are marked loaded. ***\n", file=sys.stderr, flush=True)
    return {"repeats_alternate_within_one_process": True, "cores": self.cores,
            "max_idle_load": self.max_load, "load_average_before_1_5_15": self.load_before,
            "load_average_after_1_5_15": load_after, "loaded": loaded,
            "threads": thread_settings()}


def alternate(sides: dict[str, Callable[[], Any]], repeats: int = MIN_REPEATS,
              warmup: int = 1) -> dict[str, list[float]]:
  """Seconds of each side's call, `repeats` times, the sides interleaved (ABBA order).

  Each callable must block until its work is done. Returns {side: [seconds per repeat]}.
  """
  if repeats < 1:
    raise ValueError(f"repeats={repeats}: must be >= 1 (the protocol asks for >= {MIN_REPEATS})")
  names = list(sides)
  for _ in range(warmup):
    for name in names:
      sides[name]()
  times: dict[str, list[float]] = {name: [] for name in names}
  for repeat in range(repeats):
    for name in (names if repeat % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      sides[name]()
      times[name].append(time.perf_counter() - start)
  return times


def spread(values: list[float]) -> dict[str, float]:
  """Median, min, max and interquartile range of a list of figures."""
  ordered = sorted(values)
  quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
  return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
          "q1": quartiles[0], "q3": quartiles[2], "n": len(ordered)}


def speed_ratio(ours_s: list[float], theirs_s: list[float]) -> dict[str, Any]:
  """Per-repeat speed ratio ours / theirs for equal work (= their seconds / our seconds)."""
  if len(ours_s) != len(theirs_s):
    raise ValueError(f"{len(ours_s)} vs {len(theirs_s)} repeats: ratios pair repeat by repeat")
  ratios = [t / o for o, t in zip(ours_s, theirs_s)]
  return {"per_repeat": ratios, **spread(ratios)}


def matmul_ratio(sizes=(512, 2048), repeats: int = MIN_REPEATS) -> dict[str, Any]:
  """float32 [n, n] @ [n, n] in XLA (jax.jit) vs torch on this CPU, alternated: the part of a
  model-level gap that the backends' dense dot alone explains."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  out = {}
  for size in sizes:
    a = np.random.RandomState(0).standard_normal((size, size)).astype(np.float32)
    b = np.random.RandomState(1).standard_normal((size, size)).astype(np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    matmul = jax.jit(jnp.matmul)
    calls = max(1, int(2e10 // (2 * size**3)))  # ~20 GFLOP per timed call

    def run_xla():
      for _ in range(calls):
        result = matmul(ja, jb)
      result.block_until_ready()

    def run_torch():
      for _ in range(calls):
        torch.matmul(ta, tb)

    times = alternate({"xla": run_xla, "torch": run_torch}, repeats=repeats, warmup=1)
    flop = 2 * size**3 * calls
    out[str(size)] = {
        "xla_gflop_per_s": spread([flop / t / 1e9 for t in times["xla"]]),
        "torch_gflop_per_s": spread([flop / t / 1e9 for t in times["torch"]]),
        "xla_over_torch": speed_ratio(times["xla"], times["torch"]), "times_s": times}
  return out
