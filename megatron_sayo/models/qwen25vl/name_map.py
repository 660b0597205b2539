"""One name-mapping table between Hugging Face Qwen2.5-VL tensors and megatron parameters, both directions,
and how each megatron tensor's rows are made of its HF tensors' rows (no torch: the converters move bytes).

Megatron names are those of `Qwen25VLModel.state_dict()` with the decoder layer index made global.
HF names are the hub's (`model.*`, `lm_head.*`, `visual.*`); the `model.language_model.*` /
`model.visual.*` layout of recent transformers is normalised to them on read.
Kinds say how a tensor is split over tensor parallel ranks:
  replicated | column (dim 0) | row (dim 1) | vocab (pad rows, then dim 0) | qkv (pack by query group) |
  gate_up (gate and up, each split, then concatenated per rank)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


@dataclass(frozen=True)
class RowSpan:
    """`rows` consecutive rows of a TP=1 megatron tensor: rows [start, start+rows) of HF tensor `source`
    (an index into the rule's HF names), or zero padding when source is None."""

    source: int | None
    start: int
    rows: int


def row_map(rule: Rule, text: TextConfig, hf_rows: list[int], full_rows: int) -> list[RowSpan]:
    """The rows of one layer's TP=1 megatron tensor (`full_rows` of them) in order, as spans of its HF tensors
    (`hf_rows[i]` rows each). QKV interleaves per query group [q heads, k, v]; fc1 is [gate; up]; the
    vocabulary is padded with zero rows."""
    if rule.kind == "qkv":
        groups, hd = text.num_kv_heads, text.head_dim
        q_rows = text.num_heads // groups * hd
        spans = [s for g in range(groups) for s in (RowSpan(0, g * q_rows, q_rows), RowSpan(1, g * hd, hd),
                                                    RowSpan(2, g * hd, hd))]
    else:
        spans = [RowSpan(i, 0, n) for i, n in enumerate(hf_rows)]
    pad = full_rows - sum(s.rows for s in spans)
    if pad < 0 or (pad and rule.kind != "vocab"):
        raise ValueError(f"{rule.megatron}: HF rows {hf_rows} do not make {full_rows} rows")
    return spans + ([RowSpan(None, 0, pad)] if pad else [])


def hf_rows(rule: Rule, text: TextConfig, full_rows: int) -> list[int]:
    """Row counts of the HF tensors behind a TP=1 megatron tensor of `full_rows` rows (columns are shared)."""
    if rule.kind == "vocab":
        return [text.vocab_size]
    if rule.kind == "qkv":
        return [text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim, text.num_kv_heads * text.head_dim]
    if rule.kind == "gate_up":
        return [full_rows // 2, full_rows // 2]
    return [full_rows]
