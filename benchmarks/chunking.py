"""Peak memory and time of chunking a multi-million-token document (issue 4: 5M tokens < 1.5 GB).

The document is one generated needle haystack (`niah_single_2`, 100k tokens) repeated with " "
between copies until it holds the asked number of tokens; every copy's needle is an evidence span.
Each measurement runs in a fresh Python process that only builds that text and chunks it, and
reports the process's peak resident memory (`ru_maxrss`: everything, the text and the imported
libraries included), its resident memory just before chunking, the text's and the ids' bytes and
the chunking time. Streaming (`chunk_document`'s default slices) is measured at each size; encoding
the text whole (one slice) at the smallest size, for comparison.

  python benchmarks/chunking.py [--tokens 1000000,5000000] [--tokenizer builtin|qwen2|both]
  python benchmarks/chunking.py --child --tokens 5000000   # one measurement, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The Qwen2 tokenizer folder of the sample data (GRU_MEM_SAMPLE_DATA), if given.
QWEN2_TOKENIZER = os.path.join(os.environ.get("GRU_MEM_SAMPLE_DATA", ""), "qwen2_tokenizer")
BASE_TOKENS = 100_000
CHUNK_TOKENS = 4096


def load(tokenizer_name: str):
  from gru_mem.data.tokenizer import builtin_tokenizer, load_tokenizer
  if tokenizer_name == "builtin":
    return builtin_tokenizer()
  if tokenizer_name == "qwen2":
    return load_tokenizer(QWEN2_TOKENIZER)
  raise ValueError(f"--tokenizer={tokenizer_name!r}: use builtin, qwen2 or both")


def build_document(tokenizer, target_tokens: int) -> tuple[str, list[tuple[int, int]]]:
  """A generated 100k-token haystack repeated to about `target_tokens`; one evidence span a copy."""
  from gru_mem.data import synthetic
  base = synthetic.generate("niah_single_2", BASE_TOKENS, tokenizer, seed=0)
  copies = max(1, round(target_tokens / BASE_TOKENS))
  stride = len(base.document) + 1
  evidence = [(start + copy * stride, end + copy * stride)
              for copy in range(copies) for start, end in base.evidence]
  return " ".join([base.document] * copies), evidence


def measure(tokenizer_name: str, target_tokens: int, slice_chars: int) -> dict:
  """Builds the document and chunks it in this process; memory and time figures."""
  from gru_mem.agent import chunking
  tokenizer = load(tokenizer_name)
  text, evidence = build_document(tokenizer, target_tokens)
  rss_before = common.rss_bytes()
  peak_before = common.peak_rss_bytes()
  start = time.perf_counter()
  doc = chunking.chunk_document(text, tokenizer, CHUNK_TOKENS, evidence, slice_chars=slice_chars)
  seconds = time.perf_counter() - start
  return {
      "tokenizer": tokenizer_name, "target_tokens": target_tokens, "slice_chars": slice_chars,
      "num_tokens": doc.num_tokens, "num_chunks": doc.num_chunks,
      "evidence_chunks": len(doc.evidence_chunks),
      "text_chars": len(text), "text_bytes": sys.getsizeof(text), "ids_bytes": doc.token_ids.nbytes,
      "rss_before_chunking_bytes": rss_before, "peak_rss_before_chunking_bytes": peak_before,
      "peak_rss_bytes": common.peak_rss_bytes(), "chunking_s": seconds,
      "tokens_per_s": doc.num_tokens / seconds,
  }


def measure_in_subprocess(tokenizer_name: str, target_tokens: int, slice_chars: int) -> dict:
  """`measure` in a fresh interpreter, so its peak RSS is this measurement's alone."""
  command = [sys.executable, os.path.abspath(__file__), "--child", "--tokenizer", tokenizer_name,
             "--tokens", str(target_tokens), "--slice-chars", str(slice_chars)]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", default="1000000,5000000")
  parser.add_argument("--tokenizer", default="both")
  parser.add_argument("--slice-chars", type=int, default=None,
                      help="default: chunking.SLICE_CHARS (streaming)")
  parser.add_argument("--no-whole", action="store_true", help="skip the whole-text comparison")
  parser.add_argument("--child", action="store_true", help="one measurement, JSON on stdout")
  args = parser.parse_args()
  sizes = [int(t) for t in args.tokens.split(",")]
  from gru_mem.agent.chunking import SLICE_CHARS
  slice_chars = args.slice_chars or SLICE_CHARS
  if args.child:
    print(json.dumps(measure(args.tokenizer, sizes[0], slice_chars)))
    return
  names = ["builtin", "qwen2"] if args.tokenizer == "both" else [args.tokenizer]
  rows = []
  for name in names:
    runs = [(size, slice_chars) for size in sizes]
    if not args.no_whole:
      runs.append((min(sizes), 1 << 40))  # one slice: the whole text at once
    for size, chars in runs:
      row = measure_in_subprocess(name, size, chars)
      row["mode"] = "whole text" if chars == 1 << 40 else "streaming"
      rows.append(row)
      print(f"{name:8s} {row['mode']:10s} {row['num_tokens']:>9,d} tokens: text "
            f"{row['text_bytes'] / 2**20:6.1f} MiB, ids {row['ids_bytes'] / 2**20:5.1f} MiB, "
            f"RSS before chunking {row['rss_before_chunking_bytes'] / 2**20:6.0f} MiB, peak RSS "
            f"{row['peak_rss_bytes'] / 2**20:6.0f} MiB, {row['chunking_s']:5.1f} s "
            f"({row['tokens_per_s'] / 1e3:.0f}k tokens/s)", flush=True)
  path = common.save_results("chunking", {
      "document": f"niah_single_2 ({BASE_TOKENS} tokens, seed 0) repeated, joined by ' '",
      "chunk_tokens": CHUNK_TOKENS, "peak_rss_limit_bytes": int(1.5e9), "results": rows})
  print(f"saved {path}")


if __name__ == "__main__":
  main()
