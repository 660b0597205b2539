"""Per-token attention report of one grounded sample: region mass a, image mass v, entropy, selection, TAS.

    python tools/attention_report.py --hf DIR | --megatron DIR [--tp N] [--pp M] --image IMG \\
        --bbox x1,y1,x2,y2 --prompt TEXT (--completion TEXT | --generate N) [--temperature T] --out OUTDIR

The completion is teacher-forced after the chat-formatted prompt (or sampled with the KV-cached rollout,
`--generate N`), then one scoring pass on tp*pp local ranks gives, for every completion token at sequence
position p, a(p) and v(p) from the last layer's attention row p and the entropy of logits p - 1 divided by
the temperature (docs/spec.md §3). Writes OUTDIR/report.json and OUTDIR/heatmap.png (the selected tokens'
mean attention over the image grid, the box drawn).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_sayo.config import RewardConfig  # noqa: E402


class ReportError(ValueError):
    """A bad command line or input (the message says which)."""


@dataclass
class Sample:
    """Prompt inputs of one image + question, and the region of the box."""

    input_ids: torch.Tensor        # [1, P]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor   # [1, 3]
    image_positions: list[int]
    region_positions: list[int]
    grid: tuple[int, int]          # (rows, cols) of LLM tokens over the image


# ----------------------------------------------------------------------------------------------- inputs

def parse_bbox(text: str) -> list[float]:
    """'x1,y1,x2,y2' -> four finite numbers with x1 < x2 and y1 < y2."""
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        raise ReportError(f"--bbox must be four numbers x1,y1,x2,y2, got {text!r}") from None
    if len(box) != 4 or not all(np.isfinite(box)):
        raise ReportError(f"--bbox must be four finite numbers x1,y1,x2,y2, got {text!r}")
    if not (box[0] < box[2] and box[1] < box[3]):
        raise ReportError(f"--bbox needs x1 < x2 and y1 < y2, got {text!r}")
    return box


def build_sample(processor, hf, image, prompt: str, box: list[float]) -> Sample:
    """Chat-format the prompt with the image, tokenize, and map the box to region token positions."""
    from megatron_sayo.data.regions import RegionSpec, batch_region_positions, merge_grid_from_thw

    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    batch = processor(conv, add_generation_prompt=True)
    ids, thw = batch["input_ids"], batch["image_grid_thw"]
    spec = RegionSpec(boxes=[box], orig_size=image.size, sample_id="attention_report")
    region = batch_region_positions(ids, thw, hf.tokens.image, [spec], hf.vision.spatial_merge_size,
                                    hf.vision.patch_size)[0]
    image_pos = torch.nonzero(ids[0] == hf.tokens.image).reshape(-1).tolist()
    return Sample(ids, batch["pixel_values"], thw, image_pos, region,
                  merge_grid_from_thw(thw[0].tolist(), hf.vision.spatial_merge_size))


# ----------------------------------------------------------------------------------------------- ranks

def _generate(model, sample: Sample, steps: int, temperature: float, top_p: float, seed: int) -> list[int]:
    """Sample `steps` tokens at most with the KV-cached rollout (every rank calls it; ids are shared)."""
    from megatron_sayo.inference.decode import generate
    from megatron_sayo.inference.sampling import SamplingParams

    t = model.hf.tokens
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=steps, seed=seed,
                            suppress_token_ids=(t.image, t.video, t.vision_start, t.vision_end))
    out = generate(model, dict(input_ids=sample.input_ids, attention_mask=torch.ones_like(sample.input_ids),
                               pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw), params)
    return out.completion_ids[0][out.completion_mask[0].bool()].tolist()


def _rank_scores(hf_dir, megatron_dir, tp, pp, sample: Sample, completion, generate_n, temperature, top_p, seed):
    """On every rank: (generate,) score; the last stage's TP rank 0 returns (sequence, CompletionScores)."""
    from megatron.core import parallel_state

    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime
    from megatron_sayo.rl.batch import ScoringBatch
    from megatron_sayo.rl.scoring import score_policy

    runtime.init_distributed(tp, pp)
    model = load_model_stage(hf_dir, megatron_dir, tp=tp, pp=pp)
    if generate_n:
        completion = _generate(model, sample, generate_n, temperature, top_p, seed)
    if not completion:
        raise ReportError("the completion is empty (nothing to score)")
    prompt = sample.input_ids[0].tolist()
    region = torch.zeros(len(prompt), dtype=torch.bool)
    region[sample.region_positions] = True
    batch = ScoringBatch.from_completion(model.hf, prompt, completion, sample.pixel_values, sample.image_grid_thw,
                                         region)
    scores = score_policy(model, batch, micro_batch=1, temperature=temperature, key_weights=True)
    if not (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0):
        return None
    return batch.sequences[0].tolist(), scores


# ----------------------------------------------------------------------------------------------- report

