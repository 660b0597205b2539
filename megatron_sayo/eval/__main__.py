"""python -m megatron_sayo.eval --hf DIR | --megatron DIR --benchmark NAME [--data FILE.jsonl] --out OUTDIR
       [--limit N] [--tp N] [--compare OTHER_DIR]
python -m megatron_sayo.eval --hf DIR | --megatron DIR --benchmark sayo-suite|sayo-<name> --data-root ROOT --out OUTDIR

Starts our OpenAI-compatible server, runs nemo-evaluator against it and writes OUTDIR/results.json,
OUTDIR/samples.jsonl and OUTDIR/summary.md. `--benchmark grounded` is our BYOB benchmark (accuracy + TAS);
`sayo-suite` runs the paper's nine benchmarks (or `sayo-<name>` one of them) from hub datasets under --data-root
with the SAYO authors' prompts and scoring (docs/eval.md); any other name is a task of an installed nemo-evaluator
harness, run with the paper's decoding settings.
With --compare, both checkpoints are evaluated (OUTDIR/a, OUTDIR/b) and OUTDIR/compare.{md,json} written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_sayo import console
from megatron_sayo.eval import driver, nemo_glue, reports


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m megatron_sayo.eval", description=__doc__.split("\n\n")[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF checkpoint dir")
    src.add_argument("--megatron", help="megatron checkpoint dir (converted, step dir or run dir)")
    p.add_argument("--benchmark", required=True, help="'grounded' or a nemo-evaluator task (e.g. vlmeval.chartqa)")
    p.add_argument("--data", help="grounded JSONL (for --benchmark grounded)")
    p.add_argument("--data-root", help="directory holding the suite's hub datasets (for sayo-suite, docs/eval.md)")
    p.add_argument("--min-pixels", type=int, default=None, help="suite: images rescaled up to at least this many "
                   "pixels (default: the authors' 262144)")
    p.add_argument("--max-pixels", type=int, default=None, help="suite: images rescaled down to at most this many "
                   "pixels (default: the authors' 5000000)")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples")
    p.add_argument("--answer-field", choices=("answer", "short_answer"), default="answer",
                   help="grounded: the field the answer is matched against ('short_answer' where a row has one, "
                        "e.g. the GQA rows of the SAYO mix; else 'answer')")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the server")
    p.add_argument("--compare", metavar="OTHER_DIR", help="second checkpoint (HF or megatron) to compare with")
    p.add_argument("--temperature", type=float, default=driver.PAPER_DECODING["temperature"],
                   help="sampling temperature (default: the paper's evaluation decoding)")
    p.add_argument("--top-p", type=float, default=driver.PAPER_DECODING["top_p"],
                   help="nucleus mass (default: the paper's evaluation decoding)")
    p.add_argument("--max-tokens", type=int, default=driver.PAPER_DECODING["max_new_tokens"],
                   help="most new tokens per answer (default: the paper's)")
    p.add_argument("--parallelism", type=int, default=8, help="concurrent requests nemo-evaluator sends")
    p.add_argument("--instruction", default=None, help="answer-format instruction (default: the training one)")
    p.add_argument("--log-level", choices=console.LEVELS, default="warning",
                   help="other libraries' log level on the console (nemo-evaluator's own output always goes to "
                        "OUT/nemo_evaluator/nemo_evaluator.log)")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.tp < 1 or args.parallelism < 1 or args.max_tokens < 1:
        p.error("--tp, --parallelism and --max-tokens must be >= 1")
    if args.benchmark == "grounded" and not args.data:
        p.error("--benchmark grounded needs --data FILE.jsonl")
    if args.benchmark.startswith("sayo-"):
        from megatron_sayo.eval.benchmarks.suite import select
        try:
            select(args.benchmark)
        except ValueError as exc:
            p.error(str(exc))
        if not args.data_root:
            p.error(f"--benchmark {args.benchmark} needs --data-root DIR (see docs/eval.md)")
        if args.compare:
            p.error("--compare compares single-benchmark results: run the suite once per checkpoint instead")
    if any(v is not None and v < 1 for v in (args.min_pixels, args.max_pixels)):
        p.error("--min-pixels and --max-pixels must be >= 1")
    return args


def evaluate_one(args, model: dict, out: Path) -> dict:
    """One checkpoint on the chosen benchmark, written to out/."""
    out.mkdir(parents=True, exist_ok=True)
    if args.benchmark == "grounded":
        return driver.run_grounded(args, model, out)
    if args.benchmark.startswith("sayo-"):
        from megatron_sayo.eval.benchmarks.run import run_suite
        return run_suite(args, model, out)
    return driver.run_harness(args, model, out)


def main(argv=None) -> int:
    args = parse_args(argv)
    console.setup(args.log_level)
    out = Path(args.out)
    try:
        if args.benchmark != "grounded" and not args.benchmark.startswith("sayo-"):
            nemo_glue.check_harness_task(args.benchmark)   # fail before starting any server
        model = driver.model_spec(args.hf, args.megatron)
        if not args.compare:
            results = evaluate_one(args, model, out)
        else:
            other = driver.detect_checkpoint(args.compare)
            a, b = evaluate_one(args, model, out / "a"), evaluate_one(args, other, out / "b")
            print(reports.write_compare(out, a, b))
            return 0
    except driver.EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((out / "summary.md").read_text())
    if args.benchmark.startswith("sayo-"):
        print(f"average {reports.fmt(results.get('average'))} over {len(results['benchmarks'])} benchmark(s) -> "
              f"{out / 'results.json'}")
        return 0
    print(f"accuracy {reports.fmt(results.get('accuracy'))}  tas {reports.fmt(results.get('tas'))}  "
          f"n {results.get('num_samples')}  -> {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
