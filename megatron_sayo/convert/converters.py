"""HF <-> Megatron checkpoint conversion, streaming, in one process, without torch and without a model.

Both directions are byte moves planned from config.json alone. Each megatron chunk (one layer x one TP rank's
slice, where megatron's TP x PP save puts it: models/qwen25vl/dist_layout.py) is a rectangle of the TP=1
tensor, whose rows are row ranges of HF tensors (name_map.row_map); each exported HF tensor is made of the
checkpoint's chunks the same way in reverse. tensor_copy.py moves whole rows in the kernel and slices or
casts through a bounded buffer; torch_format.py frames the torch.save records and the DCP metadata. Both
directions write `<out>.tmp-<pid>`, fsync, rename at the end, and assert that every source tensor was consumed
and every target produced. CLIs: tools/convert_*.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_sayo.checkpoint.files import (METADATA_FILE, CheckpointError, check_output_location, copy_side_files,
                                            make_metadata, prepare_output, read_metadata,
                                            resolve_checkpoint_dir)
from megatron_sayo.formats.atomic import publish_dir, write_json_atomic
from megatron_sayo.memory import peak_rss_mb
from megatron_sayo.models.qwen25vl import dist_layout
from megatron_sayo.models.qwen25vl.hf_config import ParallelLayout, load_hf_config, validate_layout
from megatron_sayo.models.qwen25vl.name_map import (RowSpan, Rule, hf_names, hf_rows, match_hf, normalize_hf_name,
                                                    row_map)
from megatron_sayo.formats.safetensors_files import INDEX_FILE, Entry, header_bytes, read_header, weight_files
from megatron_sayo.formats.tensor_copy import (CAST_DTYPES, Piece, StoredMatrix, Writeback, as_matrix, pwrite_all,
                                       write_matrix)
from megatron_sayo.formats.dtypes import DTYPES
from megatron_sayo.formats.torch_format import load_dcp_metadata, read_tensor_record


# ==============================================================================================================
# Shared: rectangles, progress, memory
# ==============================================================================================================

def rectangle(offsets: tuple[int, ...], sizes: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(row, col, rows, cols) of a chunk of a tensor of `shape` seen as a matrix (as_matrix); a chunk may cut
    dims 0 and 1 only."""
    if len(shape) == 1:
        return offsets[0], 0, sizes[0], 1
    rest = math.prod(shape[2:])
    if any(offsets[2:]) or tuple(sizes[2:]) != tuple(shape[2:]):
        raise ValueError(f"chunk {list(sizes)} at {list(offsets)} of {list(shape)} cuts a dim after the second")
    return offsets[0], offsets[1] * rest, sizes[0], sizes[1] * rest


def span_pieces(spans: list[RowSpan], sources: list[StoredMatrix | None], row: int, col: int, rows: int,
                cols: int) -> list[tuple[int | None, Piece]]:
    """(source index, piece) filling rows x cols of a TP=1 tensor from (row, col), whose rows are `spans`."""
    out, pos = [], 0
    for s in spans:
        a, b = max(pos, row), min(pos + s.rows, row + rows)
        if a < b:
            src = sources[s.source] if s.source is not None else None
            out.append((s.source, Piece(src, s.start + a - pos, col, a - row, 0, b - a, cols)))
        pos += s.rows
    return out


def _bytes_fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"