def build_report(sequence: list[int], scores, sample: Sample, temperature: float, ratio: float, eps: float) -> dict:
    """report.json content (issue 5's fields) from the completion's CompletionScores, through rl/rewards."""
    from megatron_sayo.rl.rewards import attention_reward, select_top_entropy

    p = sample.input_ids.shape[1]
    n = len(sequence) - p
    selected = select_top_entropy(scores.entropy, scores.mask, ratio)
    paper, tas = attention_reward(scores.region_mass, scores.image_mass, selected, "paper", eps)
    code, _ = attention_reward(scores.region_mass, scores.image_mass, selected, "code", eps)
    per_token = [dict(position=p + j, token_id=int(sequence[p + j]), entropy=float(scores.entropy[0, j]),
                      region_mass=float(scores.region_mass[0, j]), image_mass=float(scores.image_mass[0, j]),
                      selected=bool(selected[0, j])) for j in range(n)]
    return dict(input_ids=list(sequence), image_token_positions=sample.image_positions,
                region_token_positions=sample.region_positions, temperature=temperature, top_entropy_ratio=ratio,
                tokens=per_token, tas=float(tas[0]), reward_paper=float(paper[0]), reward_code=float(code[0]))


def selected_attention_grid(key_weights: np.ndarray, report: dict, grid: tuple[int, int]) -> np.ndarray:
    """[rows, cols]: mean over selected tokens of the head-mean attention on each image cell."""
    p0 = report["tokens"][0]["position"]
    sel = [t["position"] - p0 for t in report["tokens"] if t["selected"]]
    cells = key_weights[sel][:, report["image_token_positions"]].mean(0)
    return cells.reshape(grid)


