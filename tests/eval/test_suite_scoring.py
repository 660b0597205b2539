"""The suite scorer against a table of (response, reference, verdict) cases, one or more per rule of the SAYO
authors' eval/score.py, including its quirks. Verdicts are worked out by hand from the rules, not from our code."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("mathruler")
pytest.importorskip("math_verify")

from megatron_sayo.eval.benchmarks.scoring import extract_prediction, is_correct  # noqa: E402

# (response, reference, expected extraction, expected verdict, rule)
CASES = [
    # 1. the last \boxed{} wins; nested braces are kept whole
    ("<think>x</think> \\boxed{B} then \\boxed{C}", "C", "C", True, "last boxed"),
    ("\\boxed{B} then \\boxed{C}", "B", "C", False, "an earlier boxed does not count"),
    ("so \\boxed{\\frac{1}{2}}", "0.5", "\\frac{1}{2}", True, "nested braces + math equivalence"),
    # an unclosed last \boxed{ hides an earlier closed one (mathruler looks at the last opening only)
    ("\\boxed{A} and \\boxed{B", "A", "B", False, "unclosed last boxed -> falls back to the last character"),
    # \boxed{None} reads as 'nothing boxed' and falls through to <answer>
    ("\\boxed{None} <answer>D</answer>", "D", "D", True, "boxed None falls through"),
    # 2. else the last <answer>...</answer>
    ("<answer>12</answer> changed my mind <answer> 13 </answer>", "13", "13", True, "last answer tag, stripped"),
    ("<answer>12</answer> <answer>13", "12", "3", False, "unclosed last answer tag -> no tag answer"),
    ("<answer>\nline1\nline2</answer>", "line1\nline2", "line1\nline2", True, "answer tag spans lines"),
    # 3. else the first letter/digit after the last 'Answer:', upper-cased
    ("Answer: (b) the dog", "B", "B", True, "letter after Answer:, upper-cased"),
    ("Answer: A. Answer: c", "C", "C", True, "the last Answer: counts"),
    ("Answer: 42", "42", "4", False, "only the first digit is taken"),
    ("Answer: 42", "4", "4", True, "... so a one-digit prefix matches"),
    ("answer: B", "B", "B", True, "lower-case 'answer:' is not the marker: last character"),
    ("Answer: ...", "A", " ...", False, "nothing alphanumeric after Answer: keeps the rest as is"),
    # 4. else the response's last character
    ("The answer is B", "B", "B", True, "last character"),
    ("I pick A.", "A", ".", False, "last character is the full stop"),
    # equivalence: mathruler grader / math-verify
    ("\\boxed{0.50}", "1/2", "0.50", True, "math-verify: decimal vs fraction"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", "2\\sqrt{2}", True, "symbolic equivalence"),
    ("\\boxed{3}", "4", "3", False, "different numbers"),
    ("\\boxed{ 7 }", "7", "7", True, "boxed content stripped"),
    # single capital-letter reference contained in the (upper-cased) answer: the known over-acceptance
    ("\\boxed{Cat}", "A", "Cat", True, "reference letter A inside 'CAT'"),
    ("\\boxed{B and C}", "C", "B and C", True, "several letters answered"),
    ("\\boxed{dog}", "a", "dog", False, "lower-case reference is not a capital letter"),
    ("\\boxed{(C) 5 apples}", "C", "(C) 5 apples", True, "letter with its option text"),
    # exact case-insensitive match of the whole response
    ("Paris", "paris", "s", True, "whole response equals reference ignoring case"),
    ("  Yes  ", " yes", "s", True, "surrounding space ignored"),
    ("\\boxed{Paris}", "London", "Paris", False, "no rule matches"),
    ("", "A", "", False, "empty response"),
]


@pytest.mark.parametrize("response,reference,extracted,verdict,rule", CASES, ids=[c[4] for c in CASES])
def test_scorer_rules(response, reference, extracted, verdict, rule):
    assert extract_prediction(response.strip()) == extracted
    assert is_correct(response, reference) is verdict


def test_scorer_in_a_worker_thread():
    """nemo-evaluator scores in worker threads, where math-verify's SIGALRM limits cannot run."""
    out = {}
    t = threading.Thread(target=lambda: out.update(ok=is_correct("\\boxed{0.50}", "1/2"),
                                                   bad=is_correct("\\boxed{3}", "4")))
    t.start()
    t.join(60)
    assert out == {"ok": True, "bad": False}


def test_byob_scorer_uses_the_rules():
    pytest.importorskip("nemo_evaluator")
    from nemo_evaluator.contrib.byob import ScorerInput

    from megatron_sayo.eval.benchmarks.byob_suite import suite_score

    assert suite_score(ScorerInput(response="Answer: (a)", target="A", metadata={})) == {"correct": True,
                                                                                         "answered": True}
    assert suite_score(ScorerInput(response=None, target="A", metadata={})) == {"correct": False, "answered": False}
