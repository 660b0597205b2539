"""Memory pre-flight of a run config: the planner's per-GPU model (megatron_sayo/plan.py) on the config's own
settings, at the layout the config asks for and the world size the job will have.

`python -m megatron_sayo.train --config F --check --world-size N --gpu-memory 80GB` refuses a config whose
fullest pipeline stage does not fit, printing its row and the nearest layouts and settings that do. It needs
only the checkpoint's config.json (and data.max_pixels, or the checkpoint's image processor settings).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_sayo.config import ConfigError, RunConfig
from megatron_sayo.plan import (
    GIB,
    RESERVE,
    Arch,
    Layout,
    Row,
    Workload,
    format_table,
    layout_memory,
    layouts,
    load_arch,
)


class MemoryDoesNotFit(ConfigError):
    """The config's layout needs more memory per GPU than the GPU has (the message holds the table row and the
    nearest fitting layouts and settings)."""


@dataclass(frozen=True)
class Estimate:
    """The memory model's verdict on one config at one world size."""

    row: Row
    workload: Workload
    usable: float | None     # bytes per GPU the run may use; None: no GPU memory given (estimate only)

    @property
    def fits(self) -> bool:
        return self.usable is None or self.row.memory.total <= self.usable


# ---------------------------------------------------------------- the config's workload

def image_tokens(max_pixels: int, arch: Arch) -> int:
    """Most language-model tokens one image brings: the processor resizes it to at most max_pixels in multiples
    of patch * merge pixels a side, one token per (patch * merge)^2 pixels."""
    side = arch.vision.patch * arch.vision.merge
    return max_pixels // (side * side)


def max_pixels_bound(cfg: RunConfig, hf_dir: str, where: str) -> int:
    """data.max_pixels, else the checkpoint's own image processor bound; a ConfigError when neither exists."""
    if cfg.data.max_pixels is not None:
        return cfg.data.max_pixels
    from megatron_sayo.data.image_processing import ImageProcessorConfig

    try:
        return ImageProcessorConfig.from_json(hf_dir).max_pixels
    except FileNotFoundError:
        raise ConfigError(f"{where}: data.max_pixels is unset and {hf_dir} has no preprocessor_config.json: the "
                          f"memory model needs the most pixels an image may have (e.g. data.max_pixels: 802816 = "
                          f"1024 image tokens x 28 x 28)") from None


def workload(cfg: RunConfig, n_image_tokens: int) -> Workload:
    """What one GPU of this run does, in the planner's terms (one image per prompt)."""
    return Workload(
        seq=n_image_tokens + cfg.data.max_text_tokens, max_new_tokens=cfg.rollout.max_new_tokens,
        micro_batch=cfg.train.micro_batch, group_size=cfg.rollout.group_size, recompute=cfg.model.recompute,
        sequence_parallel=cfg.model.sequence_parallel, distributed_optimizer=cfg.optim.distributed_optimizer,
        freeze_vision=cfg.model.freeze_vision, reference_model=cfg.loss.kl_beta > 0 and not cfg.lora.enabled,
        lora_rank=cfg.lora.rank if cfg.lora.enabled else 0, image_tokens=n_image_tokens,
        global_batch=cfg.train.global_batch, params_dtype=cfg.model.params_dtype)


def estimate(arch: Arch, layout: Layout, w: Workload, gpu_memory: float | None) -> Estimate:
    """The fullest stage of `layout` under `w`, against gpu_memory (bytes; None: no verdict)."""
    mem = layout_memory(arch, layout, w)
    usable = None if gpu_memory is None else gpu_memory * (1 - RESERVE)
    row = Row(layout, mem, usable is None or mem.total <= usable, arch.text.layers % layout.pp == 0)
    return Estimate(row, w, usable)


# ---------------------------------------------------------------- what would fit instead

def batch_splits(w: Workload, dp: int) -> bool:
    """The trainer's own divisibility: global_batch prompts over DP, their completions into micro-batches."""
    completions = w.global_batch * w.group_size
    return w.global_batch % dp == 0 and completions % (dp * w.micro_batch) == 0


def fitting_layouts(arch: Arch, w: Workload, world_size: int, gpu_memory: float, current: Layout,
                    limit: int = 3) -> list[Estimate]:
    """Layouts of the same world size that fit with the same settings, nearest to `current` first."""
    def distance(lay: Layout) -> tuple:
        return (abs(math.log2(lay.tp / current.tp)) + abs(math.log2(lay.pp / current.pp)), lay.pp)

    out = []
    for lay in sorted(layouts(arch, world_size), key=distance):
        e = estimate(arch, lay, w, gpu_memory)
        if e.fits and e.row.even and batch_splits(w, lay.dp) and lay != current:
            out.append(e)
    return out[:limit]


