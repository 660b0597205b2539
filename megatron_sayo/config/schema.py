"""The run config's schema: typed dataclasses with the paper's defaults, their ranges and the checks between keys.

The dataclasses below are the single source of truth for every default; the comment beside (or just above) a
field is its one-line doc (config/reference.py reads them). Paths are kept as written (relative paths are relative
to the working directory).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


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


def cross_checks(cfg: RunConfig, where: str) -> None:
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
# Field types as a user reads them (in errors and in docs/config.md)
# --------------------------------------------------------------------------------------------------------------

def type_name(tp) -> str:
    """A field type in words: 'one of ...', 'int or null', 'a list of str'."""
    if typing.get_origin(tp) is list:
        return "a list of " + type_name(typing.get_args(tp)[0])
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if optional_inner(tp) is not None:
        return type_name(optional_inner(tp)) + " or null"
    return getattr(tp, "__name__", str(tp))


def optional_inner(tp):
    """`X` for `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None

