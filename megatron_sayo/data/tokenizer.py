"""Thin wrapper over the `tokenizers` library for a Hugging Face checkpoint's tokenizer.json.

Special-token ids are read from the files: eos and pad from tokenizer_config.json's eos_token / pad_token
(Qwen2.5-VL: <|im_end|>, <|endoftext|>), the vision tokens from the vocabulary by name.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"


class Tokenizer:
    """encode/decode plus the Qwen2.5-VL special-token ids of one checkpoint."""

    def __init__(self, tokenizer: _HFTokenizer, eos_token: str = IM_END, pad_token: str | None = None,
                 source: str = "tokenizer"):
        self._tok = tokenizer
        self.source = source
        self.eos_token = eos_token
        self.pad_token = pad_token or (ENDOFTEXT if tokenizer.token_to_id(ENDOFTEXT) is not None else eos_token)
        self.eos_id = self.token_id(self.eos_token)
        self.pad_id = self.token_id(self.pad_token)
        self.im_start_id = self.token_id(IM_START)
        self.im_end_id = self.token_id(IM_END)
        self.vision_start_id = self.token_id(VISION_START)
        self.vision_end_id = self.token_id(VISION_END)
        self.image_pad_id = self.token_id(IMAGE_PAD)
        self.video_pad_id = self.token_id(VIDEO_PAD)

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json for eos/pad) from a checkpoint directory."""
        hf_dir = Path(hf_dir)
        path = hf_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json not found in checkpoint directory {hf_dir}")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: cannot load tokenizer: {exc}") from None
        cfg = _read_json(hf_dir / "tokenizer_config.json")
        return cls(tok, eos_token=_token_str(cfg.get("eos_token")) or IM_END,
                   pad_token=_token_str(cfg.get("pad_token")), source=str(path))

    def token_id(self, token: str) -> int:
        """Id of a token string; error naming the file when the vocabulary lacks it."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{self.source}: token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. <|im_start|>) map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (including added tokens), not the model's padded vocab."""
        return self._tok.get_vocab_size(with_added_tokens=True)


def _read_json(path: Path) -> dict:
    """A JSON object from a file, {} when absent; clear error when malformed."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _token_str(value) -> str | None:
    """A token given as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value
