"""Export a LoRA training step (adapters only, plus a pointer to its base) without torch: as PEFT's adapter format
(`adapter_config.json` + `adapter_model.safetensors`, HF module names) or merged into a full HF checkpoint.

The step's dist checkpoint holds each adapter matrix as megatron saved it (layers stacked, TP shards as
chunks); `read_adapters` assembles the full HF-shaped A [rank, in] and B [out, rank]. Merging writes the base
as an HF checkpoint (copied, or converted from megatron) and then adds alpha/rank * B @ A to each adapted
weight in place, a band of rows at a time in float32, rounded back to the weight's dtype.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from megatron_sayo.checkpoint.files import (
    CheckpointError,
    copy_side_files,
    prepare_output,
    read_metadata,
    resolve_checkpoint_dir,
)
from megatron_sayo.convert.megatron_to_hf import DistSource, convert_megatron_to_hf
from megatron_sayo.formats.atomic import fsync_dir, publish_dir, write_json_atomic
from megatron_sayo.formats.dtypes import DTYPES
from megatron_sayo.formats.safetensors_files import header_bytes, read_header, weight_files
from megatron_sayo.formats.tensor_copy import BAND_BYTES, cast, pwrite_all
from megatron_sayo.memory import peak_rss_mb
from megatron_sayo.models.qwen25vl.hf_config import load_hf_config
from megatron_sayo.models.qwen25vl.lora_names import (
    TARGETS,
    adapter_entries,
    hf_weight_name,
    lora_scale,
    param_name,
    peft_key,
    peft_target_regex,
)
from megatron_sayo.models.qwen25vl.name_map import normalize_hf_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODES = ("merge", "adapter")


def lora_settings(ckpt: Path) -> dict:
    """The `lora` record of a step's checkpoint_metadata.json, checked field by field."""
    meta = read_metadata(ckpt)
    where = f"{ckpt}/checkpoint_metadata.json"
    lora = meta.get("lora")
    if not isinstance(lora, dict):
        raise CheckpointError(f"{where}: no 'lora' record (not a LoRA training step; export it without --lora)")
    checks = {"rank": lambda v: isinstance(v, int) and v >= 1, "alpha": lambda v: isinstance(v, (int, float)) and v > 0,
              "targets": lambda v: isinstance(v, list) and v and all(t in TARGETS for t in v),
              "base": lambda v: isinstance(v, dict) and v.get("format") in ("hf", "megatron")
              and isinstance(v.get("path"), str)}
    for field, ok in checks.items():
        if not ok(lora.get(field)):
            raise CheckpointError(f"{where}: lora.{field} = {lora.get(field)!r} is not valid (expected rank >= 1, "
                                  f"alpha > 0, targets from {list(TARGETS)}, base {{format: hf|megatron, path}})")
    return lora


def _read_full(source: DistSource, key: str, layer: int, shape: tuple[int, int]) -> np.ndarray:
    """One layer of a stacked adapter tensor, assembled from its chunks, as float32 [rows, cols]."""
    t = source.tensors.get(key)
    if t is None:
        raise CheckpointError(f"{source.dir}: adapter tensor '{key}' is missing")
    if tuple(t.shape[1:]) != tuple(shape):
        raise CheckpointError(f"{source.dir}: adapter tensor '{key}' has shape {list(t.shape)}, the config gives "
                              f"[layers, {shape[0]}, {shape[1]}]")
    out = np.zeros(shape, np.float32)
    covered = 0
    itemsize = DTYPES[t.dtype].itemsize
    for row, col, m in source.chunks(key, layer):
        raw = os.pread(m.fd, m.rows * m.cols * itemsize, m.offset)
        if len(raw) != m.rows * m.cols * itemsize:
            raise CheckpointError(f"{source.dir}: adapter tensor '{key}' chunk is truncated")
        values = cast(np.frombuffer(raw, np.uint8).reshape(m.rows, -1), t.dtype, "float32").view(np.float32)
        out[row:row + m.rows, col:col + m.cols] = values
        covered += m.rows * m.cols
    if covered != math.prod(shape):
        raise CheckpointError(f"{source.dir}: adapter tensor '{key}' layer {layer}: chunks cover {covered} of "
                              f"{math.prod(shape)} elements")
    return out


