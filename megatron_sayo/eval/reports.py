"""Evaluation reports: results.json, samples.jsonl and summary.md of one checkpoint, and the side-by-side
comparison of two (compare.json, compare.md). Every file is written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_sayo.checkpoint.files import write_text_atomic

COMPARE_KEYS = ("accuracy", "tas", "reward_attention", "answered", "mean_completion_tokens", "num_samples")
SUMMARY_KEYS = ("num_samples", "accuracy", "tas", "reward_attention", "answered", "mean_completion_tokens")


def mean(values) -> float | None:
    """Mean of the finite values, None when there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def fmt(value, digits: int = 4) -> str:
    """A number for a table, '-' when missing."""
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def grounded_results(benchmark: str, model: dict, records: list[dict], nemo_scores: dict, nemo_version: str,
                     decoding: dict, server_stats: dict | None = None) -> dict:
    """results.json's content for per-sample records (correct, extracted, tas, reward_attention, tokens)."""
    n = len(records)
    return {
        "benchmark": benchmark, "model": model, "num_samples": n,
        "accuracy": sum(r["correct"] for r in records) / n if n else None,
        "tas": mean(r.get("tas") for r in records),
        "reward_attention": mean(r.get("reward_attention") for r in records),
        "answered": sum(r.get("extracted") is not None for r in records) / n if n else None,
        "mean_completion_tokens": mean(r.get("completion_tokens") for r in records),
        "decoding": decoding, "nemo_evaluator": {"version": nemo_version, "scores": nemo_scores},
        "server": server_stats or {},
    }


def write_reports(out: Path, results: dict, records: list[dict] | None = None) -> dict:
    """out/results.json, out/summary.md and (with records) out/samples.jsonl; returns `results`."""
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    if records is not None:
        write_text_atomic(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_text_atomic(out / "summary.md", summary_markdown(results))
    return results


def summary_markdown(results: dict) -> str:
    """One checkpoint's summary table."""
    nemo = results.get("nemo_evaluator", {})
    lines = [f"# {results['benchmark']}: {results['model']['name']}", "",
             f"source: `{results['model'].get('hf') or results['model'].get('megatron')}`  ",
             f"decoding: {results['decoding']}  ", f"nemo-evaluator {nemo.get('version', '-')}", "",
             "| metric | value |", "|---|---|"]
    for key in SUMMARY_KEYS:
        lines.append(f"| {key} | {fmt(results.get(key))} |")
    lines += ["", "nemo-evaluator scores:", ""] + [f"- {k}: {v}" for k, v in nemo.get("scores", {}).items()]
    return "\n".join(lines) + "\n"


def compare_table(a: dict, b: dict) -> dict:
    """Side-by-side metrics of two results and their difference (b - a)."""
    rows = {}
    for key in COMPARE_KEYS:
        va, vb = a.get(key), b.get(key)
        delta = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
        rows[key] = {"a": va, "b": vb, "delta": delta}
    return {"benchmark": a["benchmark"], "a": a["model"], "b": b["model"], "metrics": rows}


def compare_markdown(table: dict) -> str:
    """The comparison as a markdown table."""
    a, b = table["a"]["name"], table["b"]["name"]
    lines = [f"# {table['benchmark']}: {a} vs {b}", "", f"| metric | {a} | {b} | delta |", "|---|---|---|---|"]
    for key, row in table["metrics"].items():
        lines.append(f"| {key} | {fmt(row['a'])} | {fmt(row['b'])} | {fmt(row['delta'])} |")
    return "\n".join(lines) + "\n"


def write_compare(out: Path, a: dict, b: dict) -> str:
    """out/compare.json and out/compare.md for two results; returns the markdown."""
    table = compare_table(a, b)
    markdown = compare_markdown(table)
    write_text_atomic(out / "compare.json", json.dumps(table, indent=2))
    write_text_atomic(out / "compare.md", markdown)
    return markdown
