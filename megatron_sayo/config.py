"""Typed run configuration: dataclasses with the paper's defaults, YAML files, dotted command-line overrides.

The dataclasses below are the single source of truth for every default. Paths are kept as written
(relative paths are relative to the working directory). Validate a file from the shell with
`python -m megatron_sayo.config FILE [key.sub=value ...]` (exit status 2 on a bad config).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
import sys
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config: the message names the source, the key and what would have been valid."""


def _f(default, *, ge=None, gt=None, le=None, lt=None):
    """A field with an optional numeric range, checked on load."""
    bounds = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=bounds)
    return field(default=default, metadata=bounds)


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """Which checkpoint to train (exactly one of the two paths) and how to run it."""

    hf_path: str | None = None          # HF Qwen2.5-VL directory (config.json + safetensors)
    megatron_path: str | None = None    # our megatron dist_checkpointing directory
    make_tiny_if_missing: bool = False  # create a tiny random checkpoint at the path on first use (demo)
    attention_backend: Literal["sdpa", "flash"] = "sdpa"   # core attention kernel ('flash': GPU only)
    layer_backend: Literal["local", "te"] = "local"        # megatron local layers, or Transformer Engine (GPU)
    # region masses: row log-sum-exp ('lse'), 0/1 indicator values through the kernel ('indicator'), or
    # 'auto' (indicator on CUDA: padded batches never materialise the scores; lse on CPU)
    region_mass_kernel: Literal["auto", "lse", "indicator"] = "auto"
    # the weights' dtype (bf16 trains with fp32 main weights)
    params_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    recompute: Literal["none", "selective", "full"] = "none"   # activations recomputed in backward: less memory
    sequence_parallel: bool = False   # megatron's sequence parallelism over the TP group (Transformer Engine only)
    # train the language model only: the vision tower gets no gradients and no optimizer state (and keeps no
    # activations for backward); the planner's --freeze-vision models the same run
    freeze_vision: bool = False


@dataclass
class DataConfig:
    """Grounded training data (JSONL/parquet, see docs/data.md) or a synthetic task."""

    train_file: str | None = None    # training set, JSONL or parquet (docs/data.md); a missing file is an error
    eval_file: str | None = None     # held-out set for eval.interval; a missing file is an error
    on_error: Literal["raise", "skip"] = "raise"   # a bad row or image: stop naming it, or skip it with a warning
    max_pixels: int | None = _f(None, gt=0)   # most pixels an image is resized to (None: the processor's own bound)
    min_pixels: int | None = _f(None, gt=0)   # fewest pixels an image is resized to (None: the processor's own bound)
    # prompt tokens besides the image's (chat template, question, instruction): a longer prompt stops the run
    # with its sample id. The memory check's prompt length is this + the image tokens max_pixels admits.
    max_text_tokens: int = _f(512, ge=1)
    # > 0: train on that many synthetic samples of synthetic_task (held-out: max(16, n // 8) more), made once in
    # synthetic_dir/<task>-<n>/; data.train_file and eval_file then name that set (set them to your files with 0)
    synthetic_n: int = _f(0, ge=0)
    # which synthetic task (data/synthetic.py)
    synthetic_task: Literal["shapes", "tiles", "tiles_reasoning"] = "shapes"
    synthetic_dir: str = ".cache/synthetic"   # the cache synthetic sets are written into (never a data file's path)
    # appended to every question (on its own line) in training and held-out evaluation; serve clients add it too
    instruction: str = "Look at the image, think briefly, then give the final answer as <answer>...</answer>."


@dataclass
class ParallelConfig:
    """Tensor and pipeline parallel sizes; data parallel is what the world size leaves."""

    tp: int = _f(1, ge=1)   # tensor-parallel size (attention heads and MLP split over tp ranks)
    pp: int = _f(1, ge=1)   # pipeline-parallel size (decoder layers split into pp stages)

    def dp(self, world_size: int) -> int:
        """Data-parallel size for `world_size` processes (after `validate`)."""
        return world_size // (self.tp * self.pp)


