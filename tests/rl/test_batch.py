"""The typed batch: the p / p-1 column rule by hand, images split per prompt row."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_sayo.rl.batch import ScoringBatch, completion_view, images_per_prompt

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


def test_distinct_images_sends_each_shared_tensor_once():
    from megatron_sayo.rl.batch import distinct_images

    a, b = torch.zeros(8, 1), torch.ones(24, 1)                     # b: two images (8 + 16 patches)
    ga, gb = torch.tensor([[1, 2, 4]]), torch.tensor([[1, 2, 4], [1, 4, 4]])
    pix, thw, order = distinct_images([a, a, torch.zeros(0), b, b, a], [ga, ga, torch.zeros(0, 3), gb, gb, ga])
    assert pix.shape[0] == 32 and thw.tolist() == [[1, 2, 4], [1, 2, 4], [1, 4, 4]]
    assert order.tolist() == [0, 0, 1, 2, 1, 2, 0]
    pix, thw, order = distinct_images([a, b], [ga, gb])
    assert order is None and thw.shape[0] == 3
    assert distinct_images([torch.zeros(0)], [torch.zeros(0, 3)]) == (None, None, None)


def _rank_shared_images(ckpt, data):
    """Completion logits and vision-tower gradients of our model through ScoringBatch.microbatches."""
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime
    from megatron_sayo.rl.batch import ScoringBatch
    from megatron_sayo.rl.scoring import completion_logits

    runtime.init_distributed(1, 1)
    model = load_model_stage(ckpt, tp=1, pp=1, for_training=True)
    batch = ScoringBatch(data["sequences"], data["attention_mask"], data["prompt_length"], data["completion_mask"],
                         data["pixel_values"], data["image_grid_thw"], torch.zeros_like(data["sequences"]).bool())
    (mb,) = batch.microbatches(model.hf, 8, with_probe=False)
    logits = completion_logits(model(**mb["inputs"]), batch.sequences.shape[1], batch.prompt_length)
    (logits * data["weights"]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.vision.named_parameters()}
    return mb["inputs"]["image_order"], logits.detach(), grads


@pytest.mark.multiproc
def test_shared_images_match_transformers(tiny_ckpt, make_image):
    """Rows of one prompt share their pixel tensor; it goes through the vision tower once, and the completion
    logits and the vision tower's gradients equal transformers', which encodes every row's image (float32 eager;
    real completion tokens; logits 1e-4 relative, gradients 1e-4 relative to their scale)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_sayo.distributed.runtime import spawn_local
    from megatron_sayo.testing.fixed_rollout import fixed_rollout

    data = fixed_rollout(tiny_ckpt, make_image)      # rows 0, 0, 1, 1: two prompts x G = 2
    P, T = data["prompt_length"], data["completion_mask"].shape[1]
    vocab = 512
    # real completion tokens only (padding columns are not compared, and carry no weight)
    data["weights"] = torch.randn(4, T, vocab, generator=torch.Generator().manual_seed(3)) * \
        data["completion_mask"][..., None]
    order, logits, grads = spawn_local(_rank_shared_images, 1, str(tiny_ckpt), data)[0]
    assert order is not None and order.tolist() == [0, 0, 1, 1]

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32,
                                                            attn_implementation="eager")
    ids = data["sequences"]
    out = hf(input_ids=ids, attention_mask=data["attention_mask"],
             pixel_values=torch.cat([p.clone() for p in data["pixel_values"]]),
             image_grid_thw=torch.cat(data["image_grid_thw"]),
             mm_token_type_ids=(ids == hf.config.image_token_id).int()).logits[:, P - 1:P - 1 + T]
    (out * data["weights"]).sum().backward()
    real = data["completion_mask"].bool()
    torch.testing.assert_close(logits[real], out.detach()[real], rtol=1e-4, atol=1e-4 * float(out.abs().max()))
    ref = {n.removeprefix("model.visual."): p.grad for n, p in hf.named_parameters() if n.startswith("model.visual.")}
    assert set(ref) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-4 * float(ref[name].abs().max()), msg=name)
