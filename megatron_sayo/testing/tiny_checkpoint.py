"""Tiny random Qwen2.5-VL checkpoints in the Hugging Face hub format, made in-process (no downloads).

`make_tiny_checkpoint` writes config.json (hub flat layout), model.safetensors (hub names `model.*`,
`lm_head.*`, `visual.*`), tokenizer.json (byte-level BPE trained on the fly, special tokens at the ids the
config names), tokenizer_config.json + chat_template.json (the Qwen2.5-VL chat template),
preprocessor_config.json and generation_config.json, into a temp dir renamed onto the target.

Weights come from transformers' Qwen2_5_VLForConditionalGeneration built with the seed; norm weights and
biases (ones and zeros after HF init) are then randomised too, so a converter that drops or swaps them
fails parity tests instead of passing by accident.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from megatron_sayo.config import ConfigError
from megatron_sayo.data.image_processing import ImageProcessorConfig
from megatron_sayo.formats.atomic import publish_dir
from megatron_sayo.formats.dtypes import torch_dtype
from megatron_sayo.formats.jsonfiles import read_json
from megatron_sayo.models.qwen25vl.hf_config import parse_hf_config
from megatron_sayo.models.qwen25vl.name_map import normalize_hf_name

# Qwen2 special tokens in their hub order (151643 + k); the first 14 are special, the rest plain added tokens.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
N_SPECIAL_FLAGGED = 14
VISION_START_OFFSET = QWEN_SPECIAL_TOKENS.index("<|vision_start|>")

# Qwen2.5-VL chat template (hub format; rendered identically by megatron_sayo.data.processor.render_chat).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
MAX_BPE_TOKENS = 256 + 3000   # merges learned on the fly; ids above are filler tokens up to the specials
TINY_MAX_PIXELS = 28 * 28 * 80
TINY_MIN_PIXELS = 28 * 28 * 4


def _qwen_ids(base: int) -> dict[str, int]:
    """Special-token ids of the hub layout starting at `base` (<|endoftext|>)."""
    return {tok: base + k for k, tok in enumerate(QWEN_SPECIAL_TOKENS)}


def _preset(vocab: int, base: int, text: dict, vision: dict, tied: bool) -> dict:
    """A hub-layout config dict with Qwen special ids placed from `base`."""
    ids = _qwen_ids(base)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        **text, "vocab_size": vocab, "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 4096, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": text["num_hidden_layers"], "use_cache": True,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {"in_chans": 3, "hidden_act": "silu", "patch_size": 14, "temporal_patch_size": 2,
                          "spatial_merge_size": 2, "tokens_per_second": 2,
                          "out_hidden_size": text["hidden_size"], **vision},
    }


PRESETS: dict[str, dict] = {
    # GQA (4 query heads, 2 kv groups), head_dim 16, untied embeddings, 2 window + 2 full-attention ViT blocks.
    "tiny": _preset(
        vocab=512, base=480, tied=False,
        text={"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "rope_theta": 1000000.0,
              "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        vision={"depth": 4, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "window_size": 112,
                "fullatt_block_indexes": [1, 3]}),
    # MHA (4 heads = 4 kv heads), head_dim 8, tied embeddings, 56-px windows, one full-attention block.
    "tiny-tied": _preset(
        vocab=400, base=370, tied=True,
        text={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "intermediate_size": 96, "rope_theta": 10000.0,
              "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}},
        vision={"depth": 3, "hidden_size": 32, "num_heads": 4, "intermediate_size": 48, "window_size": 56,
                "fullatt_block_indexes": [2]}),
}

# ------------------------------------------------------------------------------------------ config

def hub_config(raw: dict, source: str = "config.json") -> dict:
    """A Qwen2.5-VL config (any layout transformers writes) as a complete hub flat-layout dict.

    Parsed and validated by the one config reader (`hf_config.parse_hf_config`: transformers' defaults for
    absent fields); the values below are written back from the typed config, so the checkpoint's config.json
    names every field explicitly. Extra keys of `raw` (bos/pad/vision_token_id, ...) are kept."""
    parsed = parse_hf_config(raw, source)
    t, v, ids = parsed.text, parsed.vision, parsed.tokens
    cfg = {k: copy.deepcopy(val) for k, val in raw.items() if k not in ("text_config", "rope_parameters", "dtype")}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in cfg and key in (raw.get("text_config") or {}):
            cfg[key] = raw["text_config"][key]
    cfg.update(
        model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, vocab_size=t.vocab_size,
        rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings,
        rope_scaling={"type": "mrope", "mrope_section": list(t.mrope_section)}, hidden_act=t.hidden_act,
        tie_word_embeddings=t.tie_word_embeddings, image_token_id=ids.image, video_token_id=ids.video,
        vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end,
        vision_config={"depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                       "num_heads": v.num_heads, "in_chans": v.in_channels, "hidden_act": v.hidden_act,
                       "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
                       "spatial_merge_size": v.spatial_merge_size, "window_size": v.window_size,
                       "fullatt_block_indexes": list(v.fullatt_block_indexes), "out_hidden_size": v.out_hidden_size,
                       "tokens_per_second": v.tokens_per_second})
    cfg.setdefault("eos_token_id", ids.eos[0] if len(ids.eos) == 1 else list(ids.eos))
    for key in ("vision_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        values = cfg.get(key)
        for i in values if isinstance(values, list) else [values]:
            if i is not None and not (isinstance(i, int) and 0 <= i < t.vocab_size):
                raise ConfigError(f"{source}: field '{key}' = {i!r} must be an id in [0, vocab_size={t.vocab_size})")
    return cfg


# ------------------------------------------------------------------------------------------ tokens

def special_token_ids(cfg: dict, source: str = "config.json") -> dict[str, int]:
    """Token string -> id for every Qwen special token, honouring every id the config names."""
    named = {"<|vision_start|>": cfg["vision_start_token_id"], "<|vision_end|>": cfg["vision_end_token_id"],
             "<|image_pad|>": cfg["image_token_id"], "<|video_pad|>": cfg["video_token_id"]}
    if cfg.get("vision_token_id") is not None:
        named["<|vision_pad|>"] = cfg["vision_token_id"]
    eos = _first_id(cfg.get("eos_token_id"))
    others = {_first_id(cfg.get("bos_token_id")), _first_id(cfg.get("pad_token_id"))} - {None, eos}
    base = cfg["vision_start_token_id"] - VISION_START_OFFSET
    hub = _qwen_ids(base)
    fits_hub = (base >= 256 and max(hub.values()) < cfg["vocab_size"]
                and all(hub[t] == i for t, i in named.items())
                and (eos is None or eos in (hub["<|im_end|>"], hub["<|endoftext|>"]))
                and others <= {hub["<|endoftext|>"], hub["<|im_end|>"]})
    if fits_hub:
        return hub
    return _scattered_ids(named, eos, others, cfg["vocab_size"], source)


def _first_id(value):
    """An id field that may be a list (eos in some configs): its first element."""
    return value[0] if isinstance(value, list) and value else value


def _scattered_ids(named: dict, eos, others: set, vocab: int, source: str) -> dict[str, int]:
    """Non-hub id layout: named tokens where the config puts them, the rest on the highest free ids."""
    ids = dict(named)
    if eos is not None:
        ids["<|im_end|>"] = eos
    if len(others) > 1:
        raise ValueError(f"{source}: bos_token_id and pad_token_id differ from each other and from eos_token_id; "
                         f"only one of them can be <|endoftext|>")
    if others:
        ids["<|endoftext|>"] = others.pop()
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"{source}: special token ids collide: {ids}")
    free = (i for i in range(vocab - 1, -1, -1) if i not in set(ids.values()))
    for tok in QWEN_SPECIAL_TOKENS:
        if tok not in ids:
            ids[tok] = next(free)
    if min(ids.values()) < 256:
        raise ValueError(f"{source}: vocab_size {vocab} leaves fewer than 256 ids for the byte-level tokens "
                         f"below the special tokens {ids}")
    return ids


def _training_corpus(seed: int, n_lines: int = 3000) -> list[str]:
    """Deterministic pseudo-English lines (syllable words, digits, punctuation) to train BPE merges on."""
    rng = random.Random(seed)
    onsets, vowels = "b c d f g h k l m n p r s t v w st th ch sh".split(), "a e i o u ai ea ou".split()
    base_words = ("the a of to and is in what which color how many where box chart table value image answer "
                  "question left right top bottom object system user assistant You are helpful").split()
    words = base_words + ["".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3)))
                          for _ in range(600)]
    lines = []
    for _ in range(n_lines):
        parts = [rng.choice(words) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            parts.insert(rng.randrange(len(parts)), str(rng.randint(0, 2025)))
        lines.append(" ".join(parts).capitalize() + rng.choice([".", "?", "!", ",", ":"]))
    return lines


def build_tokenizer(special_ids: dict[str, int], seed: int = 0):
    """Byte-level BPE (Qwen2 pre-tokenizer) with `special_ids` at their exact ids; fillers fill the gaps."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    specials = set(special_ids.values())
    regular = [i for i in range(max(specials) + 1) if i not in specials]   # ids left for BPE + fillers
    trainer = trainers.BpeTrainer(vocab_size=min(len(regular), MAX_BPE_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    probe = Tokenizer(models.BPE())
    probe.normalizer = normalizers.NFC()
    probe.pre_tokenizer = _qwen_pre_tokenizer(pre_tokenizers, Regex)
    probe.train_from_iterator(_training_corpus(seed), trainer)
    learned = json.loads(probe.to_str())["model"]
    by_rank = sorted(learned["vocab"], key=learned["vocab"].get)
    vocab = {tok: regular[k] for k, tok in enumerate(by_rank)}
    vocab.update({f"<|filler_{i}|>": i for i in regular[len(by_rank):]})
    vocab.update(special_ids)          # in the model vocab too, so added tokens keep exactly these ids
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _qwen_pre_tokenizer(pre_tokenizers, Regex)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    order = sorted(special_ids, key=special_ids.get)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in order if _is_flagged(t)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in order if not _is_flagged(t)])
    for t, i in special_ids.items():
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"tokenizer placed {t} at {tok.token_to_id(t)}, expected {i}")
    return tok


