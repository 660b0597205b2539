"""Scores captured at decode (rollout capture) equal teacher-forced scoring, and capture changes nothing else.

Reference: rl/scoring.score_policy on the same completions (itself held to transformers' eager attention and
full-vocab log-softmax in tests/attention and tests/eval). float32 CPU, tolerance 1e-5 absolute, at TP=1,
TP=2 and PP=2 (rewards under every reward.token_selection), on left-padded prompts (one with two images, one
text-only) and rows stopping at different steps (a fifth of the vocabulary stops a row).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_sayo.inference.sampling import SamplingParams

TOL = 1e-5
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
G = 3


def _prompts(ckpt, make_image):
    """Three left-padded prompts: two images, one image, no image; region = every third image token."""
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config

    proc = Processor.from_pretrained(ckpt)
    two = [{"type": "image", "image": make_image(84, 56, seed=1)},
           {"type": "image", "image": make_image(56, 56, seed=2)},
           {"type": "text", "text": "Which picture is brighter?"}]
    one = [{"type": "image", "image": make_image(112, 84, seed=3)}, {"type": "text", "text": "Colour?"}]
    inputs = proc([[{"role": "user", "content": two}], [{"role": "user", "content": one}],
                   [{"role": "user", "content": "Say hi"}]])
    image = inputs["input_ids"] == load_hf_config(ckpt).tokens.image
    region = torch.zeros_like(image)
    for b in range(image.shape[0]):
        region[b, image[b].nonzero().flatten()[::3]] = True
    return inputs, region


def _params(ckpt):
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config

    t = load_hf_config(ckpt).tokens
    return SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=10, seed=7,
                          stop_token_ids=tuple(range(100, 200)),
                          suppress_token_ids=(t.image, t.video, t.vision_start, t.vision_end))


def _rank(ckpt, tp, pp, inputs, region, params):
    from megatron.core import parallel_state

    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime
    from megatron_sayo.inference.decode import generate
    from megatron_sayo.rl.batch import ScoringBatch
    from megatron_sayo.rl.scoring import score_policy

    runtime.init_distributed(tp, pp)
    model = load_model_stage(ckpt, tp=tp, pp=pp)
    captured = generate(model, inputs, params, num_return_sequences=G, capture_region=region)
    plain = generate(model, inputs, params, num_return_sequences=G)
    batch = ScoringBatch.from_rollout(captured, SimpleNamespace(inputs=inputs, region_mask=region), model.hf)
    teacher = score_policy(model, batch, micro_batch=G, temperature=params.temperature)  # equal microbatches (PP)
    if not parallel_state.is_pipeline_last_stage():
        return None
    if parallel_state.get_tensor_model_parallel_rank() != 0:   # it sampled on its own: the same ids?
        return dict(sequences=captured.sequences)
    return dict(captured=captured, plain=plain, teacher=teacher)


@pytest.fixture(scope="module")
def prompts(tiny_ckpt, make_image):
    return _prompts(tiny_ckpt, make_image)


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_captured_scores_equal_teacher_forced(tiny_ckpt, prompts, layout):
    from megatron_sayo.distributed.runtime import spawn_local
    from megatron_sayo.rl.advantages import group_advantages
    from megatron_sayo.rl.rewards import sequence_attention_reward

    tp, pp = LAYOUTS[layout]
    inputs, region = prompts
    results = [r for r in spawn_local(_rank, tp * pp, str(tiny_ckpt), tp, pp, inputs, region, _params(tiny_ckpt))
               if r is not None]
    out = next(r for r in results if "captured" in r)
    captured, plain, teacher = out["captured"], out["plain"], out["teacher"]
    for other in results:       # every TP rank of the last stage drew the same tokens
        assert torch.equal(other.get("sequences", captured.sequences), captured.sequences)
    assert inputs["attention_mask"][2, 0] == 0, "the batch must be left-padded"
    lengths = captured.completion_lengths
    assert len(set(lengths.tolist())) > 2 and captured.finished.any(), f"rows must stop at different steps: {lengths}"

    # capture on and off: the same completions from the same seed
    assert torch.equal(captured.sequences, plain.sequences)
    assert torch.equal(captured.completion_mask, plain.completion_mask)
    assert plain.scores is None

    got = captured.scores
    assert torch.equal(got.mask, teacher.mask)
    for name in ("logprobs", "entropy", "region_mass", "image_mass"):
        diff = (getattr(got, name) - getattr(teacher, name)).abs().max().item()
        assert diff <= TOL, f"{layout} {name}: max |captured - teacher-forced| = {diff:.2e}"
    assert got.region_mass[:2 * G].gt(0).any() and got.image_mass[2 * G:].eq(0).all()   # text-only rows: no image

    # the same rewards and advantages
    r_got, tas_got, sel_got = sequence_attention_reward(got)
    r_ref, tas_ref, sel_ref = sequence_attention_reward(teacher)
    assert torch.equal(sel_got, sel_ref)
    torch.testing.assert_close(r_got, r_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(tas_got, tas_ref, atol=TOL, rtol=TOL)
    fmt = lengths.double() / 10     # any term shared by both
    adv_got = group_advantages(r_got.double() + fmt, captured.group_ids)
    adv_ref = group_advantages(r_ref.double() + fmt, captured.group_ids)
    torch.testing.assert_close(adv_got, adv_ref, atol=TOL, rtol=0)

    # every reward.token_selection: the same tokens and rewards from captured and teacher-forced scores (the
    # reasoning/answer parts come from the completion ids, which every rank holds alike: checked above)
    from megatron_sayo.data.tokenizer import Tokenizer
    from megatron_sayo.rl.rewards import TOKEN_SELECTIONS, completion_parts

    tok = Tokenizer.from_pretrained(tiny_ckpt)
    parts = completion_parts(captured.completion_ids, lengths, lambda ids: tok.decode(ids, skip_special_tokens=True))
    for selection in TOKEN_SELECTIONS:
        r_got, tas_got, sel_got = sequence_attention_reward(got, selection=selection, parts=parts)
        r_ref, tas_ref, sel_ref = sequence_attention_reward(teacher, selection=selection, parts=parts)
        assert torch.equal(sel_got, sel_ref), selection
        torch.testing.assert_close(r_got, r_ref, atol=TOL, rtol=0)
        torch.testing.assert_close(tas_got, tas_ref, atol=TOL, rtol=TOL)
