"""generate: KV-cached generation vs transformers' generate and vs no-cache recomputation, under TP and PP."""

from __future__ import annotations

import pytest
import torch

from megatron_sayo.inference.sampling import SamplingParams

NEW_TOKENS = 12


# ------------------------------------------------------------------------------------------ helpers

def _batch(ckpt, make_image) -> dict:
    """Two left-padded prompts: one with an image, one text-only and shorter."""
    from megatron_sayo.data.processor import Processor

    proc = Processor.from_pretrained(ckpt)
    image = [{"type": "image", "image": make_image(84, 56, seed=1)}, {"type": "text", "text": "What is left?"}]
    return proc([[{"role": "user", "content": image}], [{"role": "user", "content": "Hi"}]])


def _sharp_checkpoint(out_dir):
    """The 'tiny' preset with initializer_range 0.3: random weights whose greedy text does not collapse to
    one repeated token, so wrong positions or masks change the generated ids."""
    import copy
    import json

    from megatron_sayo.testing.tiny_checkpoint import PRESETS, make_tiny_checkpoint

    cfg = dict(copy.deepcopy(PRESETS["tiny"]), initializer_range=0.3)
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return make_tiny_checkpoint(out_dir / "ckpt", config_json=out_dir / "config.json")


def _hf_generate(ckpt, batch: dict, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' greedy generate (eager, float32): sequences [B, P + T] and the chosen ids' log-probs [B, T]."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ids = batch["input_ids"]
    kwargs = {k: v for k, v in batch.items() if v is not None}
    kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        out = model.generate(**kwargs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=model.config.text_config.pad_token_id, eos_token_id=[],
                             output_logits=True, return_dict_in_generate=True)
    logp = torch.stack(out.logits, dim=1).log_softmax(-1)
    chosen = out.sequences[:, ids.shape[1]:]
    return out.sequences, logp.gather(-1, chosen[..., None]).squeeze(-1)


def _rank_generate(ckpt, tp, pp, batch, params, g, compact):
    """One rank: load our model at TP x PP, generate; every rank returns its Rollout as a dict."""
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime
    from megatron_sayo.inference.decode import generate

    runtime.init_distributed(tp, pp)
    model = load_model_stage(ckpt, tp=tp, pp=pp)
    out = generate(model, batch, params, num_return_sequences=g, compact=compact)
    return {k: v for k, v in vars(out).items()}


def _no_cache_greedy(ckpt, batch: dict, new_tokens: int) -> torch.Tensor:
    """Our model, one process, re-running the whole prefix for every new token (no KV cache)."""
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime
    from megatron_sayo.testing.reference_decode import greedy_without_cache

    runtime.init_distributed(1, 1)
    return greedy_without_cache(load_model_stage(ckpt), batch, new_tokens)


def _run(ckpt, batch, params, *, tp=1, pp=1, g=1, compact=True) -> dict:
    from megatron_sayo.distributed.runtime import spawn_local

    return spawn_local(_rank_generate, tp * pp, str(ckpt), tp, pp, batch, params, g, compact)


# ------------------------------------------------------------------------------------------ references

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _sharp_checkpoint(tmp_path_factory.mktemp("rollout"))


@pytest.fixture(scope="module")
def batch(ckpt, make_image):
    return _batch(ckpt, make_image)


@pytest.fixture(scope="module")
def hf_reference(ckpt, batch):
    return _hf_generate(ckpt, batch, NEW_TOKENS)


@pytest.fixture(scope="module")
def hf_greedy(hf_reference):
    return hf_reference[0]


GREEDY = SamplingParams(greedy=True, max_new_tokens=NEW_TOKENS, stop_token_ids=())


def test_batch_is_left_padded_with_an_image(batch):
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()
    assert batch["pixel_values"] is not None


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_greedy_equals_transformers_generate(ckpt, batch, hf_reference, tp, pp):
    hf_sequences, hf_logprobs = hf_reference
    p = batch["input_ids"].shape[1]
    assert len(set(hf_sequences[0, p:].tolist())) > NEW_TOKENS // 2      # the reference is not degenerate
    assert not torch.equal(hf_sequences[0, p:], hf_sequences[1, p:])
    results = _run(ckpt, batch, GREEDY, tp=tp, pp=pp)
    for r in results:      # every rank holds the same tokens
        assert torch.equal(r["sequences"], hf_sequences)
        torch.testing.assert_close(r["logprobs"], hf_logprobs, rtol=1e-4, atol=1e-4)
        assert r["completion_mask"].all() and r["prompt_length"] == batch["input_ids"].shape[1]


@pytest.mark.multiproc
def test_greedy_equals_no_cache_recomputation(ckpt, batch):
    from megatron_sayo.distributed.runtime import spawn_local

    ours = _run(ckpt, batch, GREEDY)[0]["sequences"]
    assert torch.equal(ours, spawn_local(_no_cache_greedy, 1, str(ckpt), batch, NEW_TOKENS)[0])


# ------------------------------------------------------------------------------------------ sampling

@pytest.mark.multiproc
def test_sampling_reproducible_and_grouped(ckpt, batch):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=3, stop_token_ids=())
    a = _run(ckpt, batch, params, g=3)[0]
    b = _run(ckpt, batch, params, g=3)[0]
    assert torch.equal(a["sequences"], b["sequences"]) and torch.equal(a["logprobs"], b["logprobs"])
    assert a["group_ids"].tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(a["sequences"][:, :a["prompt_length"]], batch["input_ids"].repeat_interleave(3, 0))
    assert len({tuple(r) for r in a["completion_ids"][:3].tolist()}) > 1   # the group's completions differ
    assert (a["logprobs"] < 0).all()
    c = _run(ckpt, batch, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=4,
                                                 stop_token_ids=()), g=3)[0]
    assert not torch.equal(a["sequences"], c["sequences"])


