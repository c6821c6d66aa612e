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


def save_results(name: str, figures: dict[str, Any]) -> str:
  """Writes figures plus machine, versions, command and date to benchmarks/results/<name>.json."""
  record = {
      "benchmark": name,
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": command_line(),
      "machine": machine_info(),
      "versions": package_versions(),
      **figures,
  }
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f"{name}.json")
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

