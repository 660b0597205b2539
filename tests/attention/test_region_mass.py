"""RegionMassProbe against naive softmax (pure, no model) and, at TP=1/2 and PP=2, against transformers' eager
attention at the last layer (output_attentions=True). Tolerance: 1e-5 absolute on a and v (float32)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_sayo.attention.region_mass import (
    RegionMassProbe,
    indicator_mass_sums,
    indicator_values,
    local_head_mass_sums,
    query_row_pairs,
)
from megatron_sayo.models.qwen25vl.attention import attention_with_lse

TOL = 1e-5


# ------------------------------------------------------------------------------------------------ naive reference

def naive_alpha(q, k, scale, allowed):
    """Full softmax weights [b, h, sq, sk] the textbook way (reference only)."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def naive_av(alpha, region_mask, image_mask):
    """docs/spec.md §3: a, v [b, sq] from full weights: mean over heads of mean over the key set."""
    a = (alpha * region_mask[:, None, None, :]).sum(-1).mean(1) / region_mask.sum(1, keepdim=True).clamp(min=1)
    v = (alpha * image_mask[:, None, None, :]).sum(-1).mean(1) / image_mask.sum(1, keepdim=True)
    return a, v


def random_case(seed, b=2, h=4, sq=23, sk=23, d=8, left_pad=(0, 5)):
    """Random q/k/v, a causal+left-padding mask, image key blocks and regions inside them."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (sq, sk, sk))
    real = torch.ones(b, sk, dtype=torch.bool)
    for i, pad in enumerate(left_pad[:b]):
        real[i, :pad] = False
    allowed = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)[None] & real[:, None, :]
    rows = torch.arange(sq)
    allowed[:, rows, rows + sk - sq] = True
    allowed = allowed[:, None]
    image = torch.zeros(b, sk, dtype=torch.bool)
    region = torch.zeros(b, sk, dtype=torch.bool)
    image[0, 3:9] = True
    image[0, 11:14] = True        # a second image
    region[0, [4, 5, 12]] = True
    image[1, 7:15] = True
    region[1, 9:11] = True
    return q, k, v, allowed, region, image


# ------------------------------------------------------------------------------------------------ pure unit tests

@pytest.mark.parametrize("chunk,padded", [(1 << 22, True), (7, True), (1 << 22, False)])
def test_probe_matches_naive_softmax(chunk, padded):
    """padded=False: plain causal, the LSE comes from the kernel's is_causal path (no mask tensor)."""
    q, k, v, allowed, region, image = random_case(0, left_pad=(0, 5) if padded else (0, 0))
    scale = 1 / math.sqrt(q.shape[-1])
    _, lse = attention_with_lse(q, k, v, allowed if padded else None, scale, "sdpa")
    rows = torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool)
    rows[0, [2, 9, 15, 22]] = True        # row 2 precedes every image key (weights must be 0)
    rows[1, 10:] = True
    probe = RegionMassProbe(rows, region, image, group=None, chunk_elements=chunk)
    probe(q, k, lse, scale)
    a_ref, v_ref = naive_av(naive_alpha(q, k, scale, allowed), region, image)
    res = probe.result
    assert torch.allclose(res.region_mean.double(), a_ref[rows], atol=TOL, rtol=0)
    assert torch.allclose(res.image_mean.double(), v_ref[rows], atol=TOL, rtol=0)
    a, v_dense = res.dense(*rows.shape)
    assert torch.allclose(a.double(), torch.where(rows, a_ref, 0), atol=TOL, rtol=0)
    assert torch.allclose(v_dense.double(), torch.where(rows, v_ref, 0), atol=TOL, rtol=0)
    assert res.image_sum[0] == 0 and res.region_sum[0] == 0  # row (0, 2) sees no image key yet
    assert torch.equal(res.region_count, region.sum(1)[res.batch])


