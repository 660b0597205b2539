"""Which completion tokens the TAS selection (top 30 % entropy, docs/spec.md §3) picks after an ablation's
warm-up, and how TAS depends on the answer word, on the first 64 held-out questions (greedy, then 4 samples
at temperature 1 / top-p 0.9 per question).

Beside the TAS of docs/spec.md §3 (the selected token's own attention row, query column p) it reports the TAS
of the row that DECIDED the token (query column p - 1, whose logits the token was sampled from; scoring with
reward.attention_row "decision"), pooled over the same selected tokens: where the looking happens.

    python -m megatron_sayo.experiments.selected_tokens --out DIR     # DIR: the ablation's --out
"""

from __future__ import annotations

import argparse
import collections
import statistics
from pathlib import Path

import torch

from megatron_sayo.checkpoint.state import load_model
from megatron_sayo.config import load_config
from megatron_sayo.data.grounded import load_grounded
from megatron_sayo.data.processor import Processor
from megatron_sayo.distributed import runtime
from megatron_sayo.experiments import ablation
from megatron_sayo.inference.decode import generate
from megatron_sayo.inference.sampling import SamplingParams
from megatron_sayo.rl import rewards
from megatron_sayo.rl.batch import ScoringBatch
from megatron_sayo.rl.prompts import build_prompt_batch
from megatron_sayo.rl.scoring import score_policy
from megatron_sayo.rl.trainer import build_policy


def inside_answer(tok, ids: list[int], j: int) -> bool:
    """Token j lies between '<answer>' and the closing tag (the answer words hold no '<')."""
    before, upto = tok.decode(ids[:j]), tok.decode(ids[:j + 1])
    return "<answer>" in before and "<" not in upto.split("<answer>", 1)[1]


def counted_means(groups: dict) -> dict:
    """{key: (count, mean)}."""
    return {k: (len(v), round(statistics.fmean(v), 4)) for k, v in groups.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m megatron_sayo.experiments.selected_tokens",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--out", required=True, type=Path, help="the ablation's --out (its warm-up is in OUT/warmup/)")
    out = p.parse_args(argv).out.resolve()
    cfg = load_config(str(ablation.CONFIG), ablation.arm_overrides(out, "tiles", ablation.ARMS["full"], "full", 0, []))
    warmup = ablation.warmup_checkpoint(cfg)
    if not (warmup / "metadata.json").is_file():
        raise SystemExit(f"{warmup}: no warm-up checkpoint (run the ablation with --out {out} first)")
    runtime.init_distributed(1, 1)
    model = build_policy(cfg, cfg.model.hf_path)
    load_model(model, warmup)
    model.eval()
    proc = Processor.from_pretrained(cfg.model.hf_path, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    samples = load_grounded(cfg.data.eval_file)[:64]
    hf, tok, r = model.hf, proc.tokenizer, cfg.reward
    suppress = hf.tokens.vision
    for name, g, params in (("greedy", 1, SamplingParams(greedy=True, max_new_tokens=24, suppress_token_ids=suppress)),
                            ("T=1, 4 per question", 4, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=24,
                                                                      suppress_token_ids=suppress))):
        picked, inside, total = collections.Counter(), 0, 0
        by_word, by_correct = collections.defaultdict(list), collections.defaultdict(list)
        decision_by_correct = collections.defaultdict(list)
        for start in range(0, len(samples), 16):
            chunk = samples[start:start + 16]
            prompts = build_prompt_batch(proc, chunk, hf.tokens.image, hf.vision.spatial_merge_size,
                                         hf.vision.patch_size, cfg.data.instruction)
            ro = generate(model, prompts.inputs, params, num_return_sequences=g)
            batch = ScoringBatch.from_rollout(ro, prompts, hf)
            sc = score_policy(model, batch, 16, params.temperature)
            _, tas, selected = rewards.sequence_attention_reward(sc, r.top_entropy_ratio, r.attention_form, r.eps)
            decided = score_policy(model, batch, 16, params.temperature, attention_row="decision")
            _, decision_tas, _ = rewards.sequence_attention_reward(decided, r.top_entropy_ratio, r.attention_form,
                                                                   r.eps)
            for row in range(ro.sequences.shape[0]):
                ids = ro.completion_ids[row, :int(ro.completion_lengths[row])].tolist()
                answer = rewards.extract_answer(tok.decode(ids, skip_special_tokens=True)) or "<none>"
                by_word[answer].append(float(tas[row]))
                by_correct[answer == chunk[row // g].answer].append(float(tas[row]))
                decision_by_correct[answer == chunk[row // g].answer].append(float(decision_tas[row]))
                for j in torch.nonzero(selected[row]).flatten().tolist():
                    picked[tok.decode([ids[j]])] += 1
                    inside += inside_answer(tok, ids, j)
                    total += 1
        mean = counted_means(dict(sorted(by_word.items(), key=lambda kv: -len(kv[1]))))
        print(f"== {name}: {total} selected tokens, {inside} inside the answer word; "
              f"most picked {picked.most_common(10)}")
        print(f"   TAS by answer word (count, mean): {mean}")
        print(f"   TAS of correct / wrong answers: {counted_means(by_correct)}")
        print(f"   deciding-row TAS (query p - 1) of correct / wrong answers: {counted_means(decision_by_correct)}")


if __name__ == "__main__":
    main()
