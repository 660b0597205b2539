#!/usr/bin/env python
"""Recommend TP/PP/DP for GRPO on Qwen2.5-VL from a per-GPU memory model and print the table.

    python tools/plan_parallelism.py --model examples/configs/qwen25vl_72b.config.json --gpus 64 --gpu-memory 80GB
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from megatron_sayo.plan import (GIB, ConfigError, NoLayoutFits, Row, Workload, load_arch, parse_memory,
                                plan, recommend, text_params, total_params, vision_params)

TERMS = ("weights", "grads", "optimizer", "activations", "logits", "reference", "kv_cache")
HEADER = ("TP", "PP", "DP", "stage", "weights", "grads", "optim", "activ", "logits", "ref", "kv", "total", "fits")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory or its config.json")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs")
    p.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 141GB (GB read as GiB)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP never crosses a node")
    p.add_argument("--seq", type=int, default=4096, help="prompt tokens incl. image tokens")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--group-size", type=int, default=16, help="GRPO completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=110)
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="selective")
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="no frozen reference model (KL off)")
    p.add_argument("--freeze-vision", action="store_true", help="vision tower frozen: bf16 weights only")
    p.add_argument("--reserve", type=float, default=0.10, help="fraction of GPU memory kept free")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    for name in ("gpus", "gpus_per_node", "seq", "micro_batch", "group_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_new_tokens < 0:
        p.error("--max-new-tokens must be >= 0")
    return args


def workload(args: argparse.Namespace) -> Workload:
    """The Workload the options describe."""
    return Workload(seq=args.seq, max_new_tokens=args.max_new_tokens, micro_batch=args.micro_batch,
                    group_size=args.group_size, recompute=args.recompute,
                    sequence_parallel=not args.no_sequence_parallel,
                    distributed_optimizer=not args.no_distributed_optimizer,
                    freeze_vision=args.freeze_vision, reference_model=not args.no_reference)


def row_cells(r: Row) -> list[str]:
    """One table row, memory in GiB."""
    m = r.memory
    gib = [f"{getattr(m, t) / GIB:.1f}" for t in TERMS]
    uneven = "" if r.even else "*"
    return [str(r.layout.tp), f"{r.layout.pp}{uneven}", str(r.layout.dp), m.stage, *gib,
            f"{m.total / GIB:.1f}", "yes" if r.fits else "no"]


def format_table(rows: list[Row]) -> str:
    """Aligned text table, one line per candidate."""
    cells = [list(HEADER)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def row_dict(r: Row) -> dict:
    """JSON form of a row (bytes)."""
    return {**asdict(r.layout), "stage": r.memory.stage, "even": r.even, "fits": r.fits,
            **{t: getattr(r.memory, t) for t in TERMS}, "total": r.memory.total}


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
              f"micro-batch {args.micro_batch}, G={args.group_size}, recompute {args.recompute}\n")
        print(format_table(rows))
        print("\nGiB per GPU on the fullest stage; * = uneven layer split (rounded up); "
              "total = weights+grads+optim+ref + max(activ+logits, kv)")
        if best:
            lay = best.layout
            print(f"\nrecommended: TP={lay.tp} PP={lay.pp} DP={lay.dp} "
                  f"({best.memory.total / GIB:.1f} GiB per GPU)")
    if best is None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