def test_probe_decode_offset_and_pairs():
    """sq < sk (KV-cache decode): query j sits at key j + sk - sq; rows given as (batch, query) pairs."""
    q, k, v, allowed, region, image = random_case(1, sq=4, sk=23, left_pad=(2, 0))
    scale = 0.3
    _, lse = attention_with_lse(q, k, v, allowed, scale, "sdpa")
    pairs = torch.tensor([[1, 3], [0, 0], [1, 1]])
    probe = RegionMassProbe(pairs, region, image, group=None)
    probe(q, k, lse, scale)
    a_ref, v_ref = naive_av(naive_alpha(q, k, scale, allowed), region, image)
    ordered = query_row_pairs(pairs)
    assert ordered.tolist() == [[0, 0], [1, 1], [1, 3]]
    assert torch.allclose(probe.result.region_mean.double(), a_ref[ordered[:, 0], ordered[:, 1]], atol=TOL, rtol=0)
    assert torch.allclose(probe.result.image_mean.double(), v_ref[ordered[:, 0], ordered[:, 1]], atol=TOL, rtol=0)


def test_probe_masks_validated():
    image = torch.zeros(1, 5, dtype=torch.bool)
    image[0, 1:3] = True
    region = torch.zeros(1, 5, dtype=torch.bool)
    region[0, 4] = True
    with pytest.raises(ValueError, match="not an image key"):
        RegionMassProbe(torch.ones(1, 5, dtype=torch.bool), region, image, group=None)
    with pytest.raises(ValueError, match="query rows"):
        RegionMassProbe(torch.ones(3), image & False, image, group=None)


def test_local_sums_never_build_full_matrix(monkeypatch):
    """Chunked rows: no weight tensor larger than heads x chunk rows x image keys is created."""
    q, k, v, allowed, region, image = random_case(2, sq=23, sk=23)
    scale = 0.25
    _, lse = attention_with_lse(q, k, v, allowed, scale, "sdpa")
    import megatron_sayo.attention.region_mass as rm

    seen = []
    original = rm._row_weights

    def spy(*args):
        out = original(*args)
        seen.append(out.shape)
        return out

    monkeypatch.setattr(rm, "_row_weights", spy)
    pairs = query_row_pairs(torch.ones(2, 23, dtype=torch.bool))
    local_head_mass_sums(q, k, lse, scale, pairs, region, image, chunk_elements=4 * 3 * 9)
    assert seen and all(s[0] * s[1] * s[2] <= 4 * 3 * 9 for s in seen)
    assert all(s[2] == int(image[0].sum()) or s[2] == int(image[1].sum()) for s in seen)


def _tp2_worker(seed):
    """Each rank holds half the heads; the probe all-reduces and divides by the total head count."""
    import torch.distributed as dist

    from megatron_sayo.distributed import runtime

    runtime.init_distributed(tp=2)
    rank = dist.get_rank()
    q, k, v, allowed, region, image = random_case(seed)
    scale = 1 / math.sqrt(q.shape[-1])
    heads = slice(2 * rank, 2 * rank + 2)
    ql, kl, vl = q[:, heads], k[:, heads], v[:, heads]
    _, lse = attention_with_lse(ql, kl, vl, allowed, scale, "sdpa")
    rows = torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool)
    rows[:, 14:] = True
    probe = RegionMassProbe(rows, region, image)  # default group: megatron's TP group
    probe(ql, kl, lse, scale)
    return probe.result.region_mean, probe.result.image_mean, rows


