"""Processor files in every layout transformers writes (4.x: preprocessor_config.json + chat_template.json or a
template inside tokenizer_config.json; 5.x: processor_config.json + chat_template.jinja), built with transformers'
own save_pretrained, give the inputs transformers gives; the converters carry the 5.x files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from megatron_sayo.data.chat_template import ChatTemplateError, find_chat_template
from megatron_sayo.data.processor import Processor
from megatron_sayo.testing.tiny_checkpoint import CHAT_TEMPLATE

IMAGE_PAD = "<|image_pad|>"
PROCESSOR_FILES = ("preprocessor_config.json", "chat_template.json", "chat_template.jinja", "processor_config.json",
                   "tokenizer.json", "tokenizer_config.json")


class Qwen2_5_VLProcessor(ProcessorMixin):
    """transformers' ProcessorMixin with the Qwen2.5-VL processor's image processor, tokenizer and template
    (the real class also needs a video processor, which needs torchvision: not installable beside CPU torch).
    save_pretrained is transformers' own, so the files are the 5.x layout byte for byte."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)


def save_v5(src, out, template=CHAT_TEMPLATE):
    """The checkpoint's processor saved by transformers 5.x's save_pretrained into `out` (config.json copied)."""
    proc = Qwen2_5_VLProcessor(Qwen2VLImageProcessorPil.from_pretrained(src), AutoTokenizer.from_pretrained(src),
                               chat_template=template)
    proc.save_pretrained(out)
    shutil.copy(src / "config.json", out / "config.json")
    return out


def reference(ckpt_dir, image_dir, conv):
    """input_ids and pixel_values the transformers way (tokenizer + its template from ckpt_dir)."""
    tok, image_proc = AutoTokenizer.from_pretrained(ckpt_dir), Qwen2VLImageProcessorPil.from_pretrained(image_dir)
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    images = [c["image"] for m in conv if not isinstance(m["content"], str) for c in m["content"]
              if c.get("type") == "image"]
    vis = image_proc(images=images, return_tensors="pt")
    for grid in vis["image_grid_thw"]:
        text = text.replace(IMAGE_PAD, "<|placeholder|>" * (int(grid.prod()) // 4), 1)
    ids = tok(text.replace("<|placeholder|>", IMAGE_PAD), return_tensors="pt")["input_ids"]
    return ids, vis["pixel_values"]


def conversation(make_image):
    return [{"role": "user", "content": [{"type": "image", "image": make_image(97, 61, 1)},
                                         {"type": "text", "text": "What is in the box?"}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": [{"type": "image", "image": make_image(40, 300, 2)},
                                         {"type": "text", "text": "And here?"}]}]


def check_same(ckpt_dir, image_dir, make_image):
    conv = conversation(make_image)
    out = Processor.from_pretrained(ckpt_dir)([conv])
    ids, pixels = reference(ckpt_dir, image_dir, conv)
    assert torch.equal(out["input_ids"], ids) and torch.equal(out["pixel_values"], pixels)
    return out


def test_transformers_5_layout(tiny_ckpt, tmp_path, make_image):
    v5 = save_v5(tiny_ckpt, tmp_path / "v5")
    names = {p.name for p in v5.iterdir()}
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "preprocessor_config.json" not in names and "chat_template.json" not in names
    assert find_chat_template(v5).source.endswith("chat_template.jinja")
    ours = check_same(v5, tiny_ckpt, make_image)
    assert all(torch.equal(ours[k], Processor.from_pretrained(tiny_ckpt)([conversation(make_image)])[k])
               for k in ("input_ids", "pixel_values", "image_grid_thw"))


def test_transformers_4_layouts(tiny_ckpt, tmp_path, make_image):
    """preprocessor_config.json with chat_template.json (4.43+), or with the template in tokenizer_config.json."""
    assert find_chat_template(tiny_ckpt).source.endswith("chat_template.json")
    check_same(tiny_ckpt, tiny_ckpt, make_image)
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(tiny_ckpt / name, old / name)
    assert json.loads((old / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert find_chat_template(old).source.endswith("tokenizer_config.json")
    check_same(old, tiny_ckpt, make_image)


def test_the_checkpoints_own_template_is_used(tiny_ckpt, tmp_path, make_image):
    custom = CHAT_TEMPLATE.replace("You are a helpful assistant.", "You look closely at images.")
    v5 = save_v5(tiny_ckpt, tmp_path / "v5", template=custom)
    out = check_same(v5, tiny_ckpt, make_image)
    text = Processor.from_pretrained(v5).tokenizer.decode(out["input_ids"][0].tolist())
    assert "You look closely at images." in text


def test_a_template_cannot_escape_the_sandbox(tiny_ckpt, tmp_path, make_image):
    v5 = save_v5(tiny_ckpt, tmp_path / "v5")
    (v5 / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja: cannot render"):
        Processor.from_pretrained(v5)([conversation(make_image)])


def test_missing_image_processor_settings_name_both_files(tiny_ckpt, tmp_path):
    v5 = save_v5(tiny_ckpt, tmp_path / "v5")
    (v5 / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    with pytest.raises(ValueError, match=r"processor_config\.json: field 'image_processor' must be an object"):
        Processor.from_pretrained(v5)
    (v5 / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no preprocessor_config\.json .* or processor_config\.json"):
        Processor.from_pretrained(v5)


def test_converters_carry_the_5x_files(tiny_ckpt, tmp_path, make_image):
    from megatron_sayo.convert.hf_to_megatron import convert_hf_to_megatron
    from megatron_sayo.convert.megatron_to_hf import convert_megatron_to_hf

    v5 = save_v5(tiny_ckpt, tmp_path / "v5")
    for weights in tiny_ckpt.glob("*.safetensors*"):
        shutil.copy(weights, v5 / weights.name)
    convert_hf_to_megatron(v5, tmp_path / "meg", tp=1, pp=1, progress=False)
    meg = tmp_path / "meg"
    assert (meg / "processor_config.json").is_file() and (meg / "chat_template.jinja").is_file()
    check_same(tmp_path / "meg", tiny_ckpt, make_image)
    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "back", progress=False)
    for name in PROCESSOR_FILES:
        assert (v5 / name).is_file() == (tmp_path / "back" / name).is_file(), name
    check_same(tmp_path / "back", tiny_ckpt, make_image)
