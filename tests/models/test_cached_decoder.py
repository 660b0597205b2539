"""The lean KV-cached decoder path equals megatron's TransformerBlock on the same weights (TP1 and TP2)."""

from __future__ import annotations

import pytest
import torch


def _rank_compare(ckpt, tp, batch):
    """Logits of a padded, image-bearing prompt through megatron's block and through the cached path, then one
    decode step through the cached path vs the block on the prompt + that token; returns relative errors."""
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime
    from megatron_sayo.inference.decode import decode_mask
    from megatron_sayo.models.qwen25vl import cached_decoder
    from megatron_sayo.models.qwen25vl.attention import AttentionState, KVCache
    from megatron_sayo.models.qwen25vl.model import model_inputs

    runtime.init_distributed(tp, 1)
    model = load_model_stage(ckpt, tp=tp)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    inputs = model_inputs(model.hf, ids, mask, batch["pixel_values"], batch["image_grid_thw"])

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    with torch.no_grad():
        block = model.full_logits(model(**inputs))
        cache = KVCache(max_len=ids.shape[1] + 1)
        cached = model.full_logits(model(**inputs, state=AttentionState(kv_cache=cache)))
        real = mask.bool()
        prefill_err = rel(cached[real], block[real])

        nxt = block[:, -1].argmax(-1)
        longer_ids = torch.cat([ids, nxt[:, None]], 1)
        longer_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        longer = model_inputs(model.hf, longer_ids, longer_mask, batch["pixel_values"], batch["image_grid_thw"])
        block_next = model.full_logits(model(**longer))[:, -1]
        step = model.full_logits(model(input_ids=nxt[:, None], position_ids=longer["position_ids"][:, :, -1:],
                                       attention_mask=decode_mask(longer_mask.bool()),
                                       state=AttentionState(kv_cache=cache)))[:, -1]
        decode_err = rel(step, block_next)
    with torch.enable_grad():   # training forwards never take the cached path
        training_uses_block = not cached_decoder.supports(model)
    return prefill_err, decode_err, training_uses_block


@pytest.mark.multiproc
@pytest.mark.parametrize("tp", [1, 2])
def test_cached_path_equals_megatron_block(tiny_ckpt, make_image, tp):
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.distributed.runtime import spawn_local

    proc = Processor.from_pretrained(tiny_ckpt)
    image = [{"type": "image", "image": make_image(84, 56, seed=3)}, {"type": "text", "text": "Where is it?"}]
    batch = proc([[{"role": "user", "content": image}], [{"role": "user", "content": "Hello there"}]])
    assert (batch["attention_mask"] == 0).any()               # the batch is padded
    for prefill_err, decode_err, training_uses_block in spawn_local(_rank_compare, tp, str(tiny_ckpt), tp, batch):
        assert prefill_err < 1e-5 and decode_err < 1e-5, (prefill_err, decode_err)
        assert training_uses_block
