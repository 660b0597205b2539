"""HF -> Megatron checkpoint conversion, streaming, in one process, without torch and without a model.

A byte move planned from config.json alone: each megatron chunk (one layer x one TP rank's slice, where
megatron's TP x PP save puts it: models/qwen25vl/dist_layout.py) is a rectangle of the TP=1 tensor, whose rows
are row ranges of HF tensors (name_map.row_map). tensor_copy.py moves whole rows in the kernel and slices or
casts through a bounded buffer; torch_save_writer.py and dcp_metadata.py frame the torch.save records and
the DCP metadata. Writes `<out>.tmp-<pid>`, fsyncs, renames at the end, and asserts that every source tensor was
consumed and every target produced. CLI: tools/convert_hf_to_megatron.py; the other direction: megatron_to_hf.py.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

from megatron_sayo.checkpoint.files import (
    METADATA_FILE,
    CheckpointError,
    check_output_location,
    copy_side_files,
    make_metadata,
    prepare_output,
)
from megatron_sayo.convert.progress import FailAfter, Progress, bytes_fmt, terminate_as_interrupt
from megatron_sayo.convert.rectangles import rectangle, span_pieces
from megatron_sayo.formats.atomic import publish_dir, write_json_atomic
from megatron_sayo.formats.dtypes import DTYPES
from megatron_sayo.formats.safetensors_files import Entry, read_header, weight_files
from megatron_sayo.formats.tensor_copy import CAST_DTYPES, StoredMatrix, as_matrix, write_matrix
from megatron_sayo.memory import peak_rss_mb
from megatron_sayo.models.qwen25vl import dist_layout
from megatron_sayo.models.qwen25vl.hf_config import ParallelLayout, load_hf_config, validate_layout
from megatron_sayo.models.qwen25vl.name_map import hf_names, hf_rows, match_hf, normalize_hf_name, row_map


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
            progress.set_postfix_str(bytes_fmt(progress.bytes_done))
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
        where = "config.json torch_dtype" if dtype == "keep" else "--dtype"
        raise CheckpointError(f"dtype {dtype_name!r} (from {where})"
                              f" is not one of {list(CAST_DTYPES)}")
    source = HFSource(hf_dir)
    check_hf_checkpoint(source, hf)
    numel = {name: math.prod(e.shape) for name, e in source.entries.items()}
    targets = dist_layout.targets(hf, tp)
    check_hf_shapes(targets, source, hf)
    check_output_location(out_dir, [hf_dir])
    total = sum(hf.text.num_layers if t.stacked else 1 for t in targets)
    bar = Progress(total, "hf->megatron (megatron tensors)", progress)   # fused qkv / fc1: fewer than HF's
    if _fail_after is not None:
        bar = FailAfter(bar, _fail_after)
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
    return {"tensors": len(numel), "megatron_tensors": total, "elements": elements,
            "seconds": time.perf_counter() - start,
            "bytes": writer.bytes_written, "peak_rss_mb": peak_rss_mb()}