def setting_steps(w: Workload, dp: int) -> dict[str, list[tuple[str, dict]]]:
    """Per knob, the changes that lower memory, least drastic first: (override text, Workload fields)."""
    completions = w.global_batch * w.group_size // dp if w.global_batch else w.micro_batch
    micro = [m for m in range(w.micro_batch - 1, 0, -1) if completions % m == 0]
    deeper = {"none": ["selective", "full"], "selective": ["full"], "full": []}[w.recompute]
    steps = {"train.micro_batch": [(f"train.micro_batch={m}", {"micro_batch": m}) for m in micro],
             "model.recompute": [(f"model.recompute={r}", {"recompute": r}) for r in deeper]}
    if not w.freeze_vision and not w.lora_rank:
        steps["model.freeze_vision"] = [("model.freeze_vision=true", {"freeze_vision": True})]
    if not w.distributed_optimizer:
        steps["optim.distributed_optimizer"] = [("optim.distributed_optimizer=true", {"distributed_optimizer": True})]
    return steps


def fitting_settings(arch: Arch, w: Workload, layout: Layout, gpu_memory: float,
                     limit: int = 4) -> list[tuple[str, Estimate]]:
    """The fewest setting changes that make `layout` fit: per knob its least drastic fitting value; when no
    single knob is enough, per pair of knobs the least drastic fitting pair."""
    steps = setting_steps(w, layout.dp)
    found = []
    for n_knobs in (1, 2):
        for knobs in itertools.combinations(steps, n_knobs):
            choices = sorted(itertools.product(*(range(len(steps[k])) for k in knobs)), key=sum)
            for pick in choices:
                edits = [steps[k][i] for k, i in zip(knobs, pick)]
                fields = {f: v for _, change in edits for f, v in change.items()}
                e = estimate(arch, layout, replace(w, **fields), gpu_memory)
                if e.fits:
                    found.append((" ".join(text for text, _ in edits), e))
                    break
        if found:
            break
    return sorted(found, key=lambda f: -f[1].row.memory.total)[:limit]


# ---------------------------------------------------------------- report

def describe(w: Workload, dp: int) -> str:
    """The settings the estimate assumed, in one line."""
    parts = [f"prompt {w.image_tokens} image + {w.seq - w.image_tokens} text tokens, {w.max_new_tokens} new",
             f"micro-batch {w.micro_batch}",
             f"rollout {w.rollout_prompts(dp):g} prompts x G={w.group_size} per DP rank", f"recompute {w.recompute}",
             w.params_dtype,
             "distributed optimizer" if w.distributed_optimizer else "plain optimizer"]
    if w.sequence_parallel:
        parts.append("sequence parallel")
    if w.lora_rank:
        parts.append(f"LoRA rank {w.lora_rank}")
    elif w.freeze_vision:
        parts.append("vision frozen")
    parts.append("reference copy" if w.reference_model else "no reference copy")
    return ", ".join(parts)


def report(e: Estimate, config_json: Path) -> str:
    """The estimate as --check prints it: assumptions, the table row, the verdict."""
    lay, total = e.row.layout, e.row.memory.total / GIB
    lines = [f"memory ({config_json}; {describe(e.workload, lay.dp)}):", format_table([e.row])]
    if e.usable is None:
        lines.append(f"estimate: {total:.1f} GiB per GPU at TP={lay.tp} PP={lay.pp} DP={lay.dp} (no --gpu-memory "
                     f"given: no verdict)")
    else:
        verdict = "fits" if e.fits else "does NOT fit"
        lines.append(f"{verdict}: {total:.1f} GiB per GPU of {e.usable / GIB:.1f} GiB usable "
                     f"({RESERVE:.0%} of the GPU kept free)")
    return "\n".join(lines)


def refusal(e: Estimate, arch: Arch, world_size: int, gpu_memory: float, config_json: Path, where: str) -> str:
    """Why the layout is refused and what would fit instead."""
    lines = [f"{where}: {report(e, config_json)}"]
    others = fitting_layouts(arch, e.workload, world_size, gpu_memory, e.row.layout)
    if others:
        lines.append("layouts that fit at this world size with these settings:")
        lines += [f"  parallel.tp={o.row.layout.tp} parallel.pp={o.row.layout.pp}  (DP={o.row.layout.dp}, "
                  f"{o.row.memory.total / GIB:.1f} GiB)" for o in others]
    settings = fitting_settings(arch, e.workload, e.row.layout, gpu_memory)
    if settings:
        lines.append(f"settings that fit at TP={e.row.layout.tp} PP={e.row.layout.pp}:")
        lines += [f"  {text}  ({s.row.memory.total / GIB:.1f} GiB)" for text, s in settings]
    if not others and not settings:
        lines.append("nothing fits by one layout or two setting changes: more GPUs, LoRA, a smaller data.max_pixels "
                     "or rollout.group_size")
    return "\n".join(lines)


def check_memory(cfg: RunConfig, hf_dir: str, world_size: int, gpu_memory: float | None, where: str) -> str:
    """The estimate's report for this config at `world_size`; MemoryDoesNotFit when gpu_memory (bytes) is given
    and the config's layout needs more."""
    config_json = Path(hf_dir) / "config.json"
    arch = load_arch(config_json)
    n_image = image_tokens(max_pixels_bound(cfg, hf_dir, where), arch)
    layout = Layout(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp(world_size))
    e = estimate(arch, layout, workload(cfg, n_image), gpu_memory)
    if not e.fits:
        raise MemoryDoesNotFit(refusal(e, arch, world_size, gpu_memory, config_json, where))
    return report(e, config_json)