def _is_flagged(token: str) -> bool:
    """Whether a Qwen added token is a 'special' one (skipped by decode(skip_special_tokens=True))."""
    return QWEN_SPECIAL_TOKENS.index(token) < N_SPECIAL_FLAGGED


def _qwen_pre_tokenizer(pre_tokenizers, Regex):
    """Qwen2's pre-tokenizer: regex split, then byte-level mapping."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])


def tokenizer_config(special_ids: dict[str, int], cfg: dict) -> dict:
    """tokenizer_config.json: Qwen2Tokenizer, eos/pad named by the config's ids, the chat template."""
    by_id = {i: t for t, i in special_ids.items()}
    eos = by_id.get(_first_id(cfg.get("eos_token_id")), "<|im_end|>")
    pad = by_id.get(_first_id(cfg.get("pad_token_id")), "<|endoftext|>")
    return {
        "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "bos_token": None, "unk_token": None,
        "eos_token": eos, "pad_token": pad, "errors": "replace", "split_special_tokens": False,
        "clean_up_tokenization_spaces": False, "model_max_length": cfg.get("max_position_embeddings", 32768),
        "additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS[:N_SPECIAL_FLAGGED] if t not in (eos, pad)],
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": _is_flagged(t)}
                                 for t, i in sorted(special_ids.items(), key=lambda kv: kv[1])},
        "chat_template": CHAT_TEMPLATE,
    }