def read_adapters(ckpt: Path, text, lora: dict) -> dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]]:
    """{(target, module, layer): (A, B)} full float32 matrices from a LoRA step's dist checkpoint."""
    source = DistSource(ckpt)
    try:
        out = {}
        for target, module, layer, a_shape, b_shape in adapter_entries(text, lora["targets"], lora["rank"]):
            a = _read_full(source, param_name(target, module, "A"), layer, a_shape)
            b = _read_full(source, param_name(target, module, "B"), layer, b_shape)
            out[(target.linear, module, layer)] = (a, b)
        return out
    finally:
        source.close()


def _write_safetensors(path: Path, tensors: list[tuple[str, np.ndarray]]) -> None:
    """float32 arrays into one safetensors file, fsynced."""
    head, offsets = header_bytes([(name, "float32", arr.shape) for name, arr in tensors])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, head, 0)
        for (_, arr), off in zip(tensors, offsets):
            pwrite_all(fd, np.ascontiguousarray(arr, np.float32), off)
        os.fsync(fd)
    finally:
        os.close(fd)


def export_adapter(megatron_dir, out_dir, *, base: str | None = None, overwrite: bool = False) -> dict:
    """PEFT's LoRA format for the step: `peft.PeftModel.from_pretrained(base_model, out_dir)` loads it."""
    start = time.perf_counter()
    ckpt = resolve_checkpoint_dir(megatron_dir)
    lora = lora_settings(ckpt)
    text = load_hf_config(ckpt).text
    adapters = read_adapters(ckpt, text, lora)
    tensors = []
    for (linear, module, layer), (a, b) in adapters.items():
        target = TARGETS[linear]
        tensors += [(peft_key(target, module, "A", layer), a), (peft_key(target, module, "B", layer), b)]
    config = {"peft_type": "LORA", "task_type": None, "r": lora["rank"], "lora_alpha": lora["alpha"],
              "lora_dropout": lora.get("dropout", 0.0), "target_modules": peft_target_regex(lora["targets"]),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "base_model_name_or_path": base or lora["base"]["path"]}
    tmp = prepare_output(out_dir, overwrite, [megatron_dir, ckpt])
    try:
        _write_safetensors(tmp / ADAPTER_WEIGHTS, tensors)
        write_json_atomic(tmp / ADAPTER_CONFIG, config)
        fsync_dir(tmp)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"tensors": len(tensors), "files": 1, "seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(), "dtype": "float32"}


def _base_dir(lora: dict, base: str | None, ckpt: Path) -> tuple[str, Path]:
    """(format, path) of the base weights: --base when given, else the step's pointer (which must exist)."""
    fmt, path = lora["base"]["format"], Path(base or lora["base"]["path"])
    if base is not None:
        fmt = "hf" if (path / "config.json").is_file() and not (path / "metadata.json").is_file() and \
            not (path / "checkpoints").is_dir() else "megatron"
    if not path.exists():
        raise CheckpointError(f"{ckpt}/checkpoint_metadata.json: lora.base.path {path} does not exist (the base "
                              f"weights these adapters apply to; pass --base DIR if they moved)")
    return fmt, path


def _copy_hf_base(base: Path, tmp: Path) -> None:
    """An HF checkpoint's weight files and side files into tmp (copied in the kernel)."""
    try:
        files = sorted(set(weight_files(base).values()))
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(f"base {base}: {exc}") from None
    index = base / "model.safetensors.index.json"
    for name in files + ([index.name] if index.is_file() else []):
        shutil.copyfile(base / name, tmp / name)
    copy_side_files(base, tmp)


