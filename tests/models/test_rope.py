"""M-RoPE positions and rotary application vs transformers' Qwen2.5-VL (tiny random configs, CPU, float32)."""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf  # noqa: E402

from megatron_sayo.models.qwen25vl.rope import decode_position_ids, get_rope_index, mrope_freqs, mrope_inv_freq  # noqa: E402

IMAGE, VIDEO, VSTART, VEND, PAD = 100, 101, 102, 103, 0
MERGE = 2
MROPE = [2, 3, 3]  # head_dim 16


def tiny_config(tokens_per_second=2):
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=MROPE),
                         bos_token_id=1, eos_token_id=2, pad_token_id=PAD),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=2, temporal_patch_size=2, spatial_merge_size=MERGE,
                           tokens_per_second=tokens_per_second, fullatt_block_indexes=[0]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(tiny_config()).eval()


def prompt(*parts, seed=0):
    """Token ids from parts: an int n = n text tokens; ('image'|'video', (t, h, w)) = a vision block."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for part in parts:
        if isinstance(part, int):
            ids += torch.randint(3, 90, (part,), generator=g).tolist()
        else:
            kind, (t, h, w) = part
            ids += [VSTART] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // MERGE**2) + [VEND]
    return ids


def batch(rows, side="left"):
    """input_ids and attention_mask [B, S] with padding on the given side."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    return ids, mask


def mm_types(input_ids):
    return (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()


def hf_rope_index(model, input_ids, image_grid_thw=None, attention_mask=None, **kw):
    """transformers' get_rope_index, adapting to its signature (5.3 added mm_token_type_ids)."""
    fn = model.model.get_rope_index
    if "mm_token_type_ids" in inspect.signature(fn).parameters:
        kw["mm_token_type_ids"] = mm_types(input_ids)
    return fn(input_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask, **kw)


def ours(input_ids, image_grid_thw=None, attention_mask=None, **kw):
    return get_rope_index(input_ids, image_grid_thw, attention_mask, image_token_id=IMAGE,
                          vision_start_token_id=VSTART, spatial_merge_size=MERGE, video_token_id=VIDEO, **kw)


def assert_same(model, input_ids, grids=None, mask=None, **kw):
    pos, delta = ours(input_ids, grids, mask, **kw)
    ref_pos, ref_delta = hf_rope_index(model, input_ids, grids, mask, **kw)
    assert pos.shape == (3, *input_ids.shape) and delta.shape == (input_ids.shape[0], 1)
    torch.testing.assert_close(pos, ref_pos.long(), rtol=0, atol=0)
    torch.testing.assert_close(delta, ref_delta.long().view(-1, 1), rtol=0, atol=0)
    return pos, delta


def grid(*rows):
    return torch.tensor(rows, dtype=torch.long)


def test_one_image(hf_model):
    g = grid([1, 4, 6])
    ids = torch.tensor([prompt(5, ("image", g[0]), 7)])
    pos, delta = assert_same(hf_model, ids, g)
    # 5 text + vision_start at 0..5; 2x3 merged image at 6 (h 6..7, w 6..8); vision_end + 7 text at 9..16
    assert pos[:, 0, 6].tolist() == [6, 6, 6] and pos[:, 0, 11].tolist() == [6, 7, 8]
    assert delta.item() == 17 - 20


def test_several_images_in_one_prompt(hf_model):
    g = grid([1, 4, 6], [1, 8, 2], [1, 2, 2])
    ids = torch.tensor([prompt(3, ("image", g[0]), 2, ("image", g[1]), ("image", g[2]), 4)])
    assert_same(hf_model, ids, g)


def test_two_samples_different_image_counts_left_padding(hf_model):
    g = grid([1, 2, 4], [1, 6, 4], [1, 4, 4])
    rows = [prompt(2, ("image", g[0]), 3, ("image", g[1]), 2, seed=1), prompt(6, ("image", g[2]), 5, seed=2)]
    ids, mask = batch(rows, "left")
    assert mask[1].eq(0).any()
    pos, _ = assert_same(hf_model, ids, g, mask)
    assert pos[:, 1][:, mask[1] == 0].eq(0).all()


def test_right_padding(hf_model):
    g = grid([1, 4, 4], [1, 2, 6])
    ids, mask = batch([prompt(1, ("image", g[0]), 9, seed=3), prompt(4, ("image", g[1]), 1, seed=4)], "right")
    assert_same(hf_model, ids, g, mask)


def test_text_only_row_in_batch(hf_model):
    g = grid([1, 4, 4])
    ids, mask = batch([prompt(11, seed=5), prompt(2, ("image", g[0]), 3, seed=6)], "left")
    pos, delta = assert_same(hf_model, ids, g, mask)
    assert delta[0].item() == 0


def test_video_and_image(hf_model):
    gi, gv = grid([1, 4, 4]), grid([2, 4, 6])
    ids = torch.tensor([prompt(3, ("video", gv[0]), 2, ("image", gi[0]), 3)])
    assert_same(hf_model, ids, gi, video_grid_thw=gv, second_per_grid_ts=torch.tensor([1.0]))


def test_video_text_resumes_after_temporal_max():
    """The documented Qwen2.5-VL example: 3x2x2 video, interval 50, text resumes at max + 1 = 101."""
    g = grid([3, 4, 4])
    ids = torch.tensor([[VSTART] + [VIDEO] * 12 + [5, 6, 7, 8, 9]])
    pos, delta = get_rope_index(ids, None, None, image_token_id=IMAGE, vision_start_token_id=VSTART,
                                video_grid_thw=g, video_token_id=VIDEO, second_per_grid_ts=torch.tensor([2.0]),
                                tokens_per_second=25)
    assert pos[0, 0, 1:13].tolist() == [1] * 4 + [51] * 4 + [101] * 4
    assert pos[1, 0, 1:13].tolist() == [1, 1, 2, 2] * 3 and pos[2, 0, 1:13].tolist() == [1, 2] * 6
    assert pos[:, 0, 13:].tolist() == [list(range(102, 107))] * 3
    assert delta.item() == 107 - ids.shape[1]


def test_grid_count_mismatch_is_an_error():
    g = grid([1, 4, 4])
    ids = torch.tensor([prompt(2, ("image", g[0]), 2)])
    with pytest.raises(ValueError, match="image_grid_thw has 2 rows"):
        ours(ids, grid([1, 4, 4], [1, 4, 4]))
    with pytest.raises(ValueError, match="needs 16 consecutive image tokens"):
        ours(ids, grid([1, 8, 8]))


def test_decode_positions_match_generate(hf_model):
    """Positions transformers' generate feeds the text model at each step, left padding in a batch of 2."""
    g = grid([1, 4, 4], [1, 2, 4], [1, 4, 2])
    rows = [prompt(3, ("image", g[0]), 4, ("image", g[1]), 3, seed=7), prompt(2, ("image", g[2]), 3, seed=8)]
    ids, mask = batch(rows, "left")
    cfg = hf_model.config.vision_config
    pixels = torch.randn(int(g.prod(-1).sum()), 3 * cfg.temporal_patch_size * cfg.patch_size ** 2)
    seen = []
    hook = hf_model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    try:
        new = 3
        with torch.no_grad():
            hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=g,
                              mm_token_type_ids=mm_types(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=PAD)
    finally:
        hook.remove()
    assert len(seen) == new
    pos, delta = ours(ids, g, mask)
    torch.testing.assert_close(seen[0][-3:], pos, rtol=0, atol=0)
    seq = ids.shape[1]
    for step in range(1, new):
        cache_position = torch.tensor([seq + step - 1])
        full_mask = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], dim=1)
        got = decode_position_ids(cache_position, delta, 2, attention_mask=full_mask)
        torch.testing.assert_close(got, seen[step][-3:], rtol=0, atol=0)
        unpadded = decode_position_ids(cache_position, delta, 2)[:, :1]  # row 0 has no padding
        torch.testing.assert_close(unpadded, seen[step][-3:, :1], rtol=0, atol=0)


