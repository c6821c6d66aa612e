"""Answer scoring: SQuAD normalisation, exact / sub-exact match, token F1, RULER's needle recall.

All metrics take one prediction string; `best_over_answers` takes the max over gold answers, and
`score_answer` scores one prediction against an `Example`-style (answers, answer_mode) pair.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Callable, Optional, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_BOXED = "\\boxed{"


def normalize_answer(text: str) -> str:
  """SQuAD's normalisation: lowercase, drop punctuation, drop whole-word articles, one space."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
  """1.0 iff the normalised strings are equal."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


def sub_exact_match(prediction: str, gold: str) -> float:
  """1.0 iff, after normalisation, either string contains the other (an empty one only matches empty)."""
  pred, ref = normalize_answer(prediction), normalize_answer(gold)
  if not pred or not ref:
    return float(pred == ref)
  return float(pred in ref or ref in pred)


def token_f1(prediction: str, gold: str) -> float:
  """SQuAD token F1: overlap = |Counter(pred) & Counter(gold)|, P = overlap/|pred|, R = overlap/|gold|,
  F1 = 2PR/(P+R); if either side has no tokens, 1.0 iff both have none."""
  pred_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(gold).split()
  if not pred_tokens or not gold_tokens:
    return float(pred_tokens == gold_tokens)
  overlap = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if overlap == 0:
    return 0.0
  precision = overlap / len(pred_tokens)
  recall = overlap / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def needles_found(prediction: str, golds: Sequence[str]) -> float:
  """RULER's recall: the fraction of gold values that occur (case-insensitively) in the prediction."""
  if not golds:
    raise ValueError("golds is empty: give at least one gold value")
  lowered = prediction.lower()
  return sum(1.0 for gold in golds if gold.lower() in lowered) / len(golds)


def all_needles_found(prediction: str, golds: Sequence[str]) -> float:
  """1.0 iff every gold value occurs in the prediction (RULER's all-or-nothing form)."""
  return float(needles_found(prediction, golds) == 1.0)


def best_over_answers(metric: Callable[[str, str], float], prediction: str,
                      golds: Sequence[str]) -> float:
  """max over gold answers of metric(prediction, gold)."""
  if not golds:
    raise ValueError("golds is empty: give at least one gold answer")
  return max(metric(prediction, gold) for gold in golds)


def extract_boxed(text: str) -> Optional[str]:
  r"""The content of the last \boxed{...} in `text` (nested braces kept); None if absent or unclosed."""
  start = text.rfind(_BOXED)
  if start < 0:
    return None
  depth = 1
  content_start = start + len(_BOXED)
  for position in range(content_start, len(text)):
    if text[position] == "{":
      depth += 1
    elif text[position] == "}":
      depth -= 1
      if depth == 0:
        return text[content_start:position]
  return None


def score_answer(prediction: str, answers: Sequence[str], answer_mode: str = "any") -> dict[str, float]:
  """All metrics for one prediction.

  answer_mode "any": each metric is the max over gold answers. "all" (every gold value is needed):
  exact / sub-exact match and F1 compare against all golds joined by ", ", and `needles` is
  all-or-nothing. `needle_recall` is always the fraction of golds found.
  """
  if answer_mode == "any":
    return {
        "exact_match": best_over_answers(exact_match, prediction, answers),
        "sub_exact_match": best_over_answers(sub_exact_match, prediction, answers),
        "f1": best_over_answers(token_f1, prediction, answers),
        "needles": best_over_answers(lambda p, g: needles_found(p, [g]), prediction, answers),
        "needle_recall": needles_found(prediction, answers),
    }
  if answer_mode == "all":
    joined = ", ".join(answers)
    return {
        "exact_match": exact_match(prediction, joined),
        "sub_exact_match": sub_exact_match(prediction, joined),
        "f1": token_f1(prediction, joined),
        "needles": all_needles_found(prediction, answers),
        "needle_recall": needles_found(prediction, answers),
    }
  raise ValueError(f"answer_mode={answer_mode!r}: must be 'any' or 'all'")
