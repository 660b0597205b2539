"""The nine suite benchmarks end to end on fixture rows: a tiny checkpoint served by our server, nemo-evaluator's
BYOB runner sending the prompts and scoring, our reports. What was sent is read back from nemo-evaluator's own
request cache and compared with the SAYO authors' messages; the reports are recomputed from its predictions."""

from __future__ import annotations

import json
import sqlite3

import pytest

pytest.importorskip("nemo_evaluator")
pytest.importorskip("mathruler")

from suite_fixtures import AUTHORS_SYSTEM_PROMPT, authors_item, write_suite  # noqa: E402

TITLES = ["MME-RealWorld", "M3CoT", "V*", "MMStar", "MathVision", "We-Math", "ChartQA", "AI2D", "CharXiv"]


def sent_requests(nemo_out) -> list[dict]:
    """Request bodies nemo-evaluator sent (its adapter's request cache, a sqlite key/value store)."""
    db = next(nemo_out.rglob("requests/cache.db"))
    with sqlite3.connect(db) as con:
        values = [row[-1] for row in con.execute("select * from Cache")]
    out = []
    for v in values:
        v = v if isinstance(v, (bytes, str)) else bytes(v)
        out.append(json.loads(v))
    return out


@pytest.mark.slow
@pytest.mark.multiproc
def test_suite_end_to_end(tiny_ckpt, tmp_path):
    from megatron_sayo.eval.__main__ import main

    raw = write_suite(tmp_path / "data")
    out = tmp_path / "out"
    rc = main(["--hf", str(tiny_ckpt), "--benchmark", "sayo-suite", "--data-root", str(tmp_path / "data"),
               "--out", str(out), "--limit", "1", "--max-tokens", "8", "--parallelism", "1"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    names = list(results["benchmarks"])
    assert [results["benchmarks"][n]["title"] for n in names] == TITLES
    assert results["decoding"] == {"temperature": 0.1, "top_p": 0.1, "max_new_tokens": 8}
    accs = []
    for name in names:
        bench = results["benchmarks"][name]
        assert bench["num_samples"] == 1 and bench["failed_requests"] == 0
        question, answer = authors_item(name, raw[name][0])
        # what nemo-evaluator sent: the authors' system prompt, then the image and their question
        (req,) = sent_requests(out / name / "nemo_evaluator")
        system, user = req["messages"]
        assert system == {"role": "system", "content": AUTHORS_SYSTEM_PROMPT}
        image = str((out / name / "byob" / "images" / "000000.png").resolve())
        assert user == {"role": "user", "content": f"<image_url>{image}</image_url>{question}"}
        assert (req["temperature"], req["top_p"], req["max_tokens"]) == (0.1, 0.1, 8)
        # our report agrees with nemo-evaluator's predictions file
        (pred,) = [json.loads(line) for line in next((out / name).rglob("byob_predictions.jsonl")).open()]
        (rec,) = [json.loads(line) for line in (out / name / "samples.jsonl").open()]
        assert pred["target"] == rec["answer"] == answer and pred["status"] == "scored"
        assert rec["response"] == pred["response"] and rec["correct"] == pred["scores"]["correct"]
        assert bench["accuracy"] == (100.0 if rec["correct"] else 0.0)
        assert json.loads((out / name / "results.json").read_text()) == bench
        accs.append(bench["accuracy"])
    assert results["average"] == round(sum(accs) / len(accs), 2)
    table = (out / "summary.md").read_text()
    assert "| model | " + " | ".join(TITLES) + " | Avg |" in table
    assert "| Qwen3-VL-8B base (paper, Table 1) | " + " | ".join("-" * 1 for _ in TITLES) + " | 59.64 |" in table


def test_suite_needs_data_root(tiny_ckpt, tmp_path, capsys):
    from megatron_sayo.eval.__main__ import main

    with pytest.raises(SystemExit):
        main(["--hf", str(tiny_ckpt), "--benchmark", "sayo-suite", "--out", str(tmp_path / "o")])
    assert "--data-root" in capsys.readouterr().err
    rc = main(["--hf", str(tiny_ckpt), "--benchmark", "sayo-ai2d", "--data-root", str(tmp_path / "none"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "ai2d: no such directory" in capsys.readouterr().err
    assert not (tmp_path / "o" / "server.log").exists()      # failed before starting a server
    (tmp_path / "o" / "ai2d" / "nemo_evaluator").mkdir(parents=True)   # an earlier run's response cache
    rc = main(["--hf", str(tiny_ckpt), "--benchmark", "sayo-ai2d", "--data-root", str(tmp_path / "none"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "exists from an earlier run" in capsys.readouterr().err
