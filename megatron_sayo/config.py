"""Typed run configuration: dataclasses with the paper's defaults, YAML files, dotted command-line overrides.

The dataclasses below are the single source of truth for every default. Paths are kept as written
(relative paths are relative to the working directory). Validate a file from the shell with
`python -m megatron_sayo.config FILE [key.sub=value ...]` (exit status 2 on a bad config).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
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
    params_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    recompute: Literal["none", "selective", "full"] = "none"
    sequence_parallel: bool = False
    # train the language model only: the vision tower gets no gradients and no optimizer state (and keeps no
    # activations for backward); the planner's --freeze-vision models the same run
    freeze_vision: bool = False


@dataclass
class DataConfig:
    """Grounded training data (JSONL/parquet, see README) or a synthetic task."""

    train_file: str | None = None
    eval_file: str | None = None
    on_error: Literal["raise", "skip"] = "raise"
    max_pixels: int | None = _f(None, gt=0)   # None: the processor's own bounds
    min_pixels: int | None = _f(None, gt=0)
    # prompt tokens besides the image's (chat template, question, instruction): a longer prompt stops the run
    # with its sample id. The memory check's prompt length is this + the image tokens max_pixels admits.
    max_text_tokens: int = _f(512, ge=1)
    synthetic_n: int = _f(0, ge=0)            # > 0: write that many synthetic samples to train_file if missing
    synthetic_task: Literal["shapes", "tiles", "tiles_reasoning"] = "shapes"   # which synthetic task (data/synthetic.py)
    instruction: str = "Look at the image, think briefly, then give the final answer as <answer>...</answer>."


@dataclass
class ParallelConfig:
    """Tensor and pipeline parallel sizes; data parallel is what the world size leaves."""

    tp: int = _f(1, ge=1)
    pp: int = _f(1, ge=1)

    def dp(self, world_size: int) -> int:
        """Data-parallel size for `world_size` processes (after `validate`)."""
        return world_size // (self.tp * self.pp)


@dataclass
class RolloutConfig:
    """Sampling of G completions per prompt (paper: G=16, T=1.0, top_p=0.9, 110 new tokens)."""

    group_size: int = _f(16, ge=2)
    temperature: float = _f(1.0, gt=0.0)
    top_p: float = _f(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = _f(110, ge=1)
    capture_scores: bool = True    # log-probs, entropies, region masses taken at decode (no scoring pass)
    capture_check: bool = False    # debug: score teacher-forced too, log mean |captured - teacher-forced|


@dataclass
class RewardWeights:
    """Weights of the summed reward terms (paper headline: attention + format)."""

    attention: float = 1.0
    format: float = 1.0
    accuracy: float = 0.0


@dataclass
class RewardConfig:
    """docs/spec.md §3-4: attention reward, format+length reward, accuracy reward."""

    weights: RewardWeights = field(default_factory=RewardWeights)
    attention_form: Literal["paper", "code"] = "paper"
    eps: float = _f(1e-8, gt=0.0)
    top_entropy_ratio: float = _f(0.3, gt=0.0, le=1.0)
    format_long_bound: int = _f(100, ge=1)
    format_short_bound: int = _f(60, ge=1)
    format_factor: float = _f(0.6, ge=0.0)
    accuracy_match: Literal["exact", "normalized", "numeric"] = "normalized"
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

    clip_eps: float = _f(0.2, gt=0.0)
    kl_beta: float = _f(0.001, ge=0.0)
    aggregation: Literal["token"] = "token"
    advantage_eps: float = _f(1e-4, gt=0.0)   # A = (r - mean) / (std + advantage_eps)


@dataclass
class OptimConfig:
    """AdamW (paper: lr 5e-6, weight decay 0.01, grad clip 0.8); constant LR after linear warmup."""

    lr: float = _f(5e-6, gt=0.0)
    weight_decay: float = _f(0.01, ge=0.0)
    grad_clip: float = _f(0.8, ge=0.0)        # 0 disables clipping
    warmup_steps: int = _f(0, ge=0)
    adam_beta1: float = _f(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = _f(0.999, ge=0.0, lt=1.0)
    adam_eps: float = _f(1e-8, gt=0.0)
    distributed_optimizer: bool = False       # megatron's ZeRO-1 optimizer (optimizer state sharded over DP)


@dataclass
class TrainConfig:
    """Steps (one policy update per rollout batch), batch sizes, seed, NaN tolerance."""

    steps: int = _f(1000, ge=1)
    global_batch: int = _f(16, ge=1)          # prompts per step, over all data-parallel ranks
    micro_batch: int = _f(4, ge=1)            # completions (sequences) per forward/backward
    prompt_sharing: bool = True               # scoring/reference/update run a group as [prompt | c_1 | ... | c_G]
    seed: int = 1234
    max_nan_steps_in_row: int = _f(3, ge=1)


@dataclass
class CheckpointConfig:
    """Save every `interval` steps (0: only at the end / on preemption), keep the `keep` newest."""

    interval: int = _f(50, ge=0)
    keep: int = _f(2, ge=1)


@dataclass
class WarmupConfig:
    """Supervised warm-up on the task's answers before GRPO (for a random tiny model whose rewards give no
    signal); the result is cached in cache_dir and reused by later runs."""

    steps: int = _f(0, ge=0)
    lr: float = _f(1e-3, gt=0.0)
    seed: int = 0                 # its data order; independent of train.seed so GRPO seeds share one warm-up
    cache_dir: str | None = None


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoRAConfig:
    """LoRA on the decoder's linears as the paper trains it (rank 16, alpha 32, every linear layer); the base
    stays frozen and the reference policy is the same model with the adapters switched off."""

    enabled: bool = False
    rank: int = _f(16, ge=1)
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
    decoding: Literal["greedy", "sample"] = "greedy"
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
    tensorboard: bool = True
    interval: int = _f(1, ge=1)


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
    run_dir: str = "runs/default"

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
        return dp


def _cross_checks(cfg: RunConfig, where: str) -> None:
    """Relations between keys that a single field's type cannot express."""
    if (cfg.model.hf_path is None) == (cfg.model.megatron_path is None):
        raise ConfigError(f"{where}: set exactly one of model.hf_path and model.megatron_path")
    if cfg.warmup.steps and not cfg.warmup.cache_dir:
        raise ConfigError(f"{where}: warmup.steps > 0 needs warmup.cache_dir")
    if cfg.data.train_file is None:
        raise ConfigError(f"{where}: data.train_file is required")
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


def config_from_dict(data: dict, where: str = "config") -> RunConfig:
    """RunConfig from a plain mapping (as `to_dict` writes it), fully validated."""
    cfg = _build(RunConfig, data, "", where)
    _cross_checks(cfg, where)
    return cfg


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML `path` (None: defaults only), apply `key.sub=value` overrides, validate."""
    data: dict = {}
    where = str(path) if path is not None else "defaults"
    if path is not None:
        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping")
    if overrides:
        _build(RunConfig, data, "", where)  # report file errors against the file first
        for text in overrides:
            key, value = parse_override(text)
            _set_dotted(data, key, value)
        where = f"{where} + command line"
    return config_from_dict(data, where)


def main(argv: list[str] | None = None) -> int:
    """Validate a config file with overrides and print the resolved config as YAML."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m megatron_sayo.config FILE [section.key=value ...]", file=sys.stderr)
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
