"""selected_tokens.inside_answer against character positions in the decoded text (the tiny tokenizer splits
words into several pieces), the deciding rows against transformers' eager attentions (masses 1e-5 relative,
float32 CPU), and the command's clear error without a warm-up checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def _decision_masses(ckpt, jsonl, completion):
    """On one rank: region/image masses of each completion token's deciding row (decision_rows + scoring)."""
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.config import DataConfig
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.distributed import runtime
    from megatron_sayo.experiments.selected_tokens import decision_rows
    from megatron_sayo.rl.batch import ScoringBatch
    from megatron_sayo.rl.prompts import build_prompt_batch
    from megatron_sayo.rl.scoring import score_policy

    runtime.init_distributed(1, 1)
    model = load_model_stage(str(ckpt), tp=1, params_dtype=torch.float32)
    proc = Processor.from_pretrained(str(ckpt), max_pixels=50176)
    hf = model.hf
    prompts = build_prompt_batch(proc, load_grounded(jsonl)[:1], hf.tokens.image, hf.vision.spatial_merge_size,
                                 hf.vision.patch_size, DataConfig().instruction)
    batch = ScoringBatch.teacher_forced(hf, prompts.inputs, prompts.region_mask, [completion], 0)
    scores = score_policy(model, decision_rows(batch), 4, 1.0)
    n = len(completion)
    return scores.region_mass[0, :n].double().numpy(), scores.image_mass[0, :n].double().numpy()


def test_deciding_rows_are_the_query_one_column_earlier(tiny_ckpt, tmp_path):
    """Against transformers' eager attentions: token j's deciding-row masses are the last layer's head-mean
    attention of query column P + j - 1 (the row whose logits sampled token j) on the region and image keys."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_sayo.config import DataConfig
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.data.regions import RegionSpec, batch_region_mask
    from megatron_sayo.distributed.runtime import spawn_local
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config
    from megatron_sayo.rl.prompts import conversation
    from megatron_sayo.train import write_synthetic

    jsonl = tmp_path / "tiles.jsonl"
    write_synthetic(jsonl, 2, seed=4, task="tiles")
    tok = Processor.from_pretrained(str(tiny_ckpt)).tokenizer
    completion = tok.encode("red over blue <answer>blue</answer>")
    got_region, got_image = next(r for r in spawn_local(_decision_masses, 1, tiny_ckpt, jsonl, completion)
                                 if r is not None)

    sample = load_grounded(jsonl)[0]
    proc = Processor.from_pretrained(str(tiny_ckpt), max_pixels=50176)
    inputs = proc([conversation(sample, DataConfig().instruction)])
    hf = load_hf_config(tiny_ckpt)
    region = batch_region_mask(inputs["input_ids"], inputs["image_grid_thw"], hf.tokens.image,
                               [RegionSpec(boxes=sample.boxes, orig_size=tuple(sample.image_size))])[0]
    P, n = inputs["input_ids"].shape[1], len(completion)
    ids = torch.cat([inputs["input_ids"], torch.tensor([completion])], 1)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_ckpt), dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        alpha = model(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                      mm_token_type_ids=(ids == model.config.image_token_id).int(),
                      output_attentions=True).attentions[-1][0].double()
    rows = torch.arange(P - 1, P - 1 + n)
    keys_region = torch.cat([region, torch.zeros(n, dtype=torch.bool)])
    keys_image = ids[0] == model.config.image_token_id
    want_region = alpha[:, rows][:, :, keys_region].mean(-1).mean(0).numpy()
    want_image = alpha[:, rows][:, :, keys_image].mean(-1).mean(0).numpy()
    np.testing.assert_allclose(got_region, want_region, rtol=1e-5)
    np.testing.assert_allclose(got_image, want_image, rtol=1e-5)
    own = alpha[:, rows + 1][:, :, keys_region].mean(-1).mean(0).numpy()   # the token's own rows differ
    assert not np.allclose(want_region, own, rtol=1e-3)
