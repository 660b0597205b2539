"""hf_config: both config.json layouts, validation errors that name the field, TP vocab padding."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from small_configs import HUB_7B, small_hub_config

from megatron_sayo.models.qwen25vl.hf_config import (ConfigError, ParallelLayout, load_hf_config, padded_vocab_size,
                                                     parse_hf_config, validate_layout)
from megatron_sayo.models.qwen25vl.transformer_config import to_transformer_config

ROOT = Path(__file__).resolve().parents[2]


def nested(flat: dict) -> dict:
    """The same config in transformers >= 5's nested layout."""
    text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "vocab_size", "rms_norm_eps", "max_position_embeddings", "hidden_act")
    out = {k: v for k, v in flat.items() if k not in text_keys + ("rope_scaling", "rope_theta")}
    out["text_config"] = {k: flat[k] for k in text_keys if k in flat}
    out["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": flat["rope_theta"],
                                             "mrope_section": flat["rope_scaling"]["mrope_section"]}
    return out


def test_hub_and_nested_layouts_agree():
    a, b = parse_hf_config(HUB_7B), parse_hf_config(nested(HUB_7B))
    assert a.text == b.text and a.vision == b.vision and a.tokens == b.tokens
    assert (a.text.hidden_size, a.text.num_layers, a.text.num_heads, a.text.num_kv_heads) == (3584, 28, 28, 4)
    assert a.text.mrope_section == (16, 24, 24) and a.tokens.image == 151655 and not a.text.tie_word_embeddings


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c.update(model_type="llava"), "model_type"),
    (lambda c: c.pop("hidden_size"), "hidden_size"),
    (lambda c: c["rope_scaling"].update(mrope_section=[16, 24, 16]), "mrope_section"),
    (lambda c: c.update(num_key_value_heads=5), "num_key_value_heads"),
    (lambda c: c.update(image_token_id=10**6), "image_token_id"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.pop("vision_config"), "vision_config"),
    (lambda c: c["vision_config"].update(out_hidden_size=1024), "out_hidden_size"),
    (lambda c: c.update(vocab_size="many"), "vocab_size"),
])
def test_bad_config_names_the_field(mutate, needle):
    cfg = copy.deepcopy(HUB_7B)
    mutate(cfg)
    with pytest.raises(ValueError, match=needle):
        parse_hf_config(cfg, "x/config.json")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hf_config(tmp_path)


@pytest.mark.parametrize("layout,needle", [
    (ParallelLayout(tp=8), "num_attention_heads 28 is not divisible by tp=8"),
    (ParallelLayout(tp=7), "num_key_value_heads 4 is not divisible by tp=7"),
    (ParallelLayout(pp=3), "num_hidden_layers 28 is not divisible by pp=3"),
    (ParallelLayout(pp=4, first_stage_layers=9, last_stage_layers=8), "cannot be split"),
    (ParallelLayout(pp=1, first_stage_layers=4), "need pp >= 2"),
])
def test_bad_layouts(layout, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_layout(parse_hf_config(HUB_7B), layout)


def test_uneven_pipeline_split_accepted_and_passed_to_megatron():
    cfg = parse_hf_config(HUB_7B)
    layout = ParallelLayout(tp=2, pp=3, first_stage_layers=8, last_stage_layers=8)
    tc = to_transformer_config(cfg, layout)
    assert (tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage) == (8, 8)
    assert tc.num_query_groups == 4 and tc.kv_channels == 128 and tc.add_qkv_bias and not tc.add_bias_linear


@pytest.mark.parametrize("vocab,tp,expected", [(152064, 1, 152064), (151936, 8, 152576), (512, 2, 512),
                                               (700, 2, 768), (400, 1, 512)])
def test_padded_vocab(vocab, tp, expected):
    assert padded_vocab_size(vocab, tp) == expected and expected % (128 * tp) == 0


def test_compare_tool_on_a_fresh_config(tmp_path, make_image):
    """compare_hf_megatron.py passes at TP=2xPP=2 on a --config-json checkpoint unlike the test presets."""
    cfg = small_hub_config(700)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    ckpt, image = tmp_path / "ckpt", tmp_path / "img.png"
    subprocess.run([sys.executable, str(ROOT / "tools/make_tiny_checkpoint.py"), "--out", str(ckpt),
                    "--config-json", str(tmp_path / "cfg.json")], check=True, capture_output=True)
    make_image(230, 150, 7).save(image)
    tool = [sys.executable, str(ROOT / "tools/compare_hf_megatron.py"), "--hf", str(ckpt), "--image", str(image),
            "--prompt", "What is this?"]
    ok = subprocess.run(tool + ["--tp", "2", "--pp", "2", "--save-logits", str(tmp_path / "l.npy")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "PASS" in ok.stdout
    import numpy as np
    assert np.load(tmp_path / "l.npy").shape[-1] == 700  # true vocab, padding (768 at TP=2) never visible
    bad = subprocess.run(tool + ["--tp", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "num_attention_heads 6 is not divisible by tp=4" in bad.stderr
