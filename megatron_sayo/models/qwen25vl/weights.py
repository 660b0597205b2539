"""One name-mapping table between Hugging Face Qwen2.5-VL tensors and megatron parameters, both directions.

Megatron names are those of `Qwen25VLModel.state_dict()` with the decoder layer index made global.
HF names are the hub's (`model.*`, `lm_head.*`, `visual.*`); the `model.language_model.*` /
`model.visual.*` layout of recent transformers is normalised to them on read.
Kinds say how a tensor is split over tensor parallel ranks:
  replicated | column (dim 0) | row (dim 1) | vocab (pad rows, then dim 0) | qkv (pack by query group) |
  gate_up (gate and up, each split, then concatenated per rank)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sayo.models.qwen25vl.hf_config import TextConfig


@dataclass(frozen=True)
class Rule:
    megatron: str          # may contain {i} (global 0-based decoder layer) or {v} (vision suffix)
    hf: tuple[str, ...]
    kind: str


RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    Rule("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), "replicated"),
    Rule("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         "replicated"),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.weight",
         tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.bias",
         tuple(f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
    Rule("decoder.layers.{i}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",), "row"),
    Rule("decoder.layers.{i}.mlp.linear_fc1.weight",
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "gate_up"),
    Rule("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), "row"),
    Rule("vision.{v}", ("visual.{v}",), "replicated"),
)

# TE layer specs fuse the norms into the following linear; megatron maps these names on checkpoint save.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{v\}", r"(?P<v>.+)") + "$")


_MEGATRON_PATTERNS = [(_pattern(r.megatron), r) for r in RULES]
_HF_PATTERNS = [(_pattern(h), r, n) for r in RULES for n, h in enumerate(r.hf)]


def normalize_hf_name(name: str) -> str:
    """Hub name for a tensor name of either transformers layout."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def match_megatron(name: str) -> tuple[Rule, dict[str, str]]:
    """The rule for a megatron parameter name and its {i}/{v} fields; KeyError when unmapped."""
    for old, new in TE_ALIASES.items():
        name = name.replace(old, new)
    for pattern, rule in _MEGATRON_PATTERNS:
        m = pattern.match(name)
        if m:
            return rule, m.groupdict()
    raise KeyError(f"no HF mapping for megatron parameter '{name}'")


def match_hf(name: str) -> tuple[Rule, dict[str, str]]:
    """The rule for an HF tensor name (either layout) and its fields; KeyError when unmapped."""
    name = normalize_hf_name(name)
    for pattern, rule, _ in _HF_PATTERNS:
        m = pattern.match(name)
        if m:
            return rule, m.groupdict()
    raise KeyError(f"HF tensor '{name}' has no megatron counterpart")


def hf_names(rule: Rule, fields: dict[str, str], tied: bool = False) -> list[str]:
    """HF tensor names behind a megatron tensor; a tied output layer reads the input embeddings."""
    if tied and rule.megatron == "output_layer.weight":
        return ["model.embed_tokens.weight"]
    return [h.format(**fields) for h in rule.hf]


def megatron_name(rule: Rule, fields: dict[str, str]) -> str:
    return rule.megatron.format(**fields)


# ---------------------------------------------------------------------------------------------------------
# Tensor transforms. `full` means the TP=1 megatron tensor; a shard is one TP rank's slice of it.
# ---------------------------------------------------------------------------------------------------------

def hf_to_full(rule: Rule, tensors: list[torch.Tensor], text: TextConfig, padded_vocab: int) -> torch.Tensor:
    """The TP=1 megatron tensor from its HF tensors."""
    if rule.kind == "vocab":
        (w,) = tensors
        return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])]) if padded_vocab > w.shape[0] else w
    if rule.kind == "qkv":
        return pack_qkv(*tensors, text.num_heads, text.num_kv_heads, text.head_dim)
    if rule.kind == "gate_up":
        return torch.cat(tensors, dim=0)
    (w,) = tensors
    return w


def full_to_hf(rule: Rule, full: torch.Tensor, text: TextConfig) -> list[torch.Tensor]:
    """The HF tensors of a TP=1 megatron tensor (inverse of hf_to_full)."""
    if rule.kind == "vocab":
        return [full[:text.vocab_size]]
    if rule.kind == "qkv":
        return list(unpack_qkv(full, text.num_heads, text.num_kv_heads, text.head_dim))
    if rule.kind == "gate_up":
        return list(full.chunk(2, dim=0))
    return [full]


def shard(rule: Rule, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's slice of a TP=1 megatron tensor."""
    if tp == 1 or rule.kind == "replicated":
        return full
    if rule.kind in ("column", "vocab", "qkv"):  # qkv is packed by query group, so contiguous groups split
        return full.chunk(tp, dim=0)[tp_rank]
    if rule.kind == "row":
        return full.chunk(tp, dim=1)[tp_rank]
    if rule.kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    raise ValueError(f"unknown split kind {rule.kind!r}")


def unshard(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """The TP=1 megatron tensor from every TP rank's slice, in rank order (inverse of shard)."""
    if len(shards) == 1 or rule.kind == "replicated":
        return shards[0]
    if rule.kind in ("column", "vocab", "qkv"):
        return torch.cat(shards, dim=0)
    if rule.kind == "row":
        return torch.cat(shards, dim=1)
    if rule.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown split kind {rule.kind!r}")


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Megatron's fused QKV: for each query group g, [its q heads, k_g, v_g] along dim 0."""
    rest = q.shape[1:]
    qg = q.reshape(groups, heads // groups * head_dim, *rest)
    kg = k.reshape(groups, head_dim, *rest)
    vg = v.reshape(groups, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def unpack_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Inverse of pack_qkv: (q, k, v)."""
    rest = qkv.shape[1:]
    per_group = (heads // groups + 2) * head_dim
    g = qkv.reshape(groups, per_group, *rest)
    nq = heads // groups * head_dim
    q, k, v = g[:, :nq], g[:, nq:nq + head_dim], g[:, nq + head_dim:]
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(), v.reshape(-1, *rest).contiguous())


# ---------------------------------------------------------------------------------------------------------
# Lazy reading of HF safetensors checkpoints (single file or sharded with an index).
# ---------------------------------------------------------------------------------------------------------

class HFCheckpointReader:
    """Tensor-by-tensor access to an HF checkpoint directory; memory never holds more than asked for."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(self.dir / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
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
        full = hf_to_full(rule, [reader.get(n) for n in hf_names(rule, fields, text.tie_word_embeddings)], text, model.padded_vocab_size)
        value = shard(rule, full, tp_rank, tp)
        if value.shape != param.shape:
            raise ValueError(f"{global_name}: HF tensors give shape {tuple(value.shape)}, model expects "
                             f"{tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        filled += 1
    return filled
