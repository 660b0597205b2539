"""Megatron -> HF checkpoint conversion, streaming, in one process, without torch and without a model.

The reverse byte move of hf_to_megatron.py: each exported HF tensor is made of the checkpoint's chunks (found
through the DCP metadata, dcp_metadata.py, and located in their records by torch_save_reader.py) by the same
row map, sharded by size into safetensors files with an index. Writes `<out>.tmp-<pid>`, fsyncs, renames at the
end, and asserts that every chunk element was used and every HF tensor produced. CLI: tools/convert_megatron_to_hf.py.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_sayo.checkpoint.files import (
    CheckpointError,
    check_output_location,
    copy_side_files,
    prepare_output,
    read_metadata,
    resolve_checkpoint_dir,
)
from megatron_sayo.convert.progress import Progress, bytes_fmt, terminate_as_interrupt
from megatron_sayo.convert.rectangles import rectangle
from megatron_sayo.formats.atomic import publish_dir, write_json_atomic
from megatron_sayo.formats.dcp_metadata import load_dcp_metadata
from megatron_sayo.formats.dtypes import DTYPES
from megatron_sayo.formats.safetensors_files import INDEX_FILE, header_bytes
from megatron_sayo.formats.tensor_copy import (
    CAST_DTYPES,
    Piece,
    StoredMatrix,
    Writeback,
    as_matrix,
    pwrite_all,
    write_matrix,
)
from megatron_sayo.formats.torch_save_reader import read_tensor_record
from megatron_sayo.memory import peak_rss_mb
from megatron_sayo.models.qwen25vl import dist_layout
from megatron_sayo.models.qwen25vl.hf_config import load_hf_config
from megatron_sayo.models.qwen25vl.name_map import Rule, hf_names, hf_rows, row_map


@dataclass(frozen=True)
class ExportItem:
    """One HF output tensor: where it comes from in the dist checkpoint."""

    hf_name: str
    shape: tuple[int, ...]
    key: str                 # dist checkpoint key
    layer: int | None        # index on the stacked leading axis, None when not stacked
    part: int                # which of the rule's HF tensors
    rule: Rule


class DistSource:
    """A torch_dist checkpoint's tensors: chunks from `.metadata`, each record's data located on first use."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        try:
            md = load_dcp_metadata((self.dir / ".metadata").read_bytes())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.dir / '.metadata'}: cannot read the dist checkpoint metadata "
                                  f"({type(exc).__name__}: {exc})") from None
        self.tensors = md.tensors
        self._fds: dict[str, int] = {}

    def chunks(self, key: str, layer: int | None) -> list[tuple[int, int, StoredMatrix]]:
        """(row, col, data) of each stored chunk of one global tensor (one layer of a stacked one)."""
        t = self.tensors[key]
        lead = 0 if layer is None else 1
        out = []
        for c in t.chunks:
            if lead and not c.offsets[0] <= layer < c.offsets[0] + c.sizes[0]:
                continue
            path = self.dir / c.file
            if c.file not in self._fds:
                try:
                    self._fds[c.file] = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from None
            try:
                rec = read_tensor_record(self._fds[c.file], c.offset, c.length)
            except ValueError as exc:
                raise CheckpointError(f"{path}: record of '{key}' at byte {c.offset}: {exc}") from None
            if rec.dtype != t.dtype or rec.shape != tuple(c.sizes):
                raise CheckpointError(f"{path}: record of '{key}' at byte {c.offset} holds {list(rec.shape)} "
                                      f"{rec.dtype}; .metadata says {list(c.sizes)} {t.dtype}")
            row, col, rows, cols = rectangle(c.offsets[lead:], c.sizes[lead:], t.shape[lead:])
            skip = (layer - c.offsets[0]) * rows * cols * DTYPES[t.dtype].itemsize if lead else 0
            out.append((row, col, StoredMatrix(self._fds[c.file], c.offset + rec.data_offset + skip, rows, cols,
                                               t.dtype)))
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def plan_export(tensors: dict, hf, kind: str) -> tuple[list[ExportItem], dict[str, int]]:
    """HF tensors to write, layer-major, from the checkpoint's tensors; + source elements per key used.

    Each checkpoint key is looked up among the layout's targets (dist_layout.targets: the key, its rule and
    per-layer HF names). Keys that are no target are an error for converted checkpoints and skipped
    (optimizer state, adapters...) for trained ones.
    """
    text = hf.text
    by_key = {t.key: t for t in dist_layout.targets(hf, 1)}
    items, used = [], {}
    for key in sorted(tensors):
        shape = tensors[key].shape
        target = by_key.get(key)
        if target is None:
            if key.startswith("optimizer") or kind != "converted" or (
                    key == "output_layer.weight" and text.tie_word_embeddings):   # tied: the hub omits lm_head
                continue
            raise CheckpointError(f"checkpoint tensor '{key}' has no HF counterpart")
        if target.stacked and shape[0] != text.num_layers:
            raise CheckpointError(f"checkpoint tensor '{key}' stacks {shape[0]} layers; config.json has "
                                  f"num_hidden_layers={text.num_layers}")
        full = shape[1:] if target.stacked else shape
        for layer in (range(shape[0]) if target.stacked else [None]):
            names = hf_names(target.rule, target.fields(layer))
            for part, (hf_name, rows) in enumerate(zip(names, hf_rows(target.rule, text, full[0]))):
                items.append(ExportItem(hf_name, (rows, *full[1:]), key, layer, part, target.rule))
        used[key] = math.prod(shape)
    items.sort(key=lambda it: (it.layer is not None, it.layer or 0))  # layer-major, like the hub's files
    return items, used