@dataclass
class RolloutConfig:
    """Sampling of G completions per prompt (paper: G=16, T=1.0, top_p=0.9, 110 new tokens)."""

    group_size: int = _f(16, ge=2)            # G completions per prompt (advantages are relative within a group)
    temperature: float = _f(1.0, gt=0.0)      # sampling temperature (entropies are taken at it too)
    top_p: float = _f(0.9, gt=0.0, le=1.0)    # nucleus sampling mass
    max_new_tokens: int = _f(110, ge=1)       # longest completion
    capture_scores: bool = True    # log-probs, entropies, region masses taken at decode (no scoring pass)
    capture_check: bool = False    # debug: score teacher-forced too, log mean |captured - teacher-forced|
    # DAPO's dynamic sampling: groups whose rewards are all equal (zero advantages) are dropped and more prompts
    # drawn until the step has train.global_batch groups with a reward spread (each DP rank its share); each step
    # logs dynamic_batches, dynamic_groups_dropped, dynamic_groups_filled and dynamic_extra_rollouts
    dynamic_sampling: bool = False
    # most prompt batches drawn in a step with dynamic_sampling, the first included; still short after them,
    # a rank fills its share with the first flat groups it drew (zero advantages)
    dynamic_sampling_max_batches: int = _f(4, ge=1)


@dataclass
class RewardWeights:
    """Weights of the summed reward terms (paper headline: attention + format)."""

    attention: float = 1.0   # SAYO's attention reward (docs/spec.md §3)
    format: float = 1.0      # <answer> tag times the length factor (docs/spec.md §4)
    accuracy: float = 0.0    # answer matches the reference (the paper's ablations only)


@dataclass
class RewardConfig:
    """docs/spec.md §3-4: attention reward, format+length reward, accuracy reward."""

    weights: RewardWeights = field(default_factory=RewardWeights)
    attention_form: Literal["paper", "code"] = "paper"   # R_attn = x^2 / (1 + x^2) ('paper') or tanh(log x) ('code')
    eps: float = _f(1e-8, gt=0.0)                        # TAS x = (A + eps) / (V + eps)
    top_entropy_ratio: float = _f(0.3, gt=0.0, le=1.0)   # share of a completion's tokens selected, by entropy
    # which completion tokens the attention reward pools over: 'entropy' the top top_entropy_ratio by entropy (the
    # paper), 'all' every token, 'reasoning' those before the last <answer> block, 'answer' those inside it.
    # Training only: held-out TAS keeps the paper's entropy selection, one yardstick for every variant.
    token_selection: Literal["entropy", "all", "reasoning", "answer"] = "entropy"
    format_long_bound: int = _f(100, ge=1)    # completions longer than this get a length penalty
    format_short_bound: int = _f(60, ge=1)    # completions shorter than this get a length penalty
    format_factor: float = _f(0.6, ge=0.0)    # scale of the length penalties
    accuracy_match: Literal["exact", "normalized", "numeric"] = "normalized"   # how an answer is compared
    # The data field the accuracy reward matches: 'short_answer' uses a row's short_answer where it has one
    # (GQA rows of the SAYO mix keep the one-word answer beside the fullAnswer sentence), else its answer.
    accuracy_target: Literal["answer", "short_answer"] = "answer"
    # Which last-layer row a(t), v(t) read for completion token t (docs/spec.md §3): 'token' = the token's own
    # row, query column p (the method); 'decision' = the row whose logits sampled it, column p - 1 (a
    # diagnostic of the ablation's finding that the lookup happens there; teacher-forced scoring only).
    attention_row: Literal["token", "decision"] = "token"


