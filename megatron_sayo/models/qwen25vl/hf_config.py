"""Read a Hugging Face Qwen2.5-VL config.json into typed configs (no torch: the converters import this).

This is the one reader of config.json: the model, the converters, the planner (`plan.py`) and the tiny-checkpoint
maker all parse through `parse_hf_config`. It accepts every layout transformers writes and fills what a file
leaves out exactly as transformers does, with transformers' own defaults (read from transformers 5.24.0,
`models/qwen2_5_vl/configuration_qwen2_5_vl.py`; the values are the same in 4.49-4.57):

* flat hub layout (4.41-4.51): text fields at the top level, `rope_scaling` + `rope_theta`;
* diff-only `vision_config` (4.49-4.51 `save_pretrained`): only the fields that differ from the vision defaults,
  e.g. the official 72B-AWQ config has no depth/num_heads, a 7B fine-tune no out_hidden_size;
* nested `text_config` (4.52+): the text fields are read from text_config alone (transformers ignores top-level
  copies once text_config is present), diff-only against the text defaults;
* 5.x: nested with `rope_parameters` and `dtype`.

Note the vision defaults' hidden_size/out_hidden_size are 3584 (the 7B text width, not the real ViT's 1280): a
3B/72B config without out_hidden_size loads in transformers and then fails; here the out_hidden_size check below
stops it with the defaulted fields named. Validation happens before any weights are touched, with errors that
name the file and the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from megatron_sayo.config import ConfigError
from megatron_sayo.formats.jsonfiles import read_json

KNOWN_MODEL_TYPES = ("qwen2_5_vl",)
# Activations the vision tower implements (vision.py maps each name to its function).
VISION_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu")
TRANSFORMERS_DEFAULTS_VERSION = "5.24.0"

# transformers' Qwen2_5_VLVisionConfig defaults (TRANSFORMERS_DEFAULTS_VERSION), by our field names.
VISION_DEFAULTS = dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                       in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                       tokens_per_second=4, window_size=112, out_hidden_size=3584,
                       fullatt_block_indexes=(7, 15, 23, 31))
# transformers' Qwen2_5_VLTextConfig defaults (hub names); head_dim is always hidden_size // num_attention_heads.
TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, hidden_act="silu",
                     max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
                     bos_token_id=151643, eos_token_id=151645, pad_token_id=None)
# transformers' Qwen2_5_VLConfig defaults (top level).
ROOT_DEFAULTS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                     vision_end_token_id=151653, tie_word_embeddings=False)


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
    def from_hf_dict(cls, d: dict, source: str = "vision_config") -> VisionConfig:
        """Typed config from a `vision_config` dict, absent fields from transformers' defaults; ConfigError
        naming source and field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected an object, got {type(d).__name__}")
        d = dict(d)
        if "in_chans" in d and "in_channels" not in d:   # the hub name (Qwen2-VL heritage)
            d["in_channels"] = d["in_chans"]
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):   # 5.x
            d["rope_theta"] = d["rope_parameters"].get("rope_theta")
        defaulted = sorted(k for k in VISION_DEFAULTS if d.get(k) is None)
        values = {f.name: d[f.name] if d.get(f.name) is not None else VISION_DEFAULTS.get(f.name, f.default)
                  for f in dataclasses.fields(cls)}
        if not isinstance(values["fullatt_block_indexes"], (list, tuple)):
            raise ConfigError(f"{source}: field 'fullatt_block_indexes' must be a list of block indexes, got "
                              f"{values['fullatt_block_indexes']!r}")
        values["fullatt_block_indexes"] = tuple(values["fullatt_block_indexes"])
        config = cls(**values)
        try:
            config.validate(source)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{_defaulted_note(defaulted)}") from None
        return config

    def validate(self, source: str = "vision_config") -> None:
        """Raise ConfigError for values the tower cannot run with."""
        def fail(field, why):
            raise ConfigError(f"{source}: field '{field}' = {getattr(self, field)!r} {why}")

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

    @property
    def vision(self) -> tuple[int, ...]:
        """The vision placeholders and markers: ids a sampler must never emit (fed back, they need pixels)."""
        return (self.image, self.video, self.vision_start, self.vision_end)


@dataclass(frozen=True)
class Qwen25VLConfig:
    """Everything needed to build Qwen25VLModel, as read from one config.json."""

    text: TextConfig
    vision: VisionConfig
    tokens: TokenIds
    torch_dtype: str
    source: str


def _defaulted_note(fields: list[str]) -> str:
    """Suffix for an error that may come from values the file did not set."""
    if not fields:
        return ""
    return (f" (not set in the file, so taken from transformers {TRANSFORMERS_DEFAULTS_VERSION}'s defaults: "
            f"{', '.join(fields)})")


def _field(d: dict, key: str, source: str, kind=int, *fallbacks: str):
    for k in (key, *fallbacks):
        if k in d and d[k] is not None:
            value = d[k]
            if kind is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{source}: field '{k}' must be int, got {value!r}")
            try:
                return kind(value)
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(f"{source}: field '{k}' must be {kind.__name__}, got {value!r}") from None
    raise ConfigError(f"{source}: missing field '{key}'")