def shard_plan(items: list[ExportItem], dtype: str, max_shard_bytes: int) -> list[list[ExportItem]]:
    """Group items (in order) into files of at most max_shard_bytes (a bigger single tensor gets its own)."""
    shards, cur, size = [], [], 0
    for it in items:
        n = math.prod(it.shape) * DTYPES[dtype].itemsize
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    if cur:
        shards.append(cur)
    return shards


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes (decimal units as transformers uses)."""
    text = str(text).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def convert_megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, *, max_shard_size: str | int = "5GB",
                           dtype: str | None = None, overwrite: bool = False, progress: bool = True,
                           remove_stale: bool = False, _fail_after: int | None = None) -> dict:
    """Megatron dist checkpoint (converted, or a trainer's step/run dir: policy weights only) -> HF directory.

    Streams every HF tensor straight from the checkpoint's records into pre-planned safetensors files.
    Output dtype: `dtype`, else the original HF dtype the checkpoint records, else config.json's.
    """
    start = time.perf_counter()
    check_output_location(out_dir, [megatron_dir])
    ckpt = resolve_checkpoint_dir(megatron_dir)
    meta = read_metadata(ckpt)
    if "lora" in meta:
        raise CheckpointError(f"{ckpt}: a LoRA training step (adapters only, base at {meta['lora'].get('base')}); "
                              f"export it with --lora merge or --lora adapter")
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{ckpt}: no config.json (needed to name and shape the HF tensors)")
    hf = load_hf_config(ckpt)
    out_dtype = dtype or meta.get("source_dtype") or hf.torch_dtype
    if out_dtype not in CAST_DTYPES:
        raise CheckpointError(f"output dtype {out_dtype!r} is not one of {list(CAST_DTYPES)}")
    source = DistSource(ckpt)
    items, used = plan_export(source.tensors, hf, meta.get("kind", "converted"))
    missing = _missing_hf_tensors(items, hf)
    if missing:
        raise CheckpointError(f"{ckpt}: checkpoint lacks tensors for {missing[:5]} ({len(missing)} in all)")
    shards = shard_plan(items, out_dtype, parse_size(max_shard_size))
    tmp = None
    try:
        with terminate_as_interrupt():
            tmp = prepare_output(out_dir, overwrite, [megatron_dir, ckpt], remove_stale)
            written = _write_shards(source, shards, out_dtype, hf.text, tmp, progress, _fail_after)
            if written != len(items) or len({it.hf_name for it in items}) != len(items):
                raise CheckpointError(f"wrote {written} tensors, planned {len(items)} (duplicate names?)")
            _check_elements(items, used, hf.text, source.tensors)
            copy_side_files(ckpt, tmp)
            publish_dir(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        source.close()
    return {"tensors": len(items), "files": len(shards), "seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(), "dtype": out_dtype}


def _missing_hf_tensors(items: list[ExportItem], hf) -> list[str]:
    """HF names the config implies (every target's, every layer) that the plan does not produce."""
    have = {it.hf_name for it in items}
    want = [name for t in dist_layout.targets(hf, 1)
            for layer in (range(hf.text.num_layers) if t.stacked else [None])
            for name in hf_names(t.rule, t.fields(layer))]
    return [n for n in want if n not in have]


def _check_elements(items: list[ExportItem], used: dict[str, int], text, tensors) -> None:
    """Every consumed source element accounted for in the output (minus the vocabulary's padding rows)."""
    out = sum(math.prod(it.shape) for it in items)
    padded = {it.key for it in items if it.rule.kind.padded}
    src = sum(text.vocab_size * math.prod(tensors[key].shape[1:]) if key in padded else n
              for key, n in used.items())
    if out != src:
        raise CheckpointError(f"element totals differ: output {out}, checkpoint {src}")


def export_pieces(item: ExportItem, source: DistSource, text, chunks) -> list[Piece]:
    """Pieces of the checkpoint's chunks that make HF tensor `item` (its rows of the TP=1 tensor)."""
    shape = source.tensors[item.key].shape
    full = shape[1:] if item.layer is not None else shape
    rule = item.rule
    pieces, pos = [], 0
    for s in row_map(rule, text, hf_rows(rule, text, full[0]), full[0]):
        if s.source == item.part:
            for row, col, m in chunks:
                a, b = max(pos, row), min(pos + s.rows, row + m.rows)
                if a < b:
                    pieces.append(Piece(m, a - row, 0, s.start + a - pos, col, b - a, m.cols))
        pos += s.rows
    return pieces


def _write_shards(source: DistSource, shards, dtype: str, text, out: Path, progress: bool,
                  fail_after: int | None) -> int:
    """Write every planned shard file (+ index when more than one); returns the tensor count written."""
    total = sum(len(s) for s in shards)
    bar = Progress(total, "megatron->hf", progress)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total_bytes, written, writeback, cached = {}, 0, 0, Writeback(), (None, None)
    for fname, shard_items in zip(names, shards):
        header, offsets = header_bytes([(it.hf_name, dtype, it.shape) for it in shard_items])
        fd = os.open(out / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pwrite_all(fd, header, 0)
            for it, offset in zip(shard_items, offsets):
                if cached[0] != (it.key, it.layer):
                    cached = ((it.key, it.layer), source.chunks(it.key, it.layer))
                dst = StoredMatrix(fd, offset, *as_matrix(it.shape), dtype)
                try:
                    write_matrix(dst, export_pieces(it, source, text, cached[1]))
                except ValueError as exc:
                    raise CheckpointError(f"'{it.hf_name}' from checkpoint tensor '{it.key}': {exc}") from None
                nbytes = dst.rows * dst.row_bytes
                writeback.start(fd, offset, nbytes)
                weight_map[it.hf_name] = fname
                written += 1
                total_bytes += nbytes
                bar.bytes_done = total_bytes
                bar.update(1)
                bar.set_postfix_str(bytes_fmt(total_bytes))
                if fail_after is not None and written > fail_after:
                    raise RuntimeError("simulated interruption")
            writeback.drain()
            os.fsync(fd)
        finally:
            writeback.drain()
            os.close(fd)
    bar.close()
    if len(shards) > 1:
        write_json_atomic(out / INDEX_FILE,
                          {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
    return written
