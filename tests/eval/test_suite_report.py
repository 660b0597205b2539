"""The suite's report: accuracy as the authors compute it (percent, 2 decimals), the average, and the table in the
paper's column order with the paper's base-model averages only where all nine benchmarks ran."""

from __future__ import annotations

from megatron_sayo.eval.benchmarks import run, suite


def test_percent_and_average():
    recs = [{"correct": c} for c in (True, False, False)]
    assert run.percent(recs) == 33.33                  # round(100 * 1/3, 2), as compute_score
    assert run.percent([]) is None
    assert run.average([33.33, 66.67, 50.0]) == 50.0
    assert run.average([10.0, None]) is None           # no average over a partial row


def results(names, acc):
    return {"model": {"name": "m"}, "decoding": {}, "paper_base": suite.paper_base_rows(),
            "benchmarks": {n: {"accuracy": acc, "num_samples": 2} for n in names},
            "average": run.average(acc for _ in names)}


def test_table_in_the_papers_order_with_paper_averages():
    table = run.summary_table(results([b.name for b in suite.BENCHMARKS], 12.5)).splitlines()
    assert table[0] == ("| model | MME-RealWorld | M3CoT | V* | MMStar | MathVision | We-Math | ChartQA | AI2D | "
                        "CharXiv | Avg |")
    assert table[2] == "| m (ours) | " + " | ".join(["12.50"] * 10) + " |"
    assert table[3:] == [f"| {m} base (paper, Table 1) | " + " | ".join(["-"] * 9) + f" | {avg} |"
                         for m, avg in (("Qwen3-VL-8B", "59.64"), ("Qwen3-VL-4B", "59.15"),
                                        ("InternVL3.5-8B", "50.49"))]


def test_one_benchmark_has_no_paper_average():
    table = run.summary_table(results(["ai2d"], 50.0)).splitlines()
    assert table[0] == "| model | AI2D | Avg |"
    assert table[3] == "| Qwen3-VL-8B base (paper, Table 1) | - | - |"
