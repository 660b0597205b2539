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


def test_failed_requests_are_sent_again_then_reported(tmp_path, monkeypatch, capsys):
    """A run whose request failed is repeated (nemo-evaluator's cache keeps answered samples); what still fails
    after ATTEMPTS runs is counted wrong and named in the summary."""
    import json
    import types

    from megatron_sayo.eval import nemo_glue

    rows = [{"id": "a", "question": "q0", "answer": "B"}, {"id": "b", "question": "q1", "answer": "C"}]
    outcomes = iter([[None, "Answer: B"], ["\\boxed{B}", "Answer: B"]])   # run 1: sample 0 fails; run 2: all answer

    def fake_run(eval_type, out_dir, url, model_id, limit, decoding, parallelism, extra=None):
        task_dir = out_dir / "sayo_ai2d"
        task_dir.mkdir(parents=True, exist_ok=True)
        responses = next(outcomes)
        with open(task_dir / "byob_predictions.jsonl", "w") as f:
            for i, r in enumerate(responses):
                f.write(json.dumps({"sample_id": i, "response": r, "error": None if r else "connection refused",
                                    "scores": {"correct": r is not None and rows[i]["answer"] in r}}) + "\n")
        return types.SimpleNamespace(tasks=None)

    monkeypatch.setattr(nemo_glue, "run_evaluation", fake_run)
    server = types.SimpleNamespace(url="http://x/v1")
    summary = run.run_one(suite.BY_NAME["ai2d"], (tmp_path / "d.jsonl", rows), "t", server, {"name": "m"}, {}, 1,
                          tmp_path / "ai2d")
    assert (summary["runs"], summary["failed_requests"], summary["accuracy"]) == (2, 0, 50.0)
    assert "1 of 2 requests failed (first: connection refused); run 1 of 3" in capsys.readouterr().err

    outcomes = iter([[None, "Answer: B"]] * run.ATTEMPTS)
    summary = run.run_one(suite.BY_NAME["ai2d"], (tmp_path / "d.jsonl", rows), "t", server, {"name": "m"}, {}, 1,
                          tmp_path / "ai2d2")
    assert (summary["runs"], summary["failed_requests"], summary["accuracy"]) == (run.ATTEMPTS, 1, 0.0)
    res = results(["ai2d"], 0.0)
    res["benchmarks"]["ai2d"]["failed_requests"] = 1
    assert "WARNING: requests that never got a response, counted wrong: ai2d 1" in run.summary_markdown(res)
