"""SAYO GRPO on megatron-core, the loop and the step: rollout -> scoring (entropy, log-probs, region masses)
-> rewards -> group advantages across DP -> reference log-probs -> one clipped + KL policy update -> metrics,
checkpoint. The loss contract (megatron's per-token loss) is stated in rl/loss.py; the optimizer set-up is
rl/optimizer.py, the metrics file rl/metrics.py.
"""

from __future__ import annotations

import logging
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_sayo.config import RunConfig
from megatron_sayo.data.grounded import decodable_samples
from megatron_sayo.distributed import runtime
from megatron_sayo.inference.completion_scores import CompletionScores
from megatron_sayo.inference.decode import completion_pad_id, generate
from megatron_sayo.inference.parallel import share_from_sampler
from megatron_sayo.inference.sampling import SamplingParams
from megatron_sayo.models.lora import adapters_disabled, attach_lora
from megatron_sayo.rl import rewards
from megatron_sayo.rl.advantages import distributed_group_advantages
from megatron_sayo.rl.batch import ScoringBatch
from megatron_sayo.rl.diagnostics import flat_groups, steering_metrics
from megatron_sayo.rl.dynamic_sampling import draw_until_full, group_has_signal, group_rows, merge_batches, merge_scores
from megatron_sayo.rl.heldout import HeldOutEvaluator
from megatron_sayo.rl.loss import grpo_token_loss
from megatron_sayo.rl.metrics import MetricsLogger
from megatron_sayo.rl.optimizer import wrap_for_training
from megatron_sayo.rl.phase_timer import PhaseTimer
from megatron_sayo.rl.prompts import PromptStream, build_prompt_batch
from megatron_sayo.rl.scoring import reference_logprobs, score_policy
from megatron_sayo.rl.update import accumulate_gradients

log = logging.getLogger("megatron_sayo.train")

STEP_PHASES = ("rollout", "score", "reference", "update")   # a step's timed phases: time_rollout, ... in metrics


# ----------------------------------------------------------------------------------------------------------
# Building the pieces
# ----------------------------------------------------------------------------------------------------------

def build_policy(cfg: RunConfig, hf_dir: str):
    """This rank's policy stage, for training, from the HF or megatron checkpoint the config names."""
    from megatron_sayo.checkpoint.loader import load_model_stage

    m = cfg.model
    return load_model_stage(None if m.megatron_path else hf_dir, m.megatron_path, tp=cfg.parallel.tp,
                            pp=cfg.parallel.pp, params_dtype=m.params_dtype, for_training=True,
                            attention_backend=m.attention_backend, layer_backend=m.layer_backend,
                            mass_kernel=m.region_mass_kernel, recompute=m.recompute,
                            sequence_parallel=m.sequence_parallel)


def freeze_vision_tower(model) -> int:
    """Turn off requires_grad on this stage's vision tower (before DDP and the optimizer are built, so neither
    holds gradient buffers or optimizer state for it); returns the number of parameters frozen (0 off stage 1)."""
    vision = getattr(model, "vision", None)
    if vision is None:
        return 0
    frozen = 0
    for p in vision.parameters():
        p.requires_grad_(False)
        frozen += p.numel()
    return frozen


def base_pointer(cfg: RunConfig, init_from: Path | None) -> dict:
    """Where the weights the run starts from live (absolute paths): the warm-up checkpoint when there is one,
    else the configured HF or megatron checkpoint. A LoRA step's adapters apply to exactly these weights."""
    if init_from is not None:
        return {"format": "megatron", "path": str(Path(init_from).resolve())}
    if cfg.model.megatron_path:
        return {"format": "megatron", "path": str(Path(cfg.model.megatron_path).resolve())}
    return {"format": "hf", "path": str(Path(cfg.model.hf_path).resolve())}


# ----------------------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------------------

_STOP_SIGNAL: list[int] = []   # signals received; checked between steps


