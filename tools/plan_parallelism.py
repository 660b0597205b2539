#!/usr/bin/env python
"""Recommend TP/PP/DP for GRPO on Qwen2.5-VL from a per-GPU memory model and print the table.

    python tools/plan_parallelism.py --model examples/configs/qwen25vl_72b.config.json --gpus 64 --gpu-memory 80GB
    python tools/plan_parallelism.py --model examples/configs/qwen25vl_7b.config.json --gpus 8 --lora-rank 16

--lora-rank adds the LoRA table (frozen bf16 base, adapter master weights and Adam state, no reference copy)
and the per-layout totals of full fine-tuning and LoRA side by side.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from megatron_sayo.plan import (
    GIB,
    RESERVE,
    TERMS,
    ConfigError,
    NoLayoutFits,
    Row,
    Workload,
    format_table,
    load_arch,
    parse_memory,
    plan,
    recommend,
    text_params,
    total_params,
    vision_params,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory or its config.json")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs")
    p.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 141GB (GB read as GiB)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP never crosses a node")
    p.add_argument("--seq", type=int, default=4096, help="prompt tokens incl. image tokens")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward/backward (train.micro_batch)")
    p.add_argument("--group-size", type=int, default=16, help="GRPO completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=110, help="longest completion (rollout.max_new_tokens)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="selective",
                   help="activation recompute (model.recompute)")
    p.add_argument("--no-sequence-parallel", action="store_true", help="model without megatron's sequence parallelism")
    p.add_argument("--no-distributed-optimizer", action="store_true",
                   help="model without the distributed optimizer (optimizer state not sharded over DP)")
    p.add_argument("--no-reference", action="store_true", help="no frozen reference model (KL off)")
    p.add_argument("--freeze-vision", action="store_true",
                   help="vision tower frozen (train with model.freeze_vision=true): bf16 weights only")
    p.add_argument("--image-tokens", type=int, default=1024,
                   help="LLM tokens of a sample's images (within --seq); the ViT sees 4x as many patches")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="also plan LoRA of this rank on every decoder linear (paper: 16); 0 = full only")
    p.add_argument("--reserve", type=float, default=RESERVE, help="fraction of GPU memory kept free")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if not 0 <= args.image_tokens <= args.seq:
        p.error(f"--image-tokens must be in [0, --seq={args.seq}], got {args.image_tokens}")
    for name in ("gpus", "gpus_per_node", "seq", "micro_batch", "group_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_new_tokens < 0:
        p.error("--max-new-tokens must be >= 0")
    if args.lora_rank < 0:
        p.error("--lora-rank must be >= 0")
    return args


def workload(args: argparse.Namespace, lora_rank: int = 0) -> Workload:
    """The Workload the options describe (full fine-tuning, or LoRA of `lora_rank`)."""
    return Workload(lora_rank=lora_rank, seq=args.seq, max_new_tokens=args.max_new_tokens, micro_batch=args.micro_batch,
                    group_size=args.group_size, recompute=args.recompute,
                    sequence_parallel=not args.no_sequence_parallel,
                    distributed_optimizer=not args.no_distributed_optimizer,
                    freeze_vision=args.freeze_vision, reference_model=not args.no_reference,
                    image_tokens=args.image_tokens)


def row_dict(r: Row) -> dict:
    """JSON form of a row (bytes)."""
    return {**asdict(r.layout), "stage": r.memory.stage, "even": r.even, "fits": r.fits,
            **{t: getattr(r.memory, t) for t in TERMS}, "total": r.memory.total}


def side_by_side(full: list[Row], lora: list[Row]) -> str:
    """Per layout: GiB per GPU of full fine-tuning next to LoRA, and whether each fits."""
    lines = ["  TP  PP  DP     full  fits     LoRA  fits"]
    for f, r in zip(full, lora):
        lines.append(f"{f.layout.tp:>4}{f.layout.pp:>4}{f.layout.dp:>4}{f.memory.total / GIB:>9.1f}"
                     f"{'yes' if f.fits else 'no':>6}{r.memory.total / GIB:>9.1f}{'yes' if r.fits else 'no':>6}")
    return "\n".join(lines)


def best_line(name: str, rows: list[Row]) -> str:
    try:
        best = recommend(rows)
    except NoLayoutFits as err:
        return f"{name}: {err}"
    lay = best.layout
    return f"{name}: TP={lay.tp} PP={lay.pp} DP={lay.dp} ({best.memory.total / GIB:.1f} GiB per GPU)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        arch = load_arch(args.model)
        memory = parse_memory(args.gpu_memory)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = plan(arch, args.gpus, memory, workload(args), args.reserve, args.gpus_per_node)
    try:
        best = recommend(rows)
    except NoLayoutFits as err:
        best, failure = None, str(err)
    counts = {"total": total_params(arch), "text": text_params(arch.text), "vision": vision_params(arch.vision)}
    if args.json:
        print(json.dumps({"params": counts, "usable_bytes": memory * (1 - args.reserve),
                          "rows": [row_dict(r) for r in rows],
                          "recommended": row_dict(best) if best else None}, indent=2))
    else:
        print(f"{args.model}: {counts['total'] / 1e9:.3f}B parameters "
              f"(language model {counts['text'] / 1e9:.3f}B, vision {counts['vision'] / 1e9:.3f}B)")
        print(f"{args.gpus} GPUs x {memory / GIB:.0f} GiB, {args.reserve:.0%} reserved -> "
              f"{memory * (1 - args.reserve) / GIB:.1f} GiB usable; seq {args.seq}+{args.max_new_tokens}, "
              f"micro-batch {args.micro_batch}, G={args.group_size}, recompute {args.recompute}, "
              f"{args.image_tokens} image tokens per sample{', vision frozen' if args.freeze_vision else ''}\n")
        print(format_table(rows))
        print("\nGiB per GPU on the fullest stage; * = uneven layer split (rounded up); "
              "total = weights+grads+optim+ref + max(activ+vis-act+logits, kv); the vision tower is replicated on "
              "every TP rank (first stage)")
        if best:
            lay = best.layout
            print(f"\nrecommended: TP={lay.tp} PP={lay.pp} DP={lay.dp} "
                  f"({best.memory.total / GIB:.1f} GiB per GPU)")
    lora_best = None
    if args.lora_rank and not args.json:
        lora_rows = plan(arch, args.gpus, memory, workload(args, args.lora_rank), args.reserve, args.gpus_per_node)
        print(f"\nLoRA rank {args.lora_rank} (frozen bf16 base, fp32 adapter grads + Adam, no reference copy):\n")
        print(format_table(lora_rows))
        print("\nfull fine-tuning vs LoRA, GiB per GPU on the fullest stage:\n")
        print(side_by_side(rows, lora_rows))
        print("\n" + best_line("recommended, full", rows) + "\n" + best_line("recommended, LoRA", lora_rows))
        lora_best = any(r.fits for r in lora_rows)
    elif args.lora_rank:
        lora_rows = plan(arch, args.gpus, memory, workload(args, args.lora_rank), args.reserve, args.gpus_per_node)
        print(json.dumps({"lora_rank": args.lora_rank, "rows": [row_dict(r) for r in lora_rows]}, indent=2))
    if best is None and not lora_best:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
