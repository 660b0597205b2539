"""make_tiny_checkpoint: the directory loads in transformers (weights, tokenizer, image processor) and
in our Processor; hub layout and names; --config-json at real Qwen ids; errors; CLI."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from megatron_sayo.data.processor import Processor
from megatron_sayo.testing.tiny_checkpoint import PRESETS, make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def load_hf(ckpt):
    """The checkpoint in transformers, eager attention, with its loading report."""
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager",
                                                                     output_loading_info=True)
    return model.eval(), info


def safetensor_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def forward(ckpt, make_image):
    """Logits of a 2-sample batch (two images + text-only, left padded) built by our Processor."""
    proc = Processor.from_pretrained(ckpt)
    batch = proc([[{"role": "user", "content": [{"type": "image", "image": make_image(97, 61, 1)},
                                                {"type": "text", "text": "What is it?"},
                                                {"type": "image", "image": make_image(40, 90, 2)}]}],
                  [{"role": "user", "content": "text only"}]])
    model, _ = load_hf(ckpt)
    with torch.no_grad():
        return model(**batch).logits, batch


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_preset_loads_and_runs_in_transformers(name, tiny_ckpt, tiny_tied_ckpt, make_image):
    ckpt = tiny_ckpt if name == "tiny" else tiny_tied_ckpt
    model, info = load_hf(ckpt)
    assert not any(info.values()), info                      # no missing / unexpected / mismatched keys
    cfg = json.loads((ckpt / "config.json").read_text())
    logits, batch = forward(ckpt, make_image)
    assert logits.shape == (*batch["input_ids"].shape, cfg["vocab_size"])
    assert torch.isfinite(logits).all() and logits.std() > 1e-3
    tied = model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert tied == cfg["tie_word_embeddings"] == (name == "tiny-tied")


def test_hub_layout_and_names(tiny_ckpt, tiny_tied_ckpt, tmp_path):
    for ckpt in (tiny_ckpt, tiny_tied_ckpt):
        cfg = json.loads((ckpt / "config.json").read_text())
        assert "text_config" not in cfg and cfg["model_type"] == "qwen2_5_vl"
        assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"] and cfg["torch_dtype"] == "float32"
        assert cfg["rope_scaling"]["type"] == "mrope"
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        assert sum(cfg["rope_scaling"]["mrope_section"]) == head_dim // 2
        for key in ("depth", "hidden_size", "num_heads", "window_size", "fullatt_block_indexes", "out_hidden_size",
                    "spatial_merge_size", "temporal_patch_size", "patch_size", "in_chans", "tokens_per_second"):
            assert key in cfg["vision_config"]
        for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
            assert (ckpt / f).is_file()
        keys = safetensor_keys(ckpt / "model.safetensors")
        assert all(k.split(".")[0] in ("model", "lm_head", "visual") for k in keys)
        assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in keys)
        # the names transformers itself writes for the same model
        model, _ = load_hf(ckpt)
        model.save_pretrained(tmp_path / ckpt.name)
        assert keys == safetensor_keys(tmp_path / ckpt.name / "model.safetensors")
        assert ("lm_head.weight" in keys) == (not cfg["tie_word_embeddings"])
    assert PRESETS["tiny"]["rope_scaling"] != PRESETS["tiny-tied"]["rope_scaling"]


def test_norms_and_biases_are_random(tiny_ckpt):
    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as f:
        assert not torch.all(f.get_tensor("model.norm.weight") == 1)
        assert not torch.all(f.get_tensor("model.layers.0.self_attn.q_proj.bias") == 0)
        assert not torch.all(f.get_tensor("visual.blocks.0.norm1.weight") == 1)


def test_seed_and_dtype(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", preset="tiny-tied", seed=1)
    b = make_tiny_checkpoint(tmp_path / "b", preset="tiny-tied", seed=1, dtype="bfloat16")
    c = make_tiny_checkpoint(tmp_path / "c", preset="tiny-tied", seed=2)
    key = "model.layers.0.mlp.up_proj.weight"
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb, \
            safe_open(str(c / "model.safetensors"), "pt") as fc:
        assert fb.get_tensor(key).dtype == torch.bfloat16
        assert torch.equal(fa.get_tensor(key).bfloat16(), fb.get_tensor(key))
        assert not torch.equal(fa.get_tensor(key), fc.get_tensor(key))
    assert json.loads((b / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_hf(b)[0].dtype == torch.bfloat16


def nested_qwen_ids_config() -> dict:
    """Preset 'tiny' rewritten in the nested text_config layout, at the real Qwen2.5-VL-7B vocab and ids."""
    cfg = copy.deepcopy(PRESETS["tiny"])
    text = {k: cfg.pop(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "intermediate_size", "vocab_size", "rope_scaling",
                                    "rope_theta")}
    text.update(vocab_size=152064, num_hidden_layers=2,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 1e6})
    del text["rope_scaling"], text["rope_theta"]
    cfg["text_config"] = text
    cfg.update(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, vision_start_token_id=151652,
               vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655, video_token_id=151656)
    return cfg


def test_config_json_at_real_qwen_ids(tmp_path, make_image):
    path = tmp_path / "qwen_ids.json"
    path.write_text(json.dumps(nested_qwen_ids_config()))
    ckpt = make_tiny_checkpoint(tmp_path / "ck", config_json=path, seed=3)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert "text_config" not in cfg and cfg["vocab_size"] == 152064 and cfg["num_hidden_layers"] == 2
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [4, 2, 2]} and cfg["rope_theta"] == 1e6
    hf_tok = AutoTokenizer.from_pretrained(ckpt)
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655,
                "<|video_pad|>": 151656}
    assert {t: hf_tok.convert_tokens_to_ids(t) for t in expected} == expected
    logits, batch = forward(ckpt, make_image)
    assert logits.shape[-1] == 152064 and torch.isfinite(logits).all()
    assert (batch["input_ids"] == 151655).sum() == int(batch["image_grid_thw"].prod(-1).sum()) // 4


def test_config_json_with_scattered_ids(tmp_path):
    cfg = copy.deepcopy(PRESETS["tiny-tied"])
    cfg.update(vocab_size=512, image_token_id=300, video_token_id=301, vision_start_token_id=302,
               vision_end_token_id=303, vision_token_id=None, eos_token_id=310, bos_token_id=311, pad_token_id=311)
    path = tmp_path / "scattered.json"
    path.write_text(json.dumps(cfg))
    ckpt = make_tiny_checkpoint(tmp_path / "ck", config_json=path)
    hf_tok = AutoTokenizer.from_pretrained(ckpt)
    got = {t: hf_tok.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    assert got == {"<|image_pad|>": 300, "<|video_pad|>": 301, "<|vision_start|>": 302, "<|vision_end|>": 303,
                   "<|im_end|>": 310, "<|endoftext|>": 311}
    assert hf_tok.eos_token_id == 310 and hf_tok.pad_token_id == 311
    proc = Processor.from_pretrained(ckpt)
    assert (proc.tokenizer.eos_id, proc.tokenizer.image_pad_id) == (310, 300)


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.update(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 1]}),
     r"mrope_section.* sums to 3; expected head_dim/2 = 8"),
    (lambda c: c.pop("hidden_size"), r"mrope_section.*transformers 5\.24\.0's defaults: hidden_size"),
    (lambda c: c["vision_config"].pop("out_hidden_size"), r"out_hidden_size 3584 must equal hidden_size 64"),
    (lambda c: c.update(model_type="llama"), "model_type"),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (lambda c: c.update(image_token_id=9999), "image_token_id"),
    (lambda c: c["vision_config"].update(fullatt_block_indexes=[7]), "fullatt_block_indexes"),
])
def test_bad_config_json(tmp_path, mutate, match):
    cfg = copy.deepcopy(PRESETS["tiny"])
    mutate(cfg)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match) as exc:
        make_tiny_checkpoint(tmp_path / "out", config_json=path)
    assert str(path) in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_cli_and_atomic_replace(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", ROOT / "tools" / "make_tiny_checkpoint.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "ck"
    assert cli.main(["--out", str(out), "--preset", "tiny-tied", "--seed", "5"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert cli.main(["--out", str(out), "--preset", "tiny-tied"]) == 2          # refuses a non-empty dir
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli.main(["--out", str(out), "--preset", "tiny", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]                 # no temp dirs left behind
    assert cli.main(["--out", str(tmp_path / "x"), "--config-json", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
