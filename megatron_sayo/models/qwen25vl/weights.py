"""Qwen2.5-VL weights in torch: HF tensors <-> TP=1 megatron tensors <-> TP shards (the rows follow
name_map.row_map), and lazy reading of HF safetensors checkpoints into a model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_sayo.formats.safetensors_files import weight_files
from megatron_sayo.models.qwen25vl.hf_config import TextConfig
from megatron_sayo.models.qwen25vl.name_map import Rule, hf_names, hf_rows, match_megatron, normalize_hf_name, row_map

# ---------------------------------------------------------------------------------------------------------
# Tensor transforms. `full` means the TP=1 megatron tensor; a shard is one TP rank's slice of it.
# ---------------------------------------------------------------------------------------------------------

def hf_to_full(rule: Rule, tensors: list[torch.Tensor], text: TextConfig, padded_vocab: int) -> torch.Tensor:
    """The TP=1 megatron tensor from its HF tensors."""
    rows = [t.shape[0] for t in tensors]
    full_rows = padded_vocab if rule.kind.padded else sum(rows)
    w = tensors[0]
    return torch.cat([tensors[s.source][s.start:s.start + s.rows] if s.source is not None
                      else w.new_zeros(s.rows, *w.shape[1:]) for s in row_map(rule, text, rows, full_rows)])


def full_to_hf(rule: Rule, full: torch.Tensor, text: TextConfig) -> list[torch.Tensor]:
    """The HF tensors of a TP=1 megatron tensor (inverse of hf_to_full)."""
    spans, parts, pos = row_map(rule, text, hf_rows(rule, text, full.shape[0]), full.shape[0]), {}, 0
    for s in spans:
        if s.source is not None:
            parts.setdefault(s.source, []).append(full[pos:pos + s.rows])
        pos += s.rows
    return [torch.cat(parts[i]) for i in sorted(parts)]


def _block(t: torch.Tensor, offsets: tuple[int, ...], sizes: tuple[int, ...]):
    """The view of `t` at the rectangle (offsets, sizes)."""
    return t[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]


def shard(rule: Rule, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's slice of a TP=1 megatron tensor: its rectangles (rule.kind.tp_pieces) stacked on dim 0."""
    pieces = rule.kind.tp_pieces(tuple(full.shape), tp, tp_rank)
    return torch.cat([_block(full, o, n) for o, n in pieces]) if len(pieces) > 1 else _block(full, *pieces[0])


def unshard(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """The TP=1 megatron tensor from every TP rank's slice, in rank order (inverse of shard)."""
    kind, tp = rule.kind, len(shards)
    if kind.split_dim is None or tp == 1:
        return shards[0]
    shape = list(shards[0].shape)
    shape[kind.split_dim] *= tp
    full = shards[0].new_empty(shape)
    for rank, s in enumerate(shards):
        pos = 0
        for offsets, sizes in kind.tp_pieces(tuple(shape), tp, rank):
            _block(full, offsets, sizes).copy_(s[pos:pos + sizes[0]])
            pos += sizes[0]
    return full


# ---------------------------------------------------------------------------------------------------------
# Lazy reading of HF safetensors checkpoints (single file or sharded with an index).
# ---------------------------------------------------------------------------------------------------------

class HFCheckpointReader:
    """Tensor-by-tensor access to an HF checkpoint directory; memory never holds more than asked for."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        weight_map = weight_files(self.dir)
        self._files: dict[str, object] = {}
        self._safe_open = safe_open
        self.locations = {normalize_hf_name(k): (f, k) for k, f in weight_map.items()}

    def names(self) -> list[str]:
        return sorted(self.locations)

    def _handle(self, file: str):
        if file not in self._files:
            path = self.dir / file
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in the index but missing")
            self._files[file] = self._safe_open(path, "pt")
        return self._files[file]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.locations:
            raise KeyError(f"{self.dir}: tensor '{name}' not found in the checkpoint")
        file, key = self.locations[name]
        return self._handle(file).get_tensor(key)

    def get_slice(self, name: str):
        """safetensors' lazy slice of a tensor (`.get_shape()`, `[a:b]`, `[:, a:b]` read only those bytes)."""
        if name not in self.locations:
            raise KeyError(f"{self.dir}: tensor '{name}' not found in the checkpoint")
        file, key = self.locations[name]
        return self._handle(file).get_slice(key)

    def file_of(self, name: str) -> Path:
        return self.dir / self.locations[name][0]

    def close(self) -> None:
        self._files.clear()


def load_hf_into_model(model, reader: HFCheckpointReader, text: TextConfig, tp_rank: int, tp: int) -> int:
    """Copy HF weights into this rank's megatron model in place; returns the count of parameters filled."""
    filled = 0
    for name, param in model.state_dict(keep_vars=True).items():
        if name.endswith("._extra_state") or not isinstance(param, torch.Tensor):
            continue
        global_name = model.global_param_name(name)
        rule, fields = match_megatron(global_name)
        tensors = [reader.get(n) for n in hf_names(rule, fields, text.tie_word_embeddings)]
        full = hf_to_full(rule, tensors, text, model.padded_vocab_size)
        value = shard(rule, full, tp_rank, tp)
        if value.shape != param.shape:
            raise ValueError(f"{global_name}: HF tensors give shape {tuple(value.shape)}, model expects "
                             f"{tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        filled += 1
    return filled
