#!/usr/bin/env python
"""Convert a Hugging Face Qwen2.5-VL checkpoint to a megatron-core dist checkpoint (loads at any TP/PP).

    python tools/convert_hf_to_megatron.py --hf HF_DIR --out MEGATRON_DIR --tp N --pp M
        [--dtype keep|bfloat16|float32] [--overwrite] [--remove-stale-tmp] [--no-progress]

One process copies each chunk's bytes from the safetensors files into the files megatron's TP x PP save
would write (no model, no process group, no torch; memory: one 64 MB band). Writes `<out>.tmp-<pid>` and
renames it at the end. Logic: megatron_sayo.convert.hf_to_megatron.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sayo.convert.hf_to_megatron import convert_hf_to_megatron  # noqa: E402
from megatron_sayo.convert.progress import run_conversion  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, convert, print a one-line summary; exit 2 with the error on bad input."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", required=True, help="HF checkpoint dir (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="megatron checkpoint dir to create")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written checkpoint")
    ap.add_argument("--dtype", choices=("keep", "bfloat16", "float32"), default="keep",
                    help="parameter dtype in the output (keep = config.json's torch_dtype)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--remove-stale-tmp", action="store_true",
                    help="delete <out>.tmp-<pid> dirs left by conversions whose process is gone (else reported)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    args = ap.parse_args(argv)
    summary, code = run_conversion(lambda: convert_hf_to_megatron(
        args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite,
        progress=not args.no_progress, remove_stale=args.remove_stale_tmp))
    if summary is None:
        return code
    print(f"wrote {args.out}: {summary['megatron_tensors']} megatron tensors (the bar's count) from "
          f"{summary['tensors']} HF tensors, {summary['elements']} elements, "
          f"{summary['seconds']:.1f}s, peak RSS {summary['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