@pytest.mark.multiproc
def test_tiny_top_p_is_greedy(ckpt, batch, hf_greedy):
    params = SamplingParams(temperature=0.7, top_p=1e-6, max_new_tokens=NEW_TOKENS, seed=1, stop_token_ids=())
    assert torch.equal(_run(ckpt, batch, params)[0]["sequences"], hf_greedy)


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_sampling_same_under_tp_and_pp(ckpt, batch, tp, pp):
    """Same seed, same tokens and log-probs at TP=2 / PP=2 as on one rank, with rows stopping at different
    steps (a fifth of the vocabulary are stop ids), so the compacted batch shrinks between pipeline stages."""
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=5,
                            stop_token_ids=tuple(range(0, 512, 5)))
    one = _run(ckpt, batch, params, g=3)[0]
    assert len(set(one["completion_lengths"].tolist())) > 1 and one["finished"].any()
    for r in _run(ckpt, batch, params, tp=tp, pp=pp, g=3):
        assert torch.equal(r["sequences"], one["sequences"])
        assert torch.equal(r["completion_mask"], one["completion_mask"])
        torch.testing.assert_close(r["logprobs"], one["logprobs"], rtol=1e-4, atol=1e-5)


@pytest.mark.multiproc
def test_stop_tokens_and_masks(ckpt, batch, hf_greedy):
    """Stop ids = greedy's token at step 3 of row 0 and step 5 of row 1: each row ends at its first stop id,
    padded after; the completion width is the longest row; compacted and uncompacted runs agree."""
    import json

    p = batch["input_ids"].shape[1]
    pad = json.loads((ckpt / "config.json").read_text())["pad_token_id"]
    completions = hf_greedy[:, p:]
    stops = (int(completions[0, 3]), int(completions[1, 5]))
    is_stop = torch.isin(completions, torch.tensor(stops))
    expected = [int(row.nonzero()[0]) + 1 for row in is_stop]
    params = SamplingParams(greedy=True, max_new_tokens=NEW_TOKENS, stop_token_ids=stops)
    runs = [_run(ckpt, batch, params, compact=compact)[0] for compact in (True, False)]
    for r in runs:
        width = max(expected)
        assert r["completion_lengths"].tolist() == expected and r["finished"].all()
        assert r["completion_ids"].shape == (2, width) and r["sequences"].shape == (2, p + width)
        for row, n in enumerate(expected):
            assert torch.equal(r["completion_ids"][row, :n], completions[row, :n])
            assert (r["completion_ids"][row, n:] == pad).all()
            assert r["completion_mask"][row].tolist() == [1] * n + [0] * (width - n)
            assert (r["logprobs"][row, n:] == 0).all() and (r["logprobs"][row, :n] < 0).all()
        assert torch.equal(r["attention_mask"][:, p:], r["completion_mask"])
        assert torch.equal(r["attention_mask"][:, :p], batch["attention_mask"])
    assert torch.equal(runs[0]["sequences"], runs[1]["sequences"])
    torch.testing.assert_close(runs[0]["logprobs"], runs[1]["logprobs"])   # batch size changes the float sums


@pytest.mark.multiproc
def test_length_stop(ckpt, batch, hf_greedy):
    r = _run(ckpt, batch, SamplingParams(greedy=True, max_new_tokens=3, stop_token_ids=()))[0]
    p = batch["input_ids"].shape[1]
    assert r["completion_ids"].shape == (2, 3) and r["completion_lengths"].tolist() == [3, 3]
    assert not r["finished"].any() and torch.equal(r["sequences"], hf_greedy[:, :p + 3])


# ------------------------------------------------------------------------------------------ rejected input

def test_right_padded_prompts_rejected():
    from megatron_sayo.inference.decode import generate

    batch = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    with pytest.raises(ValueError, match="left-padded"):
        generate(torch.nn.Linear(1, 1), batch, GREEDY)


def test_completion_texts_are_each_rows_own_tokens(tiny_ckpt):
    """Rollout.completion_texts: the texts the rows were encoded from, whatever pads or ids follow each length."""
    from megatron_sayo.data.tokenizer import Tokenizer
    from megatron_sayo.inference.decode import Rollout

    tok = Tokenizer.from_pretrained(tiny_ckpt)
    texts = ["a red square", "<answer>blue</answer>", ""]
    rows = [tok.encode(t) + [tok.eos_id] for t in texts]
    width = max(map(len, rows)) + 3
    ids = torch.tensor([r + [tok.encode("zz")[0]] * (width - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    n = len(rows)
    rollout = Rollout(sequences=ids, attention_mask=torch.ones_like(ids), prompt_length=0, completion_ids=ids,
                      completion_mask=torch.ones_like(ids), completion_lengths=lengths, group_ids=torch.arange(n),
                      logprobs=torch.zeros(ids.shape), finished=torch.ones(n, dtype=torch.bool))
    assert rollout.completion_texts(tok) == texts
