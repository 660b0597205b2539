"""Entry point: `torchrun --nproc-per-node N -m megatron_sayo.train --config FILE [key=value ...]`.

Also runs under `srun` (ranks from Slurm's environment) and as a plain single process. The config is
validated (keys, values, layout against the world size, the checkpoint's config.json) before any model is
built. A run directory that holds a checkpoint is resumed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist

from megatron_sayo import console
from megatron_sayo.config import ConfigError, RunConfig, describe, load_config
from megatron_sayo.console import LEVELS
from megatron_sayo.distributed import runtime

log = logging.getLogger("megatron_sayo.train")


def prepare_assets(cfg: RunConfig) -> None:
    """Create the tiny checkpoint and the synthetic data set the config asks for, when missing (rank 0)."""
    hf_path = Path(cfg.model.hf_path) if cfg.model.hf_path else None
    if hf_path is not None and cfg.model.make_tiny_if_missing and not (hf_path / "config.json").is_file():
        from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint

        print(f"making a tiny random Qwen2.5-VL checkpoint at {hf_path}", flush=True)
        make_tiny_checkpoint(hf_path, preset="tiny", seed=0)
    if cfg.data.synthetic_n:
        prepare_synthetic(cfg)


def prepare_synthetic(cfg: RunConfig) -> None:
    """The synthetic set data.synthetic_n asks for, made once in its cache folder (config.synthetic_files): the
    training and held-out files are written into a temporary folder that replaces the cache folder only when
    complete, so a killed run leaves no half set behind."""
    from megatron_sayo.config import synthetic_eval_n
    from megatron_sayo.formats.atomic import publish_dir

    train, held_out = Path(cfg.data.train_file), Path(cfg.data.eval_file)
    if train.is_file() and held_out.is_file():
        return
    folder = train.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    print(f"making the synthetic {cfg.data.synthetic_task} set once: {cfg.data.synthetic_n} training and "
          f"{synthetic_eval_n(cfg.data)} held-out samples in {folder}", flush=True)
    try:
        write_synthetic(tmp / train.name, cfg.data.synthetic_n, 0, cfg.data.synthetic_task, announce=False)
        write_synthetic(tmp / held_out.name, synthetic_eval_n(cfg.data), 1, cfg.data.synthetic_task, announce=False)
        publish_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_synthetic(jsonl: Path, n: int, seed: int, task: str = "shapes", announce: bool = True) -> None:
    """A synthetic grounded set at `jsonl`, its images in a NEW sibling folder `<stem>_synthetic/`.

    Everything is generated in a fresh temporary folder and renamed into place; an existing folder of that
    name is never touched (a clear error instead), so the run can only ever add what it created."""
    from megatron_sayo.data.synthetic import make_synthetic

    images = jsonl.with_name(f"{jsonl.stem}_synthetic")
    if images.exists() or images.is_symlink():
        raise FileExistsError(f"data.train_file/eval_file {jsonl} does not exist, but {images} does: refusing to "
                              f"write synthetic data there (move it away or point data.* at another file)")
    if announce:
        print(f"making {n} synthetic grounded samples at {jsonl}", flush=True)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{images.name}.tmp-", dir=jsonl.parent))
    try:
        made = make_synthetic(tmp, n, seed=seed, task=task)
        lines = []
        for line in made.read_text().splitlines():
            row = json.loads(line)
            row["image"] = f"{images.name}/{row['image']}"
            lines.append(json.dumps(row) + "\n")
        os.rename(tmp, images)  # fails rather than replaces if someone created `images` meanwhile (non-empty)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only the temporary folder this call made
        raise
    from megatron_sayo.checkpoint.files import write_text_atomic

    write_text_atomic(jsonl, "".join(lines))


def check_data_files(cfg: RunConfig) -> None:
    """data.train_file (and eval_file when set) exist and are not empty, unless the run makes them synthetic (in
    the cache, config.synthetic_files): a missing file the user named is an error, never replaced."""
    from megatron_sayo.data.grounded import EmptyDataError, require_data_file

    for key, path in (("data.train_file", cfg.data.train_file), ("data.eval_file", cfg.data.eval_file)):
        if path is None and key == "data.eval_file":
            continue
        if cfg.data.synthetic_n and not Path(path).exists():
            continue  # prepare_synthetic makes it in the cache
        try:
            require_data_file(path, key)
        except EmptyDataError as exc:
            raise ConfigError(str(exc)) from None


def check_before_launch(cfg: RunConfig, world_size: int) -> str:
    """Everything that can fail cheaply: layout vs world size and vs the checkpoint's config.json, data files."""
    from megatron_sayo.models.qwen25vl.hf_config import ParallelLayout, load_hf_config, validate_layout

    cfg.validate_world(world_size)
    check_data_files(cfg)
    hf_dir = cfg.model.hf_path or cfg.model.megatron_path
    if Path(hf_dir, "config.json").is_file():
        validate_layout(load_hf_config(hf_dir), ParallelLayout(cfg.parallel.tp, cfg.parallel.pp))
    elif not cfg.model.make_tiny_if_missing:
        raise ConfigError(f"model: {hf_dir}/config.json not found (set model.hf_path to a Qwen2.5-VL checkpoint)")
    return hf_dir


