"""Stop strings and the settled part of a growing completion (eval/textstream.py), checked by brute force."""

from __future__ import annotations

from megatron_sayo.eval.textstream import pending_stop_tail, settled_text, truncate_at_stop


def test_truncate_at_earliest_stop():
    assert truncate_at_stop("abc<END>def</s>", ["</s>", "<END>"]) == ("abc", True)
    assert truncate_at_stop("abcdef", ["x"]) == ("abcdef", False)
    assert truncate_at_stop("abc", []) == ("abc", False)


def test_pending_tail_is_longest_suffix_prefix():
    def brute(text, stops):
        return max([k for s in stops for k in range(1, len(s)) if k <= len(text) and text.endswith(s[:k])],
                   default=0)
    for text in ("hello <E", "hello <EN", "x<", "abab", "no", ""):
        for stops in (["<END>"], ["aba", "<E"], ["b"], []):
            assert pending_stop_tail(text, stops) == brute(text, stops), (text, stops)


def test_settled_text_is_always_a_prefix_of_the_final_text():
    """Streaming every prefix of a completion emits only prefixes of the final (stop-cut) text."""
    final_source = "The answer is <answer>42</answer> and then more \ufffd text"
    stops = ["</answer>", "more"]
    final, _ = truncate_at_stop(final_source, stops)
    for i in range(len(final_source) + 1):
        partial = final_source[:i]
        assert final.startswith(settled_text(partial, stops)), partial
    assert settled_text("ab\ufffd", []) == "ab"              # incomplete UTF-8 held back
    assert settled_text("x </ans", ["</answer>"]) == "x "     # could still become the stop string