@dataclass
class LossConfig:
    """GRPO loss: clipped ratio + beta * k3 KL, averaged over the global batch's valid tokens."""

    clip_eps: float = _f(0.2, gt=0.0)       # PPO ratio clip range 1 +- clip_eps
    # upper clip (DAPO's clip-higher): the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]; null: clip_eps
    clip_eps_high: float | None = _f(None, gt=0.0)
    kl_beta: float = _f(0.001, ge=0.0)      # weight of the k3 KL to the reference policy (0: no reference pass)
    aggregation: Literal["token"] = "token"   # mean over the global batch's valid completion tokens
    advantage_eps: float = _f(1e-4, gt=0.0)   # A = (r - mean) / (std + advantage_eps)


@dataclass
class OptimConfig:
    """AdamW (paper: lr 5e-6, weight decay 0.01, grad clip 0.8); constant LR after linear warmup."""

    lr: float = _f(5e-6, gt=0.0)              # learning rate after the warmup
    weight_decay: float = _f(0.01, ge=0.0)    # AdamW decoupled weight decay
    grad_clip: float = _f(0.8, ge=0.0)        # 0 disables clipping
    warmup_steps: int = _f(0, ge=0)           # linear LR warmup steps (not warmup.*, the supervised warm-up)
    adam_beta1: float = _f(0.9, ge=0.0, lt=1.0)     # Adam first-moment decay
    adam_beta2: float = _f(0.999, ge=0.0, lt=1.0)   # Adam second-moment decay
    adam_eps: float = _f(1e-8, gt=0.0)              # Adam denominator epsilon
    distributed_optimizer: bool = False       # megatron's ZeRO-1 optimizer (optimizer state sharded over DP)


@dataclass
class TrainConfig:
    """Steps (one policy update per rollout batch), batch sizes, seed, NaN tolerance."""

    steps: int = _f(1000, ge=1)               # GRPO steps in all (a resumed run goes on to this step)
    global_batch: int = _f(16, ge=1)          # prompts per step, over all data-parallel ranks
    micro_batch: int = _f(4, ge=1)            # completions (sequences) per forward/backward
    prompt_sharing: bool = True               # scoring/reference/update run a group as [prompt | c_1 | ... | c_G]
    seed: int = 1234                          # sampling, data order and initialisation
    max_nan_steps_in_row: int = _f(3, ge=1)   # non-finite losses in a row (each skipped) before the run stops


@dataclass
class CheckpointConfig:
    """Save every `interval` steps (0: only at the end / on preemption), keep the `keep` newest."""

    interval: int = _f(50, ge=0)   # steps between checkpoints (0: only at the end and on preemption)
    keep: int = _f(2, ge=1)        # newest checkpoints kept in run_dir/checkpoints


@dataclass
class WarmupConfig:
    """Supervised warm-up on the task's answers before GRPO (for a random tiny model whose rewards give no
    signal); the result is cached in cache_dir and reused by later runs."""

    steps: int = _f(0, ge=0)      # supervised steps on the reference answers before GRPO (0: none)
    lr: float = _f(1e-3, gt=0.0)  # its learning rate (constant)
    seed: int = 0                 # its data order; independent of train.seed so GRPO seeds share one warm-up
    # reference answers per step over all ranks (None: train.global_batch x rollout.group_size)
    batch: int | None = _f(None, ge=1)
    cache_dir: str | None = None  # where warm-ups are cached, each in a folder keyed by its settings' hash


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoRAConfig:
    """LoRA on the decoder's linears as the paper trains it (rank 16, alpha 32, every linear layer); the base
    stays frozen and the reference policy is the same model with the adapters switched off."""

    enabled: bool = False                      # train LoRA adapters instead of the full model
    rank: int = _f(16, ge=1)                   # adapter rank r
    alpha: float = _f(32.0, gt=0.0)           # delta W = alpha / rank * B @ A
    dropout: float = _f(0.0, ge=0.0, lt=1.0)   # on the adapter's input, training only
    targets: list[str] = _f(list(LORA_TARGETS))  # megatron linears: linear_qkv, linear_proj, linear_fc1, linear_fc2
    vision: bool = False                       # adapters on the vision tower (not supported)
    seed: int = 0                              # initialisation of A (identical at every TP/PP)


