"""Parallelism planner: exact parameter counts of Qwen2.5-VL and a per-GPU memory model for TP/PP/DP.

Memory terms follow Megatron-LM's published formulas: 6 + 12/DP bytes per parameter with the
distributed optimizer (18 without), and the activation memory of Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models".
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_sayo.config import ConfigError  # noqa: F401  (re-exported: the planner's callers catch it)
from megatron_sayo.models.qwen25vl.hf_config import Qwen25VLConfig, load_hf_config, parse_hf_config

GIB = 1024**3
BF16 = 2
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
RESERVE = 0.10   # fraction of GPU memory left free (allocator fragmentation, NCCL buffers, CUDA context)


@dataclass(frozen=True)
class TextArch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool


@dataclass(frozen=True)
class VisionArch:
    depth: int
    hidden: int
    intermediate: int
    heads: int
    out_hidden: int
    in_channels: int = 3
    patch: int = 14
    temporal_patch: int = 2
    merge: int = 2


@dataclass(frozen=True)
class Arch:
    text: TextArch
    vision: VisionArch | None


# ---------------------------------------------------------------- from the HF config

def arch_from_config(cfg: Qwen25VLConfig) -> Arch:
    """The sizes the memory model needs, from the one config reader's typed config."""
    t, v = cfg.text, cfg.vision
    return Arch(
        text=TextArch(hidden=t.hidden_size, intermediate=t.intermediate_size, layers=t.num_layers,
                      heads=t.num_heads, kv_heads=t.num_kv_heads, head_dim=t.head_dim, vocab=t.vocab_size,
                      tied=t.tie_word_embeddings),
        vision=VisionArch(depth=v.depth, hidden=v.hidden_size, intermediate=v.intermediate_size, heads=v.num_heads,
                          out_hidden=v.out_hidden_size, in_channels=v.in_channels, patch=v.patch_size,
                          temporal_patch=v.temporal_patch_size, merge=v.spatial_merge_size))


def parse_arch(cfg: dict, source: str = "config") -> Arch:
    """Arch from a config.json dict (any layout transformers writes); `source` names the file in errors."""
    return arch_from_config(parse_hf_config(cfg, source))


def load_arch(path: str | Path) -> Arch:
    """Arch from an HF model directory (its config.json) or a config.json file."""
    return arch_from_config(load_hf_config(path))


# ---------------------------------------------------------------- parameter counts

def text_layer_params(t: TextArch) -> int:
    """One decoder layer: q/k/v with bias, o without, gated MLP, two RMSNorms."""
    q = t.hidden * t.heads * t.head_dim + t.heads * t.head_dim
    kv = 2 * (t.hidden * t.kv_heads * t.head_dim + t.kv_heads * t.head_dim)
    o = t.heads * t.head_dim * t.hidden
    mlp = 3 * t.hidden * t.intermediate
    return q + kv + o + mlp + 2 * t.hidden


def embedding_params(t: TextArch) -> int:
    """Input embedding table."""
    return t.vocab * t.hidden


def output_params(t: TextArch) -> int:
    """Final RMSNorm plus lm_head (zero extra when tied to the embedding)."""
    return t.hidden + (0 if t.tied else t.vocab * t.hidden)


def text_params(t: TextArch) -> int:
    """Whole language model."""
    return embedding_params(t) + t.layers * text_layer_params(t) + output_params(t)


def training_flops(t: TextArch, sequences: int, seq_length: int) -> float:
    """Model FLOPs of one forward + backward over `sequences` x `seq_length` tokens, counted as Megatron-LM's
    `num_floating_point_operations` counts them (dense GPT, gated MLP): 12 * B * s * L * h^2 * (attention
    (1 + groups/heads + s/h) * (heads * head_dim / h) + MLP (ffn/h) * 3/2 + logits vocab / (2 L h)).
    The vision tower is not counted (Megatron-LM's formula is the language model's)."""
    h, layers = t.hidden, t.layers
    attention = (1 + t.kv_heads / t.heads + seq_length / h) * (t.heads * t.head_dim / h)
    mlp = (t.intermediate / h) * 3 / 2
    logits = t.vocab / (2 * layers * h)
    return 12.0 * sequences * seq_length * layers * h * h * (attention + mlp + logits)


def vision_block_params(v: VisionArch) -> int:
    """One ViT block: two RMSNorms, fused qkv and proj with bias, SwiGLU MLP with bias."""
    attn = v.hidden * 3 * v.hidden + 3 * v.hidden + v.hidden * v.hidden + v.hidden
    mlp = 2 * (v.hidden * v.intermediate + v.intermediate) + v.intermediate * v.hidden + v.hidden
    return attn + mlp + 2 * v.hidden


