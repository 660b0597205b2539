"""Read a Hugging Face Qwen2.5-VL config.json into typed configs (no torch: the converters import this).

Every number comes from the file. Both the hub layout (text fields at the top level) and the nested
layout of recent transformers (`text_config`, `rope_parameters`) are accepted. Validation happens here,
before any weights are touched, with errors that name the file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dataclasses

from megatron_sayo.formats.jsonfiles import read_json

KNOWN_MODEL_TYPES = ("qwen2_5_vl",)
# Activations the vision tower implements (vision.py maps each name to its function).
VISION_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu")


class ConfigError(ValueError):
    """A checkpoint config that cannot describe a model we can build."""


class VisionConfigError(ValueError):
    """A vision_config field is missing or invalid."""


# Fields transformers' Qwen2_5_VLVisionConfig fills in when a file leaves them out.
_DEFAULTS = dict(in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                 fullatt_block_indexes=(7, 15, 23, 31), hidden_act="silu", rms_norm_eps=1e-6,
                 tokens_per_second=4, rope_theta=10000.0)
_REQUIRED = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size")


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's architecture."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    out_hidden_size: int
    hidden_act: str
    rms_norm_eps: float = 1e-6
    tokens_per_second: int = 4
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "vision_config") -> "VisionConfig":
        """Typed config from a hub `vision_config` dict; raises VisionConfigError naming source and field."""
        d = dict(d)
        if "in_chans" in d and "in_channels" not in d:
            d["in_channels"] = d["in_chans"]
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", _DEFAULTS["rope_theta"])
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise VisionConfigError(f"{source}: missing field(s) {missing}")
        values = {f.name: d.get(f.name, _DEFAULTS.get(f.name)) for f in dataclasses.fields(cls)}
        values["fullatt_block_indexes"] = tuple(values["fullatt_block_indexes"] or ())
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str = "vision_config") -> None:
        """Raise VisionConfigError for values the tower cannot run with."""
        def fail(field, why):
            raise VisionConfigError(f"{source}: field '{field}' = {getattr(self, field)!r} {why}")

        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                     "temporal_patch_size", "spatial_merge_size", "window_size", "out_hidden_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, "must be a positive integer")
        if self.hidden_size % self.num_heads:
            fail("hidden_size", f"is not divisible by num_heads = {self.num_heads}")
        if self.head_dim % 4:
            fail("hidden_size", f"gives head_dim {self.head_dim}; the 2-D RoPE needs head_dim divisible by 4")
        if self.hidden_act not in VISION_ACTIVATIONS:
            fail("hidden_act", f"is not a known activation {sorted(VISION_ACTIVATIONS)}")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            fail("window_size", f"must be a multiple of patch_size * spatial_merge_size = "
                                f"{self.patch_size * self.spatial_merge_size}")
        bad = [i for i in self.fullatt_block_indexes if not isinstance(i, int) or not 0 <= i < self.depth]
        if bad:
            fail("fullatt_block_indexes", f"has indexes {bad} outside [0, depth={self.depth})")
        if not self.rms_norm_eps > 0:
            fail("rms_norm_eps", "must be > 0")
        if not self.rope_theta > 0:
            fail("rope_theta", "must be > 0")


@dataclass(frozen=True)
class TextConfig:
    """The language model's architecture."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    tie_word_embeddings: bool
    max_position_embeddings: int
    hidden_act: str


@dataclass(frozen=True)
class TokenIds:
    """Special token ids the model and the processor agree on."""

    image: int
    video: int
    vision_start: int
    vision_end: int
    eos: tuple[int, ...]
    pad: int | None


@dataclass(frozen=True)
class Qwen25VLConfig:
    """Everything needed to build Qwen25VLModel, as read from one config.json."""

    text: TextConfig
    vision: VisionConfig
    tokens: TokenIds
    torch_dtype: str
    source: str


def _field(d: dict, key: str, source: str, kind=int, *fallbacks: str):
    for k in (key, *fallbacks):
        if k in d and d[k] is not None:
            try:
                return kind(d[k])
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: field '{k}' must be {kind.__name__}, got {d[k]!r}") from None
    raise ConfigError(f"{source}: missing field '{key}'")


