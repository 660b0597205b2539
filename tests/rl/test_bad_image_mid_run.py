"""data.on_error=skip covers an image that stops decoding after the data set was loaded (a file replaced or
truncated mid-run): the GRPO step runs on the next good sample; with raise the step stops naming the sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_sayo.config import config_from_dict


def _steps(hf_dir, data_file, on_error, run_dir):
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.distributed import runtime
    from megatron_sayo.rl.trainer import GRPOTrainer

    runtime.init_distributed(1, 1)
    cfg = config_from_dict({"model": {"hf_path": hf_dir, "params_dtype": "float32"},
                            "data": {"train_file": data_file, "on_error": on_error, "max_pixels": 12544},
                            "rollout": {"group_size": 2, "max_new_tokens": 3}, "eval": {"interval": 0},
                            "train": {"global_batch": 4, "micro_batch": 4, "steps": 1}, "run_dir": run_dir})
    samples = load_grounded(data_file, on_error=on_error)
    trainer = GRPOTrainer(cfg, hf_dir, samples)
    bad = next(s for s in samples if s.id == "syn-0-000001")
    Path(bad.image_path).write_bytes(b"not a png any more")      # corrupted after loading
    try:
        result = trainer.train_step()
    except ValueError as exc:
        return {"error": str(exc)}
    return {"skipped": result.skipped, "metrics": sorted(result.metrics)}


@pytest.mark.multiproc
def test_image_corrupted_mid_run(tiny_ckpt, tmp_path):
    from megatron_sayo.distributed.runtime import spawn_local
    from megatron_sayo.train import write_synthetic

    for mode in ("skip", "raise"):
        data = tmp_path / mode / "train.jsonl"
        write_synthetic(data, 4, seed=0)
        out = spawn_local(_steps, 1, str(tiny_ckpt), str(data), mode, str(tmp_path / mode / "run"))[0]
        if mode == "skip":
            assert "error" not in out and not out["skipped"], out
        else:
            assert "sample 'syn-0-000001': image" in out["error"] and "cannot decode" in out["error"], out
