"""Supervised warm-up before GRPO: teach the policy the answer format on the task's reference answers.

A random tiny model never writes <answer>...</answer>, so its rewards carry no signal. A few steps of
next-token training (rl/loss.py nll_loss, at temperature 1) on "<answer>{answer}</answer><|im_end|>" fix
that. The result is saved as a megatron checkpoint in `warmup.cache_dir/<key>/`, the key a hash of the settings
it was trained under (`fingerprint`), so two configs never share one and a run on other settings never
overwrites another's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_sayo.config import RunConfig
from megatron_sayo.data.grounded import decodable_samples
from megatron_sayo.rl.batch import ScoringBatch
from megatron_sayo.rl.loss import nll_loss
from megatron_sayo.rl.prompts import PromptStream


def run_warmup(cfg: RunConfig, hf_dir: str, samples: list) -> Path:
    """Train `warmup.steps` supervised steps from the config's checkpoint and save to warmup_dir."""
    from megatron_sayo.checkpoint.files import make_metadata
    from megatron_sayo.checkpoint.state import save_model
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.formats.atomic import publish_dir
    from megatron_sayo.rl.optimizer import wrap_for_training
    from megatron_sayo.rl.trainer import build_policy
    from megatron_sayo.rl.update import accumulate_gradients

    w = cfg.warmup
    policy = build_policy(cfg, hf_dir)
    ddp, optimizer, _ = wrap_for_training(policy, dataclasses.replace(cfg.optim, lr=w.lr, warmup_steps=0), w.steps)
    processor = Processor.from_pretrained(hf_dir, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    stream = PromptStream(len(samples), w.seed)
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = cfg.warmup_answers() // dp   # divisible: RunConfig.validate_world
    for step in range(1, w.steps + 1):
        picked = stream.take(rows * dp)[rank * rows:(rank + 1) * rows]
        batch = ScoringBatch.from_answers(processor, policy.hf, decodable_samples(samples, picked, cfg.data.on_error),
                                          cfg.data.instruction)
        reported = accumulate_gradients(ddp, optimizer, batch, cfg.train.micro_batch, 1.0,
                                        lambda logp, _rows, mask: nll_loss(logp, mask))
        optimizer.step()
        if reported and parallel_state.get_tensor_model_parallel_rank() == 0 and rank == 0 and (
                step == 1 or step % 10 == 0 or step == w.steps):
            nll = sum(float(r["nll"]) for r in reported) / max(sum(float(r["tokens"]) for r in reported), 1.0)
            print(f"warm-up {step:>4}/{w.steps}  answer NLL {nll:.3f}", flush=True)
    out = warmup_dir(cfg, hf_dir)
    tmp = out.with_name(out.name + ".tmp")
    save_model(policy, tmp, make_metadata("trained policy", source=str(hf_dir), dtype=cfg.model.params_dtype,
                                          tp=cfg.parallel.tp, pp=cfg.parallel.pp, warmup_steps=w.steps,
                                          warmup=fingerprint(cfg, hf_dir)))
    if torch.distributed.get_rank() == 0:
        publish_dir(tmp, out)  # complete caches only: a killed warm-up leaves just the .tmp directory
    torch.distributed.barrier()
    return out


def fingerprint(cfg: RunConfig, hf_dir: str) -> dict:
    """The settings a warm-up's weights depend on (the layout is not one: checkpoints reshard on load); the
    training file by its absolute path, size and modification time, so an edited file is a new warm-up."""
    train = Path(cfg.data.train_file).resolve()
    stat = train.stat() if train.is_file() else None
    o = cfg.optim
    return {"source": str(Path(hf_dir).resolve()), "steps": cfg.warmup.steps, "lr": cfg.warmup.lr,
            "seed": cfg.warmup.seed, "train_file": str(train),
            "train_file_stat": [stat.st_size, stat.st_mtime_ns] if stat else None,
            "batch": cfg.warmup_answers(),
            "instruction": cfg.data.instruction, "pixels": [cfg.data.min_pixels, cfg.data.max_pixels],
            "params_dtype": cfg.model.params_dtype,
            "optim": [o.weight_decay, o.grad_clip, o.adam_beta1, o.adam_beta2, o.adam_eps]}


def warmup_dir(cfg: RunConfig, hf_dir: str) -> Path:
    """Where the warm-up for these settings lives: warmup.cache_dir/<first 16 hex digits of the settings' hash>."""
    key = hashlib.sha256(json.dumps(fingerprint(cfg, hf_dir), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.warmup.cache_dir) / key


def warmed_up(cfg: RunConfig, hf_dir: str, samples: list) -> Path | None:
    """The cached warm-up checkpoint for these settings, trained now when missing; None when no warm-up is
    configured. A folder whose recorded settings differ (a hash collision, an edited cache) is trained again."""
    if not cfg.warmup.steps:
        return None
    out = warmup_dir(cfg, hf_dir)
    if (out / "metadata.json").is_file():
        try:
            cached = json.loads((out / "checkpoint_metadata.json").read_text()).get("warmup")
        except (OSError, ValueError):
            cached = None
        if cached == fingerprint(cfg, hf_dir):
            if torch.distributed.get_rank() == 0:
                print(f"warm-up: reusing {out} (trained under these settings)", flush=True)
            return out
        if torch.distributed.get_rank() == 0:
            print(f"warm-up cache {out} does not record these settings: training it again", flush=True)
    elif torch.distributed.get_rank() == 0:
        print(f"warm-up: {cfg.warmup.steps} supervised steps into {out} (once for these settings)", flush=True)
    return run_warmup(cfg, hf_dir, samples)