@dataclass
class EvalConfig:
    """Held-out evaluation during training on data.eval_file: accuracy, format, TAS and attention reward of
    completions decoded greedily or with the paper's evaluation sampling (temperature 0.1, top_p 0.1)."""

    interval: int = _f(0, ge=0)              # every `interval` steps, before the first and after the last; 0: off
    num_samples: int = _f(32, ge=1)          # the first N rows of data.eval_file (fewer if the file is shorter)
    decoding: Literal["greedy", "sample"] = "greedy"   # held-out decoding: greedy, or the sampling below
    temperature: float = _f(0.1, gt=0.0)     # 'sample' only (paper's evaluation decoding)
    top_p: float = _f(0.1, gt=0.0, le=1.0)   # 'sample' only
    seed: int = 0                            # 'sample' only: the same draws at every evaluation
    batch: int = _f(16, ge=1)                # prompts per generate/score call
    max_new_tokens: int | None = _f(None, ge=1)   # None: rollout.max_new_tokens


@dataclass
class SuiteConfig:
    """The SAYO authors' evaluation settings for the nine-benchmark suite (docs/eval.md): their default system
    prompt and the pixel bounds every image is rescaled into before it is sent (eval/main.py of Cratileo/Sayo)."""

    system_prompt: str = ("You FIRST think about the reasoning process as an internal monologue and then provide the "
                          "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The "
                          "final answer MUST BE put in \\boxed{}.")
    min_pixels: int = _f(262144, gt=0)
    max_pixels: int = _f(5000000, gt=0)
    # The paper's Table 1 base models and their nine-benchmark averages (docs/spec.md §6), printed beside ours.
    paper_base_average: dict[str, float] = _f({"Qwen3-VL-8B": 59.64, "Qwen3-VL-4B": 59.15, "InternVL3.5-8B": 50.49})


@dataclass
class LogConfig:
    """What a run prints and where its metrics go besides metrics.jsonl."""

    tensorboard: bool = False     # also write run_dir/tensorboard (needs the `tensorboard` extra)
    interval: int = _f(1, ge=1)   # log every N steps
    # other libraries' log level (megatron, torch, transformers); this project's own lines are always shown
    level: Literal["debug", "info", "warning", "error"] = "warning"
    wandb: bool = False           # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "megatron_sayo"   # W&B project name
    wandb_mode: Literal["offline", "online"] = "offline"   # offline: written under run_dir/wandb, nothing sent


@dataclass
class RunConfig:
    """The whole run; `load_config` builds and validates it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run_dir: str = "runs/default"   # checkpoints, metrics.jsonl, config.yaml and plots; resumed when it has checkpoints

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate_world(self, world_size: int) -> int:
        """Check the layout against `world_size` processes; returns the data-parallel size."""
        tp, pp = self.parallel.tp, self.parallel.pp
        if world_size % (tp * pp):
            raise ConfigError(f"parallel: world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
        dp = self.parallel.dp(world_size)
        if self.train.global_batch % dp:
            raise ConfigError(f"train: global_batch = {self.train.global_batch} prompts must split evenly over "
                              f"dp={dp} data-parallel ranks")
        completions = self.train.global_batch * self.rollout.group_size
        if completions % (dp * self.train.micro_batch):
            raise ConfigError(f"train: global_batch*group_size = {completions} completions must split evenly "
                              f"into dp={dp} ranks x train.micro_batch={self.train.micro_batch}")
        if self.warmup.steps and self.warmup_answers() % dp:
            raise ConfigError(f"warmup: {self.warmup_answers()} answers per step (warmup.batch) must split evenly "
                              f"over dp={dp} data-parallel ranks")
        return dp

    def warmup_answers(self) -> int:
        """Reference answers per warm-up step over all ranks: warmup.batch, else the GRPO step's completions."""
        return self.warmup.batch or self.train.global_batch * self.rollout.group_size


