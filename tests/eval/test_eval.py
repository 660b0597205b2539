"""Evaluation end to end: a tiny checkpoint (and a second one with --compare) on a synthetic grounded set through
nemo-evaluator's BYOB runner against our server; nemo-evaluator's own output files, ours, and accuracy/TAS
recomputed independently from them. Plus the scorer and the harness error."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nemo_evaluator")


ROOT = Path(__file__).resolve().parents[2]


def own_extract(text: str | None) -> str | None:
    """Independent answer extraction: last <answer>..</answer>, else last \\boxed{..} (no nesting needed here)."""
    if not text:
        return None
    tags = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    if tags:
        return tags[-1].strip()
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return boxed[-1].strip() if boxed else None


def test_grounded_scorer_counts_answers():
    from nemo_evaluator.contrib.byob import ScorerInput

    from megatron_sayo.eval.byob_grounded import grounded_score

    def score(response, target):
        return grounded_score(ScorerInput(response=response, target=target, metadata={"match": "normalized"}))

    assert score("I think <answer>Red.</answer>", "red") == {"correct": True, "answered": True}
    assert score("so \\boxed{circle}", "circle")["correct"]
    assert score("<answer>blue</answer>", "red") == {"correct": False, "answered": True}
    assert score("no idea", "red") == {"correct": False, "answered": False}


def test_missing_harness_names_the_package(capsys, tiny_ckpt, tmp_path):
    from megatron_sayo.eval.__main__ import main

    rc = main(["--hf", str(tiny_ckpt), "--benchmark", "chartqa", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install nvidia-vlmeval" in err and "chartqa" in err
    assert not (tmp_path / "o" / "server.log").exists()      # failed before starting a server


@pytest.mark.multiproc
def test_grounded_end_to_end(tiny_ckpt, tmp_path):
    """The command end to end (a subprocess, as a user runs it): nemo-evaluator's output goes to its log file,
    the console gets our lines only."""
    from megatron_sayo.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "syn", 4)
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "megatron_sayo.eval", "--hf", str(tiny_ckpt), "--benchmark",
                           "grounded", "--data", str(data), "--out", str(out), "--limit", "3", "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "nemo_evaluator" / "nemo_evaluator.log").read_text()
    console = done.stdout + done.stderr
    for harness_line in ("User-invoked config:", "Evaluation complete", "Predictions written to"):
        assert harness_line in log and harness_line not in console, harness_line
    assert f"its output: {out / 'nemo_evaluator' / 'nemo_evaluator.log'}" in done.stdout
    assert len(console.splitlines()) < 40, console
    answers = [json.loads(line)["answer"] for line in data.read_text().splitlines()][:3]
    for d in (out,):
        nemo = d / "nemo_evaluator"
        # nemo-evaluator's own outputs: the runner's files, its parsed results and its request log/cache
        preds = [json.loads(line) for line in (nemo / "sayo_grounded" / "byob_predictions.jsonl").open()]
        raw = json.loads((nemo / "sayo_grounded" / "byob_results.json").read_text())
        assert (nemo / "results.yml").exists() and (nemo / "run_config.yml").exists()
        assert len(preds) == 3 and all(p["status"] == "scored" for p in preds)
        assert [p["target"] for p in sorted(preds, key=lambda p: p["sample_id"])] == answers
        assert all("<image_url>" in p["prompt"] for p in preds)
        # ours
        results = json.loads((d / "results.json").read_text())
        samples = [json.loads(line) for line in (d / "samples.jsonl").open()]
        assert results["num_samples"] == len(samples) == 3
        assert results["decoding"] == {"temperature": 0.1, "top_p": 0.1, "max_new_tokens": 8}
        correct = [own_extract(p["response"]) is not None and own_extract(p["response"]).lower().strip(" .")
                   == p["target"] for p in preds]
        assert results["accuracy"] == pytest.approx(sum(correct) / 3)
        assert raw["tasks"]["sayo_grounded"]["metrics"]["pass@1"]["scores"]["correct"]["value"] == \
            pytest.approx(sum(correct) / 3, abs=1e-4)
        tas = [s["tas"] for s in samples]
        assert all(t is not None and math.isfinite(t) and t > 0 for t in tas)
        assert results["tas"] == pytest.approx(sum(tas) / 3)
        assert all(1 <= s["completion_tokens"] <= 8 for s in samples)     # the generated ids, not re-tokenised
        assert results["server"]["requests"] == 3 and results["server"]["tas_requests"] == 3
        assert "| accuracy |" in (d / "summary.md").read_text()


def test_compare_wiring(tiny_ckpt, tiny_tied_ckpt, tmp_path, monkeypatch):
    """--compare evaluates both checkpoints (OUTDIR/a, OUTDIR/b) and writes the side-by-side table."""
    from megatron_sayo.eval import driver
    from megatron_sayo.eval.__main__ import main

    seen = []

    def fake_run(args, model, out):
        seen.append((model, out.name))
        tas = 1.0 if model["name"] == tiny_ckpt.name else 1.25
        res = {"benchmark": "grounded", "model": model, "accuracy": 0.5, "tas": tas, "num_samples": 2}
        (out / "results.json").write_text(json.dumps(res))
        (out / "summary.md").write_text("x")
        return res

    monkeypatch.setattr(driver, "run_grounded", fake_run)
    out = tmp_path / "cmp"
    assert main(["--hf", str(tiny_ckpt), "--benchmark", "grounded", "--data", "x.jsonl", "--out", str(out),
                 "--compare", str(tiny_tied_ckpt)]) == 0
    assert [(m["hf"], side) for m, side in seen] == [(str(tiny_ckpt), "a"), (str(tiny_tied_ckpt), "b")]
    table = json.loads((out / "compare.json").read_text())
    assert table["metrics"]["tas"] == {"a": 1.0, "b": 1.25, "delta": 0.25}
    assert table["metrics"]["accuracy"]["delta"] == 0.0
    assert "| tas | 1.0000 | 1.2500 | 0.2500 |" in (out / "compare.md").read_text()
    with pytest.raises(driver.EvalError, match="neither an HF checkpoint"):
        driver.detect_checkpoint(str(tmp_path))


def test_nemo_environment_is_scoped(tmp_path, monkeypatch):
    """The evaluator's process-wide changes (environment, nemo_evaluator's package path) last for the block only."""
    import os
    import sys

    import nemo_evaluator

    from megatron_sayo.eval import nemo_glue

    monkeypatch.setenv("NEMO_EVALUATOR_TELEMETRY_LEVEL", "2")
    monkeypatch.delenv(nemo_glue.API_KEY_ENV, raising=False)
    env_before, path_before = dict(os.environ), list(nemo_evaluator.__path__)
    with nemo_glue.nemo_environment("k3y", (tmp_path,)):
        assert os.environ[nemo_glue.API_KEY_ENV] == "k3y"
        assert os.environ["NEMO_EVALUATOR_TELEMETRY_LEVEL"] == "0"
        assert os.environ["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
        assert str(tmp_path / "nemo_evaluator") in nemo_evaluator.__path__
    assert dict(os.environ) == env_before
    assert list(nemo_evaluator.__path__) == path_before
    with pytest.raises(RuntimeError):
        with nemo_glue.nemo_environment("k3y"):
            raise RuntimeError("evaluation failed")
    assert dict(os.environ) == env_before


def test_eval_package_does_not_touch_import_path():
    """The evaluator never edits PYTHONPATH or sys.path, nor reaches into the checkout by file path."""
    import pathlib

    import megatron_sayo.eval as pkg

    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "PYTHONPATH" not in text and "sys.path" not in text and "parents[2]" not in text, path.name


def test_compiling_a_benchmark_leaves_byob_registry_as_it_was(tmp_path):
    """nemo-evaluator's compiler clears and refills BYOB's registry and unloads the module: our glue restores
    the registry, so importing the module afterwards registers its benchmark once, without an error."""
    import importlib
    import sys

    from nemo_evaluator.contrib.byob import decorators

    from megatron_sayo.eval import nemo_glue

    before = dict(decorators._BENCHMARK_REGISTRY)
    nemo_glue.compile_grounded_package(tmp_path, "megatron_sayo.eval.byob_grounded", "sayo_grounded")
    assert dict(decorators._BENCHMARK_REGISTRY) == before
    sys.modules.pop("megatron_sayo.eval.byob_grounded", None)
    decorators._BENCHMARK_REGISTRY.pop("sayo_grounded", None)
    importlib.import_module("megatron_sayo.eval.byob_grounded")
    assert "sayo_grounded" in decorators._BENCHMARK_REGISTRY
