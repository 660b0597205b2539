#!/usr/bin/env python
"""LoRA benchmark: peak memory per rank of one GRPO update, full fine-tuning vs LoRA, same ~1 GB model (CPU).

Each mode runs in fresh processes (TP=2, one per rank) doing what the trainer does before and during an
update: the policy (+ the frozen reference copy for full fine-tuning; LoRA takes the reference from the
policy with its adapters off), DDP + Adam, reference log-probs, one forward/backward over a fixed rollout
batch and the optimizer step. Prints each rank's peak RSS (VmHWM), the part above the process's start-up,
and the seconds of the update, side by side.

    python benchmarks/lora_memory.py [--gb 1.0] [--rank 16] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _rank_update(hf_dir: str, mode: str, rank: int, data: dict) -> dict:
    """One update on this rank in `mode` ('full' or 'lora'); peak RSS in MB and phase times."""
    from megatron_sayo.config import config_from_dict
    from megatron_sayo.distributed import runtime
    from megatron_sayo.memory import peak_rss_mb, reset_peak_rss, rss_mb
    from megatron_sayo.models.lora import adapters_disabled, attach_lora, trainable_parameters
    from megatron_sayo.rl.loss import grpo_token_loss
    from megatron_sayo.rl.optimizer import wrap_for_training
    from megatron_sayo.rl.scoring import reference_logprobs
    from megatron_sayo.rl.trainer import build_policy
    from megatron_sayo.rl.update import accumulate_gradients
    from megatron_sayo.testing.fixed_rollout import rollout_batch

    runtime.init_distributed(2, 1)
    start_mb = rss_mb()
    cfg = config_from_dict({"model": {"hf_path": hf_dir, "params_dtype": "float32"},
                            "data": {"train_file": "unused.jsonl"}, "parallel": {"tp": 2},
                            "loss": {"kl_beta": 0.001}, "train": {"micro_batch": 2},
                            "lora": {"enabled": mode == "lora", "rank": rank}})
    model = build_policy(cfg, hf_dir)
    reference = None
    if mode == "lora":
        attach_lora(model, model.hf.text, rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    else:
        reference = build_policy(cfg, hf_dir).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    ddp, optimizer, _ = wrap_for_training(model, cfg.optim, cfg.train.steps)
    batch = rollout_batch(data)
    gc.collect()
    load_peak = peak_rss_mb()          # includes the transient of reading the HF files
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): Linux >= 4.0 needed")
    held_mb = rss_mb()                 # weights (+ reference) + optimizer state, before the update
    t0 = time.perf_counter()
    if reference is not None:
        ref = reference_logprobs(reference, batch, 2, 1.0)
    else:
        with adapters_disabled(model):
            ref = reference_logprobs(model, batch, 2, 1.0)
    accumulate_gradients(ddp, optimizer, batch, cfg.train.micro_batch, cfg.rollout.temperature,
                         grpo_token_loss(data["old_logp"], ref, data["advantages"], cfg.loss))
    optimizer.step()
    return {"peak_mb": peak_rss_mb(), "start_mb": start_mb, "held_mb": held_mb, "load_peak_mb": load_peak,
            "seconds": time.perf_counter() - t0, "trainable": trainable_parameters(model)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="float32 checkpoint size")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--workdir", default=None, help="folder for the checkpoint (default: a new temporary folder)")
    args = ap.parse_args()

    import numpy as np
    from convert import bench_config
    from PIL import Image

    from megatron_sayo.distributed.runtime import spawn_local
    from megatron_sayo.testing.fixed_rollout import fixed_rollout
    from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lora-bench-"))
    try:
        config = work / "config.json"
        config.write_text(json.dumps(bench_config(args.gb * 1e9, 4)))
        ckpt = make_tiny_checkpoint(work / "ckpt", config_json=config, dtype="float32", overwrite=True)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e9

        def image(w, h, seed):
            return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))

        data = fixed_rollout(ckpt, image)
        results = {mode: spawn_local(_rank_update, 2, str(ckpt), mode, args.rank, data, timeout_s=1800)
                   for mode in ("full", "lora")}
        f, lo = results["full"], results["lora"]
        print(f"model: {size:.2f} GB float32, TP=2 on 2 CPU ranks, LoRA rank {args.rank} "
              f"({lo[0]['trainable'] / 1e6:.2f}M trainable parameters per rank); MB per rank, full | LoRA | ratio")
        rows = [("peak during the update (RSS)", "peak_mb"), ("held before the update (RSS)", "held_mb"),
                ("  of which above process start", None), ("peak while loading (RSS)", "load_peak_mb")]
        for r in range(2):
            for label, key in rows:
                a = f[r][key] if key else f[r]["held_mb"] - f[r]["start_mb"]
                b = lo[r][key] if key else lo[r]["held_mb"] - lo[r]["start_mb"]
                print(f"rank {r}  {label:<32} {a:>8.0f} {b:>8.0f} {a / b:>6.2f}")
            print(f"rank {r}  {'update seconds':<32} {f[r]['seconds']:>8.1f} {lo[r]['seconds']:>8.1f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