def vision_params(v: VisionArch | None) -> int:
    """Patch-embed Conv3d (no bias), blocks, and the patch merger (RMSNorm, Linear, GELU, Linear)."""
    if v is None:
        return 0
    patch = v.in_channels * v.temporal_patch * v.patch * v.patch * v.hidden
    merged = v.hidden * v.merge**2
    merger = v.hidden + merged * merged + merged + merged * v.out_hidden + v.out_hidden
    return patch + v.depth * vision_block_params(v) + merger


def total_params(a: Arch) -> int:
    """Language model plus vision tower."""
    return text_params(a.text) + vision_params(a.vision)


# ---------------------------------------------------------------- memory model

@dataclass(frozen=True)
class Workload:
    """What one GPU runs: GRPO rollout of G completions, then a training step on prompt + response."""
    seq: int = 4096               # prompt tokens (text + image tokens)
    max_new_tokens: int = 110     # response tokens; training sequence = seq + max_new_tokens
    micro_batch: int = 1          # sequences per micro-batch (training) / prompts per rollout batch
    group_size: int = 16          # GRPO completions per prompt (KV cache rows)
    recompute: str = "selective"  # none | selective | full
    sequence_parallel: bool = True
    distributed_optimizer: bool = True
    freeze_vision: bool = False
    reference_model: bool = True
    lora_rank: int = 0            # > 0: LoRA on every decoder linear, base frozen, no reference copy
    image_tokens: int = 1024      # LLM tokens of the sample's images (part of seq); the ViT sees 4x as many patches
    # prompts per step over all data-parallel ranks: the rollout decodes global_batch / DP prompts x G rows at
    # once (the trainer's rollout); None: micro_batch prompts per rollout batch (the planner's own tables)
    global_batch: int | None = None
    params_dtype: str = "bfloat16"   # bfloat16/float16: mixed precision with fp32 main weights; float32: none

    def __post_init__(self):
        if self.params_dtype not in DTYPE_BYTES:
            raise ValueError(f"params_dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.params_dtype!r}")

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one parameter, activation or KV element in the compute dtype."""
        return DTYPE_BYTES[self.params_dtype]

    def rollout_prompts(self, dp: int) -> float:
        """Prompts one data-parallel rank rolls out at once."""
        return self.micro_batch if self.global_batch is None else self.global_batch / dp


@dataclass(frozen=True)
class Layout:
    """Tensor x pipeline x data parallel sizes."""
    tp: int
    pp: int
    dp: int

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class StageMemory:
    """Bytes per GPU on one pipeline stage, term by term."""
    stage: str
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    reference: float
    kv_cache: float
    vision_activations: float = 0.0

    @property
    def total(self) -> float:
        """Static state plus the larger transient: training activations (decoder, vision tower, logits) or the
        rollout KV cache."""
        static = self.weights + self.grads + self.optimizer + self.reference
        return static + max(self.activations + self.vision_activations + self.logits, self.kv_cache)


def layers_per_stage(layers: int, pp: int) -> int:
    """Decoder layers on the fullest stage (uneven splits round up)."""
    return math.ceil(layers / pp)


def state_bytes_per_param(dp: int, distributed_optimizer: bool = True,
                          params_dtype: str = "bfloat16") -> dict[str, float]:
    """Megatron-LM's table: mixed precision (bf16 weight 2, fp32 grad 4, fp32 main weight + Adam m, v 12, over
    DP with the distributed optimizer: 18 or 6 + 12/DP); float32 (weight 4, grad 4, Adam m, v 8: 16 or 8 + 8/DP)."""
    optimizer = 8 if DTYPE_BYTES[params_dtype] == 4 else 12
    return {"weights": DTYPE_BYTES[params_dtype], "grads": 4,
            "optimizer": optimizer / dp if distributed_optimizer else optimizer}


def activation_bytes_per_layer(s: int, b: int, h: int, a: int, tp: int,
                               recompute: str, sequence_parallel: bool) -> float:
    """Korthikanti et al. 2022, bytes of activations one transformer layer keeps for backward."""
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
    sp = sequence_parallel and tp > 1
    if recompute == "full":
        return 2 * s * b * h / (tp if sp else 1)
    attention = 0 if recompute == "selective" else 5 * a * s / h
    if sp:
        return s * b * h * (34 + attention) / tp
    return s * b * h * (10 + 24 / tp + attention / tp)


def logits_bytes(s: int, b: int, vocab: int, tp: int) -> float:
    """fp32 logits for the loss, vocab-parallel (Korthikanti et al.: 4*s*b*v/t)."""
    return 4 * s * b * vocab / tp


def kv_cache_bytes(t: TextArch, n_layers: int, tp: int, w: Workload, dp: int = 1) -> float:
    """K and V of `n_layers` layers for G completions of each prompt one DP rank rolls out, full length."""
    kv_heads = max(t.kv_heads // tp, 1)
    per_token = 2 * n_layers * kv_heads * t.head_dim * w.dtype_bytes
    return per_token * w.group_size * (w.seq + w.max_new_tokens) * w.rollout_prompts(dp)


def vision_activation_bytes(v: VisionArch | None, image_tokens: int, micro_batch: int) -> float:
    """bf16 activations the vision tower keeps for backward, one micro-batch: s = image_tokens * merge^2 patches;
    per ViT block the two RMSNorm inputs, the qkv input, q/k/v, the attention output and the MLP input (8 x 2sh)
    and the SwiGLU gate, up, SiLU(gate) and product (4 x 2sI) with a memory-efficient attention kernel (no s^2
    term); the merger's ln_q input, MLP input and hidden (about 8sh). Not divided by TP: the tower is replicated
    on every TP rank, and not recomputed (megatron's recompute covers the decoder layers only)."""
    if v is None or image_tokens <= 0:
        return 0.0
    s = image_tokens * v.merge**2 * micro_batch
    return v.depth * s * (16 * v.hidden + 8 * v.intermediate) + 8 * s * v.hidden


def lora_layer_params(t: TextArch, rank: int, tp: int = 1) -> float:
    """LoRA parameters of one decoder layer on one TP rank, adapters on q/k/v/o/gate/up/down: a column-parallel
    linear keeps A [r, in] whole and B [out/tp, r]; a row-parallel one A [r, in/tp] and B [out, r] whole."""
    q, kv, h, ffn = t.heads * t.head_dim, t.kv_heads * t.head_dim, t.hidden, t.intermediate
    column = rank * (3 * h + (q + 2 * kv) / tp) + rank * (2 * h + 2 * ffn / tp)   # q/k/v, gate/up
    row = rank * (q / tp + h) + rank * (ffn / tp + h)                             # o, down
    return column + row


def stage_params(a: Arch, pp: int, first: bool, last: bool) -> int:
    """Parameters held by a stage before TP sharding (vision and embedding on the first stage)."""
    t = a.text
    n = layers_per_stage(t.layers, pp) * text_layer_params(t)
    if first:
        n += embedding_params(t) + vision_params(a.vision)
    if last:
        n += output_params(t)
        if t.tied and pp > 1:
            n += embedding_params(t)  # megatron keeps a copy of the tied embedding on the last stage
    return n


def stage_memory(a: Arch, layout: Layout, w: Workload, first: bool, last: bool) -> StageMemory:
    """Per-GPU bytes of one stage of `layout` under workload `w`.

    The language model's parameters are split over TP; the vision tower (first stage) is replicated whole on
    every TP rank. A frozen vision tower keeps its bf16 weights only (no grads, optimizer state, activations)."""
    t = a.text
    tp, pp = layout.tp, layout.pp
    held = stage_params(a, pp, first, last)
    vision = vision_params(a.vision) if first else 0
    per_gpu = (held - vision) / tp + vision             # parameters one GPU of this stage holds
    frozen = vision if w.freeze_vision else 0
    trainable = per_gpu - frozen
    per = state_bytes_per_param(layout.dp, w.distributed_optimizer, w.params_dtype)
    scale = w.dtype_bytes / BF16   # the activation formulas count bf16 elements
    s, n_layers = w.seq + w.max_new_tokens, layers_per_stage(t.layers, pp)
    in_flight = pp if first else 1  # 1F1B: stage i holds pp - i micro-batches
    act = scale * activation_bytes_per_layer(s, w.micro_batch, t.hidden, t.heads, tp,
                                             w.recompute, w.sequence_parallel)
    trains_vision = first and not w.freeze_vision and not w.lora_rank
    vision_act = (scale * vision_activation_bytes(a.vision, w.image_tokens, w.micro_batch) * in_flight
                  if trains_vision else 0.0)
    kv = kv_cache_bytes(t, n_layers, tp, w, layout.dp)
    name = "only" if first and last else "first" if first else "last"
    if w.lora_rank:
        adapters = n_layers * lora_layer_params(t, w.lora_rank, tp)
        return StageMemory(
            stage=name,
            weights=(per_gpu + adapters) * per["weights"],     # the frozen base in bf16, plus the adapters
            grads=adapters * per["grads"],
            optimizer=adapters * per["optimizer"],
            activations=act * n_layers * in_flight,
            logits=logits_bytes(s, w.micro_batch, t.vocab, tp) if last else 0.0,
            reference=0.0,                                       # the base with adapters off is the reference
            kv_cache=kv,
        )
    return StageMemory(
        stage=name,
        weights=per_gpu * per["weights"],
        grads=trainable * per["grads"],
        optimizer=trainable * per["optimizer"],
        activations=act * n_layers * in_flight,
        logits=logits_bytes(s, w.micro_batch, t.vocab, tp) if last else 0.0,
        reference=per_gpu * w.dtype_bytes if w.reference_model else 0.0,
        kv_cache=kv,
        vision_activations=vision_act,
    )


def layout_memory(a: Arch, layout: Layout, w: Workload) -> StageMemory:
    """The fullest stage of the layout (first or last; middle stages hold a subset of either)."""
    if layout.pp == 1:
        return stage_memory(a, layout, w, first=True, last=True)
    stages = [stage_memory(a, layout, w, first=True, last=False),
              stage_memory(a, layout, w, first=False, last=True)]
    return max(stages, key=lambda m: m.total)


# ---------------------------------------------------------------- candidates and recommendation

def tp_candidates(a: Arch, gpus_per_node: int = 8) -> list[int]:
    """TP sizes that split whole query groups (and vision heads) and stay inside one node."""
    vision_heads = a.vision.heads if a.vision else 1
    return [tp for tp in range(1, gpus_per_node + 1)
            if a.text.kv_heads % tp == 0 and vision_heads % tp == 0]


def layouts(a: Arch, gpus: int, gpus_per_node: int = 8) -> list[Layout]:
    """Every (TP, PP, DP) with TP*PP*DP = gpus and at least one decoder layer per stage."""
    out = []
    for tp in tp_candidates(a, gpus_per_node):
        if gpus % tp:
            continue
        for pp in range(1, min(a.text.layers, gpus // tp) + 1):
            if (gpus // tp) % pp == 0:
                out.append(Layout(tp, pp, gpus // (tp * pp)))
    return out


TERMS = ("weights", "grads", "optimizer", "activations", "vision_activations", "logits", "reference", "kv_cache")
HEADER = ("TP", "PP", "DP", "stage", "weights", "grads", "optim", "activ", "vis-act", "logits", "ref", "kv", "total",
          "fits")


@dataclass(frozen=True)
class Row:
    layout: Layout
    memory: StageMemory
    fits: bool
    even: bool


def plan(a: Arch, gpus: int, gpu_memory: float, w: Workload = Workload(),
         reserve: float = RESERVE, gpus_per_node: int = 8) -> list[Row]:
    """One row per candidate layout; `fits` means total <= gpu_memory * (1 - reserve)."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve must be in [0, 1), got {reserve}")
    usable = gpu_memory * (1 - reserve)
    rows = []
    for lay in layouts(a, gpus, gpus_per_node):
        mem = layout_memory(a, lay, w)
        rows.append(Row(lay, mem, mem.total <= usable, a.text.layers % lay.pp == 0))
    return rows


def recommend(rows: list[Row]) -> Row:
    """Smallest model-parallel size that fits; ties: fewer pipeline stages, even split, less memory."""
    fitting = [r for r in rows if r.fits]
    if not fitting:
        raise NoLayoutFits(rows)
    return min(fitting, key=lambda r: (r.layout.model_parallel, r.layout.pp, not r.even, r.memory.total))


class NoLayoutFits(RuntimeError):
    """No candidate layout fits the GPU memory."""

    def __init__(self, rows: list[Row]):
        best = min(rows, key=lambda r: r.memory.total, default=None)
        hint = (f"; the leanest (TP={best.layout.tp}, PP={best.layout.pp}) needs "
                f"{best.memory.total / GIB:.1f} GiB per GPU" if best else "; no layout divides the GPU count")
        super().__init__("no TP/PP/DP layout fits" + hint +
                         " (more GPUs, --freeze-vision, --recompute full, a shorter --seq, fewer --image-tokens or a "
                         "smaller --group-size)")
        self.rows = rows


def row_cells(r: Row) -> list[str]:
    """One table row, memory in GiB."""
    m = r.memory
    gib = [f"{getattr(m, t) / GIB:.1f}" for t in TERMS]
    uneven = "" if r.even else "*"
    return [str(r.layout.tp), f"{r.layout.pp}{uneven}", str(r.layout.dp), m.stage, *gib,
            f"{m.total / GIB:.1f}", "yes" if r.fits else "no"]


def format_table(rows: list[Row]) -> str:
    """Aligned text table, one line per candidate."""
    cells = [list(HEADER)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '80' (GiB) or '81920MiB' -> bytes; GB is read as GiB, as GPU vendors mean it."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*", text.lower())
    if not m:
        raise ValueError(f"--gpu-memory: cannot read {text!r} (e.g. 80GB, 141GB, 81920MiB)")
    scale = {"t": 1024**4, "g": GIB, "m": 1024**2}[(m.group(2) or "g")[0]]
    return float(m.group(1)) * scale
