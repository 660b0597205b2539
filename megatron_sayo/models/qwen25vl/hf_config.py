"""Read a Hugging Face Qwen2.5-VL config.json into typed configs and a megatron TransformerConfig.

Every number comes from the file. Both the hub layout (text fields at the top level) and the nested
layout of recent transformers (`text_config`, `rope_parameters`) are accepted. Validation happens here,
before any weights are touched, with errors that name the file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_sayo.jsonfiles import read_json
from megatron_sayo.models.qwen25vl.vision import VisionConfig

KNOWN_MODEL_TYPES = ("qwen2_5_vl",)


class ConfigError(ValueError):
    """A checkpoint config that cannot describe a model we can build."""


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


def to_transformer_config(cfg: Qwen25VLConfig, layout: ParallelLayout, *, params_dtype: torch.dtype = torch.float32,
                          recompute: str | None = None, sequence_parallel: bool = False,
                          **overrides):
    """The megatron TransformerConfig of the decoder for this layout (validated first)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    validate_layout(cfg, layout)
    t = cfg.text
    gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=t.num_layers,
        hidden_size=t.hidden_size,
        ffn_hidden_size=t.intermediate_size,
        num_attention_heads=t.num_heads,
        num_query_groups=t.num_kv_heads,
        kv_channels=t.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=t.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        sequence_parallel=sequence_parallel and layout.tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not gpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        share_embeddings_and_output_weights=t.tie_word_embeddings,
    )
    if recompute in ("selective", "full"):
        kwargs.update(recompute_granularity=recompute)
        if recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(overrides)
    share = kwargs.pop("share_embeddings_and_output_weights")
    config = TransformerConfig(**kwargs)
    config.share_embeddings_and_output_weights = share
    return config


