"""One name-mapping table between Hugging Face Qwen2.5-VL tensors and megatron parameters, both directions,
and how each megatron tensor's rows are made of its HF tensors' rows (no torch: the converters move bytes).

Megatron names are those of `Qwen25VLModel.state_dict()` with the decoder layer index made global.
HF names are the hub's (`model.*`, `lm_head.*`, `visual.*`); the `model.language_model.*` /
`model.visual.*` layout of recent transformers is normalised to them on read.
Each rule has a conversion Kind, the one record of how its tensor is made and split: which HF rows make the
TP=1 megatron rows (row_map), and which rectangles of it each tensor-parallel rank holds (tp_pieces). The
converters, the dist checkpoint layout and the torch weight loader all read these; nothing else interprets a
kind. Kinds: replicated | row (dim 1 split) | vocab (zero rows padded, dim 0 split) | qkv (packed per query
group, dim 0 split) | gate_up ([gate; up], each half split on dim 0, a rank holds its slice of both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_sayo.models.qwen25vl.hf_config import TextConfig


@dataclass(frozen=True)
class RowSpan:
    """`rows` consecutive rows of a TP=1 megatron tensor: rows [start, start+rows) of HF tensor `source`
    (an index into the rule's HF names), or zero padding when source is None."""

    source: int | None
    start: int
    rows: int


@dataclass(frozen=True)
class Kind:
    """How one kind of tensor is converted: its HF rows, and its split over tensor-parallel ranks."""

    name: str
    split_dim: int | None      # the dim cut over TP ranks; None: every rank holds all of it
    blocks: int = 1            # dim-0 blocks split separately (gate_up: gate and up)
    padded: bool = False       # zero rows after the HF rows (the vocabulary, padded for TP)

    def hf_rows(self, text: TextConfig, full_rows: int) -> list[int]:
        """Row counts of the HF tensors behind a TP=1 tensor of `full_rows` rows (columns are shared)."""
        if self.padded:
            return [text.vocab_size]
        if self.name == "qkv":
            kv = text.num_kv_heads * text.head_dim
            return [text.num_heads * text.head_dim, kv, kv]
        return [full_rows // self.blocks] * self.blocks

    def row_map(self, text: TextConfig, hf_rows: list[int], full_rows: int) -> list[RowSpan]:
        """The TP=1 tensor's rows in order as spans of its HF tensors (`hf_rows[i]` rows each): qkv interleaves
        per query group [q heads, k, v]; others stack their HF tensors; padding is zero rows."""
        if self.name == "qkv":
            groups, hd = text.num_kv_heads, text.head_dim
            q_rows = text.num_heads // groups * hd
            spans = [s for g in range(groups) for s in (RowSpan(0, g * q_rows, q_rows), RowSpan(1, g * hd, hd),
                                                        RowSpan(2, g * hd, hd))]
        else:
            spans = [RowSpan(i, 0, n) for i, n in enumerate(hf_rows)]
        pad = full_rows - sum(s.rows for s in spans)
        if pad < 0 or (pad and not self.padded):
            raise ValueError(f"{self.name}: HF rows {hf_rows} do not make {full_rows} rows")
        return spans + ([RowSpan(None, 0, pad)] if pad else [])

    def tp_pieces(self, shape: tuple[int, ...], tp: int, rank: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(offsets, sizes) of the rectangles of a TP=1 tensor of `shape` that TP rank `rank` holds, in the
        order its shard stacks them on dim 0 (one rectangle unless the kind has several blocks)."""
        if self.split_dim is None or tp == 1:
            return [((0,) * len(shape), tuple(shape))]
        d = self.split_dim
        block = shape[d] // self.blocks
        if block % tp:
            raise ValueError(f"{self.name}: dim {d} of {list(shape)} does not split into {self.blocks} x {tp}")
        per = block // tp
        sizes = tuple(per if i == d else n for i, n in enumerate(shape))
        return [(tuple(b * block + rank * per if i == d else 0 for i in range(len(shape))), sizes)
                for b in range(self.blocks)]


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("replicated", None), Kind("row", 1), Kind("vocab", 0, padded=True), Kind("qkv", 0),
    Kind("gate_up", 0, blocks=2))}


@dataclass(frozen=True)
class Rule:
    megatron: str          # may contain {i} (global 0-based decoder layer) or {v} (vision suffix)
    hf: tuple[str, ...]
    kind: Kind


def _rule(megatron: str, hf: tuple[str, ...], kind: str) -> Rule:
    return Rule(megatron, hf, KINDS[kind])


RULES: tuple[Rule, ...] = (
    _rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    _rule("output_layer.weight", ("lm_head.weight",), "vocab"),
    _rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    _rule("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), "replicated"),
    _rule("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
          "replicated"),
    _rule("decoder.layers.{i}.self_attention.linear_qkv.weight",
          tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    _rule("decoder.layers.{i}.self_attention.linear_qkv.bias",
          tuple(f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
    _rule("decoder.layers.{i}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",),
          "row"),
    _rule("decoder.layers.{i}.mlp.linear_fc1.weight",
          ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "gate_up"),
    _rule("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), "row"),
    _rule("vision.{v}", ("visual.{v}",), "replicated"),
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


def row_map(rule: Rule, text: TextConfig, hf_rows: list[int], full_rows: int) -> list[RowSpan]:
    """The rows of one layer's TP=1 megatron tensor as spans of its HF tensors (rule.kind.row_map)."""
    try:
        return rule.kind.row_map(text, hf_rows, full_rows)
    except ValueError as exc:
        raise ValueError(f"{rule.megatron}: {exc}") from None


def hf_rows(rule: Rule, text: TextConfig, full_rows: int) -> list[int]:
    """Row counts of the HF tensors behind a TP=1 megatron tensor of `full_rows` rows (rule.kind.hf_rows)."""
    return rule.kind.hf_rows(text, full_rows)