class Terminated(KeyboardInterrupt):
    """SIGTERM received: raised in the main thread so the conversion's clean-up runs as for Ctrl-C."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """While converting, SIGTERM raises Terminated (SIGINT already raises KeyboardInterrupt), so the temp dir
    is removed instead of left behind; the previous handler is restored after. No-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Progress:
    """tqdm when available and wanted, else silent; counts tensors and carries a bytes total."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bytes_done = 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="tensor", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix_str(self, s: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(s, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _FailAfter:
    """Progress wrapper that raises after n tensors: simulates a conversion killed mid-way (tests)."""

    def __init__(self, bar, n: int):
        self.bar, self.n, self.bytes_done = bar, n, 0

    def update(self, k: int) -> None:
        self.n -= k
        if self.n < 0:
            raise RuntimeError("simulated interruption")

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        self.bar.close()


# ==============================================================================================================
# HF -> Megatron
# ==============================================================================================================

class HFSource:
    """An HF checkpoint dir's tensors by hub name: where each one's bytes lie (headers only) and open files."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        try:
            stored = weight_files(self.dir)
        except (FileNotFoundError, ValueError) as exc:
            raise CheckpointError(f"{self.dir}: cannot read the weights ({exc})") from None
        headers = {}
        for file in sorted(set(stored.values())):
            path = self.dir / file
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in the index but missing")
            try:
                headers[file] = read_header(path)
            except ValueError as exc:
                raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None
        self.files: dict[str, str] = {}
        self.entries: dict[str, Entry] = {}
        for key, file in stored.items():
            if key not in headers[file]:
                raise CheckpointError(f"{self.dir / file}: index lists tensor '{key}' but the file lacks it")
            name = normalize_hf_name(key)
            self.files[name], self.entries[name] = file, headers[file][key]
        self._fds: dict[str, int] = {}

    def file_of(self, name: str) -> Path:
        return self.dir / self.files[name]

    def matrix(self, name: str) -> StoredMatrix:
        file, entry = self.files[name], self.entries[name]
        if file not in self._fds:
            self._fds[file] = os.open(self.dir / file, os.O_RDONLY)
        return StoredMatrix(self._fds[file], entry.offset, *as_matrix(entry.shape), entry.dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def check_hf_checkpoint(source: HFSource, hf) -> None:
    """Every tensor maps to a megatron one of this config, in a dtype we convert; CheckpointError otherwise."""
    for name, entry in source.entries.items():
        where = source.file_of(name)
        try:
            rule, fields = match_hf(name)
        except KeyError:
            raise CheckpointError(f"{where}: extra tensor '{name}' has no megatron counterpart "
                                  f"(not a Qwen2.5-VL weight)") from None
        if "i" in fields and int(fields["i"]) >= hf.text.num_layers:
            raise CheckpointError(f"{where}: extra tensor '{name}': layer {fields['i']} but "
                                  f"config.json has num_hidden_layers={hf.text.num_layers}")
        if rule.megatron == "output_layer.weight" and hf.text.tie_word_embeddings:
            raise CheckpointError(f"{where}: extra tensor '{name}': config.json ties the word "
                                  f"embeddings (tie_word_embeddings=true), so lm_head.weight must be absent")
        if entry.dtype not in CAST_DTYPES:
            raise CheckpointError(f"{where}: tensor '{name}' is {entry.dtype}; expected one of {CAST_DTYPES}")


def check_hf_shapes(targets, source: HFSource, hf) -> None:
    """Every HF tensor the checkpoint needs is present with the shape config.json implies."""
    text = hf.text
    for target in targets:
        full = target.shape[1:] if target.stacked else target.shape
        rows = hf_rows(target.rule, text, full[0])
        for layer in (range(text.num_layers) if target.stacked else [None]):
            for hf_name, n in zip(hf_names(target.rule, target.fields(layer), text.tie_word_embeddings), rows):
                where = f"(needed for megatron '{target.megatron_name(layer)}')"
                if hf_name not in source.entries:
                    raise CheckpointError(f"{source.dir}: missing tensor '{hf_name}' {where}")
                got, want = source.entries[hf_name].shape, (n, *full[1:])
                if got != want:
                    raise CheckpointError(f"{source.file_of(hf_name)}: tensor '{hf_name}' has shape {list(got)}, "
                                          f"config.json implies {list(want)} {where}")


def verify_consumed(numel: dict[str, int], reads: dict[str, dict[str, int]]) -> int:
    """Assert every HF tensor was read, fully, by every target that needs it; returns elements consumed."""
    unused = sorted(set(numel) - set(reads))
    if unused:
        raise CheckpointError(f"{len(unused)} source tensor(s) not consumed by the model: {unused[:5]}")
    for name, targets in reads.items():
        for target, n in targets.items():
            if n != numel[name]:
                raise CheckpointError(f"'{name}' -> '{target}': {n} elements written, source has {numel[name]}")
    return sum(numel.values())


def stream_hf_to_dist(source: HFSource, hf, layout: ParallelLayout, dtype: str, writer,
                      progress) -> dict[str, dict[str, int]]:
    """Write every chunk of the checkpoint from the HF files; returns {hf_name: {target: elements read}}."""
    text = hf.text
    reads: dict[str, dict[str, int]] = {}
    for target in dist_layout.targets(hf, layout.tp):
        full = target.shape[1:] if target.stacked else target.shape
        by_layer: dict[int | None, list] = {}
        for chunk in dist_layout.chunks(target, layout, text.num_layers):
            by_layer.setdefault(chunk.layer, []).append(chunk)
        for layer, layer_chunks in by_layer.items():
            names = hf_names(target.rule, target.fields(layer), text.tie_word_embeddings)
            spans = row_map(target.rule, text, [source.entries[n].shape[0] for n in names], full[0])
            sources = [source.matrix(n) for n in names]
            key, stored, lead = target.megatron_name(layer), target.stored_dtype(dtype), int(target.stacked)
            for chunk in layer_chunks:
                row, col, rows, cols = rectangle(chunk.offsets[lead:], chunk.sizes[lead:], full)
                pieces = span_pieces(spans, sources, row, col, rows, cols)
                for i, p in pieces:
                    if i is not None:
                        by_target = reads.setdefault(names[i], {})
                        by_target[key] = by_target.get(key, 0) + p.rows * p.cols
                writer.add_chunk(target.key, target.shape, chunk.offsets, chunk.sizes, stored, (rows, cols),
                                 lambda dst, pieces=pieces: write_matrix(dst, [p for _, p in pieces]),
                                 rank=chunk.file_rank)
                progress.bytes_done += rows * cols * DTYPES[stored].itemsize
            progress.update(1)
            progress.set_postfix_str(_bytes_fmt(progress.bytes_done))
    per_stage = text.num_layers // layout.pp
    for key, layer in dist_layout.extra_states(hf):
        writer.add_object(key, [None], rank=layer // per_stage * layout.tp)   # megatron saves [None] per linear
    return reads


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1,
                           dtype: str = "keep", overwrite: bool = False, progress: bool = True,
                           remove_stale: bool = False, _fail_after: int | None = None) -> dict:
    """HF checkpoint dir -> megatron dist checkpoint laid out for TP x PP (loadable at any). Returns a summary.
    `remove_stale`: delete `<out>.tmp-<pid>` dirs left by dead conversions (else they are only reported)."""
    from megatron_sayo.formats.dist_writer import TorchDistWriter

    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    hf = load_hf_config(hf_dir)
    layout = ParallelLayout(tp, pp)
    validate_layout(hf, layout)
    dtype_name = hf.torch_dtype if dtype == "keep" else dtype
    if dtype_name not in CAST_DTYPES:
        raise CheckpointError(f"dtype {dtype_name!r} (from {'config.json torch_dtype' if dtype == 'keep' else '--dtype'})"
                              f" is not one of {list(CAST_DTYPES)}")
    source = HFSource(hf_dir)
    check_hf_checkpoint(source, hf)
    numel = {name: math.prod(e.shape) for name, e in source.entries.items()}
    targets = dist_layout.targets(hf, tp)
    check_hf_shapes(targets, source, hf)
    check_output_location(out_dir, [hf_dir])
    total = sum(hf.text.num_layers if t.stacked else 1 for t in targets)
    bar = _Progress(total, "hf->megatron", progress)
    if _fail_after is not None:
        bar = _FailAfter(bar, _fail_after)
    tmp = writer = None
    try:
        with terminate_as_interrupt():
            tmp = prepare_output(out_dir, overwrite, [hf_dir], remove_stale)
            writer = TorchDistWriter(tmp)
            reads = stream_hf_to_dist(source, hf, layout, dtype_name, writer, bar)
            elements = verify_consumed(numel, reads)
            writer.finish()
            copy_side_files(hf_dir, tmp)
            write_json_atomic(tmp / METADATA_FILE, make_metadata(
                "converted", source=str(hf_dir.resolve()), dtype=dtype_name, tp=tp, pp=pp,
                source_dtype=hf.torch_dtype, hf_tensors=len(numel), hf_elements=elements))
            publish_dir(tmp, out_dir)
    except BaseException:
        if writer is not None:
            writer.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        source.close()
    return {"tensors": len(numel), "elements": elements, "seconds": time.perf_counter() - start,
            "bytes": writer.bytes_written, "peak_rss_mb": peak_rss_mb()}


# ==============================================================================================================
# Megatron -> HF
# ==============================================================================================================

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
    bar = _Progress(total, "megatron->hf", progress)
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
                bar.set_postfix_str(_bytes_fmt(total_bytes))
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
