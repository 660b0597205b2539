"""HF <-> Megatron checkpoint conversion, streaming, in one process, without building the model.

HF -> Megatron reads each layer's TP slice from the safetensors shards and appends it to the torch_dist files
where megatron's TP x PP save would put it (layout: models/qwen25vl/dist_layout.py; files: dist_writer.py).
Megatron -> HF reads one global tensor (one layer of a stacked one) at a time through torch's DCP reader and
writes it into pre-planned safetensors shards with hub names. Both write `<out>.tmp-<pid>` and rename at the
end, and assert that every source tensor was consumed and every target produced. CLIs: tools/convert_*.py.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_sayo.checkpoint import (DTYPES, METADATA_FILE, CheckpointError, copy_side_files, make_metadata,
                                      prepare_output, publish, read_metadata, resolve_checkpoint_dir,
                                      write_json_atomic)

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


# ==============================================================================================================
# HF -> Megatron (one process, no model: each chunk read from the safetensors slices it needs and written where
# the TP x PP ranks of a megatron save would have written it)
# ==============================================================================================================

def expected_hf_shapes(rule, full_shape: tuple[int, ...], text) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors behind a TP=1 megatron tensor of `full_shape` (computed on meta tensors)."""
    from megatron_sayo.models.qwen25vl.weights import full_to_hf

    return [tuple(t.shape) for t in full_to_hf(rule, torch.empty(full_shape, device="meta"), text)]


def _rows(sl, start: int, stop: int) -> torch.Tensor:
    return sl[start:stop]