def cpu_smoke_changes(cfg: RunConfig) -> list[tuple[str, object, object]]:
    """What --cpu-smoke changes, as (key, was, now): TP and PP at most 2 each, the GPU kernels (flash attention,
    Transformer Engine layers) swapped for their CPU counterparts. Nothing else: every other setting of the file
    (bf16 with fp32 main weights, recompute, distributed optimizer, frozen tower, LoRA) runs as written."""
    m, par = cfg.model, cfg.parallel
    wanted = [("parallel.tp", par.tp, min(par.tp, 2)), ("parallel.pp", par.pp, min(par.pp, 2)),
              ("model.attention_backend", m.attention_backend, "sdpa" if m.attention_backend == "flash" else None),
              ("model.layer_backend", m.layer_backend, "local" if m.layer_backend == "te" else None)]
    return [(key, was, now) for key, was, now in wanted if now is not None and now != was]


def apply_cpu_smoke(path: str, overrides: list[str]) -> RunConfig:
    """The config of `path` + `overrides` with cpu_smoke_changes applied; prints each change."""
    changes = cpu_smoke_changes(load_config(path, overrides))
    for key, was, now in changes:
        print(f"cpu-smoke: {key}={now} (was {was})")
    if not changes:
        print("cpu-smoke: nothing to change")
    return load_config(path, [*overrides, *(f"{key}={now}" for key, _, now in changes)])


def job_gpu_memory(flag: str | None) -> float | None:
    """Bytes per GPU: --gpu-memory when given, else this machine's first GPU, else None (a CPU machine)."""
    from megatron_sayo.plan import parse_memory

    if flag is not None:
        return parse_memory(flag)
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None