def resume_conflict(cfg: RunConfig) -> str | None:
    """Why this config cannot resume the checkpoints already in its run_dir, or None: the newest checkpoint
    (by its checkpoint_metadata.json) was written with another `lora.enabled`, or another adapter `lora.rank` /
    `lora.targets`, so it holds other tensors than this run would load. Read-only: checked before anything in
    the run directory is written."""
    from megatron_sayo.checkpoint.files import CheckpointError, ordered_checkpoints, read_metadata

    for ckpt in ordered_checkpoints(Path(cfg.run_dir) / "checkpoints"):
        try:
            saved = read_metadata(ckpt).get("lora")
        except CheckpointError:
            continue                      # the resume scan warns about it and passes over it
        lora = cfg.lora
        if (saved is not None) != lora.enabled:
            return (f"{cfg.run_dir}: checkpoint {ckpt.name} was written with lora.enabled={saved is not None}, "
                    f"this run sets lora.enabled={lora.enabled}; resume with lora.enabled={saved is not None} or "
                    f"use a new run_dir")
        if saved is not None:
            for key, want in (("rank", lora.rank), ("targets", list(lora.targets))):
                if saved.get(key) != want:
                    return (f"{cfg.run_dir}: checkpoint {ckpt.name} holds adapters with lora.{key}={saved.get(key)!r}, "
                            f"this run sets lora.{key}={want!r}; resume with the checkpoint's value or use a new "
                            f"run_dir")
        return None
    return None


def install_signal_handlers() -> None:
    """SIGTERM / SIGUSR1 (Slurm preemption) from process start on: the trainer finishes its current (or first)
    step, checkpoints and exits 0."""
    def handler(signum, _frame):
        _STOP_SIGNAL.append(signum)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    metrics: dict = field(default_factory=dict)
    skipped: bool = False


class Preempted(Exception):
    """Raised between steps after SIGTERM/SIGUSR1, once the checkpoint is written."""


