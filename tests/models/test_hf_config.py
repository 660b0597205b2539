"""hf_config: both config.json layouts, validation errors that name the field, TP vocab padding."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from small_configs import HUB_7B, small_hub_config

from megatron_sayo.models.qwen25vl.hf_config import (
    ConfigError,
    ParallelLayout,
    load_hf_config,
    padded_vocab_size,
    parse_hf_config,
    validate_layout,
)
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


@pytest.mark.multiproc
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


# ---------------------------------------------------------- every layout transformers writes, against transformers

HUB_72B = json.loads((ROOT / "examples/configs/qwen25vl_72b.config.json").read_text())
# vision_config of the official Qwen2.5-VL-72B-Instruct-AWQ config.json (transformers 4.49: only non-default fields).
AWQ_72B_VISION = {"hidden_size": 1280, "in_chans": 3, "intermediate_size": 3456, "model_type": "qwen2_5_vl",
                  "out_hidden_size": 8192, "spatial_patch_size": 14, "tokens_per_second": 2}
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "rms_norm_eps", "max_position_embeddings", "hidden_act", "rope_theta", "rope_scaling",
             "bos_token_id", "eos_token_id", "tie_word_embeddings", "torch_dtype")


def diff_only_72b() -> dict:
    """transformers 4.49 save of the 72B: flat text, vision_config holding only non-default fields."""
    return {**copy.deepcopy(HUB_72B), "vision_config": dict(AWQ_72B_VISION), "transformers_version": "4.49.0"}


def finetune_7b_without_out_hidden_size() -> dict:
    """A 7B fine-tune saved by 4.50: vision_config without out_hidden_size (and the other defaults)."""
    return {**copy.deepcopy(HUB_7B), "transformers_version": "4.50.0",
            "vision_config": {"hidden_size": 1280, "in_chans": 3, "model_type": "qwen2_5_vl",
                              "spatial_patch_size": 14, "tokens_per_second": 2}}


def nested_452_7b() -> dict:
    """transformers 4.52 layout: top-level text fields AND a text_config (with rope_scaling), vision in full."""
    cfg = copy.deepcopy(HUB_7B)
    text = {k: copy.deepcopy(cfg[k]) for k in TEXT_KEYS if k in cfg}
    text["rope_scaling"] = {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}
    cfg.update(text_config={**text, "model_type": "qwen2_5_vl_text", "architectures": None},
               transformers_version="4.52.4")
    cfg["vision_config"].update(model_type="qwen2_5_vl", torch_dtype="bfloat16", initializer_range=0.02)
    return cfg


def nested_diff_only_72b() -> dict:
    """4.52+ nested 72B whose text_config keeps only the fields that differ from the text defaults."""
    cfg = {k: v for k, v in copy.deepcopy(HUB_72B).items() if k not in TEXT_KEYS}
    cfg["text_config"] = {"max_position_embeddings": 128000, "rms_norm_eps": 1e-06, "max_window_layers": 70,
                          "sliding_window": 32768, "model_type": "qwen2_5_vl_text",
                          "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
    cfg["vision_config"] = dict(AWQ_72B_VISION)
    return cfg


def ours_vs_transformers(path: Path):
    """(ours, transformers') view of the same config.json, as comparable dicts."""
    from transformers import Qwen2_5_VLConfig

    ours, theirs = load_hf_config(path), Qwen2_5_VLConfig.from_pretrained(path.parent)
    t, v, ht, hv = ours.text, ours.vision, theirs.text_config, theirs.vision_config
    mine = dict(hidden=t.hidden_size, inter=t.intermediate_size, layers=t.num_layers, heads=t.num_heads,
                kv=t.num_kv_heads, vocab=t.vocab_size, eps=t.rms_norm_eps, theta=t.rope_theta,
                mrope=list(t.mrope_section), max_pos=t.max_position_embeddings, tied=t.tie_word_embeddings,
                eos=list(ours.tokens.eos),
                ids=[ours.tokens.image, ours.tokens.video, ours.tokens.vision_start, ours.tokens.vision_end],
                v=[v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.in_channels, v.patch_size,
                   v.temporal_patch_size, v.spatial_merge_size, v.window_size, list(v.fullatt_block_indexes),
                   v.out_hidden_size, v.hidden_act, v.tokens_per_second, v.rope_theta])
    eos = ht.eos_token_id
    ref = dict(hidden=ht.hidden_size, inter=ht.intermediate_size, layers=ht.num_hidden_layers,
               heads=ht.num_attention_heads, kv=ht.num_key_value_heads, vocab=ht.vocab_size, eps=ht.rms_norm_eps,
               theta=ht.rope_parameters["rope_theta"], mrope=list(ht.rope_parameters["mrope_section"]),
               max_pos=ht.max_position_embeddings, tied=theirs.tie_word_embeddings,
               eos=list(eos) if isinstance(eos, (list, tuple)) else [eos],
               ids=[theirs.image_token_id, theirs.video_token_id, theirs.vision_start_token_id,
                    theirs.vision_end_token_id],
               v=[hv.depth, hv.hidden_size, hv.intermediate_size, hv.num_heads, hv.in_channels, hv.patch_size,
                  hv.temporal_patch_size, hv.spatial_merge_size, hv.window_size, list(hv.fullatt_block_indexes),
                  hv.out_hidden_size, hv.hidden_act, hv.tokens_per_second, hv.rope_parameters["rope_theta"]])
    return mine, ref


LAYOUTS = {
    "flat_hub_4.41_7b": lambda: copy.deepcopy(HUB_7B),
    "flat_hub_4.41_72b": lambda: copy.deepcopy(HUB_72B),
    "diff_only_4.49_72b_awq": diff_only_72b,
    "diff_only_4.50_7b_no_out_hidden": finetune_7b_without_out_hidden_size,
    "nested_4.52_7b": nested_452_7b,
    "nested_diff_only_72b": nested_diff_only_72b,
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_layout_reads_as_transformers_reads_it(name, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LAYOUTS[name]()))
    mine, ref = ours_vs_transformers(path)
    assert mine == ref


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_transformers_5_save_reads_as_transformers_reads_it(name, tmp_path):
    """The 5.x layout (nested text_config with rope_parameters, dtype) from transformers' own save_pretrained."""
    from transformers import Qwen2_5_VLConfig

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LAYOUTS[name]()))
    Qwen2_5_VLConfig.from_pretrained(src).save_pretrained(tmp_path / "v5")
    saved = json.loads((tmp_path / "v5/config.json").read_text())
    assert "rope_parameters" in saved["text_config"] and "rope_scaling" not in saved["text_config"]
    mine, ref = ours_vs_transformers(tmp_path / "v5/config.json")
    assert mine == ref
    assert load_hf_config(tmp_path / "v5") .text == load_hf_config(src).text


