"""Which tile the reasoning describes, on the `tiles_reasoning` ablation: for the warm-up and each run's last
checkpoint, greedy completions of the first 64 held-out questions, split by whether the reasoning ("red over
blue <answer>blue</answer>") describes the asked tile, with accuracy and TAS (docs/spec.md §3) of each part.

    python -m megatron_sayo.experiments.described_tiles --out DIR [key=value ...]   # the ablation's DIR, overrides
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from megatron_sayo.config import load_config
from megatron_sayo.data.synthetic import TILES_QUESTION, TILES_REASONING
from megatron_sayo.experiments import ablation


def asked_colour(question: str) -> str:
    """'What is under red?' -> 'red' (data/synthetic.py TILES_QUESTION)."""
    prefix, suffix = TILES_QUESTION.split("{}")
    return question.removeprefix(prefix).removesuffix(suffix)


def described_colour(completion: str) -> str | None:
    """The top colour the reasoning describes ('green over blue <answer>...' -> 'green', data/synthetic.py
    TILES_REASONING); None without one."""
    head, sep, _ = completion.partition(TILES_REASONING.split("{}")[1])
    return head.strip() or None if sep else None


def split_by_description(rows: list[tuple[str, str, bool, float]]) -> dict:
    """rows of (asked, described, correct, tas) -> share describing the asked tile, and per part the count,
    accuracy and mean TAS."""
    out = {"asked_share": sum(a == d for a, d, _, _ in rows) / max(len(rows), 1)}
    for part, keep in (("asked", lambda a, d: a == d), ("other", lambda a, d: a != d)):
        sel = [(c, t) for a, d, c, t in rows if keep(a, d)]
        out[part] = {"n": len(sel), "accuracy": statistics.fmean(c for c, _ in sel) if sel else float("nan"),
                     "tas": statistics.fmean(t for _, t in sel) if sel else float("nan")}
    return out


def evaluate(model, cfg, processor, samples) -> dict:
    """Greedy completions of `samples`, scored by the training path; split_by_description of them."""
    from megatron_sayo.inference.decode import generate
    from megatron_sayo.inference.sampling import SamplingParams
    from megatron_sayo.rl import rewards
    from megatron_sayo.rl.batch import ScoringBatch
    from megatron_sayo.rl.prompts import build_prompt_batch
    from megatron_sayo.rl.scoring import score_policy

    hf, tok, r = model.hf, processor.tokenizer, cfg.reward
    params = SamplingParams(greedy=True, max_new_tokens=cfg.rollout.max_new_tokens, suppress_token_ids=(
        hf.tokens.image, hf.tokens.video, hf.tokens.vision_start, hf.tokens.vision_end))
    rows = []
    for start in range(0, len(samples), 16):
        chunk = samples[start:start + 16]
        prompts = build_prompt_batch(processor, chunk, hf.tokens.image, hf.vision.spatial_merge_size,
                                     hf.vision.patch_size, cfg.data.instruction)
        ro = generate(model, prompts.inputs, params, num_return_sequences=1)
        scores = score_policy(model, ScoringBatch.from_rollout(ro, prompts, hf), 16, 1.0)
        _, tas, _ = rewards.sequence_attention_reward(scores, r.top_entropy_ratio, r.attention_form, r.eps)
        for row, sample in enumerate(chunk):
            text = tok.decode(ro.completion_ids[row, :int(ro.completion_lengths[row])].tolist(),
                              skip_special_tokens=True)
            correct = rewards.accuracy_reward(rewards.extract_answer(text), sample.answer, r.accuracy_match) > 0
            rows.append((asked_colour(sample.question), described_colour(text), correct, float(tas[row])))
    return split_by_description(rows)


def main(argv=None) -> None:
    from megatron_sayo.checkpoint.files import find_resumable
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.checkpoint.state import load_model
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.distributed import runtime
    from megatron_sayo.rl.trainer import build_policy

    p = argparse.ArgumentParser(prog="python -m megatron_sayo.experiments.described_tiles",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--out", required=True, type=Path, help="the ablation's --out")
    p.add_argument("overrides", nargs="*", help="the overrides the ablation ran with")
    args = p.parse_args(argv)
    out = args.out.resolve()
    overrides = ablation.arm_overrides(out, ablation.toy_of(args.overrides), ablation.ARMS["full"], "full", 0,
                                       args.overrides)
    cfg = load_config(str(ablation.CONFIG), overrides)
    warmup = ablation.warmup_checkpoint(cfg)
    if not (warmup / "metadata.json").is_file():
        raise SystemExit(f"{warmup}: no warm-up checkpoint (run the ablation with --out {out} first)")
    runtime.init_distributed(1, 1)
    processor = Processor.from_pretrained(cfg.model.hf_path, min_pixels=cfg.data.min_pixels,
                                          max_pixels=cfg.data.max_pixels)
    samples = load_grounded(cfg.data.eval_file)[:64]
    warm = build_policy(cfg, cfg.model.hf_path)
    load_model(warm, warmup)
    models = [("warm-up", lambda: warm.eval())]
    for run in sorted((out / "runs").glob("*-seed*")):
        step = find_resumable(run)
        if step is not None:
            models.append((f"{run.name} {step.name}", lambda step=step: load_model_stage(
                megatron_dir=step, params_dtype=torch.float32)))
    print("| checkpoint | describes the asked tile | accuracy (asked / other) | TAS (asked / other) |")
    print("|---|---|---|---|")
    for name, build in models:
        got = evaluate(build(), cfg, processor, samples)
        a, o = got["asked"], got["other"]
        print(f"| {name} | {got['asked_share']:.3f} ({a['n']}/{a['n'] + o['n']}) | {a['accuracy']:.3f} / "
              f"{o['accuracy']:.3f} | {a['tas']:.3f} / {o['tas']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
