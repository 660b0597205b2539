"""LoRA end to end on 2 CPU ranks (TP=2): a few GRPO steps, then
- stop + resume equals an uninterrupted run bit for bit (metrics and exported adapters),
- the step holds adapters (+ optimizer) only and points at its base,
- `--lora merge` under transformers gives our model's logits (1e-4 relative), and PEFT loading `--lora adapter`
  onto the base gives the merged export's (1e-5 relative)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sayo.data.processor import Processor
from megatron_sayo.testing.parity import INPUT_KEYS, compare_logits, hf_logits, megatron_logits

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "megatron_sayo/configs/tiny.yaml"
VOLATILE = ("time_", "tokens_per_s")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    from megatron_sayo.train import write_synthetic

    data = tmp_path_factory.mktemp("data")
    write_synthetic(data / "train.jsonl", 16, seed=0)
    return data / "train.jsonl"


def run_train(ckpt, train_file, run_dir, steps):
    args = [f"model.hf_path={ckpt}", "model.make_tiny_if_missing=false", f"data.train_file={train_file}",
            "data.eval_file=null", "data.synthetic_n=0", f"run_dir={run_dir}", f"train.steps={steps}",
            "train.global_batch=2", "train.micro_batch=2", "rollout.group_size=2", "rollout.max_new_tokens=6",
            "checkpoint.interval=2", "checkpoint.keep=3", "log.tensorboard=false", "warmup.steps=0",
            "optim.warmup_steps=0", "optim.lr=2e-2", "loss.kl_beta=0.05", "lora.enabled=true", "lora.rank=4",
            "lora.alpha=8", "eval.interval=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_sayo.train", "--config", str(CONFIG), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()], done.stdout


def export(mode, src, out):
    done = subprocess.run([sys.executable, str(ROOT / "tools/convert_megatron_to_hf.py"), "--megatron", str(src),
                           "--out", str(out), "--lora", mode, "--no-progress"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(out)


@pytest.fixture(scope="module")
def runs(tiny_ckpt, train_file, tmp_path_factory):
    """A 4-step LoRA run, and a second start from its step-2 checkpoint (copied, with the first 2 metrics rows,
    into a fresh run dir: the checkpoint a 2-step run ends with) continued to step 4."""
    straight = tmp_path_factory.mktemp("straight")
    resumed = tmp_path_factory.mktemp("resumed")
    m_straight, _ = run_train(tiny_ckpt, train_file, straight, 4)
    step2 = straight / "checkpoints" / "step_0000002"
    shutil.copytree(step2, resumed / "checkpoints" / step2.name)
    (resumed / "checkpoints" / "latest").write_text(step2.name + "\n")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in m_straight[:2]))
    m_resumed, out = run_train(tiny_ckpt, train_file, resumed, 4)
    assert re.search(r"resumed from \S*step_0000002 at step 2", out), out[-2000:]
    return straight, resumed, m_straight, m_resumed


def stable(row):
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


@pytest.mark.multiproc
def test_resume_equals_uninterrupted_bit_for_bit(runs, tmp_path):
    straight, resumed, m_straight, m_resumed = runs
    assert [r["step"] for r in m_resumed] == [1, 2, 3, 4]
    assert [stable(r) for r in m_resumed] == [stable(r) for r in m_straight]
    assert m_straight[-1]["kl"] > 0, "the adapters must have moved the policy away from the base"
    a = export("adapter", straight, tmp_path / "a")
    b = export("adapter", resumed, tmp_path / "b")
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()


@pytest.mark.multiproc
def test_step_holds_adapters_only_and_points_at_the_base(runs, tiny_ckpt):
    from megatron_sayo.checkpoint.files import read_metadata, resolve_checkpoint_dir
    from megatron_sayo.convert.megatron_to_hf import DistSource
    from megatron_sayo.models.lora import is_adapter_key

    step = resolve_checkpoint_dir(runs[0])
    meta = read_metadata(step)
    assert meta["lora"]["base"] == {"format": "hf", "path": str(Path(tiny_ckpt).resolve())}
    assert (meta["lora"]["rank"], meta["lora"]["alpha"]) == (4, 8.0)
    keys = list(DistSource(step).tensors)
    model_keys = [k for k in keys if not k.startswith("optimizer")]
    assert model_keys and all(is_adapter_key(k) for k in model_keys), [k for k in model_keys if not is_adapter_key(k)]
    # Adam's two moments per adapter matrix, nothing for the frozen base
    opt = [k for k in keys if k.startswith("optimizer")]
    assert opt and all(is_adapter_key(k) for k in opt)
    assert len(opt) == 2 * len(model_keys)


@pytest.mark.multiproc
def test_plain_export_of_a_lora_step_names_the_lora_option(runs, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools/convert_megatron_to_hf.py"), "--megatron",
                           str(runs[0]), "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "--lora merge" in done.stderr and not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def batch(tiny_ckpt, make_image):
    convs = [[{"role": "user", "content": [{"type": "image", "image": make_image(112, 84, 7)},
                                           {"type": "text", "text": "where is the square?"}]}],
             [{"role": "user", "content": [{"type": "text", "text": "text only"}]}]]
    return Processor.from_pretrained(tiny_ckpt)(convs)


@pytest.mark.multiproc
def test_merged_export_matches_our_model_and_peft_matches_merged(runs, tiny_ckpt, batch, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    straight = runs[0]
    merged = export("merge", straight, tmp_path / "merged")
    adapter = export("adapter", straight, tmp_path / "adapter")
    mask = batch["attention_mask"].numpy()

    ours = megatron_logits(str(tiny_ckpt), batch, tp=2, megatron_dir=str(straight))
    ref_merged = hf_logits(str(merged), batch)
    report = compare_logits(ours, ref_merged, mask)
    assert report.rel <= 1e-4 and report.top1_agreement == 1.0, str(report)
    base = hf_logits(str(tiny_ckpt), batch)
    assert compare_logits(base, ref_merged, mask).rel > 1e-3, "training must have changed the merged weights"

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32,
                                                               attn_implementation="eager")
    model = PeftModel.from_pretrained(model, adapter).eval()
    kwargs = {k: torch.as_tensor(v) for k, v in batch.items() if k in INPUT_KEYS and v is not None}
    ids = kwargs["input_ids"]
    cfg = model.base_model.model.config
    kwargs["mm_token_type_ids"] = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
    with torch.no_grad():
        peft_logits = model(**kwargs).logits.float().numpy()
    report = compare_logits(peft_logits, ref_merged, mask)
    assert report.rel <= 1e-5, str(report)
    assert np.isfinite(peft_logits).all()


def test_merge_into_bfloat16_weights_rounds_as_torch(tmp_path):
    """In-place merge of a bf16 weight (two bands) equals torch's (W.float() + s * B @ A).to(bfloat16)."""
    from safetensors.torch import load_file, save_file

    from megatron_sayo.convert import lora_export

    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 48, generator=g).to(torch.bfloat16)
    other = torch.randn(5, generator=g)
    save_file({"model.layers.0.self_attn.o_proj.weight": w, "x": other}, tmp_path / "model.safetensors")
    a, b = torch.randn(4, 48, generator=g), torch.randn(70, 4, generator=g)
    old_band = lora_export.BAND_BYTES
    lora_export.BAND_BYTES = 40 * 48 * 4          # 40 rows per band: two bands, the second partial
    try:
        n = lora_export.merge_into(tmp_path, {("linear_proj", "o_proj", 0): (a.numpy(), b.numpy())}, 2.0)
    finally:
        lora_export.BAND_BYTES = old_band
    got = load_file(tmp_path / "model.safetensors")
    assert n == 1 and torch.equal(got["x"], other)
    assert torch.equal(got["model.layers.0.self_attn.o_proj.weight"], (w.float() + 2.0 * (b @ a)).to(torch.bfloat16))


