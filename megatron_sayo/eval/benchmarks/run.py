"""`python -m megatron_sayo.eval --benchmark sayo-suite|sayo-<name> --data-root ROOT`: the paper's benchmarks through
nemo-evaluator against one server.

  1. every selected benchmark is read from ROOT/<folder> and its rows checked (all before any model work);
  2. images are rescaled as the authors do and put in OUT/<name>/byob/images/, rows as a BYOB dataset there;
  3. byob_suite.py is compiled with nemo-evaluator's BYOB compiler into OUT/byob_package/;
  4. one server starts; nemo-evaluator's `evaluate` runs each task against it (the runner prompts, our scorer
     scores); OUT/<name>/{results.json,samples.jsonl};
  5. OUT/results.json and OUT/summary.md: accuracy in percent per benchmark in the paper's column order, the average,
     and the paper's published base-model figures beside them (only averages could be obtained; see suite.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_sayo.eval import nemo_glue
from megatron_sayo.eval.benchmarks import prepare, suite
from megatron_sayo.eval.benchmarks.hub_data import DatasetError
from megatron_sayo.eval.driver import decoding_params, read_jsonl
from megatron_sayo.eval.errors import EvalError
from megatron_sayo.eval.server_process import local_media_root, start_server

BYOB_MODULE = "megatron_sayo.eval.benchmarks.byob_suite"
ATTEMPTS = 3   # nemo-evaluator runs per benchmark while requests fail (answered ones come from its cache)


def prepare_all(benchmarks: list[suite.Benchmark], data_root: Path, out: Path, limit: int | None,
                min_pixels: int, max_pixels: int) -> dict[str, tuple[Path, list[dict]]]:
    """{name: (BYOB dataset path, rows)}; every dataset is read and checked before any image is written."""
    samples = {b.name: b.samples(data_root, limit) for b in benchmarks}
    prepared = {}
    for b in benchmarks:
        byob = out / b.name / "byob"
        rows = prepare.byob_rows(samples[b.name], byob / "images", min_pixels, max_pixels)
        prepare.write_jsonl(rows, byob / "dataset.jsonl")
        prepared[b.name] = (byob / "dataset.jsonl", rows)
    return prepared


def sample_records(rows: list[dict], predictions: list[dict]) -> list[dict]:
    """Per-sample records in dataset order: id, reference, response, extracted answer, verdict."""
    from megatron_sayo.eval.benchmarks.scoring import extract_prediction

    by_id = {p["sample_id"]: p for p in predictions}
    records = []
    for i, row in enumerate(rows):
        pred = by_id.get(i, {})
        response = (pred.get("response") or "").strip()
        records.append({"id": row["id"], "question": row["question"], "answer": row["answer"],
                        "response": pred.get("response"), "extracted": extract_prediction(response) if response
                        else None, "correct": bool((pred.get("scores") or {}).get("correct", False)),
                        **({"error": pred["error"]} if pred.get("error") else {})})
    return records


def percent(records: list[dict]) -> float | None:
    """Accuracy in percent rounded to 2 decimals (the authors' compute_score); None without samples."""
    return round(100.0 * sum(r["correct"] for r in records) / len(records), 2) if records else None


def average(values) -> float | None:
    """Mean of the values that are not None, rounded to 2 decimals; None when any is missing."""
    values = list(values)
    return None if not values or any(v is None for v in values) else round(sum(values) / len(values), 2)


def summary_table(results: dict) -> str:
    """Markdown: one row for our model and one per paper base model, the paper's column order plus the average."""
    names = list(results["benchmarks"])
    titles = [suite.BY_NAME[n].title for n in names]
    cell = lambda v: "-" if v is None else f"{v:.2f}"   # noqa: E731
    lines = ["| model | " + " | ".join(titles) + " | Avg |", "|---" * (len(titles) + 2) + "|",
             f"| {results['model']['name']} (ours) | " + " | ".join(
                 cell(results["benchmarks"][n]["accuracy"]) for n in names) + f" | {cell(results['average'])} |"]
    for model, scores in results["paper_base"].items():
        avg = scores["average"] if len(names) == len(suite.BENCHMARKS) else None
        lines.append(f"| {model} base (paper, Table 1) | " + " | ".join(cell(scores[n]) for n in names) +
                     f" | {cell(avg)} |")
    return "\n".join(lines) + "\n"


def summary_markdown(results: dict) -> str:
    """OUT/summary.md: the table, the decoding and where the paper figures come from."""
    counts = ", ".join(f"{n} {b['num_samples']}" for n, b in results["benchmarks"].items())
    failed = {n: b["failed_requests"] for n, b in results["benchmarks"].items() if b.get("failed_requests")}
    failures = (f"\nWARNING: requests that never got a response, counted wrong: "
                f"{', '.join(f'{n} {k}' for n, k in failed.items())} (see <name>/samples.jsonl).\n" if failed else "")
    return (f"# SAYO benchmark suite: {results['model']['name']}\n\n{summary_table(results)}\n"
            f"accuracy in percent (the SAYO authors' prompts and scoring); decoding: {results['decoding']}; "
            f"samples per benchmark: {counts}"
            f".\nPaper rows: the paper (arXiv 2602.08241, Table 1) reports Qwen3-VL-8B/4B and InternVL3.5-8B, not "
            f"Qwen2.5-VL; only their nine-benchmark averages are filled in here, the per-benchmark cells were not "
            f"available ('-').\n" + failures)


def run_one(b: suite.Benchmark, prepared: tuple[Path, list[dict]], eval_type: str, server, model: dict,
            decoding: dict, parallelism: int, bench_dir: Path) -> dict:
    """One benchmark's nemo-evaluator run against the server; writes bench_dir/{results.json,samples.jsonl}.

    Samples whose request failed (no response: e.g. nemo-evaluator's local proxy lost its port to another
    process) are sent again, up to ATTEMPTS runs in all; nemo-evaluator's response cache in bench_dir keeps the
    answered ones, so a rerun only sends the failed requests. Failures left are counted wrong (as the authors'
    score would) and reported."""
    dataset, rows = prepared
    nemo_out = bench_dir / "nemo_evaluator"
    for attempt in range(1, ATTEMPTS + 1):
        result = nemo_glue.run_evaluation(eval_type, nemo_out, server.url + "/chat/completions", model["name"],
                                          None, decoding, parallelism,
                                          extra={"dataset": {"path": str(dataset.resolve())}})
        records = sample_records(rows, read_jsonl(nemo_glue.find_output(nemo_out, "byob_predictions.jsonl",
                                                                        suite.task_name(b.name))))
        failed = [r for r in records if r["response"] is None]
        if not failed:
            break
        print(f"warning: {b.name}: {len(failed)} of {len(records)} requests failed (first: "
              f"{failed[0].get('error')}); run {attempt} of {ATTEMPTS}", file=sys.stderr)
    summary = {"title": b.title, "hub_id": b.hub_id, "split": b.split, "num_samples": len(records),
               "accuracy": percent(records), "failed_requests": len(failed), "runs": attempt,
               "nemo_evaluator": nemo_glue.metric_scores(result)}
    prepare.write_jsonl(records, bench_dir / "samples.jsonl")
    (bench_dir / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_suite(args, model: dict, out: Path) -> dict:
    """The selected suite benchmarks for one checkpoint; writes out/ and returns results.json's content."""
    from megatron_sayo.config import SuiteConfig

    cfg = SuiteConfig()
    min_pixels, max_pixels = args.min_pixels or cfg.min_pixels, args.max_pixels or cfg.max_pixels
    benchmarks = suite.select(args.benchmark)
    if not args.data_root:
        raise EvalError(f"--benchmark {args.benchmark} needs --data-root DIR (see docs/eval.md)")
    for b in benchmarks:
        if (out / b.name / "nemo_evaluator").exists():
            raise EvalError(f"{out / b.name / 'nemo_evaluator'} exists from an earlier run: nemo-evaluator would "
                            f"answer from its response cache there; choose a new --out (nothing is deleted)")
    try:
        prepared = prepare_all(benchmarks, Path(args.data_root), out, args.limit, min_pixels, max_pixels)
    except DatasetError as exc:
        raise EvalError(str(exc)) from None
    package = out / "byob_package"
    types = {b.name: nemo_glue.compile_grounded_package(package, BYOB_MODULE, suite.task_name(b.name))
             for b in benchmarks}
    decoding = decoding_params(args)
    per_bench = {}
    # local media confined to the prepared images; they were rescaled into [min_pixels, max_pixels], and the
    # server's header check allows twice that (rounding), whatever the checkpoint's processor says
    images = [row["image_url"] for _, rows in prepared.values() for row in rows]
    server = start_server(model.get("hf"), model.get("megatron"), args.tp, out / "server.log",
                          extra_args=["--allowed-local-media-path", local_media_root(images),
                                      "--max-image-pixels", str(2 * max(max_pixels, min_pixels))])
    try:
        with nemo_glue.nemo_environment(server.api_key, (package,)):
            for b in benchmarks:
                per_bench[b.name] = run_one(b, prepared[b.name], types[b.name], server, model, decoding,
                                            args.parallelism, out / b.name)
    finally:
        server.stop()
    results = {"suite": args.benchmark, "model": model, "decoding": decoding,
               "image_pixels": {"min": min_pixels, "max": max_pixels}, "benchmarks": per_bench,
               "average": average(v["accuracy"] for v in per_bench.values()),
               "paper_base": suite.paper_base_rows()}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(summary_markdown(results))
    return results
