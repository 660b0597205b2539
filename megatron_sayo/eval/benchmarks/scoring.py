"""The SAYO authors' answer extraction and correctness rules (Cratileo/Sayo eval/score.py), on maintained libraries.

Extraction: the last \\boxed{} (mathruler's extractor), else the last <answer>...</answer>, else the first letter or
digit after the last `Answer:` (upper-cased), else the response's last character. Correct when mathruler's grader
or math-verify says the extracted answer equals the reference, or the reference is one capital letter contained in
the upper-cased answer, or the whole response equals the reference ignoring case and surrounding space.
The quirks are kept on purpose so that our numbers mean what theirs mean (tests/eval/test_suite_scoring.py).
"""

from __future__ import annotations

import re
import string
import threading

# The last <answer> tag (no later <answer> anywhere after it) and its content up to the first </answer>.
LAST_ANSWER_TAG = re.compile(r"<answer>(?!.*<answer>)(.*?)</answer>", re.DOTALL | re.MULTILINE)
NONE = "None"   # mathruler's "nothing extracted" value, which the authors test against


def extract_prediction(response: str) -> str:
    """The authors' extracted answer of a (stripped) response; '' for an empty response."""
    from mathruler.grader import extract_boxed_content

    if not response:
        return ""
    answer = extract_boxed_content(response)
    if answer != NONE:
        return answer
    tag = LAST_ANSWER_TAG.search(response)
    answer = tag.group(1).strip() if tag else NONE
    if answer != NONE:
        return answer
    idx = response.rfind("Answer:")
    if idx == -1:
        return response[-1]
    rest = response[idx + len("Answer:"):]
    return next((c.upper() for c in rest if c.isalpha() or c.isdigit()), rest)


def math_equal(answer: str, reference: str) -> bool:
    """mathruler's grader, then math-verify (as the authors call them: the answer parsed as math-verify's gold).

    math-verify's time limits use SIGALRM, which only the main thread may set: nemo-evaluator's runner scores in
    worker threads, where the limits are off (mathruler's grader has none either)."""
    from math_verify import parse, verify
    from mathruler.grader import grade_answer

    try:
        if grade_answer(answer, reference):
            return True
    except Exception:   # sympy on untrusted text: a failure to compare is a non-match
        pass
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return float(verify(parse(answer, parsing_timeout=limit), parse(reference, parsing_timeout=limit),
                            timeout_seconds=limit)) > 0
    except Exception:
        return False


def is_correct(response: str | None, reference) -> bool:
    """The authors' verdict for one response against its reference answer."""
    response = (response or "").strip()
    reference = str(reference)
    if not response:
        return False
    answer = extract_prediction(response)
    if math_equal(answer, reference):
        return True
    if len(reference) == 1 and reference in string.ascii_uppercase and reference.upper() in answer.upper():
        return True
    return response.lower() == reference.strip().lower()
