"""selected_tokens.inside_answer against character positions in the decoded text (the tiny tokenizer splits
words into several pieces), and the command's clear error without a warm-up checkpoint."""

from __future__ import annotations

import pytest

from megatron_sayo.experiments.selected_tokens import inside_answer, main


def test_inside_answer_matches_character_spans(tiny_ckpt):
    from megatron_sayo.data.processor import Processor

    tok = Processor.from_pretrained(str(tiny_ckpt)).tokenizer
    ids = tok.encode("think: red<answer>purple</answer>")
    text = tok.decode(ids)
    lo = text.index("<answer>") + len("<answer>")
    hi = text.index("</answer>")
    for j in range(len(ids)):
        start, end = len(tok.decode(ids[:j])), len(tok.decode(ids[:j + 1]))
        assert inside_answer(tok, ids, j) == (start >= lo and end <= hi), (j, tok.decode([ids[j]]))
    assert any(inside_answer(tok, ids, j) for j in range(len(ids)))


def test_missing_warmup_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no warm-up checkpoint"):
        main(["--out", str(tmp_path)])

