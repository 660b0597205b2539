"""Vision tower vs transformers' Qwen2_5_VisionTransformerPretrainedModel (tiny random config, CPU, float32)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLVisionConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel  # noqa: E402

from megatron_sayo.models.qwen25vl.hf_config import ConfigError, VisionConfig  # noqa: E402
from megatron_sayo.models.qwen25vl.vision import Qwen25VisionModel  # noqa: E402

TINY = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, in_channels=3,
            patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
            fullatt_block_indexes=[1, 3], hidden_act="silu", tokens_per_second=2)


def hf_tower(attn_implementation):
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel._from_config(
        Qwen2_5_VLVisionConfig(**TINY), attn_implementation=attn_implementation).eval()
    with torch.no_grad():  # larger than the 0.02 init so every layer moves the output
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name or "ln_q" in name else 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def towers(request):
    hf = hf_tower(request.param)
    ours = Qwen25VisionModel(VisionConfig.from_hf_dict(hf.config.to_dict(), source="test"))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours.eval()


def run_both(towers, *grids):
    hf, ours = towers
    grid_thw = torch.tensor(grids, dtype=torch.long)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixels, grid_thw=grid_thw).pooler_output
        out = ours(pixels, grid_thw)
    assert out.shape == (pixels.shape[0] // 4, 64)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    return out


def test_state_dict_keys_match_transformers():
    hf = hf_tower("eager")
    ours = Qwen25VisionModel(VisionConfig.from_hf_dict(hf.config.to_dict(), source="test"))
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}


def test_one_image_larger_than_a_window(towers):
    run_both(towers, (1, 10, 14))  # merged 5 x 7, windows of 4 x 4 merged tokens: 4 windows, 3 partial


def test_several_images_of_different_grids(towers):
    run_both(towers, (1, 10, 14), (1, 4, 4), (2, 6, 8), (1, 16, 8))


def test_odd_grid(towers):
    run_both(towers, (1, 6, 18))  # merged 3 x 9: neither side a multiple of the window


def test_hub_field_names():
    d = {**TINY, "in_chans": 3}
    del d["in_channels"]
    c = VisionConfig.from_hf_dict(d, source="config.json")
    assert c.in_channels == 3 and c.fullatt_block_indexes == (1, 3) and c.head_dim == 16


@pytest.mark.parametrize("change, message", [
    (dict(num_heads=3), "field 'hidden_size' = 32 is not divisible by num_heads = 3"),
    (dict(hidden_size=24, num_heads=4), "head_dim 6"),
    (dict(hidden_act="swish2"), "field 'hidden_act' = 'swish2' is not a known activation"),
    (dict(fullatt_block_indexes=[1, 4]), r"field 'fullatt_block_indexes' .* outside \[0, depth=4\)"),
    (dict(window_size=100), "field 'window_size' = 100 must be a multiple of"),
    (dict(depth=0), "field 'depth' = 0 must be a positive integer"),
    (dict(depth="4"), "field 'depth' = '4' must be a positive integer"),
])
def test_bad_vision_config(change, message):
    d = {k: v for k, v in {**TINY, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=r"ckpt/config.json: vision_config: .*" + message):
        VisionConfig.from_hf_dict(d, source="ckpt/config.json: vision_config")


def test_pixel_values_must_match_grid(towers):
    with pytest.raises(ValueError, match="does not match grid_thw"):
        towers[1](torch.zeros(10, 1176), torch.tensor([[1, 4, 4]]))


def test_flash_without_package_is_a_clear_error():
    ours = Qwen25VisionModel(VisionConfig.from_hf_dict(TINY), attn_impl="flash")
    with pytest.raises(RuntimeError, match="attn_impl='flash'"):
        ours(torch.zeros(16, 1176), torch.tensor([[1, 4, 4]]))


def test_bfloat16_tower_tracks_float32(towers):
    """Casting the tower to bf16 keeps the RoPE angles in float32; the output stays near the fp32 one."""
    _, ours = towers
    grid_thw = torch.tensor([[1, 10, 14]])
    pixels = torch.randn(140, 1176, generator=torch.Generator().manual_seed(2))
    low = Qwen25VisionModel(ours.config).to(torch.bfloat16)
    low.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ref, out = ours(pixels, grid_thw), low(pixels.bfloat16(), grid_thw)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 3e-2
