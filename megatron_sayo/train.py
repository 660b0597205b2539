"""Entry point: `torchrun --nproc-per-node N -m megatron_sayo.train --config FILE [key=value ...]`.

Also runs under `srun` (ranks from Slurm's environment) and as a plain single process. The config is
validated (keys, values, layout against the world size, the checkpoint's config.json) before any model is
built. A run directory that holds a checkpoint is resumed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_sayo.distributed import runtime
from megatron_sayo.config import ConfigError, RunConfig, load_config

log = logging.getLogger("megatron_sayo.train")


def prepare_assets(cfg: RunConfig) -> None:
    """Create the tiny checkpoint and the synthetic data set the config asks for, when missing (rank 0)."""
    hf_path = Path(cfg.model.hf_path) if cfg.model.hf_path else None
    if hf_path is not None and cfg.model.make_tiny_if_missing and not (hf_path / "config.json").is_file():
        from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint

        print(f"making a tiny random Qwen2.5-VL checkpoint at {hf_path}", flush=True)
        make_tiny_checkpoint(hf_path, preset="tiny", seed=0)
    for path, n, seed in ((cfg.data.train_file, cfg.data.synthetic_n, 0),
                          (cfg.data.eval_file, max(16, cfg.data.synthetic_n // 8), 1)):
        if path and cfg.data.synthetic_n and not Path(path).is_file():
            write_synthetic(Path(path), n, seed)


def write_synthetic(jsonl: Path, n: int, seed: int) -> None:
    """A synthetic grounded set at `jsonl` (images beside it), written atomically."""
    from megatron_sayo.data.synthetic import make_synthetic

    print(f"making {n} synthetic grounded samples at {jsonl}", flush=True)
    sub = jsonl.with_suffix("")
    if sub.exists():
        shutil.rmtree(sub)
    made = make_synthetic(sub, n, seed=seed)
    tmp = jsonl.with_name(f".{jsonl.name}.tmp")
    with open(made) as src, open(tmp, "w") as dst:
        for line in src:
            row = json.loads(line)
            row["image"] = f"{sub.name}/{row['image']}"
            dst.write(json.dumps(row) + "\n")
    tmp.replace(jsonl)


def check_before_launch(cfg: RunConfig, world_size: int) -> str:
    """Everything that can fail cheaply: layout vs world size and vs the checkpoint's config.json."""
    from megatron_sayo.models.qwen25vl.hf_config import ParallelLayout, load_hf_config, validate_layout

    cfg.validate_world(world_size)
    hf_dir = cfg.model.hf_path or cfg.model.megatron_path
    if Path(hf_dir, "config.json").is_file():
        validate_layout(load_hf_config(hf_dir), ParallelLayout(cfg.parallel.tp, cfg.parallel.pp))
    elif not cfg.model.make_tiny_if_missing:
        raise ConfigError(f"model: {hf_dir}/config.json not found (set model.hf_path to a Qwen2.5-VL checkpoint)")
    return hf_dir


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m megatron_sayo.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML run config (see examples/)")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 parallel.tp=2")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launch = runtime.read_launch_env()
    try:
        cfg = load_config(args.config, args.overrides)
        hf_dir = check_before_launch(cfg, launch.world_size)
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"config OK: {args.config} (world size {launch.world_size})")
        return 0

    from megatron_sayo.rl.trainer import install_signal_handlers

    install_signal_handlers()  # before the slow start-up, so an early preemption signal is not fatal
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.rl.trainer import GRPOTrainer, MetricsLogger, Preempted
    from megatron_sayo.rl.warmup import warmed_up

    runtime.init_distributed(cfg.parallel.tp, cfg.parallel.pp, launch=launch)
    runtime.seed_everything(cfg.train.seed)
    try:
        if launch.rank == 0:
            prepare_assets(cfg)
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run_dir) / "config.yaml").write_text(_yaml(cfg))
        dist.barrier()
        samples = load_grounded(cfg.data.train_file, on_error=cfg.data.on_error)
        held_out = load_grounded(cfg.data.eval_file, on_error=cfg.data.on_error) if cfg.eval.interval else None
        trainer = GRPOTrainer(cfg, hf_dir, samples, init_from=warmed_up(cfg, hf_dir, samples),
                              eval_samples=held_out)
        trainer.maybe_resume()
        logger = MetricsLogger(Path(cfg.run_dir), trainer.is_logger, cfg.train.steps, cfg.log.tensorboard)
        try:
            trainer.fit(logger)
        except Preempted as exc:
            if trainer.is_logger:
                print(exc, flush=True)
            return 0
        return 0
    finally:
        runtime.shutdown()


def _yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


if __name__ == "__main__":
    sys.exit(main())
