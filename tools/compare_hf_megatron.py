#!/usr/bin/env python
"""Logit parity of our megatron Qwen2.5-VL (any TP x PP, ranks started here) against transformers.

    python tools/compare_hf_megatron.py --hf DIR [--megatron MEGATRON_DIR] --tp 2 --pp 2 \
        --image cat.png --prompt "What is in the picture?" [--save-inputs in.npz] [--save-logits out.npy]

Inputs are built by our processor (chat template, one user turn with the images then the prompt).
Exits 1 when the relative error (max |ours - ref| / max |ref|) exceeds --rtol or top-1 disagrees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="HF checkpoint directory (the reference, and our weights "
                                               "unless --megatron is given)")
    p.add_argument("--megatron", help="megatron checkpoint directory made by tools/convert_hf_to_megatron.py")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the megatron side")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the megatron side")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable; none = text only)")
    p.add_argument("--prompt", required=True, help="text prompt both models score")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the logits comparison")
    p.add_argument("--save-inputs", type=Path, help="write input_ids, attention_mask, pixel_values, "
                                                    "image_grid_thw (numpy .npz)")
    p.add_argument("--save-logits", type=Path, help="write our logits, float32 [batch, seq, vocab] (.npy)")
    return p.parse_args(argv)


def build_inputs(hf_dir: str, images: list[str], prompt: str) -> dict:
    from megatron_sayo.data.processor import Processor

    content = [{"type": "image", "image": path} for path in images] + [{"type": "text", "text": prompt}]
    return Processor.from_pretrained(hf_dir)([[{"role": "user", "content": content}]])


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_sayo.models.qwen25vl.hf_config import ParallelLayout, load_hf_config, validate_layout
    from megatron_sayo.testing.parity import compare_logits, hf_logits, megatron_logits

    try:
        validate_layout(load_hf_config(args.hf), ParallelLayout(args.tp, args.pp))
        for path in args.image:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--image {path}: no such file")
        batch = build_inputs(args.hf, args.image, args.prompt)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.save_inputs:
        np.savez(args.save_inputs, **{k: v.numpy() for k, v in batch.items() if v is not None})
    ours = megatron_logits(args.hf, batch, tp=args.tp, pp=args.pp, megatron_dir=args.megatron)
    if args.save_logits:
        np.save(args.save_logits, ours.astype(np.float32))
    ref = hf_logits(args.hf, batch)
    report = compare_logits(ours, ref, batch["attention_mask"].numpy())
    source = args.megatron or args.hf
    print(f"tp={args.tp} pp={args.pp} weights={source} tokens={int(batch['attention_mask'].sum())} "
          f"vocab={ours.shape[-1]}: {report}")
    if not report.ok(args.rtol):
        print(f"FAIL: relative error {report.rel:.3e} > {args.rtol:g} or top-1 disagreement", file=sys.stderr)
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