class GRPOTrainer:
    """Owns the model, optimizer, data stream and run directory of one training run."""

    def __init__(self, cfg: RunConfig, hf_dir: str, samples: list, init_from: Path | None = None,
                 eval_samples: list | None = None):
        from megatron_sayo.data.processor import Processor

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.hf_dir = hf_dir
        self.samples = samples
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.policy = self._load(init_from)
        self.hf = self.policy.hf
        self.base_pointer = base_pointer(cfg, init_from)
        if cfg.lora.enabled:   # before DDP and the optimizer: only the adapters train
            attach_lora(self.policy, self.hf.text, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                        dropout=cfg.lora.dropout, targets=cfg.lora.targets, seed=cfg.lora.seed)
        if cfg.model.freeze_vision:   # before DDP and the optimizer: the vision tower gets no grads/state
            freeze_vision_tower(self.policy)
        self.ddp, self.optimizer, self.scheduler = wrap_for_training(self.policy, cfg.optim, cfg.train.steps)
        # with LoRA the reference policy is the same model with its adapters off: no second copy
        self.reference = (self._load(init_from).eval() if cfg.loss.kl_beta > 0 and not cfg.lora.enabled
                          else None)
        if self.reference is not None:
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.processor = Processor.from_pretrained(hf_dir, min_pixels=cfg.data.min_pixels,
                                                   max_pixels=cfg.data.max_pixels)
        self.stream = PromptStream(len(samples), cfg.train.seed)
        self.heldout = HeldOutEvaluator(cfg, self.processor, eval_samples) if cfg.eval.interval else None
        self.step = 0
        self.nan_in_row = 0
        self.is_logger = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank()
                          == 0 and self.dp_rank == 0)

    def _load(self, init_from: Path | None):
        """The configured checkpoint, or the warm-up checkpoint when one is given."""
        model = build_policy(self.cfg, self.hf_dir)
        if init_from is not None:
            from megatron_sayo.checkpoint.state import load_model

            load_model(model, init_from)
        return model

    # -- one GRPO step ------------------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        cfg = self.cfg
        timer = PhaseTimer(STEP_PHASES)
        per_rank = cfg.train.global_batch // self.dp
        first = self.step * cfg.train.global_batch + self.dp_rank * per_rank
        g = cfg.rollout.group_size
        draws: list[dict | None] = []
        if cfg.rollout.dynamic_sampling:
            def draw(index: int, roll: bool):
                draws.append(self._draw(index, per_rank, roll, timer))
                return None if draws[-1] is None else draws[-1]["signal"]
            chosen, stats = draw_until_full(draw, per_rank, g, cfg.rollout.dynamic_sampling_max_batches,
                                            parallel_state.get_data_parallel_group() if self.dp > 1 else None)
            with timer.phase("score"):
                part = self._merge(draws, chosen)
            dynamic = stats.metrics()
        else:
            part, dynamic = self._draw(0, per_rank, True, timer), {}
        batch, scores, check = part["batch"], part["scores"], part["check"]
        with timer.phase("reference"):
            ref_logp = self._reference_logprobs(batch, cfg.train.micro_batch)

        last = parallel_state.is_pipeline_last_stage()
        metrics: dict = {}
        advantages = None
        with timer.phase("update"):
            if last:
                terms, tas, texts, total = part["terms"], part["tas"], part["texts"], part["total"]
                group_ids = torch.arange(total.numel(), device=total.device) // g + first
                advantages = distributed_group_advantages(total, group_ids, eps=cfg.loss.advantage_eps)
                metrics = self._rollout_metrics(terms, total, tas, scores)
                metrics.update(steering_metrics(terms["attention"], terms["accuracy"], tas, advantages, group_ids))
                metrics.update(self._no_signal(total, group_ids))
                metrics.update(dynamic)
            loss_metrics, grad_norm, skipped = self._update(batch, scores, ref_logp, advantages)
        step_seconds = timer.elapsed()
        self.step += 1
        if last:
            metrics.update(loss_metrics)
            metrics.update(check)
            n_tokens = float(batch.completion_mask.sum()) * self.dp
            metrics.update(step=self.step, grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"],
                           tokens_per_s=n_tokens / step_seconds, skipped=skipped, **timer.metrics(),
                           time_step=step_seconds, sample_completion=texts[0][:200],
                           sequences=batch.sequences.shape[0] * self.dp, sequence_length=batch.sequences.shape[1])
            if torch.cuda.is_available():
                metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return StepResult(metrics, skipped)

    def _draw(self, index: int, per_rank: int, roll: bool, timer: PhaseTimer) -> dict | None:
        """Prompt batch `index` of this step: this rank's prompts (always taken from the stream, so every rank's
        stream stays at one position), and when `roll`, their rollout (timed as "rollout"), scores and, on the
        last stage, the reward terms (timed as "score"); `signal` (every stage): per group, whether its rewards
        differ (dynamic sampling)."""
        cfg = self.cfg
        indices = self.stream.take(cfg.train.global_batch)
        if not roll:
            return None
        with timer.phase("rollout"):
            local = decodable_samples(self.samples, indices[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank],
                                      cfg.data.on_error)
            prompts, rollout = self._rollout(local, index)
        with timer.phase("score"):
            return self._score(local, prompts, rollout)

    def _rollout(self, local: list, index: int):
        """(prompt batch, rollout) of this rank's samples `local` in prompt batch `index` of the step."""
        cfg, hf = self.cfg, self.hf
        prompts = build_prompt_batch(self.processor, local, hf.tokens.image, hf.vision.spatial_merge_size,
                                     hf.vision.patch_size, cfg.data.instruction, cfg.data.max_text_tokens)
        g = cfg.rollout.group_size
        params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens,
                                suppress_token_ids=hf.tokens.vision,
                                seed=cfg.train.seed * 1_000_003 + self.step * 1009 + self.dp_rank + index * 104_729)
        self.policy.eval()
        inputs = {k: (v.to(runtime.device()) if isinstance(v, torch.Tensor) else v)
                  for k, v in prompts.inputs.items()}
        capture = cfg.rollout.capture_scores
        return prompts, generate(self.policy, inputs, params, num_return_sequences=g,
                                 capture_region=prompts.region_mask if capture else None)

    def _score(self, local: list, prompts, rollout) -> dict:
        """The rollout's batch and scores (captured, or a teacher-forced pass), on the last stage its reward
        terms, and with dynamic sampling the per-group `signal` flags on every stage."""
        cfg, hf = self.cfg, self.hf
        g, capture = cfg.rollout.group_size, cfg.rollout.capture_scores
        rows = rollout.group_ids.tolist()
        batch = ScoringBatch.from_rollout(rollout, prompts, hf)
        check = {}
        if not capture or cfg.rollout.capture_check:
            scores = score_policy(self.policy, batch, cfg.train.micro_batch, cfg.rollout.temperature,
                                  attention_row=cfg.reward.attention_row, shared=cfg.train.prompt_sharing)
            if capture and scores is not None:
                check = {f"capture_diff_{k}": v for k, v in rollout.scores.mean_abs_difference(scores).items()}
        if capture:
            scores = rollout.scores
        out = dict(batch=batch, scores=scores, check=check)
        signal = torch.zeros(len(local), dtype=torch.float64, device=rollout.sequences.device)
        if parallel_state.is_pipeline_last_stage():
            terms, tas, texts = self._rewards(rollout, scores, [local[r] for r in rows])
            total = rewards.total_reward(terms, cfg.reward.weights)
            out.update(terms=terms, tas=tas, texts=texts, total=total)
            signal = group_has_signal(total, g).double()
        if cfg.rollout.dynamic_sampling:   # the last stage's flags, on every stage (TP ranks computed them alike)
            out["signal"] = [bool(f) for f in share_from_sampler(signal).tolist()]
        return out

    def _merge(self, draws: list[dict | None], chosen: list[tuple[int, int]]) -> dict:
        """One step's batch from the chosen (draw, group) pairs of dynamic sampling: rows, scores, terms."""
        g = self.cfg.rollout.group_size
        by_draw: dict[int, list[int]] = {}
        for d, group in chosen:
            by_draw.setdefault(d, []).append(group)
        parts = [(draws[d], group_rows(groups, g)) for d, groups in sorted(by_draw.items())]
        first = draws[0]
        batch = merge_batches([(p["batch"], rows) for p, rows in parts], completion_pad_id(self.hf))
        out = dict(batch=batch, check=first["check"])
        out["scores"] = (None if first["scores"] is None else
                         merge_scores([(p["scores"], rows) for p, rows in parts]))
        if "terms" in first:
            def pick(values, rows):
                return values[torch.as_tensor(rows, dtype=torch.long, device=values.device)]
            out["terms"] = {k: torch.cat([pick(p["terms"][k], rows) for p, rows in parts]) for k in first["terms"]}
            out["tas"] = torch.cat([pick(p["tas"], rows) for p, rows in parts])
            out["total"] = torch.cat([pick(p["total"], rows) for p, rows in parts])
            out["texts"] = [p["texts"][r] for p, rows in parts for r in rows]
        return out

    def _reference_logprobs(self, batch: ScoringBatch, mb: int):
        """The reference policy's log-probs (None without a KL term): the frozen copy, or with LoRA the
        policy with its adapters switched off."""
        temperature, shared = self.cfg.rollout.temperature, self.cfg.train.prompt_sharing
        if self.cfg.loss.kl_beta == 0:
            return None
        if self.cfg.lora.enabled:
            with adapters_disabled(self.policy):
                return reference_logprobs(self.policy, batch, mb, temperature, shared)
        return reference_logprobs(self.reference, batch, mb, temperature, shared)

    def _rewards(self, rollout, scores: CompletionScores, samples):
        """Per-completion reward terms (attention, format, accuracy) and TAS, on the last stage."""
        cfg = self.cfg.reward
        tok = self.processor.tokenizer
        parts = None
        if cfg.token_selection in ("reasoning", "answer"):
            parts = rewards.completion_parts(rollout.completion_ids, rollout.completion_lengths,
                                             lambda ids: tok.decode(ids, skip_special_tokens=True))
        attn, tas, _ = rewards.sequence_attention_reward(scores, cfg.top_entropy_ratio, cfg.attention_form, cfg.eps,
                                                         cfg.token_selection, parts)
        texts = rollout.completion_texts(tok)
        fmt, acc = rewards.text_rewards(texts, rollout.completion_lengths.tolist(),
                                        [sample.reference(cfg.accuracy_target) for sample in samples], cfg)
        terms = {"attention": attn.float(), "format": torch.tensor(fmt, device=attn.device),
                 "accuracy": torch.tensor(acc, device=attn.device)}
        return terms, tas, texts

    def _rollout_metrics(self, terms, total, tas, scores: CompletionScores) -> dict:
        """Means over the global batch (all-reduced over DP) of rewards, TAS, entropy, lengths."""
        mask = scores.mask.float()
        local = torch.stack([total.mean(), terms["attention"].mean(), terms["format"].mean(),
                             terms["accuracy"].mean(), tas.float().mean(),
                             (scores.entropy * mask).sum() / mask.sum().clamp(min=1), mask.sum(1).mean()])
        group = parallel_state.get_data_parallel_group()
        if self.dp > 1:
            dist.all_reduce(local, group=group)
            local /= self.dp
        keys = ("reward_total", "reward_attention", "reward_format", "reward_accuracy", "tas", "entropy",
                "completion_tokens")
        return {k: float(v) for k, v in zip(keys, local)}

    def _no_signal(self, total: torch.Tensor, group_ids: torch.Tensor) -> dict:
        """Groups of the global batch whose rewards are all equal (zero advantages: nothing to learn from them);
        a warning on the logging rank when that is every group."""
        flat = torch.tensor([float(flat_groups(total, group_ids))])
        if self.dp > 1:
            dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
        groups = self.cfg.train.global_batch
        if int(flat.item()) == groups and self.is_logger:
            log.warning("step %d: all %d groups have zero reward variance (every completion of a prompt got the "
                        "same reward): no learning signal, so loss, KL and gradients are 0", self.step + 1, groups)
        return {"groups_no_signal": int(flat.item()), "groups": groups}

    def _update(self, batch: ScoringBatch, scores: CompletionScores | None, ref_logp, advantages):
        """One optimizer step on the clipped + KL loss; (metrics, grad norm, skipped)."""
        cfg = self.cfg
        loss = None if scores is None else grpo_token_loss(scores.logprobs, ref_logp, advantages, cfg.loss)
        reported = accumulate_gradients(self.ddp, self.optimizer, batch, cfg.train.micro_batch,
                                        cfg.rollout.temperature, loss, shared=cfg.train.prompt_sharing)
        metrics = self._loss_metrics(reported)
        finite = torch.tensor([1.0 if all(math.isfinite(v) for v in metrics.values()) else 0.0])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            self.nan_in_row += 1
            log.warning("step %d: non-finite loss, skipping the update (%d in a row)", self.step + 1,
                        self.nan_in_row)
            if self.nan_in_row >= cfg.train.max_nan_steps_in_row:
                raise FloatingPointError(f"{self.nan_in_row} non-finite losses in a row "
                                         f"(train.max_nan_steps_in_row = {cfg.train.max_nan_steps_in_row})")
            return metrics, float("nan"), True
        self.nan_in_row = 0
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return metrics, float(grad_norm) if grad_norm is not None else 0.0, not ok

    def _loss_metrics(self, reported: list[dict]) -> dict:
        """Global loss and KL per token; reported dicts hold this rank's sums (last stage only)."""
        if not reported:
            return {}
        tokens = sum(float(r["tokens"]) for r in reported)
        sums = torch.tensor([sum(float(r["pg_loss"]) for r in reported), sum(float(r["kl"]) for r in reported),
                             sum(float(r["clip_fraction"]) for r in reported), tokens])
        if self.dp > 1:
            dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        total = max(float(sums[3]), 1.0)
        pg, kl, clip = (float(x) / total for x in sums[:3])
        return {"loss": pg + self.cfg.loss.kl_beta * kl, "pg_loss": pg, "kl": kl, "clip_fraction": clip}

    def evaluate(self) -> dict:
        """Held-out metrics (eval_*) of the current policy, with the seconds they took."""
        timer = PhaseTimer()
        with timer.phase("eval"):
            out = self.heldout.evaluate(self.policy)
        return {**out, **timer.metrics()} if out else {}

    # -- the loop ----------------------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if _STOP_SIGNAL else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def state_extra(self) -> dict:
        return {"step": self.step, "data_position": self.stream.position, "nan_in_row": self.nan_in_row}

    def save(self) -> None:
        from megatron_sayo.checkpoint.state import save_training_state

        save_training_state(self.run_dir, self.step, self.policy, self.optimizer, self.scheduler,
                            extra=self.state_extra(), keep=self.cfg.checkpoint.keep, config_dir=self.hf_dir,
                            metadata=self.checkpoint_metadata())

    def checkpoint_metadata(self) -> dict:
        """What a step's checkpoint_metadata.json records beyond the defaults: with LoRA, the adapters' settings
        and the base they apply to (the step holds the adapters only)."""
        if not self.cfg.lora.enabled:
            return {}
        lora = self.cfg.lora
        return {"lora": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                         "targets": list(lora.targets), "base": self.base_pointer}}

    def maybe_resume(self) -> bool:
        """Resume from the newest complete checkpoint in run_dir, if any."""
        from megatron_sayo.checkpoint.state import load_training_state

        state = load_training_state(self.run_dir, self.policy, self.optimizer, self.scheduler)
        if state is None:
            return False
        extra = state["extra"]
        self.step, self.stream.position = int(state["step"]), int(extra["data_position"])
        self.nan_in_row = int(extra.get("nan_in_row", 0))
        if self.is_logger:
            print(f"resumed from {state['path']} at step {self.step}", flush=True)
        return True

    def fit(self, logger: MetricsLogger) -> None:
        cfg = self.cfg
        interval = cfg.checkpoint.interval
        if self.heldout is not None and self.step == 0:
            logger.log({"step": 0, **self.evaluate()})
        while self.step < cfg.train.steps:
            result = self.train_step()
            if self.heldout is not None and self.heldout.due(self.step):
                result.metrics.update(self.evaluate())
            logger.log(result.metrics)
            done = self.step >= cfg.train.steps
            if self._stop_requested():
                self.save()
                raise Preempted(f"stopped by signal at step {self.step}; checkpoint written")
            if done or (interval and self.step % interval == 0):
                self.save()