@pytest.mark.multiproc
@pytest.mark.slow
def test_probe_tp2_matches_naive_all_heads():
    from megatron_sayo.distributed import runtime

    results = runtime.spawn_local(_tp2_worker, 2, 3)
    q, k, v, allowed, region, image = random_case(3)
    a_ref, v_ref = naive_av(naive_alpha(q, k, 1 / math.sqrt(q.shape[-1]), allowed), region, image)
    for a, v_, rows in results:
        assert torch.allclose(a.double(), a_ref[rows], atol=TOL, rtol=0)
        assert torch.allclose(v_.double(), v_ref[rows], atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------ model vs eager

def _grounded_batch(ckpt, make_image, padding_side="left"):
    """Two padded samples of uneven length, the second with two images; region = a box on one image of each."""
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.data.regions import RegionSpec, batch_region_mask
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config

    proc = Processor.from_pretrained(ckpt)
    convs = [[{"role": "user", "content": [{"type": "image", "image": make_image(112, 84, 0)},
                                           {"type": "text", "text": "what is in the box?"}]}],
             [{"role": "user", "content": [{"type": "image", "image": make_image(56, 56, 1)},
                                           {"type": "image", "image": make_image(84, 112, 2)},
                                           {"type": "text", "text": "compare the two pictures, at some length"}]}]]
    batch = proc(convs, padding_side=padding_side)
    hf = load_hf_config(ckpt)
    specs = [RegionSpec(boxes=[[10, 5, 60, 50]], orig_size=(112, 84)),
             RegionSpec(boxes=[[0, 60, 40, 112], [70, 0, 84, 10]], orig_size=(84, 112), image_index=1)]
    region = batch_region_mask(batch["input_ids"], batch["image_grid_thw"], hf.tokens.image, specs)
    image = batch["input_ids"] == hf.tokens.image
    return batch, region, image


def _rank_masses(ckpt, tp, pp, batch, region, image, mass_kernel="auto"):
    from megatron.core import parallel_state

    from megatron_sayo.attention.region_mass import score_region_mass
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime
    from megatron_sayo.models.qwen25vl.model import model_inputs

    runtime.init_distributed(tp, pp)
    model = load_model_stage(ckpt, tp=tp, pp=pp, mass_kernel=mass_kernel)
    batch = {k: (torch.as_tensor(v) if v is not None else None) for k, v in batch.items()}
    rows = batch["attention_mask"].bool()
    mb = dict(inputs=model_inputs(model.hf, **batch), query_rows=rows, region_mask=torch.as_tensor(region),
              image_mask=torch.as_tensor(image))
    out = score_region_mass(model, [mb])
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        return out[0].region_mass.numpy(), out[0].image_mass.numpy()
    return None


def _eager_masses(ckpt, batch, region, image):
    """a, v [b, s] from transformers' eager last-layer attentions (the independent reference)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    kwargs = {k: v for k, v in batch.items() if v is not None}
    ids = kwargs["input_ids"]
    # transformers >= 5 builds 3-D M-RoPE positions only when told which tokens are image/video slots
    kwargs["mm_token_type_ids"] = ((ids == model.config.image_token_id).int()
                                   + 2 * (ids == model.config.video_token_id).int())
    with torch.no_grad():
        out = model(**kwargs, output_attentions=True)
    a, v = naive_av(out.attentions[-1].double(), region, image)
    real = batch["attention_mask"].bool()
    return torch.where(real, a, 0), torch.where(real, v, 0)


@pytest.fixture(scope="module")
def grounded(tiny_ckpt, make_image):
    batch, region, image = _grounded_batch(tiny_ckpt, make_image)
    a_ref, v_ref = _eager_masses(tiny_ckpt, batch, region, image)
    assert float(v_ref.max()) > 1e-3 and float(a_ref.max()) > 1e-3  # the reference is not trivially zero
    return batch, region, image, a_ref, v_ref


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_masses_equal_eager_attention(tiny_ckpt, grounded, tp, pp):
    from megatron_sayo.distributed.runtime import spawn_local

    batch, region, image, a_ref, v_ref = grounded
    np_batch = {k: (v.numpy() if v is not None else None) for k, v in batch.items()}
    results = spawn_local(_rank_masses, tp * pp, str(tiny_ckpt), tp, pp, np_batch, region.numpy(), image.numpy())
    a, v = next(r for r in results if r is not None)
    assert torch.allclose(torch.from_numpy(a).double(), a_ref, atol=TOL, rtol=0)
    assert torch.allclose(torch.from_numpy(v).double(), v_ref, atol=TOL, rtol=0)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("tp,padding_side", [(1, "right"), (2, "left")])
def test_indicator_masses_equal_eager_attention(tiny_ckpt, make_image, tp, padding_side):
    """model.region_mass_kernel='indicator' (the CUDA default) on CPU: the right-padded uneven batch GRPO scores
    and a left-padded one, against transformers' eager attention."""
    from megatron_sayo.distributed.runtime import spawn_local

    batch, region, image = _grounded_batch(tiny_ckpt, make_image, padding_side)
    assert not bool(batch["attention_mask"].all())            # the batch really is padded
    a_ref, v_ref = _eager_masses(tiny_ckpt, batch, region, image)
    np_batch = {k: (v.numpy() if v is not None else None) for k, v in batch.items()}
    results = spawn_local(_rank_masses, tp, str(tiny_ckpt), tp, 1, np_batch, region.numpy(), image.numpy(),
                          "indicator")
    a, v = next(r for r in results if r is not None)
    assert float(v_ref.max()) > 1e-3
    assert torch.allclose(torch.from_numpy(a).double(), a_ref, atol=TOL, rtol=0)
    assert torch.allclose(torch.from_numpy(v).double(), v_ref, atol=TOL, rtol=0)


def test_probe_key_weights_match_naive_head_mean():
    """key_weights=True: per row, mean_h alpha on every image key (0 on other keys), chunked rows."""
    q, k, v, allowed, region, image = random_case(4)
    scale = 0.2
    _, lse = attention_with_lse(q, k, v, allowed, scale, "sdpa")
    rows = torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool)
    rows[:, 12:] = True
    probe = RegionMassProbe(rows, region, image, group=None, chunk_elements=50, key_weights=True)
    probe(q, k, lse, scale)
    ref = naive_alpha(q, k, scale, allowed).mean(1) * image[:, None, :]    # [b, sq, sk]
    assert torch.allclose(probe.result.key_weights.double(), ref[rows], atol=TOL, rtol=0)
    assert RegionMassProbe(rows, region, image, group=None).key_weights is False


