"""Our megatron Qwen2.5-VL against transformers (float32, eager): logits at every TP x PP layout, gradients.

Relative error = max |ours - ref| / max |ref| over real (unpadded) positions; tolerance 1e-4, top-1 identical.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sayo.data.processor import Processor
from megatron_sayo.testing.parity import compare_logits, hf_logits, megatron_logits

pytestmark = pytest.mark.compat     # in every cell of `make compat` (docs/compat.md)

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def _user(content):
    return [{"role": "user", "content": content}]


def gqa_batch(ckpt, make_image):
    """Batch of 2: two images of different sizes in one prompt, and a left-padded text-only prompt."""
    convs = [_user([{"type": "image", "image": make_image(140, 112, 1)}, {"type": "text", "text": "left"},
                    {"type": "image", "image": make_image(90, 200, 2)}, {"type": "text", "text": "which one?"}]),
             _user([{"type": "text", "text": "no picture here"}])]
    return Processor.from_pretrained(ckpt)(convs)


def tied_batch(ckpt, make_image):
    """Batch of 2 with one image each, of different sizes (one larger than a vision window)."""
    convs = [_user([{"type": "image", "image": make_image(200, 130, 3)}, {"type": "text", "text": "describe"}]),
             _user([{"type": "image", "image": make_image(60, 60, 4)}, {"type": "text", "text": "colour?"}])]
    return Processor.from_pretrained(ckpt)(convs)


@pytest.fixture(scope="module", params=["tiny", "tiny-tied"])
def case(request, tiny_ckpt, tiny_tied_ckpt, make_image):
    ckpt = tiny_ckpt if request.param == "tiny" else tiny_tied_ckpt
    batch = (gqa_batch if request.param == "tiny" else tied_batch)(ckpt, make_image)
    return ckpt, batch, hf_logits(str(ckpt), batch)


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_logits_match_transformers(case, tp, pp):
    ckpt, batch, ref = case
    ours = megatron_logits(str(ckpt), batch, tp=tp, pp=pp)
    report = compare_logits(ours, ref, batch["attention_mask"].numpy())
    assert report.rel <= 1e-4, str(report)
    assert report.top1_agreement == 1.0, str(report)


def test_batch_exercises_padding_images_and_text_only(tiny_ckpt, make_image):
    batch = gqa_batch(tiny_ckpt, make_image)
    assert batch["image_grid_thw"].shape[0] == 2
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][0].all()


# ------------------------------------------------------------------------------------------------------
# Gradients: a TP=2 and a PP=2 backward give the TP=1 gradients of the same weights.
# ------------------------------------------------------------------------------------------------------

def _rank_grads(hf_dir: str, tp: int, pp: int, batch: dict):
    from megatron.core import parallel_state, tensor_parallel

    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime
    from megatron_sayo.distributed.schedule import run_forward_backward
    from megatron_sayo.models.qwen25vl.model import model_inputs

    runtime.init_distributed(tp, pp)
    model = load_model_stage(hf_dir, tp=tp, pp=pp).train()
    batch = {k: (torch.as_tensor(v) if v is not None else None) for k, v in batch.items()}
    inputs = model_inputs(model.hf, **batch)
    labels = torch.roll(batch["input_ids"], -1, dims=1).transpose(0, 1).contiguous()  # [s, b]
    mask = (batch["attention_mask"] * torch.roll(batch["attention_mask"], -1, dims=1)).transpose(0, 1).float()
    mask[-1] = 0

    def loss_fn(logits, mb):
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
        total = (losses * mask).sum()
        return total, mask.sum().to(torch.int), {"loss": total.detach()}

    run_forward_backward(model, [dict(inputs=inputs)], loss_fn)
    grads = {model.global_param_name(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(), grads


def _full_grads(hf_dir, tp, pp, batch) -> dict[str, torch.Tensor]:
    from megatron_sayo.distributed.runtime import spawn_local
    from megatron_sayo.models.qwen25vl.name_map import match_megatron
    from megatron_sayo.models.qwen25vl.weights import unshard

    results = spawn_local(_rank_grads, tp * pp, hf_dir, tp, pp, batch)
    by_name: dict[str, dict[int, torch.Tensor]] = {}
    for tp_rank, _, grads in results:
        for name, g in grads.items():
            by_name.setdefault(name, {})[tp_rank] = g
    return {name: unshard(match_megatron(name)[0], [shards[r] for r in sorted(shards)])
            for name, shards in by_name.items()}


@pytest.fixture(scope="module")
def reference_grads(tiny_ckpt, make_image):
    batch = {k: v for k, v in gqa_batch(tiny_ckpt, make_image).items()}
    return batch, _full_grads(str(tiny_ckpt), 1, 1, batch)


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_backward_matches_tp1(tiny_ckpt, reference_grads, tp, pp):
    batch, ref = reference_grads
    ours = _full_grads(str(tiny_ckpt), tp, pp, batch)
    assert set(ours) == set(ref)
    assert any(n.startswith("vision.") for n in ref), "vision tower must receive gradients"
    for name, g in ref.items():
        scale = g.abs().max().item() or 1.0
        err = (ours[name] - g).abs().max().item() / scale
        assert err <= 1e-4, f"{name}: relative gradient error {err:.2e}"
