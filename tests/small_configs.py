"""A small hub-layout Qwen2.5-VL config.json unlike the tiny presets (its own sizes, vocabulary and ids)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

HUB_7B = json.loads((Path(__file__).resolve().parents[1] / "examples/configs/qwen25vl_7b.config.json").read_text())


def small_hub_config(vocab_size: int, layers: int = 4, vision_depth: int = 3) -> dict:
    """The 7B config shrunk: hidden 96, 6/2 heads, mrope [4, 2, 2], special ids just below vocab_size."""
    cfg = copy.deepcopy(HUB_7B)
    v = vocab_size
    cfg.update(hidden_size=96, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=6,
               num_key_value_heads=2, vocab_size=v, image_token_id=v - 45, video_token_id=v - 44,
               vision_start_token_id=v - 48, vision_end_token_id=v - 47, eos_token_id=v - 55, bos_token_id=v - 57,
               vision_token_id=v - 46, rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]})
    cfg["vision_config"] = {"depth": vision_depth, "hidden_size": 48, "intermediate_size": 80, "num_heads": 3,
                            "out_hidden_size": 96, "window_size": 112, "fullatt_block_indexes": [vision_depth - 1]}
    return cfg