def test_diff_only_values_and_planner_count(tmp_path):
    """The 72B-AWQ vision config: depth 32 and 16 heads come from the defaults; the planner counts the real 72B."""
    from megatron_sayo.plan import load_arch, total_params

    path = tmp_path / "config.json"
    path.write_text(json.dumps(diff_only_72b()))
    v = load_hf_config(path).vision
    assert (v.depth, v.num_heads, v.window_size, v.fullatt_block_indexes) == (32, 16, 112, (7, 15, 23, 31))
    assert total_params(load_arch(path)) == 73_410_777_344   # transformers' count of Qwen2.5-VL-72B


def test_defaulted_out_hidden_size_that_cannot_fit_names_the_default(tmp_path):
    """A 3B config without out_hidden_size gets transformers' 3584 != 2048: a clear error, not a broken model."""
    cfg = json.loads((ROOT / "examples/configs/qwen25vl_3b.config.json").read_text())
    del cfg["vision_config"]["out_hidden_size"]
    with pytest.raises(ConfigError, match=r"out_hidden_size 3584 must equal hidden_size 2048 .*defaults: "
                                          r"vision_config\.out_hidden_size"):
        parse_hf_config(cfg, "3b/config.json")


@pytest.mark.multiproc
def test_diff_only_config_through_check_plan_and_converter(tmp_path):
    """train --check, plan_parallelism.py and convert_hf_to_megatron.py accept a diff-only config (or fail
    cleanly on a vision error, never with a traceback)."""
    from megatron_sayo.models.qwen25vl.hf_config import ParallelLayout, validate_layout

    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text(json.dumps(diff_only_72b()))
    validate_layout(load_hf_config(good), ParallelLayout(tp=8, pp=2))
    done = subprocess.run([sys.executable, str(ROOT / "tools/plan_parallelism.py"), "--model", str(good),
                           "--gpus", "64", "--freeze-vision"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "73.411B parameters" in done.stdout, done.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = diff_only_72b()
    cfg["vision_config"]["num_heads"] = 7        # 1280 not divisible by 7
    (bad / "config.json").write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf", str(bad),
                           "--out", str(tmp_path / "meg")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "vision_config: field 'hidden_size' = 1280 is not divisible by num_heads = 7" in done.stderr