def _ids(value) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def parse_hf_config(raw: dict, source: str = "config.json") -> Qwen25VLConfig:
    """Typed, validated config from a parsed config.json dict (flat hub or nested layout)."""
    model_type = raw.get("model_type")
    if model_type not in KNOWN_MODEL_TYPES:
        raise ConfigError(f"{source}: field 'model_type' is {model_type!r}; expected one of {KNOWN_MODEL_TYPES}")
    text = {**raw, **raw.get("text_config", {})}
    rope = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
    if "vision_config" not in raw:
        raise ConfigError(f"{source}: missing field 'vision_config'")

    num_heads = _field(text, "num_attention_heads", source)
    hidden = _field(text, "hidden_size", source)
    head_dim = int(text.get("head_dim") or hidden // num_heads)
    mrope = rope.get("mrope_section")
    if not mrope:
        raise ConfigError(f"{source}: missing field 'rope_scaling.mrope_section' (Qwen2.5-VL uses 3-D M-RoPE)")
    if sum(mrope) != head_dim // 2:
        raise ConfigError(f"{source}: field 'mrope_section' {list(mrope)} sums to {sum(mrope)}; "
                          f"expected head_dim/2 = {head_dim // 2}")
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: field 'hidden_act' is {act!r}; expected 'silu'")
    tc = TextConfig(
        hidden_size=hidden,
        intermediate_size=_field(text, "intermediate_size", source),
        num_layers=_field(text, "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=_field(text, "num_key_value_heads", source),
        head_dim=head_dim,
        vocab_size=_field(text, "vocab_size", source),
        rms_norm_eps=_field(text, "rms_norm_eps", source, float),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1e6))),
        mrope_section=tuple(int(x) for x in mrope),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        max_position_embeddings=int(text.get("max_position_embeddings", 128000)),
        hidden_act=act,
    )
    if tc.num_heads % tc.num_kv_heads:
        raise ConfigError(f"{source}: num_attention_heads {tc.num_heads} is not a multiple of "
                          f"num_key_value_heads {tc.num_kv_heads}")
    tokens = TokenIds(
        image=_field(raw, "image_token_id", source, int, "image_token_index"),
        video=_field(raw, "video_token_id", source, int, "video_token_index"),
        vision_start=_field(raw, "vision_start_token_id", source),
        vision_end=_field(raw, "vision_end_token_id", source),
        eos=_ids(text.get("eos_token_id", raw.get("eos_token_id", 151645))),
        pad=text.get("pad_token_id", raw.get("pad_token_id")),
    )
    for name in ("image", "video", "vision_start", "vision_end"):
        if not 0 <= getattr(tokens, name) < tc.vocab_size:
            raise ConfigError(f"{source}: field '{name}_token_id' = {getattr(tokens, name)} is outside the "
                              f"vocabulary [0, {tc.vocab_size})")
    vision = VisionConfig.from_hf_dict(raw["vision_config"], source=f"{source}: vision_config")
    if vision.out_hidden_size != tc.hidden_size:
        raise ConfigError(f"{source}: vision_config.out_hidden_size {vision.out_hidden_size} must equal "
                          f"hidden_size {tc.hidden_size}")
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or text.get("dtype") or "bfloat16")
    return Qwen25VLConfig(tc, vision, tokens, dtype, source)


def load_hf_config(path: str | Path) -> Qwen25VLConfig:
    """Parse `path` (a checkpoint directory or its config.json)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = read_json(file, "a Hugging Face config.json", ConfigError)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    return parse_hf_config(raw, str(file))


@dataclass(frozen=True)
class ParallelLayout:
    """How the model is split: TP, PP and an optional uneven first/last pipeline stage."""

    tp: int = 1
    pp: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None


def validate_layout(cfg: Qwen25VLConfig, layout: ParallelLayout) -> None:
    """Raise ConfigError when the model cannot be split as asked."""
    t, src = cfg.text, cfg.source
    if layout.tp < 1 or layout.pp < 1:
        raise ConfigError(f"parallel: tp and pp must be >= 1, got tp={layout.tp} pp={layout.pp}")
    if t.num_heads % layout.tp:
        raise ConfigError(f"{src}: num_attention_heads {t.num_heads} is not divisible by tp={layout.tp}")
    if t.num_kv_heads % layout.tp:
        raise ConfigError(f"{src}: num_key_value_heads {t.num_kv_heads} is not divisible by tp={layout.tp} "
                          f"(TP splits whole query groups)")
    if t.intermediate_size % layout.tp:
        raise ConfigError(f"{src}: intermediate_size {t.intermediate_size} is not divisible by tp={layout.tp}")
    uneven = layout.first_stage_layers is not None or layout.last_stage_layers is not None
    if not uneven:
        if t.num_layers % layout.pp:
            raise ConfigError(f"{src}: num_hidden_layers {t.num_layers} is not divisible by pp={layout.pp}; "
                              f"set first/last stage layer counts for an uneven split")
        return
    if layout.pp < 2:
        raise ConfigError("parallel: first/last stage layer counts need pp >= 2")
    rest = t.num_layers - (layout.first_stage_layers or 0) - (layout.last_stage_layers or 0)
    middle = layout.pp - (layout.first_stage_layers is not None) - (layout.last_stage_layers is not None)
    if rest < 0 or (middle and rest % middle) or (not middle and rest):
        raise ConfigError(f"{src}: num_hidden_layers {t.num_layers} cannot be split as first="
                          f"{layout.first_stage_layers} last={layout.last_stage_layers} over pp={layout.pp}")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple
