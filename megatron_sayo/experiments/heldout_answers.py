"""Greedy held-out answers of an ablation's warm-up and of each run's last checkpoint (the first 64 questions),
by answer word and, on `tiles_reasoning`, by whether the reasoning ("red over blue <answer>blue</answer>")
describes the asked tile; accuracy and TAS (docs/spec.md §3) of each part: what a reward changed in the answers.

    python -m megatron_sayo.experiments.heldout_answers --out DIR [--toy tiles|tiles_reasoning] [--arms a,b]
        [key=value ...]                                   # DIR, arms and overrides as the ablation ran
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sayo.config import load_config
from megatron_sayo.data.synthetic import TILES_QUESTION, TILES_REASONING
from megatron_sayo.experiments import ablation


@dataclass(frozen=True)
class Answer:
    """One held-out completion: the asked tile's top colour, the described one (None without reasoning), the
    answer word (None without <answer>), whether it is right, and its TAS."""

    asked: str
    described: str | None
    word: str | None
    correct: bool
    tas: float


def asked_colour(question: str) -> str:
    """'What is under red?' -> 'red' (data/synthetic.py TILES_QUESTION)."""
    prefix, suffix = TILES_QUESTION.split("{}")
    return question.removeprefix(prefix).removesuffix(suffix)


def described_colour(completion: str) -> str | None:
    """The top colour the reasoning describes ('green over blue <answer>...' -> 'green', data/synthetic.py
    TILES_REASONING); None without one."""
    head, sep, _ = completion.partition(TILES_REASONING.split("{}")[1])
    return head.strip() or None if sep else None


def _part(answers: list[Answer]) -> dict:
    """Count, accuracy and mean TAS of some answers (nan for none)."""
    return {"n": len(answers),
            "accuracy": statistics.fmean(a.correct for a in answers) if answers else float("nan"),
            "tas": statistics.fmean(a.tas for a in answers) if answers else float("nan")}


def split_by_description(answers: list[Answer]) -> dict:
    """Share of answers whose reasoning describes the asked tile, and count / accuracy / TAS of those ("asked")
    and of the rest ("other")."""
    asked = [a for a in answers if a.described == a.asked]
    return {"asked_share": len(asked) / max(len(answers), 1), "asked": _part(asked),
            "other": _part([a for a in answers if a.described != a.asked])}


def by_word(answers: list[Answer]) -> dict[str | None, dict]:
    """Per answer word, most frequent first: count / accuracy / TAS."""
    words: dict[str | None, list[Answer]] = {}
    for a in answers:
        words.setdefault(a.word, []).append(a)
    return {w: _part(group) for w, group in sorted(words.items(), key=lambda kv: (-len(kv[1]), str(kv[0])))}


def greedy_answers(model, cfg, processor, samples) -> list[Answer]:
    """Greedy completions of `samples`, scored as the held-out evaluation scores them (rl/heldout.py)."""
    from megatron_sayo.inference.decode import generate
    from megatron_sayo.inference.sampling import SamplingParams
    from megatron_sayo.rl.batch import ScoringBatch
    from megatron_sayo.rl.heldout import score_completions
    from megatron_sayo.rl.prompts import build_prompt_batch
    from megatron_sayo.rl.rewards import extract_answer
    from megatron_sayo.rl.scoring import score_policy

    hf = model.hf
    params = SamplingParams(greedy=True, max_new_tokens=cfg.rollout.max_new_tokens,
                            suppress_token_ids=hf.tokens.vision)
    out = []
    for start in range(0, len(samples), 16):
        chunk = samples[start:start + 16]
        prompts = build_prompt_batch(processor, chunk, hf.tokens.image, hf.vision.spatial_merge_size,
                                     hf.vision.patch_size, cfg.data.instruction)
        ro = generate(model, prompts.inputs, params, num_return_sequences=1)
        scores = score_policy(model, ScoringBatch.from_rollout(ro, prompts, hf), 16, 1.0)
        got = score_completions(ro, scores, [sample.answer for sample in chunk], processor.tokenizer, cfg.reward)
        for row, (sample, text) in enumerate(zip(chunk, got.texts, strict=True)):
            out.append(Answer(asked_colour(sample.question), described_colour(text), extract_answer(text),
                              got.accuracy[row] > 0, got.tas[row]))
    return out


def report_line(name: str, answers: list[Answer], reasoning: bool) -> str:
    """One markdown row: accuracy, TAS, (the description split,) and the answer words as word n (TAS)."""
    whole = _part(answers)
    cells = [name, f"{whole['accuracy']:.3f}", f"{whole['tas']:.3f}"]
    if reasoning:
        got = split_by_description(answers)
        a, o = got["asked"], got["other"]
        cells += [f"{a['n']}/{a['n'] + o['n']}", f"{a['accuracy']:.2f} / {o['accuracy']:.2f}",
                  f"{a['tas']:.2f} / {o['tas']:.2f}"]
    cells.append(", ".join(f"{w} {p['n']} ({p['tas']:.1f})" for w, p in by_word(answers).items()))
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> None:
    from megatron_sayo import console

    console.setup("warning")
    from megatron_sayo.checkpoint.files import find_resumable
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.checkpoint.state import load_model
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.distributed import runtime
    from megatron_sayo.rl.trainer import build_policy

    p = argparse.ArgumentParser(prog="python -m megatron_sayo.experiments.heldout_answers",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--out", required=True, type=Path, help="the ablation's --out")
    p.add_argument("--toy", default="tiles_reasoning", choices=list(ablation.TOYS), help="which toy's runs")
    p.add_argument("--arms", default="", help="comma-separated arms (default: every run folder of the toy)")
    p.add_argument("overrides", nargs="*", help="the overrides the ablation ran with")
    args = p.parse_args(argv)
    out = args.out.resolve()
    overrides = ablation.arm_overrides(out, args.toy, ablation.ARMS["full"], "full", 0, args.overrides)
    cfg = load_config(str(ablation.CONFIG), overrides)
    warmup = ablation.warmup_checkpoint(cfg)
    if not (warmup / "metadata.json").is_file():
        raise SystemExit(f"{warmup}: no warm-up checkpoint (run the ablation with --out {out} first)")
    arms = [a for a in args.arms.split(",") if a]
    runs = sorted(r for r in (out / args.toy / "runs").glob("*-seed*") if not arms or r.name.rsplit("-seed", 1)[0]
                  in arms)
    with runtime.one_local_rank():
        runtime.init_distributed(1, 1)
        processor = Processor.from_pretrained(cfg.model.hf_path, min_pixels=cfg.data.min_pixels,
                                              max_pixels=cfg.data.max_pixels)
        samples = load_grounded(cfg.data.eval_file)[:64]
        warm = build_policy(cfg, cfg.model.hf_path)
        load_model(warm, warmup)
        models = [("warm-up", lambda: warm.eval())]
        for run in runs:
            step = find_resumable(run)
            if step is not None:
                models.append((f"{run.name} {step.name}", lambda step=step: load_model_stage(
                    megatron_dir=step, params_dtype=torch.float32)))
        reasoning = args.toy == "tiles_reasoning"
        head = ["checkpoint", "accuracy", "TAS"] + (["describes the asked tile", "accuracy (asked / other)",
                                                     "TAS (asked / other)"] if reasoning else [])
        head.append("answer words: count (TAS)")
        print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|", flush=True)
        for name, build in models:
            print(report_line(name, greedy_answers(build(), cfg, processor, samples), reasoning), flush=True)


if __name__ == "__main__":
    main()