def test_decode_several_new_tokens():
    got = decode_position_ids(torch.arange(10, 13), torch.tensor([[-4], [2]]), 2)
    assert got.shape == (3, 2, 3)
    assert got[0].tolist() == [[6, 7, 8], [12, 13, 14]] and got[2].tolist() == got[0].tolist()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_rotary_application_matches_transformers(hf_model, batch_size):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer import TransformerConfig

    g = grid([1, 6, 4], [1, 4, 8])
    rows = [prompt(4, ("image", g[0]), 5, ("image", g[1]), 6, seed=9), prompt(30, seed=10)][:batch_size]
    ids, mask = batch(rows, "left")
    position_ids, _ = hf_rope_index(hf_model, ids, g, mask)
    heads, head_dim, theta = 4, 16, 10000.0
    q = torch.randn(batch_size, heads, ids.shape[1], head_dim, generator=torch.Generator().manual_seed(11)) * 3
    rotary = hf.Qwen2_5_VLRotaryEmbedding(hf_model.config.text_config)
    cos, sin = rotary(q, position_ids)
    ref, _ = hf.apply_rotary_pos_emb(q, q, cos, sin)

    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                               apply_rope_fusion=False, mrope_section=MROPE)
    freqs = mrope_freqs(position_ids, mrope_inv_freq(head_dim, theta), MROPE)
    assert freqs.shape == (ids.shape[1], batch_size, 1, head_dim)
    out = apply_rotary_pos_emb(q.permute(2, 0, 1, 3), freqs, config, cp_group=object())
    torch.testing.assert_close(out.permute(1, 2, 0, 3), ref, rtol=0, atol=1e-6)


def test_mrope_section_must_sum_to_half_head_dim():
    with pytest.raises(ValueError, match=r"mrope_section \[2, 3, 2\].*head_dim/2 = 8"):
        mrope_freqs(torch.zeros(3, 1, 4, dtype=torch.long), mrope_inv_freq(16, 1e6), [2, 3, 2])