def read_hf_shard(rule, names: list[str], reader, text, padded_vocab: int, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's slice of a megatron tensor, reading only the bytes it needs from the HF slices."""
    from megatron_sayo.models.qwen25vl.weights import hf_to_full, pack_qkv, shard

    slices = [reader.get_slice(n) for n in names]
    if tp == 1 or rule.kind == "replicated":
        return shard(rule, hf_to_full(rule, [s[:] for s in slices], text, padded_vocab), tp_rank, tp)
    if rule.kind == "vocab":
        (sl,) = slices
        per = padded_vocab // tp
        start, stop = tp_rank * per, min((tp_rank + 1) * per, text.vocab_size)
        w = _rows(sl, start, stop) if stop > start else torch.empty(0, *sl.get_shape()[1:])
        return torch.cat([w, w.new_zeros(per - w.shape[0], *w.shape[1:])]) if w.shape[0] < per else w
    if rule.kind == "column":
        (sl,) = slices
        per = sl.get_shape()[0] // tp
        return _rows(sl, tp_rank * per, (tp_rank + 1) * per)
    if rule.kind == "row":
        (sl,) = slices
        per = sl.get_shape()[1] // tp
        return sl[:, tp_rank * per:(tp_rank + 1) * per]
    if rule.kind == "gate_up":
        parts = []
        for sl in slices:
            per = sl.get_shape()[0] // tp
            parts.append(_rows(sl, tp_rank * per, (tp_rank + 1) * per))
        return torch.cat(parts, dim=0)
    if rule.kind == "qkv":
        q, k, v = slices
        groups, hd = text.num_kv_heads // tp, text.head_dim
        qrows, kvrows = groups * (text.num_heads // text.num_kv_heads) * hd, groups * hd
        return pack_qkv(_rows(q, tp_rank * qrows, (tp_rank + 1) * qrows),
                        _rows(k, tp_rank * kvrows, (tp_rank + 1) * kvrows),
                        _rows(v, tp_rank * kvrows, (tp_rank + 1) * kvrows),
                        text.num_heads // tp, groups, hd)
    raise ValueError(f"unknown split kind {rule.kind!r}")


def _qkv_part_elements(hf_name: str, packed_numel: int, text) -> int:
    """Elements of the q, k or v part inside a packed QKV slice of `packed_numel` elements."""
    per_group = text.num_heads // text.num_kv_heads + 2
    share = (per_group - 2) if ".q_proj." in hf_name else 1
    return packed_numel * share // per_group


def _source_elements(rule, names: list[str], value: torch.Tensor, row_start: int, text) -> dict[str, int]:
    """{hf_name: elements of it inside one TP slice `value`} (vocab padding rows excluded)."""
    if rule.kind == "vocab":
        real = min(max(text.vocab_size - row_start, 0), value.shape[0])
        return {names[0]: real * value[0].numel()}
    if rule.kind == "qkv":
        return {n: _qkv_part_elements(n, value.numel(), text) for n in names}
    return {n: value.numel() // len(names) for n in names}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux VmHWM (ru_maxrss would include the RSS of the parent
    that forked it, which Linux carries across exec), else ru_maxrss."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bytes_fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"


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


def check_hf_checkpoint(hf_dir: str | Path, reader, hf) -> dict[str, tuple[int, ...]]:
    """Validate headers and names before anything is written; returns {hf_name: shape}.

    Raises CheckpointError for a corrupt/truncated safetensors file, a tensor no rule maps, or a layer index
    outside the config.
    """
    from safetensors import safe_open

    from megatron_sayo.models.qwen25vl.weights import match_hf

    files = sorted({f for f, _ in reader.locations.values()})
    shapes = {}
    for file in files:
        path = Path(hf_dir) / file
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the index but missing")
        try:
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own SafetensorError for bad headers/lengths
            raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None
    found = {}
    for name, (file, key) in reader.locations.items():
        if key not in shapes:
            raise CheckpointError(f"{Path(hf_dir) / file}: index lists tensor '{key}' but the file lacks it")
        try:
            rule, fields = match_hf(name)
        except KeyError:
            raise CheckpointError(f"{reader.file_of(name)}: extra tensor '{name}' has no megatron counterpart "
                                  f"(not a Qwen2.5-VL weight)") from None
        if "i" in fields and int(fields["i"]) >= hf.text.num_layers:
            raise CheckpointError(f"{reader.file_of(name)}: extra tensor '{name}': layer {fields['i']} but "
                                  f"config.json has num_hidden_layers={hf.text.num_layers}")
        if rule.megatron == "output_layer.weight" and hf.text.tie_word_embeddings:
            raise CheckpointError(f"{reader.file_of(name)}: extra tensor '{name}': config.json ties the word "
                                  f"embeddings (tie_word_embeddings=true), so lm_head.weight must be absent")
        found[name] = shapes[key]
    return found


def check_hf_shapes(targets, shapes: dict[str, tuple[int, ...]], reader, hf) -> None:
    """Every HF tensor the checkpoint needs is present with the shape config.json implies."""
    from megatron_sayo.models.qwen25vl.weights import hf_names

    text = hf.text
    for target in targets:
        for layer in (range(text.num_layers) if target.stacked else [None]):
            names = hf_names(target.rule, target.fields(layer), text.tie_word_embeddings)
            full = target.shape[1:] if target.stacked else target.shape
            if target.rule.kind == "vocab":
                full = (text.vocab_size, *full[1:])
            for hf_name, want in zip(names, expected_hf_shapes(target.rule, full, text)):
                where = f"(needed for megatron '{target.megatron_name(layer)}')"
                if hf_name not in shapes:
                    raise CheckpointError(f"{reader.dir}: missing tensor '{hf_name}' {where}")
                got = shapes[hf_name]
                if got != want:
                    raise CheckpointError(f"{reader.file_of(hf_name)}: tensor '{hf_name}' has shape {list(got)}, "
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


def stream_hf_to_dist(reader, hf, layout, dtype: torch.dtype, writer, progress) -> dict[str, dict[str, int]]:
    """Write every chunk of the checkpoint from the HF reader; returns {hf_name: {target: elements read}}.

    One layer of one tensor is in memory at a time; the reader's file mappings are dropped after each, so
    resident memory stays at that size whatever the checkpoint's.
    """
    from megatron_sayo.models.qwen25vl import dist_layout
    from megatron_sayo.models.qwen25vl.hf_config import padded_vocab_size
    from megatron_sayo.models.qwen25vl.weights import hf_names

    text = hf.text
    padded = padded_vocab_size(text.vocab_size, layout.tp)
    reads: dict[str, dict[str, int]] = {}
    for target in dist_layout.targets(hf, layout.tp):
        by_layer: dict[int | None, list] = {}
        for chunk in dist_layout.chunks(target, layout, text.num_layers):
            by_layer.setdefault(chunk.layer, []).append(chunk)
        for layer, layer_chunks in by_layer.items():
            names = hf_names(target.rule, target.fields(layer), text.tie_word_embeddings)
            tp = 1 if target.rule.kind == "replicated" else layout.tp
            for r in range(tp):
                value = read_hf_shard(target.rule, names, reader, text, padded, r, tp).to(
                    target.stored_dtype(dtype))
                for n, count in _source_elements(target.rule, names, value, r * value.shape[0], text).items():
                    by_target = reads.setdefault(n, {})
                    by_target[target.megatron_name(layer)] = by_target.get(target.megatron_name(layer), 0) + count
                mine = [c for c in layer_chunks if c.tp_rank == r]
                pieces = value.chunk(2, dim=0) if target.rule.kind == "gate_up" else (value,)
                for chunk, piece in zip(mine, pieces):
                    writer.add_chunk(target.key, target.shape, chunk.offsets,
                                     piece.unsqueeze(0) if layer is not None else piece, rank=chunk.file_rank)
                progress.bytes_done += value.numel() * value.element_size()
                del value, pieces
            reader.close()
            progress.update(1)
            progress.set_postfix_str(_bytes_fmt(progress.bytes_done))
    per_stage = text.num_layers // layout.pp
    for key, layer in dist_layout.extra_states(hf):
        writer.add_object(key, [None], rank=layer // per_stage * layout.tp)   # megatron saves [None] per linear
    return reads


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1,
                           dtype: str = "keep", overwrite: bool = False, progress: bool = True,
                           _fail_after: int | None = None) -> dict:
    """HF checkpoint dir -> megatron dist checkpoint laid out for TP x PP (loadable at any). Returns a summary.

    One process streams the tensors (no model, no process group): memory is bounded by one layer of the
    largest tensor, not by the model.
    """
    from megatron_sayo.dist_writer import TorchDistWriter
    from megatron_sayo.models.qwen25vl import dist_layout
    from megatron_sayo.models.qwen25vl.hf_config import ParallelLayout, load_hf_config, validate_layout
    from megatron_sayo.models.qwen25vl.weights import HFCheckpointReader

    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    hf = load_hf_config(hf_dir)
    layout = ParallelLayout(tp, pp)
    validate_layout(hf, layout)
    dtype_name = hf.torch_dtype if dtype == "keep" else dtype
    if dtype_name not in DTYPES:
        raise CheckpointError(f"dtype {dtype_name!r} (from {'config.json torch_dtype' if dtype == 'keep' else '--dtype'})"
                              f" is not one of {sorted(DTYPES)}")
    try:
        reader = HFCheckpointReader(hf_dir)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{hf_dir}: cannot read the weights ({exc})") from None
    except Exception as exc:  # safetensors' SafetensorError: bad header or truncated data
        raise CheckpointError(f"{hf_dir / 'model.safetensors'}: corrupt safetensors file ({exc})") from None
    shapes = check_hf_checkpoint(hf_dir, reader, hf)
    numel = {name: int(np.prod(shape)) for name, shape in shapes.items()}
    targets = dist_layout.targets(hf, tp)
    check_hf_shapes(targets, shapes, reader, hf)
    tmp = prepare_output(out_dir, overwrite)
    writer = TorchDistWriter(tmp)
    total = sum(hf.text.num_layers if t.stacked else 1 for t in targets)
    bar = _Progress(total, "hf->megatron", progress)
    if _fail_after is not None:
        bar = _FailAfter(bar, _fail_after)
    try:
        reads = stream_hf_to_dist(reader, hf, layout, DTYPES[dtype_name], writer, bar)
        elements = verify_consumed(numel, reads)
        writer.finish()
        copy_side_files(hf_dir, tmp)
        write_json_atomic(tmp / METADATA_FILE, make_metadata(
            "converted", source=str(hf_dir.resolve()), dtype=dtype_name, tp=tp, pp=pp,
            source_dtype=hf.torch_dtype, hf_tensors=len(numel), hf_elements=elements))
        publish(tmp, out_dir)
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        reader.close()
    return {"tensors": len(numel), "elements": elements, "seconds": time.perf_counter() - start,
            "bytes": writer.bytes_written, "peak_rss_mb": peak_rss_mb()}


# ==============================================================================================================
# Megatron -> HF (model-free: one global tensor slice at a time, streamed into safetensors files)
# ==============================================================================================================

@dataclass(frozen=True)
class ExportItem:
    """One HF output tensor: where it comes from in the dist checkpoint and how it is cut out."""

    hf_name: str
    shape: tuple[int, ...]
    key: str                 # dist checkpoint key
    layer: int | None        # index on the stacked leading axis, None when not stacked
    part: int                # which of full_to_hf's outputs
    megatron_name: str


def plan_export(tensors_meta: dict, text, kind: str) -> tuple[list[ExportItem], dict[str, int]]:
    """HF tensors to write, in source order, from the checkpoint's tensor metadata; + source elements per key.

    Keys that map to no rule are an error for converted checkpoints and skipped (optimizer state etc.) for
    trained ones.
    """
    from megatron_sayo.models.qwen25vl.weights import full_to_hf, hf_names, match_megatron

    items, used = [], {}
    for key in sorted(tensors_meta):
        shape = tuple(tensors_meta[key].global_shape)
        stacked = key.startswith("decoder.layers.")
        layers = range(shape[0]) if stacked else [None]
        if stacked and shape[0] != text.num_layers:
            raise CheckpointError(f"checkpoint tensor '{key}' stacks {shape[0]} layers; config.json has "
                                  f"num_hidden_layers={text.num_layers}")
        try:
            match_megatron(key.replace("decoder.layers.", "decoder.layers.0.", 1) if stacked else key)
        except KeyError:
            if key.startswith("optimizer") or kind != "converted":
                continue
            raise CheckpointError(f"checkpoint tensor '{key}' has no HF counterpart") from None
        for layer in layers:
            name = key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1) if stacked else key
            rule, fields = match_megatron(name)
            if rule.megatron == "output_layer.weight" and text.tie_word_embeddings:
                continue  # the hub omits lm_head when embeddings are tied; save_pretrained does too
            full_shape = shape[1:] if stacked else shape
            outs = full_to_hf(rule, torch.empty(full_shape, device="meta"), text)
            for part, (hf_name, t) in enumerate(zip(hf_names(rule, fields), outs)):
                items.append(ExportItem(hf_name, tuple(t.shape), key, layer, part, name))
        used[key] = int(np.prod(shape))
    items.sort(key=lambda it: (it.layer is not None, it.layer or 0))  # layer-major, like the hub's files
    return items, used


def shard_plan(items: list[ExportItem], dtype: torch.dtype, max_shard_bytes: int) -> list[list[ExportItem]]:
    """Group items (in order) into files of at most max_shard_bytes (a bigger single tensor gets its own)."""
    shards, cur, size = [], [], 0
    esize = torch.empty(0, dtype=dtype).element_size()
    for it in items:
        n = int(np.prod(it.shape)) * esize
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    if cur:
        shards.append(cur)
    return shards


def safetensors_header(items: list[ExportItem], dtype: torch.dtype) -> tuple[bytes, list[int]]:
    """The 8-byte length + JSON header of a safetensors file holding `items`, and each item's byte size."""
    esize = torch.empty(0, dtype=dtype).element_size()
    header, offset, sizes = {"__metadata__": {"format": "pt"}}, 0, []
    for it in items:
        n = int(np.prod(it.shape)) * esize
        header[it.hf_name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(it.shape),
                              "data_offsets": [offset, offset + n]}
        offset += n
        sizes.append(n)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


class _SlicePlanner:
    """dcp load planner that reads each requested tensor at a given global offset (a slice of a global tensor)."""

    @staticmethod
    def make(offsets: dict[str, tuple[int, ...]]):
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        class Planner(DefaultLoadPlanner):
            def create_local_plan(self):
                reads = []
                for fqn, t in self.state_dict.items():
                    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[fqn]), sizes=t.size())
                    reads += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
                return LoadPlan(reads)

            def lookup_tensor(self, index):
                return self.state_dict[index.fqn]

        return Planner(flatten_state_dict=False, flatten_sharded_tensors=False)


class DistCheckpointReader:
    """Reads global tensors, or one layer of a stacked one, from a torch_dist checkpoint in one process
    (torch.distributed.checkpoint's reader; no model, no process group)."""

    def __init__(self, ckpt_dir: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = Path(ckpt_dir)
        try:
            md = FileSystemReader(str(self.dir)).read_metadata()
        except Exception as exc:
            raise CheckpointError(f"{self.dir / '.metadata'}: cannot read the dist checkpoint metadata "
                                  f"({type(exc).__name__}: {exc})") from None
        self.meta = {k: _TensorMeta(tuple(v.size), v.properties.dtype)
                     for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

        class _Reader(FileSystemReader):   # the .metadata pickle is read once, not once per load call
            def read_metadata(self, *args, **kwargs):
                return md

        self._reader = _Reader(str(self.dir))

    def load(self, requests: list[tuple[str, int | None]]) -> dict[tuple[str, int | None], torch.Tensor]:
        """{(key, layer): tensor} for each requested global tensor (layer=None) or layer of a stacked one."""
        from torch.distributed.checkpoint import load as dcp_load

        state, offsets = {}, {}
        for key, layer in requests:
            m = self.meta[key]
            if layer is None:
                state[key], offsets[key] = torch.empty(m.global_shape, dtype=m.dtype), (0,) * len(m.global_shape)
            else:
                state[key] = torch.empty((1, *m.global_shape[1:]), dtype=m.dtype)
                offsets[key] = (layer,) + (0,) * (len(m.global_shape) - 1)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp_load(state, storage_reader=self._reader, planner=_SlicePlanner.make(offsets), no_dist=True)
        except Exception as exc:
            raise CheckpointError(f"{self.dir}: reading {[k for k, _ in requests]} failed "
                                  f"({type(exc).__name__}: {exc})") from None
        return {(key, layer): state[key] if layer is None else state[key][0] for key, layer in requests}


@dataclass(frozen=True)
class _TensorMeta:
    global_shape: tuple[int, ...]
    dtype: torch.dtype


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes (decimal units as transformers uses)."""
    text = str(text).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def _group_loads(items: list[ExportItem], per_load: int) -> list[list[tuple[str, int | None]]]:
    """Distinct (key, layer) sources in item order, `per_load` of them per dist_checkpointing.load call."""
    seen, batches, cur = set(), [], []
    for it in items:
        src = (it.key, it.layer)
        if src in seen:
            continue
        seen.add(src)
        if len(cur) >= per_load or any(k == src[0] for k, _ in cur):  # one slice per key per load call
            batches.append(cur)
            cur = []
        cur.append(src)
    if cur:
        batches.append(cur)
    return batches


def convert_megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, *, max_shard_size: str | int = "5GB",
                           dtype: str | None = None, overwrite: bool = False, progress: bool = True,
                           _fail_after: int | None = None) -> dict:
    """Megatron dist checkpoint (converted, or a trainer's step/run dir: policy weights only) -> HF directory.

    Streams: one global tensor (one layer of a stacked one) in memory at a time, written straight into
    pre-planned safetensors files. Output dtype: `dtype`, else config.json's torch_dtype (the original one).
    """
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config


    start = time.perf_counter()
    ckpt = resolve_checkpoint_dir(megatron_dir)
    meta = read_metadata(ckpt)
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{ckpt}: no config.json (needed to name and shape the HF tensors)")
    hf = load_hf_config(ckpt)
    out_dtype = DTYPES.get(dtype or meta.get("source_dtype") or hf.torch_dtype)
    if out_dtype is None:
        raise CheckpointError(f"output dtype {dtype or hf.torch_dtype!r} is not one of {sorted(DTYPES)}")
    reader = DistCheckpointReader(ckpt)
    items, used = plan_export(reader.meta, hf.text, meta.get("kind", "converted"))
    missing = _missing_hf_tensors(items, hf)
    if missing:
        raise CheckpointError(f"{ckpt}: checkpoint lacks tensors for {missing[:5]} ({len(missing)} in all)")
    shards = shard_plan(items, out_dtype, parse_size(max_shard_size))
    tmp = prepare_output(out_dir, overwrite)
    try:
        written = _write_shards(reader, shards, out_dtype, hf.text, tmp, progress, _fail_after)
        if written != len(items) or len({it.hf_name for it in items}) != len(items):
            raise CheckpointError(f"wrote {written} tensors, planned {len(items)} (duplicate names?)")
        _check_elements(items, used, hf.text, reader.meta)
        copy_side_files(ckpt, tmp)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"tensors": len(items), "files": len(shards), "seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(), "dtype": str(out_dtype)}


def _missing_hf_tensors(items: list[ExportItem], hf) -> list[str]:
    """Expected HF names (from the config) that the plan does not produce."""
    have = {it.hf_name for it in items}
    t = hf.text
    want = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if t.tie_word_embeddings else ["lm_head.weight"])
    for i in range(t.num_layers):
        want += [f"model.layers.{i}.{n}" for n in (
            "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
            "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
            "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight")]
    missing = [n for n in want if n not in have]
    if not any(n.startswith("visual.") for n in have):
        missing.append("visual.*")
    return missing


def _check_elements(items: list[ExportItem], used: dict[str, int], text, meta) -> None:
    """Every consumed source element accounted for in the output (minus vocab padding and tied copies)."""
    out = sum(int(np.prod(it.shape)) for it in items)
    src = 0
    for key, n in used.items():
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if key == "output_layer.weight" and text.tie_word_embeddings:
                continue
            n = text.vocab_size * int(np.prod(meta[key].global_shape[1:]))
        src += n
    if out != src:
        raise CheckpointError(f"element totals differ: output {out}, checkpoint {src}")


def _write_shards(reader, shards, dtype, text, out: Path, progress: bool, fail_after: int | None) -> int:
    """Write every planned shard file (+ index when more than one); returns the tensor count written."""
    from megatron_sayo.models.qwen25vl.weights import full_to_hf, match_megatron

    total = sum(len(s) for s in shards)
    bar = _Progress(total, "megatron->hf", progress)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total_bytes, written = {}, 0, 0
    for fname, shard_items in zip(names, shards):
        header, sizes = safetensors_header(shard_items, dtype)
        offsets = dict(zip((it.hf_name for it in shard_items), np.cumsum([0] + sizes[:-1]).tolist()))
        with open(out / fname, "wb") as f:
            f.write(header)
            for batch in _group_loads(shard_items, 8):
                loaded = reader.load(batch)
                for (key, layer), full in loaded.items():
                    name = key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1) if layer is not None else key
                    rule, _ = match_megatron(name)
                    parts = full_to_hf(rule, full, text)
                    for it in (i for i in shard_items if (i.key, i.layer) == (key, layer)):
                        t = parts[it.part].to(dtype).contiguous()
                        if tuple(t.shape) != it.shape:
                            raise CheckpointError(f"'{it.hf_name}': got shape {list(t.shape)}, planned {list(it.shape)}")
                        f.seek(len(header) + offsets[it.hf_name])
                        f.write(t.reshape(-1).view(torch.uint8).numpy())
                        weight_map[it.hf_name] = fname
                        written += 1
                        total_bytes += t.numel() * t.element_size()
                        bar.bytes_done = total_bytes
                        bar.update(1)
                        bar.set_postfix_str(_bytes_fmt(total_bytes))
                        if fail_after is not None and written > fail_after:
                            raise RuntimeError("simulated interruption")
                del loaded
            f.flush()
            os.fsync(f.fileno())
    bar.close()
    if len(shards) > 1:
        write_json_atomic(out / "model.safetensors.index.json",
                          {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
    return written