def synthetic_files(data: DataConfig) -> tuple[str, str]:
    """(train, held-out) JSONL of the synthetic set `data` asks for: a folder of synthetic_dir named by the task
    and the sample count, so two settings never share one."""
    folder = f"{data.synthetic_dir.rstrip('/')}/{data.synthetic_task}-{data.synthetic_n}"
    return f"{folder}/train.jsonl", f"{folder}/eval.jsonl"


def synthetic_eval_n(data: DataConfig) -> int:
    """Held-out samples made beside a synthetic training set of data.synthetic_n."""
    return max(16, data.synthetic_n // 8)


def _resolve_synthetic(data: DataConfig, where: str) -> None:
    """With data.synthetic_n > 0, point data.train_file / eval_file at the synthetic set in the cache; a data file
    the user named is never replaced by synthetic data (nor written): naming one together with synthetic_n is an
    error."""
    if not data.synthetic_n:
        return
    for key, want in zip(("train_file", "eval_file"), synthetic_files(data)):
        given = getattr(data, key)
        if given is not None and given != want:
            raise ConfigError(f"{where}: data.{key} = {given!r} is set together with data.synthetic_n = "
                              f"{data.synthetic_n}: synthetic data goes only to its cache ({want}), never to a "
                              f"file you name; to train on your file add data.synthetic_n=0")
        setattr(data, key, want)


def _cross_checks(cfg: RunConfig, where: str) -> None:
    """Relations between keys that a single field's type cannot express."""
    if (cfg.model.hf_path is None) == (cfg.model.megatron_path is None):
        raise ConfigError(f"{where}: set exactly one of model.hf_path and model.megatron_path")
    if cfg.warmup.steps and not cfg.warmup.cache_dir:
        raise ConfigError(f"{where}: warmup.steps > 0 needs warmup.cache_dir")
    _resolve_synthetic(cfg.data, where)
    if cfg.data.train_file is None:
        raise ConfigError(f"{where}: data.train_file is required (or data.synthetic_n > 0 for a synthetic task)")
    _lora_checks(cfg.lora, cfg.model, where)
    if cfg.eval.interval and not cfg.data.eval_file:
        raise ConfigError(f"{where}: eval.interval > 0 needs data.eval_file (the held-out set)")
    if cfg.reward.attention_row == "decision" and cfg.rollout.capture_scores:
        raise ConfigError(f"{where}: reward.attention_row = decision needs rollout.capture_scores = false (the "
                          f"rollout captures each token's own row only)")
    lo, hi = cfg.data.min_pixels, cfg.data.max_pixels
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"{where}: data.min_pixels ({lo}) must be <= data.max_pixels ({hi})")


def _lora_checks(lora: LoRAConfig, model: ModelConfig, where: str) -> None:
    """The LoRA block's values that its field types cannot check."""
    bad = [t for t in lora.targets if t not in LORA_TARGETS]
    if bad or not lora.targets or len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(f"{where}: lora.targets = {lora.targets!r}: expected a non-empty list of distinct names "
                          f"from {', '.join(LORA_TARGETS)}")
    if lora.enabled and lora.vision:
        raise ConfigError(f"{where}: lora.vision = true is not supported (adapters go on the language decoder "
                          f"only; the vision tower stays frozen)")
    if lora.enabled and model.layer_backend != "local":
        raise ConfigError(f"{where}: lora.enabled needs model.layer_backend: local (Transformer Engine fuses the "
                          f"RMSNorm into linear_qkv/linear_fc1, so an adapter there would see un-normalised input)")