# ------------------------------------------------------------------------------------------ weights

def build_hf_model(cfg: dict, seed: int = 0):
    """transformers' Qwen2_5_VLForConditionalGeneration for a hub config, float32, seeded, all params random."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(cfg))).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif "norm" in name.rsplit(".", 2)[-2] or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def hub_state_dict(model, tied: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """State dict under hub names, cast to dtype; lm_head dropped when tied (as transformers saves it)."""
    out = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        out[normalize_hf_name(name)] = t.detach().to(dtype).contiguous().clone()
    return out


# ------------------------------------------------------------------------------------------ writer

DTYPES = ("float32", "bfloat16")    # what a tiny checkpoint is written in


def load_config_json(path: str | Path) -> dict:
    """A config file (hub flat or nested layout) normalised to the hub flat layout."""
    return hub_config(read_json(path, "a config.json"), source=str(path))


def make_tiny_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0,
                         config_json: str | Path | None = None, dtype: str = "float32",
                         overwrite: bool = False) -> Path:
    """Write a complete HF Qwen2.5-VL checkpoint directory with random weights; returns its path."""
    from safetensors.torch import save_file
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if config_json is not None:
        cfg = load_config_json(config_json)
    elif preset in PRESETS:
        cfg = hub_config(PRESETS[preset], source=f"preset '{preset}'")
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or pass config_json")
    cfg["torch_dtype"] = dtype
    source = str(config_json or f"preset '{preset}'")
    ids = special_token_ids(cfg, source)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model = build_hf_model(cfg, seed)
        save_file(hub_state_dict(model, cfg["tie_word_embeddings"], torch_dtype(dtype)), tmp / "model.safetensors",
                  metadata={"format": "pt"})
        build_tokenizer(ids, seed).save(str(tmp / "tokenizer.json"))
        tok_cfg = tokenizer_config(ids, cfg)
        vision = cfg["vision_config"]
        pre = ImageProcessorConfig(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS,
                                   patch_size=vision["patch_size"], temporal_patch_size=vision["temporal_patch_size"],
                                   merge_size=vision["spatial_merge_size"])
        gen = {"bos_token_id": cfg.get("bos_token_id"), "pad_token_id": ids[tok_cfg["pad_token"]],
               "eos_token_id": sorted({ids[tok_cfg["eos_token"]], ids["<|endoftext|>"]})}
        files = {"config.json": cfg, "tokenizer_config.json": tok_cfg, "preprocessor_config.json": pre.to_dict(),
                 "chat_template.json": {"chat_template": CHAT_TEMPLATE}, "generation_config.json": gen}
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