def merge_into(hf_dir: Path, adapters: dict, scale: float) -> int:
    """W += scale * B @ A for every adapted weight of the HF checkpoint in hf_dir, in place; returns the count."""
    where = {normalize_hf_name(name): (file, name) for name, file in weight_files(hf_dir).items()}
    headers: dict[str, dict] = {}
    merged = 0
    for (linear, module, layer), (a, b) in adapters.items():
        hub = hf_weight_name(TARGETS[linear], module, layer)
        if hub not in where:
            raise CheckpointError(f"{hf_dir}: base checkpoint has no tensor '{hub}' to merge an adapter into")
        file, stored = where[hub]
        if file not in headers:
            headers[file] = read_header(hf_dir / file)
        entry = headers[file][stored]
        if entry.shape != (b.shape[0], a.shape[1]):
            raise CheckpointError(f"{hf_dir / file}: '{stored}' has shape {list(entry.shape)}, the adapter gives "
                                  f"[{b.shape[0]}, {a.shape[1]}]")
        _add_in_place(hf_dir / file, entry, b, a, scale)
        merged += 1
    return merged


def _add_in_place(path: Path, entry, b: np.ndarray, a: np.ndarray, scale: float) -> None:
    """entry's matrix += scale * b @ a, in bands of rows (float32 arithmetic, rounded to the stored dtype)."""
    rows, cols = entry.shape
    itemsize = DTYPES[entry.dtype].itemsize
    band = max(1, BAND_BYTES // (cols * 4))
    fd = os.open(path, os.O_RDWR)
    try:
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            offset = entry.offset + r0 * cols * itemsize
            raw = np.frombuffer(os.pread(fd, (r1 - r0) * cols * itemsize, offset), np.uint8).reshape(r1 - r0, -1)
            w = cast(raw, entry.dtype, "float32").view(np.float32)
            w += np.float32(scale) * (b[r0:r1] @ a)
            pwrite_all(fd, cast(w.view(np.uint8), "float32", entry.dtype), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def export_merged(megatron_dir, out_dir, *, base: str | None = None, max_shard_size: str | int = "5GB",
                  dtype: str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """A full HF checkpoint: the step's base with every adapter merged into its weight (W + alpha/r * B A)."""
    start = time.perf_counter()
    ckpt = resolve_checkpoint_dir(megatron_dir)
    lora = lora_settings(ckpt)
    fmt, base_dir = _base_dir(lora, base, ckpt)
    text = load_hf_config(ckpt).text
    adapters = read_adapters(ckpt, text, lora)
    tmp = prepare_output(out_dir, overwrite, [megatron_dir, ckpt, base_dir])
    try:
        if fmt == "megatron":
            convert_megatron_to_hf(base_dir, tmp, max_shard_size=max_shard_size, dtype=dtype, overwrite=True,
                                   progress=progress)
        else:
            if dtype is not None:
                raise CheckpointError(f"--dtype applies to a megatron base; the HF base {base_dir} is copied as is")
            _copy_hf_base(base_dir, tmp)
        if load_hf_config(tmp).text != text:
            raise CheckpointError(f"base {base_dir}: config.json differs from the one the adapters were trained on "
                                  f"({ckpt}/config.json)")
        merged = merge_into(tmp, adapters, lora_scale(lora["rank"], lora["alpha"]))
        fsync_dir(tmp)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(set(weight_files(out_dir).values()))
    return {"tensors": len(weight_files(out_dir)), "merged": merged, "files": len(files),
            "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "dtype": read_header(Path(out_dir) / files[0]).popitem()[1].dtype if files else "?"}


def export_lora(mode: str, megatron_dir, out_dir, **kwargs) -> dict:
    """`mode` 'merge' (full HF checkpoint) or 'adapter' (PEFT format)."""
    if mode not in MODES:
        raise CheckpointError(f"--lora {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "adapter":
        return export_adapter(megatron_dir, out_dir, base=kwargs.get("base"), overwrite=kwargs.get("overwrite", False))
    return export_merged(megatron_dir, out_dir, **kwargs)