# --------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the key
# --------------------------------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    if typing.get_origin(tp) is list:
        return "a list of " + _type_name(typing.get_args(tp)[0])
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if _optional_inner(tp) is not None:
        return _type_name(_optional_inner(tp)) + " or null"
    return getattr(tp, "__name__", str(tp))


def _optional_inner(tp):
    """`X` for `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _coerce(value, tp, key: str, where: str):
    """`value` as type `tp` (int -> float allowed, '5e-6' -> float allowed), else ConfigError."""
    bad = ConfigError(f"{where}: {key} = {value!r}: expected {_type_name(tp)}")
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _coerce(value, inner, key, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, where)
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise bad
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{n}]", where) for n, v in enumerate(value)]
    raise TypeError(f"config field {key}: unsupported type {tp}")


def _check_range(value, bounds: dict, key: str, where: str) -> None:
    ops = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
           "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
    for name, bound in bounds.items():
        ok, sym = ops[name]
        if value is not None and not ok(value, bound):
            raise ConfigError(f"{where}: {key} = {value!r}: must be {sym} {bound}")


def _build(cls, data, prefix: str, where: str):
    """Instantiate dataclass `cls` from a mapping, checking every key, type and range."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"{where}: unknown key {key!r}; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, where)
        _check_range(kwargs[name], fields[name].metadata, key, where)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value) -> None:
    """tree['a']['b'] = value for key 'a.b' (intermediate mappings created)."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.steps=20' -> ('train.steps', 20); the value is read as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise ConfigError(f"command line: override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"command line: {key}: cannot parse value {raw!r}: {exc}") from None
    return key.strip(), value


def config_from_dict(data: dict, where: str = "config", complete: bool = True) -> RunConfig:
    """RunConfig from a plain mapping (as `to_dict` writes it), fully validated; complete=False skips the checks
    between keys (a partial config, e.g. the defaults alone, for --print-config)."""
    cfg = _build(RunConfig, data, "", where)
    if complete:
        _cross_checks(cfg, where)
    return cfg


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merged key by key, anything else (lists too) replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file as plain data with its `defaults:` resolved: `defaults: other.yaml` (or a list of files,
    later ones winning; paths relative to this file's folder) is read first and this file's keys merged on top."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"{path}: defaults form a cycle ({chain})")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parents = data.pop("defaults", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
        raise ConfigError(f"{path}: defaults = {parents!r}: expected a file name or a list of file names")
    merged: dict = {}
    for parent in parents:
        merged = _merge(merged, read_config_file(path.parent / parent, (*_seen, path.resolve())))
    return _merge(merged, data)


def load_config(path: str | None, overrides: list[str] = (), complete: bool = True) -> RunConfig:
    """Read YAML `path` (None: defaults only; its `defaults:` files first), apply `key.sub=value` overrides,
    validate (complete=False: each key only, see config_from_dict)."""
    data: dict = {}
    where = str(path) if path is not None else "defaults"
    if path is not None:
        data = read_config_file(path)
    if overrides:
        _build(RunConfig, data, "", where)  # report file errors against the file first
        for text in overrides:
            key, value = parse_override(text)
            _set_dotted(data, key, value)
        where = f"{where} + command line"
    return config_from_dict(data, where, complete)


# --------------------------------------------------------------------------------------------------------------
# Field documentation: the comments beside (or just above) each field in this file are its one-line doc
# --------------------------------------------------------------------------------------------------------------

def field_docs(cls) -> dict[str, str]:
    """{field name: doc} of a dataclass in this module: the comment lines just above the field, else the comment
    at the end of its line, joined into one line."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above, line = [], node.lineno - 1
        while line in comments and line not in code_lines:
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        docs[node.target.id] = " ".join(above or trailing)
    return docs


def _sections(cls=None, prefix: str = ""):
    """(dotted prefix, dataclass) of RunConfig and every nested config dataclass, depth first."""
    cls = cls or RunConfig
    yield prefix, cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _sections(hints[f.name], f"{prefix}{f.name}.")