def _ids(value) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def text_fields(raw: dict, source: str) -> tuple[dict, list[str]]:
    """The language model's fields as transformers sees them, and the names filled from its defaults.

    With a `text_config` object, transformers reads the text fields from it alone; without one, from the top
    level. `rope_scaling` (legacy name) wins over `rope_parameters`; `rope_theta` may sit beside either."""
    nested = raw.get("text_config")
    if nested is not None and not isinstance(nested, dict):
        raise ConfigError(f"{source}: field 'text_config' must be an object, got {type(nested).__name__}")
    given = nested if nested is not None else raw
    defaulted = sorted(k for k in TEXT_DEFAULTS if k != "pad_token_id" and given.get(k) is None)
    text = {**TEXT_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    if text.get("num_key_value_heads") is None:
        text["num_key_value_heads"] = text["num_attention_heads"]
    rope = given.get("rope_scaling") or given.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: field 'rope_scaling'/'rope_parameters' must be an object, got {rope!r}")
    text["rope_theta"] = rope.get("rope_theta", text["rope_theta"])
    if "rope_theta" in rope:
        defaulted = [k for k in defaulted if k != "rope_theta"]
    text["mrope_section"] = rope.get("mrope_section")
    return text, defaulted


def parse_hf_config(raw: dict, source: str = "config.json") -> Qwen25VLConfig:
    """Typed, validated config from a parsed config.json dict (any layout transformers writes)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a JSON object")
    model_type = raw.get("model_type")
    if model_type not in KNOWN_MODEL_TYPES:
        raise ConfigError(f"{source}: field 'model_type' is {model_type!r}; expected one of {KNOWN_MODEL_TYPES}")
    if not isinstance(raw.get("vision_config"), dict):   # every transformers version writes one (maybe diff-only)
        raise ConfigError(f"{source}: missing field 'vision_config' (an object; transformers always writes it)")
    text, defaulted = text_fields(raw, source)
    try:
        return _build(raw, text, source)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{_defaulted_note(defaulted)}") from None


def _build(raw: dict, text: dict, source: str) -> Qwen25VLConfig:
    num_heads = _field(text, "num_attention_heads", source)
    hidden = _field(text, "hidden_size", source)
    if num_heads <= 0 or hidden <= 0 or hidden % num_heads:
        raise ConfigError(f"{source}: hidden_size {hidden} must be a positive multiple of num_attention_heads "
                          f"{num_heads}")
    head_dim = hidden // num_heads
    if text.get("head_dim") not in (None, head_dim):
        raise ConfigError(f"{source}: field 'head_dim' = {text['head_dim']!r}; Qwen2.5-VL uses hidden_size / "
                          f"num_attention_heads = {head_dim}")
    mrope = text["mrope_section"]
    if not mrope:
        raise ConfigError(f"{source}: missing field 'rope_scaling.mrope_section' (Qwen2.5-VL uses 3-D M-RoPE)")
    if (not isinstance(mrope, (list, tuple)) or len(mrope) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in mrope)):
        raise ConfigError(f"{source}: field 'mrope_section' must be 3 positive integers (t, h, w), got {mrope!r}")
    if sum(mrope) != head_dim // 2:
        raise ConfigError(f"{source}: field 'mrope_section' {list(mrope)} sums to {sum(mrope)}; "
                          f"expected head_dim/2 = {head_dim // 2}")
    act = text.get("hidden_act")
    if act != "silu":
        raise ConfigError(f"{source}: field 'hidden_act' is {act!r}; expected 'silu'")
    tied = raw.get("tie_word_embeddings", ROOT_DEFAULTS["tie_word_embeddings"])
    if not isinstance(tied, bool):
        raise ConfigError(f"{source}: field 'tie_word_embeddings' must be true or false, got {tied!r}")
    tied = tied or text.get("tie_word_embeddings") is True   # pre-5 saves kept it inside text_config
    tc = TextConfig(
        hidden_size=hidden,
        intermediate_size=_field(text, "intermediate_size", source),
        num_layers=_field(text, "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=_field(text, "num_key_value_heads", source),
        head_dim=head_dim,
        vocab_size=_field(text, "vocab_size", source),
        rms_norm_eps=_field(text, "rms_norm_eps", source, float),
        rope_theta=_field(text, "rope_theta", source, float),
        mrope_section=tuple(mrope),
        tie_word_embeddings=tied,
        max_position_embeddings=_field(text, "max_position_embeddings", source),
        hidden_act=act,
    )
    for name in ("intermediate_size", "num_layers", "num_kv_heads", "vocab_size", "max_position_embeddings"):
        if getattr(tc, name) <= 0:
            raise ConfigError(f"{source}: field '{name}' must be a positive integer, got {getattr(tc, name)}")
    if tc.num_heads % tc.num_kv_heads:
        raise ConfigError(f"{source}: num_attention_heads {tc.num_heads} is not a multiple of "
                          f"num_key_value_heads {tc.num_kv_heads}")
    root = {**ROOT_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    try:
        eos = _ids(text.get("eos_token_id"))
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: field 'eos_token_id' must be an id or a list of ids, got "
                          f"{text.get('eos_token_id')!r}") from None
    tokens = TokenIds(
        image=_field(root, "image_token_id", source, int, "image_token_index"),
        video=_field(root, "video_token_id", source, int, "video_token_index"),
        vision_start=_field(root, "vision_start_token_id", source),
        vision_end=_field(root, "vision_end_token_id", source),
        eos=eos,
        pad=text.get("pad_token_id"),
    )
    for name in ("image", "video", "vision_start", "vision_end"):
        if not 0 <= getattr(tokens, name) < tc.vocab_size:
            raise ConfigError(f"{source}: field '{name}_token_id' = {getattr(tokens, name)} is outside the "
                              f"vocabulary [0, {tc.vocab_size})")
    vision = VisionConfig.from_hf_dict(raw["vision_config"], source=f"{source}: vision_config")
    if vision.out_hidden_size != tc.hidden_size:
        raise ConfigError(f"{source}: vision_config.out_hidden_size {vision.out_hidden_size} must equal "
                          f"hidden_size {tc.hidden_size}"
                          + _defaulted_note([f"vision_config.{k}" for k in ("out_hidden_size",)
                                             if raw["vision_config"].get(k) is None]))
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