def memory_report(cfg: RunConfig, hf_dir: str, world_size: int, gpu_memory: str | None, where: str) -> str:
    """The memory model's estimate for this config (memory_check.py); raises MemoryDoesNotFit (a ConfigError)
    when the job's GPUs are too small."""
    from megatron_sayo.memory_check import check_memory

    memory = job_gpu_memory(gpu_memory)
    if not Path(hf_dir, "config.json").is_file():
        if memory is not None:
            raise ConfigError(f"model: {hf_dir}/config.json not found: the memory check needs the checkpoint's "
                              f"config.json (a directory holding just that file is enough)")
        return f"memory: no estimate ({hf_dir}/config.json is made at the first run)"
    return check_memory(cfg, hf_dir, world_size, memory, where)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m megatron_sayo.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None,
                   help="YAML run config (see examples/ and docs/config.md); required except with --print-config")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (the dataclass defaults, --config and the overrides) with each "
                        "field's one-line doc, and exit")
    p.add_argument("--log-level", choices=LEVELS, default=None,
                   help="other libraries' log level (default: log.level, 'warning': megatron's and the others' "
                        "known noise hidden); this project's own lines are always printed")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --check: the number of processes the run will have (default: from the launcher's "
                        "environment, 1 for a plain process)")
    p.add_argument("--gpu-memory", default=None,
                   help="with --check: memory per GPU of the job (e.g. 80GB, 141GB, 81559MiB); the memory model "
                        "refuses a layout that does not fit. Default: this machine's GPU, else estimate only")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the config shrunk on CPU: TP and PP at most 2, flash/te swapped for sdpa/local; "
                        "prints what it changed (pass a tiny model.hf_path and data files)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 parallel.tp=2")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console.setup(args.log_level or "warning")
    if args.print_config:
        try:
            print(describe(load_config(args.config, args.overrides, complete=args.config is not None)), end="")
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.config is None:
        print("config error: --config FILE is required (only --print-config runs on the defaults alone)",
              file=sys.stderr)
        return 2
    launch = runtime.read_launch_env()
    if args.world_size is not None and not args.check:
        print("config error: --world-size is for --check (a run takes its world size from the launcher)",
              file=sys.stderr)
        return 2
    if args.gpu_memory is not None and not args.check:
        print("config error: --gpu-memory is for --check", file=sys.stderr)
        return 2
    if args.world_size is not None and args.world_size < 1:
        print(f"config error: --world-size must be >= 1, got {args.world_size}", file=sys.stderr)
        return 2
    world_size = args.world_size or launch.world_size
    try:
        cfg = (apply_cpu_smoke(args.config, args.overrides) if args.cpu_smoke
               else load_config(args.config, args.overrides))
        hf_dir = check_before_launch(cfg, world_size)
        memory = (memory_report(cfg, hf_dir, world_size, args.gpu_memory, args.config) if args.check
                  else None)
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.log_level is None:
        console.setup(cfg.log.level)
    if args.check:
        print(memory)
        print(f"config OK: {args.config} (world size {world_size})")
        return 0

    from megatron_sayo.rl.trainer import install_signal_handlers

    install_signal_handlers()  # before the slow start-up, so an early preemption signal is not fatal
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.rl.metrics import MetricsLogger
    from megatron_sayo.rl.trainer import GRPOTrainer, Preempted, resume_conflict
    from megatron_sayo.rl.warmup import warmed_up

    runtime.init_distributed(cfg.parallel.tp, cfg.parallel.pp, launch=launch)
    runtime.seed_everything(cfg.train.seed)
    from megatron_sayo.distributed import topology

    topology.report()   # rank 0 logs each rank's host and each TP/DP group's transport, once
    try:
        conflict = resume_conflict(cfg)   # every rank, before anything in run_dir is written
        if conflict is not None:
            if launch.rank == 0:
                print(f"config error: {conflict}", file=sys.stderr)
            return 2
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
        if trainer.step >= cfg.train.steps:
            if launch.rank == 0:
                print(f"{cfg.run_dir}: already at step {trainer.step} (train.steps = {cfg.train.steps}): nothing to "
                      f"train; raise train.steps to go on, or use another run_dir", flush=True)
            return 0
        logger = MetricsLogger(Path(cfg.run_dir), trainer.is_logger, cfg.train.steps, cfg.log.tensorboard,
                               wandb=cfg.log if cfg.log.wandb else None, run_config=cfg.to_dict(),
                               print_every=cfg.log.interval)
        try:
            trainer.fit(logger)
        except Preempted as exc:
            if trainer.is_logger:
                print(exc, flush=True)
            return 0
        finally:
            logger.close()
        if trainer.is_logger:
            from megatron_sayo.rl.summary import run_summary

            print("\n" + run_summary(Path(cfg.run_dir)), flush=True)
        return 0
    except Exception as exc:
        lost = topology.failure_message(exc)   # a peer died: name its ranks and host
        if lost:
            print(f"ERROR: {lost}", file=sys.stderr, flush=True)
        raise
    finally:
        runtime.shutdown()


def _yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


if __name__ == "__main__":
    sys.exit(main())
