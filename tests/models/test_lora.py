"""LoRA adapters on megatron's TP linears against PEFT on transformers (float32, eager).

The same full adapter matrices (random A and B) go into our model at TP1 / TP2 / PP2 and into a PEFT model of
the HF checkpoint; logits agree within 1e-4 relative. Switching the adapters off gives the base model's logits
exactly; the lean KV-cached decoder adds the adapters as the megatron block does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sayo.data.processor import Processor
from megatron_sayo.models.qwen25vl.hf_config import load_hf_config
from megatron_sayo.models.qwen25vl.lora_names import TARGETS, adapter_entries, param_name, peft_key, peft_target_regex
from megatron_sayo.testing.fixed_rollout import random_adapters
from megatron_sayo.testing.parity import INPUT_KEYS, compare_logits

RANK, ALPHA = 4, 8.0
LAYOUTS = [(1, 1), (2, 1), (1, 2)]


def to_peft(ckpt, adapters: dict[str, torch.Tensor], targets=tuple(TARGETS)) -> dict[str, torch.Tensor]:
    text = load_hf_config(ckpt).text
    return {peft_key(t, m, w, layer): adapters[param_name(t, m, w, layer)]
            for t, m, layer, _, _ in adapter_entries(text, targets, RANK) for w in "AB"}


def batch_for(ckpt, make_image):
    convs = [[{"role": "user", "content": [{"type": "image", "image": make_image(112, 84, 5)},
                                           {"type": "text", "text": "what is here?"}]}],
             [{"role": "user", "content": [{"type": "text", "text": "no image, short"}]}]]
    return Processor.from_pretrained(ckpt)(convs)


def peft_reference_logits(ckpt, batch, adapters) -> np.ndarray:
    """transformers + PEFT (the reference implementation of LoRA) with the given adapter matrices."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import Qwen2_5_VLForConditionalGeneration

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                            target_modules=peft_target_regex(TARGETS))).eval()
    result = set_peft_model_state_dict(model, to_peft(ckpt, adapters))
    assert not result.unexpected_keys, result.unexpected_keys[:3]
    assert not [k for k in result.missing_keys if "lora_" in k]
    kwargs = {k: torch.as_tensor(v) for k, v in batch.items() if k in INPUT_KEYS and v is not None}
    ids = kwargs["input_ids"]
    image, video = base.config.image_token_id, base.config.video_token_id
    kwargs["mm_token_type_ids"] = (ids == image).int() + 2 * (ids == video).int()
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def _rank_logits(ckpt, tp, pp, batch, adapters):
    """(base logits, with adapters, adapters off, KV-cached prefill with adapters or None) on the last stage."""
    from megatron.core import parallel_state

    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime
    from megatron_sayo.distributed.schedule import run_forward
    from megatron_sayo.models.lora import adapters_disabled, attach_lora, load_full_adapters, trainable_parameters
    from megatron_sayo.models.qwen25vl.attention import AttentionState, KVCache
    from megatron_sayo.models.qwen25vl.model import model_inputs

    runtime.init_distributed(tp, pp)
    model = load_model_stage(ckpt, tp=tp, pp=pp)
    inputs = model_inputs(model.hf, *(torch.as_tensor(batch[k]) for k in INPUT_KEYS))

    def logits():
        out = run_forward(model, [dict(inputs=inputs)], collect=lambda o, mb: model.full_logits(o))
        return out[0] if out else None

    base = logits()
    attach_lora(model, model.hf.text, rank=RANK, alpha=ALPHA)
    load_full_adapters(model, adapters)
    counts = (trainable_parameters(model), len(model.decoder.layers))
    on = logits()
    with adapters_disabled(model):
        off = logits()
    cached = None
    if pp == 1:
        with torch.no_grad():
            state = AttentionState(kv_cache=KVCache(max_len=inputs["input_ids"].shape[1]))
            cached = model.full_logits(model(**inputs, state=state))
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        return base, on, off, cached, counts
    return None


@pytest.fixture(scope="module")
def reference(tiny_ckpt, make_image):
    batch = batch_for(tiny_ckpt, make_image)
    adapters = random_adapters(load_hf_config(tiny_ckpt).text, RANK)
    return batch, adapters, peft_reference_logits(str(tiny_ckpt), batch, adapters)


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_adapted_logits_match_peft(tiny_ckpt, reference, tp, pp):
    from megatron_sayo.distributed.runtime import spawn_local

    batch, adapters, ref = reference
    plain = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k in INPUT_KEYS}
    from megatron_sayo.plan import load_arch, lora_layer_params

    base, on, off, cached, (trainable, layers) = next(
        r for r in spawn_local(_rank_logits, tp * pp, str(tiny_ckpt), tp, pp, plain, adapters) if r is not None)
    # the planner's per-rank adapter count is what the model really trains
    assert trainable == layers * lora_layer_params(load_arch(tiny_ckpt).text, RANK, tp)
    mask = batch["attention_mask"].numpy()
    report = compare_logits(on.numpy(), ref, mask)
    assert report.rel <= 1e-4, str(report)
    # the adapters must matter at this scale, or the comparison above proves nothing
    assert compare_logits(base.numpy(), ref, mask).rel > 100 * max(report.rel, 1e-7)
    assert torch.equal(off, base), "adapters switched off must give the base model's logits exactly"
    if cached is not None:
        real = batch["attention_mask"].bool()
        err = float((cached[real] - on[real]).abs().max() / on[real].abs().max())
        assert err <= 1e-5, f"KV-cached decoder with adapters: relative error {err:.2e}"


def test_peft_regex_leaves_the_vision_tower_alone(tiny_ckpt):
    import re

    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32)
    hit = [n for n, _ in model.named_modules() if re.fullmatch(peft_target_regex(TARGETS), n)]
    text = load_hf_config(tiny_ckpt).text
    assert len(hit) == 7 * text.num_layers and not [n for n in hit if "visual" in n]
