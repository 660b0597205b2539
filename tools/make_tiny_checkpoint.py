#!/usr/bin/env python
"""Write a tiny random Qwen2.5-VL checkpoint in the HF hub format (weights, tokenizer, processor configs).

    python tools/make_tiny_checkpoint.py --out DIR [--seed N] [--config-json CONFIG.json]
        [--dtype float32|bfloat16] [--preset tiny|tiny-tied] [--overwrite]

The logic lives in megatron_sayo.testing.tiny_checkpoint.make_tiny_checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sayo.testing.tiny_checkpoint import DTYPES, PRESETS, make_tiny_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the checkpoint, print its path."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to create")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--config-json", default=None,
                    help="build exactly this architecture (hub flat or nested text_config layout)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype the weights are written in")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="used when --config-json is absent")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    args = ap.parse_args(argv)
    try:
        out = make_tiny_checkpoint(args.out, preset=args.preset, seed=args.seed, config_json=args.config_json,
                                   dtype=args.dtype, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