def draw_heatmap(image, cells: np.ndarray, box: list[float], report: dict, tokenizer, path: Path) -> None:
    """The image with the selected tokens' attention over it (cells, alpha-blended), the box, a colour bar
    (share of the image's attention, uniform = 1), and beside it a/v and entropy per completion token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    w, h = image.size
    share = cells / cells.mean() if cells.mean() > 0 else cells       # 1 = the uniform share of one cell
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 6.2), gridspec_kw=dict(width_ratios=[1.1, 1]))
    ax.imshow(image, extent=(0, w, h, 0))
    heat = ax.imshow(share, cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest",
                     vmin=float(share.min()), vmax=float(share.max()) + 1e-12)
    rows, cols = cells.shape
    ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, edgecolor="#00e5ff",
                           linewidth=2.5, label="box"))
    _outline_region(ax, report, rows, cols, w, h)
    ax.set_title(f"selected tokens' attention over the image ({rows}x{cols} cells)", fontsize=11)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    # below the image, so neither the bar nor its label can run into the panel's or the figure's title
    fig.colorbar(heat, ax=ax, orientation="horizontal", fraction=0.05, pad=0.08,
                 label="cell attention / mean cell (selected tokens, head mean; uniform = 1)")
    _token_panel(ax2, report, tokenizer)
    n_sel = sum(t["selected"] for t in report["tokens"])
    fig.suptitle(f"TAS = {report['tas']:.3f}   R_attn paper = {report['reward_paper']:.3f}   "
                 f"code = {report['reward_code']:.3f}   selected {n_sel}/{len(report['tokens'])} tokens "
                 f"(top {report['top_entropy_ratio']:g} entropy, T = {report['temperature']:g})", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _outline_region(ax, report: dict, rows: int, cols: int, w: int, h: int) -> None:
    """Dashed outline of each region cell (the tokens the box maps to)."""
    from matplotlib.patches import Rectangle

    start = report["image_token_positions"][0]
    cw, ch = w / cols, h / rows
    for i, pos in enumerate(report["region_token_positions"]):
        r, c = divmod(pos - start, cols)
        ax.add_patch(Rectangle((c * cw, r * ch), cw, ch, fill=False, edgecolor="white", linewidth=0.8,
                               linestyle="--", alpha=0.7, label="region cells" if i == 0 else None))


def _token_panel(ax, report: dict, tokenizer) -> None:
    """a/v (region share per token, uniform = 1) and entropy over the completion; selected tokens marked."""
    toks = report["tokens"]
    x = np.arange(len(toks))
    ratio = np.array([t["region_mass"] / t["image_mass"] if t["image_mass"] > 0 else np.nan for t in toks])
    sel = np.array([t["selected"] for t in toks])
    for j in x[sel]:
        ax.axvspan(j - 0.5, j + 0.5, color="#ffbf00", alpha=0.25, lw=0)
    ax.plot(x, ratio, color="#1f77b4", lw=1.4, marker=".", label="a / v (region vs whole image, per key)")
    ax.scatter(x[sel], ratio[sel], color="#d62728", zorder=3, s=30, label="selected (top entropy, shaded)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("completion token")
    ax.set_ylabel("a / v   (1 = region gets its share)")
    ent = ax.twinx()
    ent.plot(x, [t["entropy"] for t in toks], color="#2ca02c", lw=1.0, alpha=0.8, label="entropy (logits p-1, /T)")
    ent.set_ylabel("entropy (nats)", color="#2ca02c")
    if len(toks) <= 40 and tokenizer is not None:
        ax.set_xticks(x)
        ax.set_xticklabels([repr(tokenizer.decode([t["token_id"]]))[1:-1][:10] for t in toks], rotation=70,
                           fontsize=7)
    lines = ax.get_legend_handles_labels()
    bars = ent.get_legend_handles_labels()
    ax.legend(lines[0] + bars[0], lines[1] + bars[1], fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 if
              len(toks) > 40 or tokenizer is None else -0.3), ncol=3, frameon=False)
    ax.set_title("per completion token", fontsize=11)


# ----------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", type=Path, help="HF Qwen2.5-VL checkpoint directory")
    src.add_argument("--megatron", type=Path, help="megatron checkpoint directory (with its side files)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the scoring pass")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the scoring pass")
    p.add_argument("--image", type=Path, required=True, help="the sample's image file")
    p.add_argument("--bbox", required=True, help="x1,y1,x2,y2 in pixels of the original image")
    p.add_argument("--prompt", required=True,
                   help="the user text after the image (question and instruction, as in training)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--completion", help="teacher-forced completion text")
    what.add_argument("--generate", type=int, metavar="N", help="sample up to N tokens with the rollout engine")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; entropies are taken at it (training: 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --generate")
    p.add_argument("--seed", type=int, default=0, help="with --generate")
    p.add_argument("--top-entropy-ratio", type=float, default=RewardConfig.top_entropy_ratio,
                   help="share of completion tokens selected by entropy (reward.top_entropy_ratio)")
    p.add_argument("--eps", type=float, default=RewardConfig.eps, help="TAS = (A + eps) / (V + eps) (reward.eps)")
    p.add_argument("--out", type=Path, required=True, help="output folder for report.json and heatmap.png")
    return p.parse_args(argv)


def check_args(args) -> Path:
    """Validate before any heavy work; returns the checkpoint dir the processor files come from."""
    if args.tp < 1 or args.pp < 1:
        raise ReportError(f"--tp and --pp must be >= 1, got {args.tp}, {args.pp}")
    if args.temperature <= 0:
        raise ReportError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_entropy_ratio <= 1:
        raise ReportError(f"--top-entropy-ratio must be in (0, 1], got {args.top_entropy_ratio}")
    if args.generate is not None and args.generate < 1:
        raise ReportError(f"--generate must be >= 1, got {args.generate}")
    if not args.image.is_file():
        raise ReportError(f"--image {args.image}: no such file")
    ckpt = args.hf or args.megatron
    if args.megatron:
        from megatron_sayo.checkpoint.files import resolve_checkpoint_dir

        ckpt = resolve_checkpoint_dir(args.megatron)
    for names in (("config.json",), ("tokenizer.json",), ("preprocessor_config.json", "processor_config.json")):
        if not any((Path(ckpt) / name).is_file() for name in names):
            raise ReportError(f"{ckpt}: missing {' or '.join(names)} (the report needs the checkpoint's config and "
                              f"processor files)")
    return Path(ckpt)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ckpt = check_args(args)
        box = parse_bbox(args.bbox)
        from PIL import Image

        from megatron_sayo.data.processor import Processor
        from megatron_sayo.distributed.runtime import one_local_rank, spawn_local
        from megatron_sayo.models.qwen25vl.hf_config import load_hf_config

        hf = load_hf_config(ckpt)
        processor = Processor.from_pretrained(ckpt)
        image = Image.open(args.image).convert("RGB")
        sample = build_sample(processor, hf, image, args.prompt, box)
        completion = processor.tokenizer.encode(args.completion) if args.completion is not None else None
        if completion is not None and not completion:
            raise ReportError("--completion is empty")
    except (ReportError, ValueError, OSError) as exc:
        print(f"attention_report: {exc}", file=sys.stderr)
        return 2
    rank_args = (str(args.hf) if args.hf else None, str(ckpt) if args.megatron else None, args.tp, args.pp, sample,
                 completion, args.generate, args.temperature, args.top_p, args.seed)
    if args.tp * args.pp == 1:   # one rank: here, without starting a second interpreter
        with one_local_rank():
            results = [_rank_scores(*rank_args)]
    else:
        results = spawn_local(_rank_scores, args.tp * args.pp, *rank_args)
    sequence, scores = next(r for r in results if r is not None)
    report = build_report(sequence, scores, sample, args.temperature, args.top_entropy_ratio, args.eps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    draw_heatmap(image, selected_attention_grid(scores.key_weights[0].numpy(), report, sample.grid), box, report,
                 processor.tokenizer, args.out / "heatmap.png")
    print(f"tas {report['tas']:.4f}  reward_paper {report['reward_paper']:.4f}  reward_code {report['reward_code']:.4f}"
          f"  ({len(report['tokens'])} completion tokens) -> {args.out}/report.json, heatmap.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
