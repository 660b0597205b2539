"""The no-cache greedy decoder: what `inference.decode.generate` is tested against, and the benchmarks' baseline."""

from __future__ import annotations

import torch


def greedy_without_cache(model, batch: dict, new_tokens: int) -> torch.Tensor:
    """Greedy decoding that re-runs the whole prefix (vision included) for every new token, one process, no
    KV cache and no stop ids: the reference for `generate` and the baseline Megatron-Bridge's VL generation
    corresponds to. Returns the sequences [b, P + new_tokens]."""
    from megatron_sayo.models.qwen25vl.model import model_inputs

    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(new_tokens):
        inputs = model_inputs(model.hf, ids, mask, batch["pixel_values"], batch["image_grid_thw"])
        with torch.no_grad():
            nxt = model.full_logits(model(**inputs))[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids
