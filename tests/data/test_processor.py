"""Tokenizer and Processor vs transformers: the checkpoint's chat template rendered by the HF tokenizer
(jinja), image pads expanded with the reference image processor's grid, tokenized by the HF tokenizer.
(transformers' Qwen2_5_VLProcessor itself cannot be built here: it needs torchvision for its video part.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from megatron_sayo.data.processor import Processor, render_chat
from megatron_sayo.data.tokenizer import Tokenizer

IMAGE_PAD = "<|image_pad|>"


@pytest.fixture(scope="module", params=["tiny", "tiny-tied"])
def ckpt(request, tiny_ckpt, tiny_tied_ckpt):
    return tiny_ckpt if request.param == "tiny" else tiny_tied_ckpt


@pytest.fixture(scope="module")
def hf_tok(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


def conversations(make_image):
    """A mixed batch: two images, text-only with system prompt, multi-turn, three images, string content."""
    img = make_image
    return [
        [{"role": "user", "content": [{"type": "image", "image": img(97, 61, 1)},
                                      {"type": "text", "text": "What is in the box?"},
                                      {"type": "image", "image": img(1000, 700, 2)}]}],
        [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": [{"type": "text", "text": "Only text here, 123 numbers & ünïcödé."}]}],
        [{"role": "user", "content": [{"type": "image", "image": img(10, 13, 3)}, {"type": "text", "text": "Hi"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "<answer>cat</answer>"}]},
         {"role": "user", "content": [{"type": "text", "text": "And now?"}, {"type": "image", "image": img(50, 400, 4)},
                                      {"type": "image", "image": img(33, 517, 5)}]}],
        [{"role": "user", "content": "plain string content"}],
    ]


def reference_batch(ckpt, hf_tok, convs, padding_side, add_generation_prompt=True):
    """input_ids/attention_mask/pixel_values/image_grid_thw the transformers way."""
    image_proc = Qwen2VLImageProcessorPil.from_pretrained(ckpt)
    texts, all_images = [], []
    for conv in convs:
        text = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
        images = [c["image"] for m in conv if not isinstance(m["content"], str) for c in m["content"]
                  if c.get("type") == "image"]
        for image in images:     # same rule as Qwen2_5_VLProcessor.replace_image_token
            grid = image_proc(images=[image], return_tensors="pt")["image_grid_thw"][0]
            n = int(grid.prod()) // image_proc.merge_size ** 2
            text = text.replace(IMAGE_PAD, "<|placeholder|>" * n, 1)
        texts.append(text.replace("<|placeholder|>", IMAGE_PAD))
        all_images += images
    hf_tok.padding_side = padding_side
    enc = hf_tok(texts, padding=True, return_tensors="pt")
    vis = image_proc(images=all_images, return_tensors="pt") if all_images else {}
    return enc["input_ids"], enc["attention_mask"], vis.get("pixel_values"), vis.get("image_grid_thw")


# ------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_matches_hf(ckpt, hf_tok):
    tok = Tokenizer.from_pretrained(ckpt)
    for text in ["Hello world!", "  spaces\n\nnewlines\t", "ünïcödé 12345 ✓", "<|im_start|>user\nhi<|im_end|>",
                 "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>x"]:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text == hf_tok.decode(ids)


def test_special_ids_come_from_the_files(ckpt, hf_tok):
    tok = Tokenizer.from_pretrained(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert tok.eos_id == cfg["eos_token_id"] == hf_tok.eos_token_id == hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_id == cfg["pad_token_id"] == hf_tok.pad_token_id
    assert tok.vision_start_id == cfg["vision_start_token_id"]
    assert tok.vision_end_id == cfg["vision_end_token_id"]
    assert tok.image_pad_id == cfg["image_token_id"]
    assert tok.video_pad_id == cfg["video_token_id"]
    assert tok.im_start_id == hf_tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode([tok.eos_id, tok.image_pad_id], skip_special_tokens=True) == ""


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        Tokenizer.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ chat template

@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("vision_id", [True, False])
def test_render_chat_equals_checkpoint_template(hf_tok, make_image, gen, vision_id):
    for conv in conversations(make_image):
        ref = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, add_vision_id=vision_id)
        assert render_chat(conv, gen, vision_id) == ref


# ------------------------------------------------------------------------------------------ processor

@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_matches_transformers(ckpt, hf_tok, make_image, side):
    convs = conversations(make_image)
    out = Processor.from_pretrained(ckpt)(convs, padding_side=side)
    ids, mask, pv, grid = reference_batch(ckpt, hf_tok, convs, side)
    assert torch.equal(out["input_ids"], ids)
    assert torch.equal(out["attention_mask"], mask)
    assert torch.equal(out["image_grid_thw"], grid)
    assert torch.equal(out["pixel_values"], pv)
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.int64
    pad_col = 0 if side == "left" else -1
    assert (mask[:, pad_col] == 0).any()       # the batch really is padded on that side
    assert (out["input_ids"] == hf_tok.convert_tokens_to_ids(IMAGE_PAD)).sum() == int(grid.prod(-1).sum()) // 4


def test_text_only_batch(ckpt, hf_tok, make_image):
    convs = [conversations(make_image)[1], conversations(make_image)[3]]
    out = Processor.from_pretrained(ckpt)(convs)
    ids, mask, _, _ = reference_batch(ckpt, hf_tok, convs, "left")
    assert torch.equal(out["input_ids"], ids) and torch.equal(out["attention_mask"], mask)
    assert out["pixel_values"] is None and out["image_grid_thw"] is None


def test_single_conversation_without_generation_prompt(ckpt, hf_tok, make_image):
    conv = conversations(make_image)[2]
    out = Processor.from_pretrained(ckpt)(conv, add_generation_prompt=False)
    ids, _, _, grid = reference_batch(ckpt, hf_tok, [conv], "left", add_generation_prompt=False)
    assert torch.equal(out["input_ids"], ids) and torch.equal(out["image_grid_thw"], grid)


def test_images_passed_separately(tiny_ckpt, make_image):
    proc = Processor.from_pretrained(tiny_ckpt)
    imgs = [make_image(97, 61, 1), make_image(40, 40, 2)]
    inline = [[{"role": "user", "content": [{"type": "image", "image": imgs[0]}, {"type": "image", "image": imgs[1]},
                                            {"type": "text", "text": "compare"}]}]]
    placeholders = [[{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                  {"type": "text", "text": "compare"}]}]]
    a, b = proc(inline), proc(placeholders, images=[imgs])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_processor_errors(tiny_ckpt, make_image):
    proc = Processor.from_pretrained(tiny_ckpt)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    with pytest.raises(ValueError, match="conversation 0, image 0: image item has no 'image'"):
        proc([conv])
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> placeholders but 2 images"):
        proc([conv], images=[[make_image(30, 30), make_image(30, 30)]])
    bad = [{"role": "user", "content": [{"type": "image", "image": make_image(500, 2)}]}]
    with pytest.raises(ValueError, match="conversation 1, image 0: image aspect ratio"):
        proc([[{"role": "user", "content": "ok"}], bad])
    with pytest.raises(NotImplementedError, match="videos are not supported"):
        proc([[{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}]])
    with pytest.raises(ValueError, match="padding_side"):
        proc([[{"role": "user", "content": "ok"}]], padding_side="middle")
    with pytest.raises(ValueError, match="message 0: expected a dict with 'role' and 'content'"):
        proc([[{"content": "no role"}]])
