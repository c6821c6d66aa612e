"""Answer metrics against hand-computed values and SQuAD's official normalisation behaviour."""

import pytest

from gru_mem.data import metrics


@pytest.mark.parametrize("text, normalized", [
    ("The  Cat!", "cat"),
    ("  An apple, a day...  ", "apple day"),
    ("Theater anarchy", "theater anarchy"),  # articles only as whole words
    ("A.B.C", "abc"),  # punctuation goes first, so "a.b.c" -> "abc" and no article remains
    ("the-end", "theend"),
    ("Über\tTHE\nmap", "über map"),
    ("", ""),
])
def test_normalize_answer(text, normalized):
  assert metrics.normalize_answer(text) == normalized


def test_exact_and_sub_exact_match():
  assert metrics.exact_match("The Cat.", "cat") == 1.0
  assert metrics.exact_match("black cat", "cat") == 0.0
  assert metrics.sub_exact_match("black cat", "the cat") == 1.0  # gold inside prediction
  assert metrics.sub_exact_match("cat", "a black cat") == 1.0  # prediction inside gold
  assert metrics.sub_exact_match("dog", "cat") == 0.0
  assert metrics.sub_exact_match("", "cat") == 0.0  # "" is in every string; it must not count
  assert metrics.sub_exact_match("The", "a") == 1.0  # both normalise to ""


def test_token_f1_by_hand():
  # pred -> "cat sat on mat" (4), gold -> "cat on mat" (3); overlap 3: P = 3/4, R = 1.
  assert metrics.token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(
      2 * 0.75 * 1.0 / 1.75)
  # Counter overlap: min(3, 1) = 1 -> P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 0.4.
  assert metrics.token_f1("cat cat cat", "cat dog") == pytest.approx(0.4)
  assert metrics.token_f1("dog", "cat") == 0.0
  assert metrics.token_f1("the", "a") == 1.0  # both empty after normalisation
  assert metrics.token_f1("the", "cat") == 0.0


def test_needles():
  prediction = "The values are 123 and 456."
  assert metrics.needles_found(prediction, ["123", "456", "789"]) == pytest.approx(2 / 3)
  assert metrics.all_needles_found(prediction, ["123", "456", "789"]) == 0.0
  assert metrics.all_needles_found(prediction, ["456", "123"]) == 1.0
  assert metrics.needles_found("TANGO", ["tango"]) == 1.0  # case-insensitive
  with pytest.raises(ValueError, match="golds is empty"):
    metrics.needles_found("x", [])


def test_best_over_answers():
  assert metrics.best_over_answers(metrics.token_f1, "cat", ["dog", "the cat"]) == 1.0
  assert metrics.best_over_answers(metrics.token_f1, "black cat", ["dog", "cat"]) == pytest.approx(
      2 * 0.5 * 1.0 / 1.5)
  with pytest.raises(ValueError, match="golds is empty"):
    metrics.best_over_answers(metrics.exact_match, "x", [])


@pytest.mark.parametrize("text, boxed", [
    (r"so \boxed{42}", "42"),
    (r"\boxed{a} then \boxed{b{c}d}", "b{c}d"),  # the last one, nested braces kept
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{}", ""),
    (r"\boxed{a} \boxed{unclosed", None),  # the last one is unclosed
    ("no box here", None),
    (r"\boxed{x{y}", None),
])
def test_extract_boxed(text, boxed):
  assert metrics.extract_boxed(text) == boxed


def test_score_answer_modes():
  any_scores = metrics.score_answer("Tim Burton", ["burton", "Tim Burton"], "any")
  assert any_scores["exact_match"] == 1.0 and any_scores["f1"] == 1.0
  all_scores = metrics.score_answer("1234567, 7654321", ["1234567", "7654321"], "all")
  assert all_scores["needles"] == 1.0 and all_scores["exact_match"] == 1.0
  half = metrics.score_answer("1234567", ["1234567", "7654321"], "all")
  assert half["needles"] == 0.0 and half["needle_recall"] == 0.5
  assert half["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
  with pytest.raises(ValueError, match="answer_mode='some'"):
    metrics.score_answer("x", ["x"], "some")
