"""The typed batch and scores: the p / p-1 column rule by hand, images split per prompt row, padding zeroed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_sayo.rl.batch import CompletionScores, ScoringBatch, completion_view, images_per_prompt

HF = SimpleNamespace(tokens=SimpleNamespace(image=9), vision=SimpleNamespace(spatial_merge_size=2))


def test_completion_view_hand_case():
    # prompt = columns 0..2 (P = 3), completion tokens 0..3 at columns 3..6, column 7 padding
    per_position = torch.arange(8)[None].repeat(2, 1)
    assert completion_view(per_position, 3, 4, "query").tolist() == [[3, 4, 5, 6]] * 2      # own attention row
    assert completion_view(per_position, 3, 4, "logits").tolist() == [[2, 3, 4, 5]] * 2     # the logits it came from
    # logits computed from column P - 1 on (Qwen25VLModel.forward logits_from): column 0 of the array is P - 1
    from_p_minus_1 = per_position[:, 2:]
    assert completion_view(from_p_minus_1, 3, 4, "logits", first_column=2).tolist() == [[2, 3, 4, 5]] * 2


def test_completion_view_rejects_columns_outside():
    with pytest.raises(ValueError, match="outside"):
        completion_view(torch.zeros(1, 6), 3, 4, "query")
    with pytest.raises(ValueError, match="outside"):
        completion_view(torch.zeros(1, 6), 0, 2, "logits")


def test_scores_zero_padding_and_check_shapes():
    mask = torch.tensor([[1, 1, 0]])
    s = CompletionScores(torch.tensor([[-1.0, -2.0, float("nan")]]), torch.ones(1, 3), None, None, mask)
    assert s.logprobs.tolist() == [[-1.0, -2.0, 0.0]] and s.entropy.tolist() == [[1.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="entropy"):
        CompletionScores(torch.zeros(1, 3), torch.zeros(1, 2), None, None, mask)
    both = CompletionScores.cat([s, s])
    assert both.logprobs.shape == (2, 3) and both.region_mass is None
    other = CompletionScores(torch.tensor([[-1.5, -2.0, 7.0]]), torch.ones(1, 3), None, None, mask)
    assert s.mean_abs_difference(other) == {"logprobs": 0.25, "entropy": 0.0}


def test_images_per_prompt_with_several_images_and_a_text_row():
    # row 0: two images (2x4 patches -> 2 tokens, 4x4 -> 4 tokens); row 1: none; row 2: one image (2 tokens)
    ids = torch.tensor([[9, 9, 1, 9, 9, 9, 9], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 9, 9, 1]])
    thw = torch.tensor([[1, 2, 4], [1, 4, 4], [1, 2, 4]])
    pixels = torch.arange(8 + 16 + 8)[:, None].float()
    pix, grids = images_per_prompt(dict(input_ids=ids, pixel_values=pixels, image_grid_thw=thw), HF)
    assert [p.shape[0] for p in pix] == [24, 0, 8] and pix[2][0, 0] == 24
    assert [g.tolist() for g in grids] == [[[1, 2, 4], [1, 4, 4]], [], [[1, 2, 4]]]
    with pytest.raises(ValueError, match="image"):
        images_per_prompt(dict(input_ids=ids, pixel_values=pixels, image_grid_thw=thw[:2]), HF)


def test_teacher_forced_layout():
    ids = torch.tensor([[0, 5, 9, 9], [5, 6, 9, 9]])
    inputs = dict(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
                  pixel_values=torch.zeros(16, 1), image_grid_thw=torch.tensor([[1, 2, 4], [1, 2, 4]]))
    region = torch.tensor([[False, False, True, False], [False, False, False, True]])
    batch = ScoringBatch.teacher_forced(HF, inputs, region, [[7, 8, 2], [7]], pad_id=0)
    assert batch.prompt_length == 4
    assert batch.sequences.tolist() == [[0, 5, 9, 9, 7, 8, 2], [5, 6, 9, 9, 7, 0, 0]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]
    assert batch.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.region_mask[:, :4].tolist() == region.tolist() and not batch.region_mask[:, 4:].any()
    assert [p.shape[0] for p in batch.pixel_values] == [8, 8]
    with pytest.raises(ValueError, match="empty"):
        ScoringBatch.teacher_forced(HF, inputs, region, [[7], []], pad_id=0)
