"""Qwen2.5-VL processor: chat template + tokenizer + image processor -> model inputs.

A conversation is a list of messages {"role": ..., "content": str | [items]}; an item is
{"type": "image", "image": PIL.Image | path} or {"type": "text", "text": ...} (the transformers format).
Each image becomes <|vision_start|> + n x <|image_pad|> + <|vision_end|>, with
n = grid_t * grid_h * grid_w / merge_size**2 from the image's image_grid_thw row.

Batch output: input_ids [B, L] and attention_mask [B, L] (int64, padded 'left' by default for generation,
or 'right'), pixel_values float32 [N, C*T*P*P] and image_grid_thw int64 [n_images, 3] with the images of
all conversations in batch order (both None when the batch holds no image).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megatron_sayo.data.chat_template import ChatTemplate, find_chat_template
from megatron_sayo.data.image_processing import ImageProcessorConfig, process_image
from megatron_sayo.data.tokenizer import IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, Tokenizer
from megatron_sayo.models.qwen25vl.rope import tokens_per_image

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
PADDING_SIDES = ("left", "right")


# ------------------------------------------------------------------------------------- chat template

def _is_image_item(item: dict) -> bool:
    """The template's test for an image content item."""
    return item.get("type") == "image" or "image" in item or "image_url" in item


def _is_video_item(item: dict) -> bool:
    """The template's test for a video content item."""
    return item.get("type") == "video" or "video" in item


def render_chat(messages: list[dict], add_generation_prompt: bool = False, add_vision_id: bool = False) -> str:
    """The Qwen2.5-VL chat template as text, with one <|image_pad|> per image (expanded later)."""
    out, n_images, n_videos = [], 0, 0
    for i, msg in enumerate(messages):
        if i == 0 and msg["role"] != "system":
            out.append(f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
        out.append(f"{IM_START}{msg['role']}\n")
        content = msg["content"]
        if isinstance(content, str):
            out.append(f"{content}{IM_END}\n")
            continue
        for item in content:
            if _is_image_item(item):
                n_images += 1
                out.append((f"Picture {n_images}: " if add_vision_id else "") + VISION_START + IMAGE_PAD + VISION_END)
            elif _is_video_item(item):
                n_videos += 1
                out.append((f"Video {n_videos}: " if add_vision_id else "") + VISION_START + VIDEO_PAD + VISION_END)
            elif "text" in item:
                out.append(item["text"])
        out.append(f"{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def conversation_images(messages: list[dict], where: str = "conversation") -> list:
    """The images of a conversation's content items, in order; errors name the message."""
    images = []
    for m, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"{where}, message {m}: expected a dict with 'role' and 'content', got {msg!r}")
        if isinstance(msg["content"], str):
            continue
        for k, item in enumerate(msg["content"]):
            if not isinstance(item, dict):
                raise ValueError(f"{where}, message {m}, item {k}: expected a dict, got {type(item).__name__}")
            if _is_image_item(item):
                images.append(item.get("image"))
            elif _is_video_item(item):
                raise NotImplementedError(f"{where}, message {m}, item {k}: videos are not supported")
    return images


# ------------------------------------------------------------------------------------- processor

class Processor:
    """Tokenizer + image processor of one checkpoint, producing Qwen2.5-VL model inputs."""

    def __init__(self, tokenizer: Tokenizer, image_config: ImageProcessorConfig,
                 chat_template: ChatTemplate | None = None):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.chat_template = chat_template   # None: the built-in Qwen2.5-VL template (render_chat)

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path, min_pixels: int | None = None,
                        max_pixels: int | None = None) -> Processor:
        """Load the tokenizer, the image processor settings and the chat template from a checkpoint dir in any
        layout transformers writes (4.x: preprocessor_config.json, chat_template.json; 5.x: processor_config.json,
        chat_template.jinja); min/max_pixels (when given) override the file's image size bounds."""
        hf_dir = Path(hf_dir)
        image_config = ImageProcessorConfig.from_json(hf_dir)
        bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        if bounds:
            image_config = dataclasses.replace(image_config, **bounds)
        return cls(Tokenizer.from_pretrained(hf_dir), image_config, find_chat_template(hf_dir))

    def image_token_count(self, grid_thw) -> int:
        """LLM tokens of one image: grid_t * grid_h * grid_w / merge_size**2."""
        return tokens_per_image(grid_thw, self.image_config.merge_size)[0]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            add_vision_id: bool = False) -> str:
        """Conversation -> prompt text (one <|image_pad|> per image), with the checkpoint's template."""
        if self.chat_template is not None:
            return self.chat_template.render(messages, add_generation_prompt, add_vision_id)
        return render_chat(messages, add_generation_prompt, add_vision_id)

    def encode_prompt(self, text: str, images: list,
                      where: str = "prompt") -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """Prompt text with one <|image_pad|> per image -> (ids with pads expanded, pixel rows, grids)."""
        if VIDEO_PAD in text:
            raise NotImplementedError(f"{where}: videos are not supported")
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"{where}: the text has {len(pieces) - 1} {IMAGE_PAD} placeholders "
                             f"but {len(images)} images were given")
        ids, rows, grids = self.tokenizer.encode(pieces[0]), [], []
        for k, (image, piece) in enumerate(zip(images, pieces[1:])):
            if image is None:
                raise ValueError(f"{where}, image {k}: image item has no 'image' (pass a PIL image or a file path)")
            pix, thw = process_image(image, self.image_config, name=f"{where}, image {k}")
            rows.append(torch.from_numpy(pix))
            grids.append(thw)
            ids += [self.tokenizer.image_pad_id] * self.image_token_count(thw) + self.tokenizer.encode(piece)
        if not images:
            return ids, None, None
        return ids, torch.cat(rows), torch.tensor(grids, dtype=torch.long)

    def pad(self, sequences: list[list[int]], padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """Pad id lists to one length with the pad token -> (input_ids, attention_mask), both int64."""
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for b, seq in enumerate(sequences):
            span = slice(length - len(seq), length) if padding_side == "left" else slice(0, len(seq))
            input_ids[b, span] = torch.tensor(seq, dtype=torch.long)
            mask[b, span] = 1
        return input_ids, mask

    def __call__(self, conversations: list, images: list[list] | None = None, add_generation_prompt: bool = True,
                 padding_side: str = "left", add_vision_id: bool = False) -> dict:
        """Batch of conversations -> dict(input_ids, attention_mask, pixel_values, image_grid_thw).

        Images come from the content items, or from `images` (one list per conversation) when given.
        """
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]          # a single conversation
        if not conversations:
            raise ValueError("Processor: empty batch")
        if images is not None and len(images) != len(conversations):
            raise ValueError(f"Processor: {len(images)} image lists for {len(conversations)} conversations")
        seqs, rows, grids = [], [], []
        for b, messages in enumerate(conversations):
            where = f"conversation {b}"
            found = conversation_images(messages, where)
            imgs = found if images is None else list(images[b])
            text = self.apply_chat_template(messages, add_generation_prompt, add_vision_id)
            ids, pix, grid = self.encode_prompt(text, imgs, where)
            seqs.append(ids)
            if pix is not None:
                rows.append(pix)
                grids.append(grid)
        input_ids, attention_mask = self.pad(seqs, padding_side)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "pixel_values": torch.cat(rows) if rows else None,
                "image_grid_thw": torch.cat(grids) if grids else None}