# ------------------------------------------------------------------------------------------------ indicator kernel

def right_padded_case(seed, lengths=(23, 14, 9), h=4, groups=2, d=8):
    """Uneven samples, right-padded (the GRPO batch), GQA keys not expanded; image keys in each sample."""
    g = torch.Generator().manual_seed(seed)
    b, s = len(lengths), max(lengths)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, groups, s, d, generator=g)
    real = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None] & real[:, None, :]
    allowed[:, torch.arange(s), torch.arange(s)] = True
    image = torch.zeros(b, s, dtype=torch.bool)
    region = torch.zeros(b, s, dtype=torch.bool)
    image[:, 2:7] = True
    region[0, [3, 6]] = True
    region[1, 2] = True
    region[2, 4:6] = True
    return q, k, allowed[:, None], region, image, real


def test_indicator_probe_matches_naive_softmax_right_padded():
    """lse=None: masses from the kernel with 0/1 values over the attention's own mask, GQA k unexpanded."""
    q, k, allowed, region, image, real = right_padded_case(5)
    scale = 0.4
    rows = real.clone()
    rows[:, :3] = False                      # completion-like rows; row 3.. of each sample
    probe = RegionMassProbe(rows, region, image, group=None)
    probe(q, k, None, scale, allowed)
    k_full = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    a_ref, v_ref = naive_av(naive_alpha(q, k_full, scale, allowed), region, image)
    assert torch.allclose(probe.result.region_mean.double(), a_ref[rows], atol=TOL, rtol=0)
    assert torch.allclose(probe.result.image_mean.double(), v_ref[rows], atol=TOL, rtol=0)
    assert float(v_ref[rows].min()) > 0      # every chosen row sees image keys: the comparison is not vacuous


def test_indicator_sums_equal_lse_sums_left_padded_and_decode():
    """Left padding (explicit mask) and KV-cache decode (sq < sk, mask None = causal at offset) against naive."""
    q, k, v, allowed, region, image = random_case(6)
    scale = 0.3
    pairs = query_row_pairs(torch.tensor([[0, 4], [0, 22], [1, 9], [1, 20]]))
    sums = indicator_mass_sums(q, k, allowed, scale, pairs, region, image)
    alpha = naive_alpha(q, k, scale, allowed)
    ref_region = (alpha * region[:, None, None, :]).sum(-1).sum(1)[pairs[:, 0], pairs[:, 1]]
    ref_image = (alpha * image[:, None, None, :]).sum(-1).sum(1)[pairs[:, 0], pairs[:, 1]]
    assert torch.allclose(sums[0].double(), ref_region, atol=TOL, rtol=0)
    assert torch.allclose(sums[1].double(), ref_image, atol=TOL, rtol=0)

    q, k, v, _, region, image = random_case(7, sq=4, sk=23, left_pad=(0, 0))
    causal = torch.ones(4, 23, dtype=torch.bool).tril(19)[None, None].expand(2, 1, 4, 23)
    pairs = query_row_pairs(torch.ones(2, 4, dtype=torch.bool))
    sums = indicator_mass_sums(q, k, None, scale, pairs, region, image)
    alpha = naive_alpha(q, k, scale, causal)
    assert torch.allclose(sums[1].double(), (alpha * image[:, None, None, :]).sum(-1).sum(1).flatten(),
                          atol=TOL, rtol=0)


