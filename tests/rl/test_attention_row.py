"""reward.attention_row: the region/image masses of each completion token's own attention row (query column
p, docs/spec.md §3) or of the row that sampled it (p - 1), against transformers' eager attentions (1e-5
relative, float32 CPU); the decision rows need teacher-forced scoring (a config error otherwise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

CONFIG = Path(__file__).resolve().parents[2] / "megatron_sayo/configs/tiny.yaml"


def _masses(ckpt, jsonl, completion, attention_row):
    """On one rank: region/image masses of each completion token from score_policy with `attention_row`."""
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.config import DataConfig
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.distributed import runtime
    from megatron_sayo.rl.batch import ScoringBatch
    from megatron_sayo.rl.prompts import build_prompt_batch
    from megatron_sayo.rl.scoring import score_policy

    runtime.init_distributed(1, 1)
    model = load_model_stage(str(ckpt), tp=1, params_dtype=torch.float32)
    proc = Processor.from_pretrained(str(ckpt), max_pixels=50176)
    hf = model.hf
    prompts = build_prompt_batch(proc, load_grounded(jsonl)[:1], hf.tokens.image, hf.vision.spatial_merge_size,
                                 hf.vision.patch_size, DataConfig().instruction)
    batch = ScoringBatch.teacher_forced(hf, prompts.inputs, prompts.region_mask, [completion], 0)
    scores = score_policy(model, batch, 4, 1.0, attention_row=attention_row)
    n = len(completion)
    return scores.region_mass[0, :n].double().numpy(), scores.image_mass[0, :n].double().numpy()


@pytest.mark.multiproc
@pytest.mark.parametrize("attention_row,shift", [("token", 0), ("decision", -1)])
def test_attention_row_masses_equal_eager_attention(tiny_ckpt, tmp_path, attention_row, shift):
    """Against transformers' eager attentions: token j's masses are the last layer's head-mean attention on the
    region and image keys of query column P + j ("token", docs/spec.md §3) or P + j - 1 ("decision": the row
    whose logits sampled token j)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_sayo.config import DataConfig
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.data.regions import RegionSpec, batch_region_mask
    from megatron_sayo.distributed.runtime import spawn_local
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config
    from megatron_sayo.rl.prompts import conversation
    from megatron_sayo.train import write_synthetic

    jsonl = tmp_path / "tiles.jsonl"
    write_synthetic(jsonl, 2, seed=4, task="tiles")
    tok = Processor.from_pretrained(str(tiny_ckpt)).tokenizer
    completion = tok.encode("red over blue <answer>blue</answer>")
    got_region, got_image = next(r for r in spawn_local(_masses, 1, tiny_ckpt, jsonl, completion, attention_row)
                                 if r is not None)

    sample = load_grounded(jsonl)[0]
    proc = Processor.from_pretrained(str(tiny_ckpt), max_pixels=50176)
    inputs = proc([conversation(sample, DataConfig().instruction)])
    hf = load_hf_config(tiny_ckpt)
    region = batch_region_mask(inputs["input_ids"], inputs["image_grid_thw"], hf.tokens.image,
                               [RegionSpec(boxes=sample.boxes, orig_size=tuple(sample.image_size))])[0]
    P, n = inputs["input_ids"].shape[1], len(completion)
    ids = torch.cat([inputs["input_ids"], torch.tensor([completion])], 1)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_ckpt), dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        alpha = model(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                      mm_token_type_ids=(ids == model.config.image_token_id).int(),
                      output_attentions=True).attentions[-1][0].double()
    rows = torch.arange(P + shift, P + shift + n)
    keys_region = torch.cat([region, torch.zeros(n, dtype=torch.bool)])
    keys_image = ids[0] == model.config.image_token_id
    want_region = alpha[:, rows][:, :, keys_region].mean(-1).mean(0).numpy()
    want_image = alpha[:, rows][:, :, keys_image].mean(-1).mean(0).numpy()
    np.testing.assert_allclose(got_region, want_region, rtol=1e-5)
    np.testing.assert_allclose(got_image, want_image, rtol=1e-5)
    other = alpha[:, rows - 1 - 2 * shift][:, :, keys_region].mean(-1).mean(0).numpy()  # the other convention
    assert not np.allclose(want_region, other, rtol=1e-3)


def test_decision_rows_need_teacher_forced_scoring():
    from megatron_sayo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="reward.attention_row = decision needs rollout.capture_scores = false"):
        load_config(str(CONFIG), ["reward.attention_row=decision"])
    assert load_config(str(CONFIG), ["reward.attention_row=decision",
                                     "rollout.capture_scores=false"]).reward.attention_row == "decision"
