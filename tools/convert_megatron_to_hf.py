#!/usr/bin/env python
"""Convert a megatron dist checkpoint (converted, or a GRPO trainer's step / run dir) to Hugging Face format.

    python tools/convert_megatron_to_hf.py --megatron DIR --out HF_DIR [--max-shard-size 5GB]
        [--dtype bfloat16|float32] [--overwrite] [--remove-stale-tmp] [--no-progress]
        [--lora merge|adapter [--base DIR]]

One process, no model, no torch: each HF tensor is copied from the checkpoint's chunks (whatever TP/PP wrote
them) into pre-planned safetensors files with hub names; policy weights only (optimizer state is skipped).
Output dtype defaults to the original HF dtype. Logic: megatron_sayo.convert.megatron_to_hf.
A LoRA run's step holds adapters only: `--lora merge` writes the base (the step's pointer, or --base) with the
adapters merged into its weights; `--lora adapter` writes PEFT's adapter_config.json + adapter_model.safetensors
(megatron_sayo.convert.lora_export).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sayo.convert.lora_export import MODES, export_lora  # noqa: E402
from megatron_sayo.convert.megatron_to_hf import convert_megatron_to_hf  # noqa: E402
from megatron_sayo.convert.progress import run_conversion  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, convert, print a one-line summary; exit 2 with the error on bad input."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--megatron", required=True, help="megatron checkpoint dir, trainer step dir or run dir")
    ap.add_argument("--out", required=True, help="HF checkpoint dir to create")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                    help="output dtype (default: the original HF dtype)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--remove-stale-tmp", action="store_true",
                    help="delete <out>.tmp-<pid> dirs left by conversions whose process is gone (else reported)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    ap.add_argument("--lora", choices=MODES, default=None,
                    help="a LoRA step: 'merge' into the base weights, or 'adapter' (PEFT format)")
    ap.add_argument("--base", default=None, help="with --lora: the base checkpoint (default: the step's pointer)")
    args = ap.parse_args(argv)
    if args.base and not args.lora:
        ap.error("--base needs --lora")
    def convert() -> dict:
        if args.lora == "adapter":
            return export_lora("adapter", args.megatron, args.out, base=args.base, overwrite=args.overwrite)
        if args.lora == "merge":
            return export_lora("merge", args.megatron, args.out, base=args.base, max_shard_size=args.max_shard_size,
                               dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
        return convert_megatron_to_hf(args.megatron, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype,
                                      overwrite=args.overwrite, progress=not args.no_progress,
                                      remove_stale=args.remove_stale_tmp)

    summary, code = run_conversion(convert)
    if summary is None:
        return code
    print(f"wrote {args.out}: {summary['tensors']} tensors in {summary['files']} file(s), {summary['dtype']}, "
          f"{summary['seconds']:.1f}s, peak RSS {summary['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