def _scalar(value) -> str:
    """A value as one line of YAML (flow style for lists and mappings)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def describe(cfg: RunConfig) -> str:
    """The resolved config as YAML, each field followed by its one-line doc (`train --print-config`)."""
    lines: list[str] = []

    def walk(obj, indent: str) -> None:
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                doc = (type(value).__doc__ or "").strip().splitlines()[0]
                lines.append(f"{indent}{f.name}:{'  # ' + doc if doc else ''}")
                walk(value, indent + "  ")
            else:
                doc = docs.get(f.name, "")
                lines.append(f"{indent}{f.name}: {_scalar(value)}{'  # ' + doc if doc else ''}")

    walk(cfg, "")
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """docs/config.md: every section and field of RunConfig with its type, default and doc, from the
    dataclasses (tests/test_config.py checks the file is current)."""
    out = ["<!-- generated by `python -m megatron_sayo.config --markdown > docs/config.md` from "
           "megatron_sayo/config.py; do not edit by hand -->", "", "# Run config reference", "",
           "Every key of a run config, its type, its default and what it does. A config file may start from others "
           "with `defaults: other.yaml` (or a list; paths relative to the file, later files and the file itself "
           "winning key by key). `python -m megatron_sayo.train --print-config [--config FILE] [key=value ...]` "
           "prints the resolved config with these docs.", ""]
    defaults = RunConfig()
    for prefix, cls in _sections():
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        leaves = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
        if not leaves:
            continue
        obj = defaults
        for part in prefix.rstrip(".").split(".") if prefix else []:
            obj = getattr(obj, part)
        title = prefix.rstrip(".") or "top level"
        heading = f"`{title}`" if prefix else "Top level"
        out += [f"## {heading}", "", " ".join((cls.__doc__ or "").split()), "",
                "| key | type | default | description |", "|---|---|---|---|"]
        for f in leaves:
            doc = docs.get(f.name, "").replace("|", "\\|")
            kind = _type_name(hints[f.name]).replace("|", "\\|")
            default = _scalar(getattr(obj, f.name)).replace("|", "\\|")
            out.append(f"| `{prefix}{f.name}` | {kind} | `{default}` | {doc} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Validate a config file with overrides and print the resolved config as YAML."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--markdown"]:
        print(reference_markdown(), end="")
        return 0
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m megatron_sayo.config FILE [section.key=value ...]\n"
              "       python -m megatron_sayo.config --markdown   (the reference docs/config.md)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args[0], args[1:])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------------------------------------------
# Server (python -m megatron_sayo.eval.serve: its command-line defaults; not part of a run config)
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServeConfig:
    """Defaults of every server limit (each one a --flag of the same name; README "Security and limits")."""

    host: str = "127.0.0.1"                 # loopback unless told otherwise
    max_batch: int = 32                     # most requests generated together
    max_tokens_limit: int = 4096            # largest max_tokens a request may ask for
    default_max_tokens: int = 256           # max_tokens when a request gives none
    max_images_per_request: int = 8         # counted before any image is decoded
    max_image_pixels_factor: int = 4        # --max-image-pixels default: this x the processor's max_pixels
    max_prompt_chars: int = 1_000_000       # characters of message text, checked before tokenizing
    max_body_bytes: int = 64 << 20          # request body; larger ones get 413 before being read
    max_connections: int = 256              # open connections; requests beyond get 503
    backlog: int = 2048                     # listen backlog (the kernel caps it at net.core.somaxconn)
    read_timeout_s: float = 30.0            # a request's headers, and then its body, must arrive within this
    keep_alive_s: float = 5.0               # idle keep-alive connections are closed after this
    max_n: int = 16                         # choices per request
    max_stop: int = 4                       # stop strings per request
    max_top_logprobs: int = 20              # OpenAI's bound
