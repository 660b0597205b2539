"""Held-out evaluation during GRPO: decode on data.eval_file, then score the completions with the training
path (entropies and last-layer region/image masses captured at decode, or one teacher-forced no-grad pass
with rollout.capture_scores false; the same reward functions), so eval_tas and eval_reward_attention mean
exactly what tas and reward_attention mean in training.

Decoding is greedy or the paper's evaluation sampling (temperature 0.1, top_p 0.1, fixed seed, so every
evaluation draws the same way). Token selection for TAS ranks entropies at the decoding temperature
(docs/spec.md §3: the distribution the token was drawn from); greedy counts as temperature 1.
The held-out rows are split over data-parallel ranks; the sums are all-reduced over DP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_sayo.config import EvalConfig, RewardConfig, RunConfig
from megatron_sayo.inference.completion_scores import CompletionScores
from megatron_sayo.inference.decode import Rollout, generate
from megatron_sayo.inference.sampling import SamplingParams
from megatron_sayo.rl import rewards
from megatron_sayo.rl.batch import ScoringBatch
from megatron_sayo.rl.prompts import build_prompt_batch
from megatron_sayo.rl.scoring import score_policy

METRIC_KEYS = ("eval_accuracy", "eval_format", "eval_tas", "eval_reward_attention")


def eval_sampling(cfg: EvalConfig, max_new_tokens: int, suppress: tuple[int, ...]) -> tuple[SamplingParams, float]:
    """(how to decode, the temperature the scoring pass divides logits by for the entropy ranking)."""
    greedy = cfg.decoding == "greedy"
    params = SamplingParams(temperature=1.0 if greedy else cfg.temperature, top_p=1.0 if greedy else cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens or max_new_tokens, greedy=greedy, seed=cfg.seed,
                            suppress_token_ids=suppress)
    return params, params.temperature


@dataclass(frozen=True)
class SampleScores:
    """Per completion of one scored batch: the reward terms and TAS (last pipeline stage)."""

    accuracy: list[float]
    format: list[float]
    tas: list[float]
    reward_attention: list[float]
    texts: list[str]


def score_completions(rollout: Rollout, scores: CompletionScores, answers: list[str], tokenizer,
                      reward: RewardConfig) -> SampleScores:
    """Accuracy, format, TAS and attention reward of each completion row, from its CompletionScores."""
    attn, tas, _ = rewards.sequence_attention_reward(scores, reward.top_entropy_ratio, reward.attention_form,
                                                     reward.eps)
    texts = rollout.completion_texts(tokenizer)
    fmt, acc = rewards.text_rewards(texts, rollout.completion_lengths.tolist(), answers, reward)
    return SampleScores(acc, fmt, [float(t) for t in tas], [float(a) for a in attn], texts)


class HeldOutEvaluator:
    """Evaluates the policy on this DP rank's share of the first eval.num_samples held-out rows."""

    def __init__(self, cfg: RunConfig, processor, samples: list):
        self.cfg, self.processor = cfg, processor
        dp = parallel_state.get_data_parallel_world_size()
        rank = parallel_state.get_data_parallel_rank()
        chosen = samples[:cfg.eval.num_samples]
        if not chosen:
            raise ValueError(f"{cfg.data.eval_file}: the held-out set is empty (eval.interval = {cfg.eval.interval})")
        self.samples = chosen[rank::dp]
        self.total = len(chosen)

    def due(self, step: int) -> bool:
        """Evaluate before the first step, every eval.interval steps and after the last."""
        interval = self.cfg.eval.interval
        return bool(interval) and (step % interval == 0 or step == self.cfg.train.steps)

    def sampling(self, policy) -> tuple[SamplingParams, float]:
        return eval_sampling(self.cfg.eval, self.cfg.rollout.max_new_tokens, policy.hf.tokens.vision)

    def score_chunk(self, policy, chunk: list) -> tuple[Rollout, SampleScores | None]:
        """Decode one chunk of held-out samples and score it; the scores exist on the last stage only."""
        cfg, hf = self.cfg, policy.hf
        params, temperature = self.sampling(policy)
        prompts = build_prompt_batch(self.processor, chunk, hf.tokens.image, hf.vision.spatial_merge_size,
                                     hf.vision.patch_size, cfg.data.instruction)
        capture = cfg.rollout.capture_scores
        rollout = generate(policy, prompts.inputs, params, num_return_sequences=1,
                           capture_region=prompts.region_mask if capture else None)
        if capture:
            scores = rollout.scores
        else:
            scores = score_policy(policy, ScoringBatch.from_rollout(rollout, prompts, hf), cfg.train.micro_batch,
                                  temperature, attention_row=cfg.reward.attention_row)
        if scores is None:
            return rollout, None
        return rollout, score_completions(rollout, scores, [s.reference(cfg.reward.accuracy_target) for s in chunk],
                                          self.processor.tokenizer, cfg.reward)

    def evaluate(self, policy) -> dict:
        """{eval_accuracy, eval_format, eval_tas, eval_reward_attention, eval_reward_total, eval_samples,
        eval_sample_completion}
        on the last pipeline stage; {} on the others. Every rank of the model must call it."""
        sums = torch.zeros(5, dtype=torch.float64)   # accuracy, format, tas, reward_attention, count
        first_text = ""
        policy.eval()
        for start in range(0, len(self.samples), self.cfg.eval.batch):
            chunk = self.samples[start:start + self.cfg.eval.batch]
            _, got = self.score_chunk(policy, chunk)
            if got is None:
                continue
            sums += torch.tensor([sum(got.accuracy), sum(got.format), sum(got.tas), sum(got.reward_attention),
                                  len(chunk)], dtype=torch.float64)
            first_text = first_text or got.texts[0]
        if parallel_state.get_data_parallel_world_size() > 1:
            dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        if not parallel_state.is_pipeline_last_stage():
            return {}
        n = max(float(sums[4]), 1.0)
        out = {k: float(v) / n for k, v in zip(METRIC_KEYS, sums[:4])}
        w = self.cfg.reward.weights   # the training reward_total's weighted sum, of the held-out means
        out["eval_reward_total"] = (w.attention * out["eval_reward_attention"] + w.format * out["eval_format"]
                                    + w.accuracy * out["eval_accuracy"])
        out.update(eval_samples=int(sums[4]), eval_sample_completion=first_text[:200])
        return out