def test_bad_lora_metadata_names_file_and_field(tmp_path):
    from megatron_sayo.checkpoint.files import CheckpointError
    from megatron_sayo.convert.lora_export import lora_settings

    (tmp_path / "metadata.json").write_text("{}")
    meta = {"kind": "trained policy", "lora": {"rank": 0, "alpha": 32, "targets": ["linear_qkv"],
                                               "base": {"format": "hf", "path": "/x"}}}
    (tmp_path / "checkpoint_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"checkpoint_metadata.json: lora.rank = 0"):
        lora_settings(tmp_path)
    meta["lora"].update(rank=4, targets=["q_proj"])
    (tmp_path / "checkpoint_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"lora.targets"):
        lora_settings(tmp_path)


@pytest.mark.multiproc
def test_merge_onto_a_megatron_base_equals_the_hf_base(runs, tiny_ckpt, tmp_path):
    """--base pointing at the same weights converted to megatron (as a warm-up checkpoint is) merges to the same
    tensors as the HF base (float32 round trips are exact)."""
    from safetensors.torch import load_file

    from megatron_sayo.convert.hf_to_megatron import convert_hf_to_megatron
    from megatron_sayo.models.qwen25vl.name_map import normalize_hf_name

    meg = tmp_path / "meg"
    convert_hf_to_megatron(tiny_ckpt, meg, tp=2, pp=1, progress=False)
    from_hf = export("merge", runs[0], tmp_path / "from_hf")
    done = subprocess.run([sys.executable, str(ROOT / "tools/convert_megatron_to_hf.py"), "--megatron",
                           str(runs[0]), "--out", str(tmp_path / "from_meg"), "--lora", "merge", "--base", str(meg),
                           "--no-progress"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]

    def tensors(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update({normalize_hf_name(k): v for k, v in load_file(f).items()})
        return out

    a, b = tensors(from_hf), tensors(tmp_path / "from_meg")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
