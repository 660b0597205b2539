"""Validate grounded dataset files: `python -m megatron_sayo.data.validate FILE [FILE...]`.

Checks every row with the loader's own row validation and reports ALL bad rows
with their line (JSONL) or row (parquet) numbers. Exit 1 if any row is bad or a
file is missing, empty or unreadable, 0 with a count summary otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_sayo.data.grounded import EmptyDataError, check_file, require_data_file


def validate_files(paths: list[str | Path], out=None) -> int:
    """Print every bad row and a per-file summary (to `out`, default stdout); return the number of problems."""
    out = out or sys.stdout
    problems = 0
    for path in map(Path, paths):
        try:
            good, errors = check_file(require_data_file(path))
        except EmptyDataError as exc:
            print(f"FAILED: {exc}", file=out)
            problems += 1
            continue
        except Exception as exc:  # unreadable container (corrupt parquet)
            print(f"{path}: cannot read file: {type(exc).__name__}: {exc}", file=out)
            problems += 1
            continue
        for err in errors:
            print(err, file=out)
        status = "OK" if not errors and good else "FAILED"
        empty = "" if good or errors else " (no rows: only blank lines)"
        print(f"{path}: {status}: {len(good)} good row(s), {len(errors)} bad row(s){empty}", file=out)
        problems += len(errors) + (not good and not errors)
    return problems


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="JSONL or parquet grounded dataset files")
    args = parser.parse_args(argv)
    return 1 if validate_files(args.files) else 0


if __name__ == "__main__":
    sys.exit(main())
