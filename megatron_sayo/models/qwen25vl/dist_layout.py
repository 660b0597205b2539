"""The torch_dist checkpoint layout of Qwen25VLModel, derived from the config alone (no model, no megatron).

What megatron's `dist_checkpointing.save(model.sharded_state_dict())` writes for our model at TP x PP: every
global tensor is the TP=1 megatron tensor, decoder tensors stacked over layers on a leading axis under
`decoder.layers.<name>` (the local spec's norms under TE's `layer_norm_weight` names), SwiGLU fc1 stored as
separate gate and up chunks, and one `_extra_state` object per linear. The streaming HF -> Megatron
converter writes exactly this, chunk by chunk as the TP x PP ranks would; a test holds it to megatron's save.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sayo.models.qwen25vl.hf_config import ParallelLayout, Qwen25VLConfig, padded_vocab_size
from megatron_sayo.models.qwen25vl.name_map import RULES, TE_ALIASES, Rule

STACKED = "decoder.layers."
# Linears whose (empty) extra state megatron saves per layer as a sharded object.
LAYER_LINEARS = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")


@dataclass(frozen=True)
class Target:
    """One global tensor of the checkpoint and the rule that fills it (per layer when stacked)."""

    key: str
    shape: tuple[int, ...]          # global shape (leading layer axis when stacked)
    rule: Rule
    vision_name: str | None = None  # the {v} field of a vision tensor

    @property
    def stacked(self) -> bool:
        return self.key.startswith(STACKED)

    def stored_dtype(self, params_dtype: str) -> str:
        """Megatron's local-spec RMSNorm keeps float32 weights whatever params_dtype is; so does its save."""
        return "float32" if self.key.endswith("layer_norm_weight") or self.key.startswith(
            "decoder.final_layernorm") else params_dtype

    def megatron_name(self, layer: int | None) -> str:
        """The state_dict name of one layer's (or the only) tensor, as the weight rules spell it."""
        return self.rule.megatron.format(i=layer, v=self.vision_name)

    def fields(self, layer: int | None) -> dict[str, str]:
        return {"i": str(layer)} if self.stacked else ({"v": self.vision_name} if self.vision_name else {})


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a target: a layer (when stacked) x one TP rank's slice (x gate or up for fc1)."""

    layer: int | None
    tp_rank: int
    part: int | None                 # 0 gate / 1 up of a fused fc1 slice, else None
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file_rank: int                   # which rank's file it goes to: stage * tp + tp_rank, as megatron writes


def dist_key(megatron_template: str) -> str:
    """Checkpoint key of a rule's megatron name: layer index dropped, local norms under TE's names."""
    name = megatron_template.replace("decoder.layers.{i}.", STACKED)
    for te_name, local_name in TE_ALIASES.items():
        name = name.replace(local_name, te_name)
    return name


def full_shape(rule: Rule, hf: Qwen25VLConfig, padded_vocab: int) -> tuple[int, ...]:
    """The TP=1 megatron shape of one layer's text tensor, from the config."""
    t = hf.text
    qkv_rows = (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
    name = rule.megatron
    if rule.kind.padded:
        return (padded_vocab, t.hidden_size)
    if rule.kind.name == "qkv":
        return (qkv_rows, t.hidden_size) if name.endswith("weight") else (qkv_rows,)
    if rule.kind.name == "gate_up":
        return (2 * t.intermediate_size, t.hidden_size)
    if name.endswith("linear_proj.weight"):
        return (t.hidden_size, t.num_heads * t.head_dim)
    if name.endswith("linear_fc2.weight"):
        return (t.hidden_size, t.intermediate_size)
    return (t.hidden_size,)         # the RMSNorm weights


def vision_shapes(hf: Qwen25VLConfig) -> dict[str, tuple[int, ...]]:
    """{vision parameter name: shape} of our vision tower (vision.py), in state_dict order."""
    v = hf.vision
    h, inter, merged = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size ** 2
    out = {"patch_embed.proj.weight": (h, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)}
    for i in range(v.depth):
        out.update({f"blocks.{i}.{name}": shape for name, shape in (
            ("norm1.weight", (h,)), ("attn.qkv.weight", (3 * h, h)), ("attn.qkv.bias", (3 * h,)),
            ("attn.proj.weight", (h, h)), ("attn.proj.bias", (h,)), ("norm2.weight", (h,)),
            ("mlp.gate_proj.weight", (inter, h)), ("mlp.gate_proj.bias", (inter,)),
            ("mlp.up_proj.weight", (inter, h)), ("mlp.up_proj.bias", (inter,)),
            ("mlp.down_proj.weight", (h, inter)), ("mlp.down_proj.bias", (h,)))})
    out.update({"merger.ln_q.weight": (h,), "merger.mlp.0.weight": (merged, merged), "merger.mlp.0.bias": (merged,),
                "merger.mlp.2.weight": (v.out_hidden_size, merged), "merger.mlp.2.bias": (v.out_hidden_size,)})
    return out


def targets(hf: Qwen25VLConfig, tp: int) -> list[Target]:
    """Every global tensor of the checkpoint, in the order the converter writes them."""
    padded = padded_vocab_size(hf.text.vocab_size, tp)
    layers = hf.text.num_layers
    out = []
    for rule in RULES:
        if rule.megatron == "vision.{v}":
            out += [Target(f"vision.{v}", shape, rule, v) for v, shape in vision_shapes(hf).items()]
        elif rule.megatron == "output_layer.weight" and hf.text.tie_word_embeddings:
            continue
        elif "{i}" in rule.megatron:
            out.append(Target(dist_key(rule.megatron), (layers, *full_shape(rule, hf, padded)), rule))
        else:
            out.append(Target(rule.megatron, full_shape(rule, hf, padded), rule))
    return out


def extra_states(hf: Qwen25VLConfig) -> list[tuple[str, int]]:
    """(key, decoder layer whose stage writes it) of the sharded `_extra_state` objects megatron saves: one
    per layer linear, and the output layer's (on the last layer's stage)."""
    layers = hf.text.num_layers
    return [(f"{STACKED}{linear}._extra_state/shard_{i}_{layers}", i) for i in range(layers)
            for linear in LAYER_LINEARS] + [("output_layer._extra_state/shard_0_1", layers - 1)]


def _stage(layer: int | None, target: Target, layers: int, pp: int) -> int:
    if layer is not None:
        return layer // (layers // pp)
    return pp - 1 if target.key.startswith(("decoder.final_layernorm", "output_layer")) else 0


def chunks(target: Target, layout: ParallelLayout, layers: int) -> list[Chunk]:
    """How TP x PP ranks would store `target`: per layer, per TP rank, one chunk per rectangle the rank holds
    (rule.kind.tp_pieces: gate and up apart for fc1)."""
    kind = target.rule.kind
    tp = 1 if kind.split_dim is None else layout.tp
    out = []
    for layer in (range(layers) if target.stacked else [None]):
        lead = (layer,) if layer is not None else ()
        one = target.shape[1:] if layer is not None else target.shape
        for r in range(tp):
            file_rank = _stage(layer, target, layers, layout.pp) * layout.tp + r
            pieces = kind.tp_pieces(tuple(one), tp, r)
            for part, (offsets, sizes) in enumerate(pieces):
                out.append(Chunk(layer, r, part if len(pieces) > 1 else None, lead + offsets,
                                 ((1,) if layer is not None else ()) + sizes, file_rank))
    return out