def test_indicator_key_weights_match_naive_head_mean():
    q, k, allowed, region, image, real = right_padded_case(8)
    rows = real.clone()
    rows[:, :5] = False
    probe = RegionMassProbe(rows, region, image, group=None, key_weights=True)
    probe(q, k, None, 0.25, allowed)
    k_full = k.repeat_interleave(2, dim=1)
    ref = naive_alpha(q, k_full, 0.25, allowed).mean(1) * image[:, None, :]
    assert torch.allclose(probe.result.key_weights.double(), ref[rows], atol=TOL, rtol=0)


def test_indicator_values_layout():
    region = torch.tensor([False, True, False, False])
    image = torch.tensor([False, True, True, False])
    values = indicator_values(region, image, image.nonzero().squeeze(1), key_weights=True)
    assert values.shape == (4, 8)            # 2 + 2 used columns padded to the kernel's alignment
    assert values[:, 0].tolist() == [0, 1, 0, 0] and values[:, 1].tolist() == [0, 1, 1, 0]
    assert values[:, 2].tolist() == [0, 1, 0, 0] and values[:, 3].tolist() == [0, 0, 1, 0]
    assert values[:, 4:].abs().sum() == 0


def test_mass_kernel_resolution():
    from megatron_sayo.models.qwen25vl.attention import resolve_mass_kernel

    assert resolve_mass_kernel("auto", torch.device("cpu")) == "lse"
    assert resolve_mass_kernel("auto", torch.device("cuda")) == "indicator"
    assert resolve_mass_kernel("indicator", torch.device("cpu")) == "indicator"
    with pytest.raises(ValueError, match="region_mass_kernel"):
        resolve_mass_kernel("fast", torch.device("cpu"))


@pytest.mark.parametrize("with_lse", [True, False])
def test_decode_probe_matches_naive_softmax(with_lse):
    """One new query per row over a padded KV cache (GQA 4 heads / 2 groups): masses from a naive softmax."""
    from megatron_sayo.attention.region_mass import DecodeMassProbe

    g = torch.Generator().manual_seed(11)
    n, h, groups, sk, d, m = 3, 4, 2, 9, 8, 6
    q = torch.randn(n, h, 1, d, generator=g)
    k = torch.randn(n, groups, sk, d, generator=g)
    allowed = torch.ones(n, 1, 1, sk, dtype=torch.bool)
    allowed[1, ..., :2] = False                                   # row 1: two left-padding keys
    image = torch.zeros(n, m, dtype=torch.bool)
    image[:, 2:6] = True
    region = torch.zeros(n, m, dtype=torch.bool)
    region[0, 3] = region[1, 4] = region[1, 5] = True             # row 2: no region
    scale = 0.3
    k_full = k.repeat_interleave(h // groups, dim=1)
    scores = (q @ k_full.transpose(-1, -2))[:, :, 0] * scale      # [n, h, sk]
    scores = scores.masked_fill(~allowed[:, :, 0], float("-inf"))
    alpha = scores.double().softmax(-1)
    want_a = [(alpha[b][:, region[b].nonzero().flatten()]).sum(-1).mean().item() / max(int(region[b].sum()), 1)
              for b in range(n)]
    want_v = [(alpha[b][:, image[b].nonzero().flatten()]).sum(-1).mean().item() / int(image[b].sum())
              for b in range(n)]
    probe = DecodeMassProbe(region, image, group=None)
    if with_lse:
        probe(q, k_full, torch.logsumexp(scores, -1)[..., None], scale)
    else:
        probe(q, k, None, scale, allowed)
    torch.testing.assert_close(probe.result.region_mean.double(), torch.tensor(want_a, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(probe.result.image_mean.double(), torch.tensor(want_v, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert probe.result.region_mean[2] == 0


def test_lse_of_bf16_inputs_is_computed_in_float32():
    """The materialising path (bf16 on CPU, or lse on CUDA): the LSE of the bf16 q/k as given, to float32
    accuracy (bf16-rounded scores would be ~1e-2 off in log space)."""
    q, k, v, allowed, region, image = random_case(9, d=64)
    q, k, v = (t.mul(2.0).bfloat16() for t in (q, k, v))
    scale = 1 / math.sqrt(q.shape[-1])
    _, lse = attention_with_lse(q, k, v, allowed, scale, "sdpa")
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    ref = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    assert torch.allclose(lse.double(), ref, atol=1e-5, rtol=0)
