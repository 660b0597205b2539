"""Evaluation driver: start our server, run a nemo-evaluator task against it, add TAS, write the reports.

Grounded benchmark flow:
  1. grounded JSONL -> BYOB dataset rows (byob_grounded.byob_rows) in OUTDIR/byob/dataset.jsonl;
  2. nemo-evaluator's BYOB compiler compiles byob_grounded.py into a harness package under OUTDIR/byob/ (added to
     `nemo_evaluator.__path__` for this process only: nothing is installed into site-packages);
  3. nemo-evaluator's `evaluate` runs the task against the server (its runner sends the prompts, scores the
     answers with our scorer, writes byob_results.json + byob_predictions.jsonl);
  4. TAS: every prediction is teacher-forced through the server's /v1/tas (same model, same TP ranks), giving
     the sample's pooled region/image attention ratio over its top-entropy answer tokens;
  5. OUTDIR/results.json, OUTDIR/samples.jsonl, OUTDIR/summary.md.

nemo-evaluator 0.2.8's BYOB runner writes to <out>/<task>/ while the output parser it generates reads <out>/;
our package ships its own parser (`OUTPUT_PY`) that reads either place.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PAPER_DECODING = {"temperature": 0.1, "top_p": 0.1, "max_new_tokens": 2048}
API_KEY_ENV = "SAYO_EVAL_API_KEY"
# Harness tasks the paper reports, and the nemo-evaluator package that provides them.
HARNESS_PACKAGES = {
    "chartqa": "nvidia-vlmeval", "ai2d": "nvidia-vlmeval", "mmstar": "nvidia-vlmeval",
    "mathvision": "nvidia-vlmeval", "charxiv": "nvidia-vlmeval", "we_math": "nvidia-vlmeval",
    "m3cot": "nvidia-vlmeval", "vstar": "nvidia-vlmeval", "mme_realworld_lite": "nvidia-vlmeval",
}

OUTPUT_PY = '''"""Output parser for the sayo grounded BYOB benchmark (reads <out>/ or <out>/<task>/)."""
import json
import os

from nemo_evaluator.api.api_dataclasses import EvaluationResult

TASK = {task!r}


def parse_output(output_dir: str) -> EvaluationResult:
    for path in (os.path.join(output_dir, "byob_results.json"), os.path.join(output_dir, TASK, "byob_results.json")):
        if os.path.exists(path):
            with open(path) as f:
                return EvaluationResult.model_validate(json.load(f))
    raise FileNotFoundError(f"no byob_results.json in {{output_dir}} or {{os.path.join(output_dir, TASK)}}")
'''


class EvalError(RuntimeError):
    """A clear, user-facing evaluation failure."""


# ------------------------------------------------------------------------------------------------ server

def http_json(url: str, body: dict | None = None, api_key: str | None = None, timeout: float = 600.0):
    """(status, JSON) of a GET (body None) or POST to our server."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@dataclass
class ServerProcess:
    """A running `megatron_sayo.eval.serve` subprocess (own process group) and how to reach it."""

    proc: subprocess.Popen
    url: str          # base URL, ends with /v1
    api_key: str
    log_path: Path

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it does not exit in time."""
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def source_args(hf: str | None, megatron: str | None) -> list[str]:
    """--hf DIR or --megatron DIR for the server command line."""
    return ["--hf", str(hf)] if hf else ["--megatron", str(megatron)]


def child_env(extra: dict | None = None) -> dict:
    """Environment for subprocesses: our package importable, this interpreter first on PATH, telemetry off."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["NEMO_EVALUATOR_TELEMETRY_LEVEL"] = "0"
    env.update(extra or {})
    return env


def start_server(hf: str | None, megatron: str | None, tp: int, log_path: Path, startup_s: float = 900.0,
                 extra_args: list[str] | None = None) -> ServerProcess:
    """Start the server on a free loopback port with a fresh API key; return once /health answers."""
    from megatron_sayo.distributed.runtime import free_port

    port, key = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "megatron_sayo.eval.serve", *source_args(hf, megatron), "--tp", str(tp),
           "--host", "127.0.0.1", "--port", str(port), *(extra_args or [])]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env({"SAYO_API_KEY": key}),
                            start_new_session=True)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}/v1", key, log_path)
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EvalError(f"the server exited with code {proc.returncode} during start-up; its log "
                            f"({log_path}) ends with:\n{tail(log_path)}")
        try:
            if http_json(f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.5)
    server.stop()
    raise EvalError(f"the server did not answer /health within {startup_s:.0f}s; log: {log_path}")


def tail(path: Path, n: int = 20) -> str:
    """The last n lines of a text file."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------ nemo-evaluator

def require_nemo_evaluator():
    """The nemo_evaluator module, or EvalError naming the extra to install."""
    os.environ["NEMO_EVALUATOR_TELEMETRY_LEVEL"] = "0"
    try:
        import nemo_evaluator
    except ImportError:
        raise EvalError("nemo-evaluator is not installed: pip install 'megatron_sayo[eval]' "
                        "(or pip install nemo-evaluator==0.2.8)") from None
    return nemo_evaluator


def install_grounded_package(root: Path) -> str:
    """Compile byob_grounded.py with nemo-evaluator's BYOB compiler into root/; return the task's eval type."""
    import yaml

    nemo_evaluator = require_nemo_evaluator()
    from nemo_evaluator.contrib.byob.compiler import compile_benchmark

    from megatron_sayo.eval import byob_grounded as bg

    fdf = compile_benchmark("megatron_sayo.eval.byob_grounded")[bg.TASK]
    pkg = root / "nemo_evaluator" / f"byob_{bg.TASK}"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "framework.yml").write_text(yaml.safe_dump(fdf, sort_keys=False))
    (pkg / "output.py").write_text(OUTPUT_PY.format(task=bg.TASK))
    ns = str(root / "nemo_evaluator")
    if ns not in nemo_evaluator.__path__:
        nemo_evaluator.__path__.append(ns)
    for name in [m for m in sys.modules if m.startswith(f"nemo_evaluator.byob_{bg.TASK}")]:
        del sys.modules[name]
    return fdf["evaluations"][0]["defaults"]["config"]["type"]


def available_tasks() -> set[str]:
    """'framework.task' and bare task names of the installed nemo-evaluator harness packages."""
    from nemo_evaluator.core.input import get_available_evaluations

    by_framework, _, by_task = get_available_evaluations()
    names = set(by_task)
    for framework, tasks in by_framework.items():
        names.update(f"{framework}.{t}" for t in tasks)
    return names


def check_harness_task(name: str) -> None:
    """EvalError naming the package to install when no installed harness provides `name`."""
    require_nemo_evaluator()
    if name in available_tasks():
        return
    bare = name.split(".")[-1].lower()
    package = HARNESS_PACKAGES.get(bare)
    hint = (f"install the harness package that provides it: pip install {package}" if package else
            "install the nemo-evaluator harness package that provides it")
    extra = " (the VLM harnesses need a GPU machine with torchvision)" if package == "nvidia-vlmeval" else ""
    raise EvalError(f"benchmark {name!r} is not provided by any installed nemo-evaluator harness; {hint}{extra}. "
                    f"Built in: 'grounded'.")


def run_nemo_evaluator(eval_type: str, out_dir: Path, server: ServerProcess, model_id: str, limit: int | None,
                       decoding: dict, parallelism: int, extra: dict | None = None):
    """nemo-evaluator's `evaluate` for one task against the server; returns its EvaluationResult."""
    require_nemo_evaluator()
    from nemo_evaluator.api.api_dataclasses import (ApiEndpoint, ConfigParams, EndpointType, EvaluationConfig,
                                                    EvaluationTarget)
    from nemo_evaluator.core.evaluate import evaluate

    os.environ[API_KEY_ENV] = server.api_key
    os.environ["PATH"] = child_env()["PATH"]
    os.environ["PYTHONPATH"] = child_env()["PYTHONPATH"]
    params = ConfigParams(limit_samples=limit, parallelism=parallelism, request_timeout=3600, extra=extra or {},
                          **decoding)
    cfg = EvaluationConfig(type=eval_type, output_dir=str(out_dir), params=params)
    target = EvaluationTarget(api_endpoint=ApiEndpoint(url=server.url + "/chat/completions", model_id=model_id, type=EndpointType.CHAT,
                                                       api_key_name=API_KEY_ENV))
    try:
        return evaluate(cfg, target)
    except SystemExit as exc:   # nemo-evaluator exits on a failed command
        raise EvalError(f"nemo-evaluator failed (exit {exc.code}) for {eval_type}; see {out_dir}") from None


# ------------------------------------------------------------------------------------------------ grounded

def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def find_output(out_dir: Path, name: str, task: str) -> Path:
    """nemo-evaluator output file `name` in out_dir/ or out_dir/<task>/ (0.2.8 writes the latter)."""
    for path in (out_dir / name, out_dir / task / name):
        if path.exists():
            return path
    raise EvalError(f"nemo-evaluator wrote no {name} in {out_dir} or {out_dir / task}")


def tas_for(server: ServerProcess, row: dict, response: str) -> dict:
    """TAS of one answered sample: the same prompt nemo-evaluator sent, the response teacher-forced."""
    from megatron_sayo.eval.byob_grounded import prompt_text

    status, body = http_json(server.url + "/tas", {"messages": [{"role": "user", "content": prompt_text(row)}],
                                                   "completion": response, "boxes": row["boxes"]}, server.api_key)
    if status != 200:
        return {"tas": None, "tas_error": body.get("error", {}).get("message", str(body))}
    return body


def sample_records(rows: list[dict], predictions: list[dict], server: ServerProcess) -> list[dict]:
    """Per-sample records: ids, answer, response, extracted answer, correct, TAS."""
    from megatron_sayo.rl.rewards import extract_answer

    records = []
    for pred in sorted(predictions, key=lambda p: p["sample_id"]):
        row = rows[pred["sample_id"]]
        response = pred.get("response")
        scores = pred.get("scores") or {}
        rec = {"id": row["id"], "question": row["question"], "answer": row["answer"], "response": response,
               "extracted": extract_answer(response) if response else None,
               "correct": bool(scores.get("correct", False)), "status": pred.get("status")}
        if response:
            t = tas_for(server, row, response)
            rec.update(tas=t.get("tas"), reward_attention=t.get("reward_attention"),
                       completion_tokens=t.get("completion_tokens"), **({"tas_error": t["tas_error"]}
                                                                        if "tas_error" in t else {}))
        else:
            rec.update(tas=None, error=pred.get("error"))
        records.append(rec)
    return records


def mean(values) -> float | None:
    """Mean of the finite values, None when there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def metric_scores(result) -> dict[str, float]:
    """{metric.score: value} flattened from a nemo-evaluator EvaluationResult."""
    out = {}
    for task_name, task in (result.tasks or {}).items():
        for metric_name, metric in task.metrics.items():
            for score_name, score in metric.scores.items():
                out[f"{task_name}/{metric_name}/{score_name}"] = score.value
    return out


def run_grounded(args, model: dict, out: Path) -> dict:
    """The grounded benchmark for one checkpoint; writes out/ and returns results.json's content."""
    from megatron_sayo.config import DataConfig, RewardConfig
    from megatron_sayo.data.grounded import load_grounded
    from megatron_sayo.eval import byob_grounded as bg

    if not args.data:
        raise EvalError("--benchmark grounded needs --data FILE.jsonl (a grounded dataset)")
    samples = load_grounded(args.data)[:args.limit] if args.limit else load_grounded(args.data)
    if not samples:
        raise EvalError(f"{args.data}: no samples")
    rows = bg.byob_rows(samples, args.instruction or DataConfig().instruction, RewardConfig().accuracy_match)
    byob_dir = out / "byob"
    dataset = byob_dir / "dataset.jsonl"
    dataset.parent.mkdir(parents=True, exist_ok=True)
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_type = install_grounded_package(byob_dir / "package")
    nemo_out = out / "nemo_evaluator"
    decoding = decoding_params(args)
    server = start_server(model.get("hf"), model.get("megatron"), args.tp, out / "server.log")
    try:
        result = run_nemo_evaluator(eval_type, nemo_out, server, model["name"], None, decoding, args.parallelism,
                                    extra={"dataset": {"path": str(dataset.resolve())}})
        predictions = read_jsonl(find_output(nemo_out, "byob_predictions.jsonl", bg.TASK))
        records = sample_records(rows, predictions, server)
        stats = http_json(server.url.removesuffix("/v1") + "/health")[1]
    finally:
        server.stop()
    return write_reports(out, "grounded", model, records, metric_scores(result), decoding, stats)


def decoding_params(args) -> dict:
    """The paper's decoding settings unless overridden on the command line."""
    return {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_tokens}


def write_reports(out: Path, benchmark: str, model: dict, records: list[dict], nemo_scores: dict, decoding: dict,
                  server_stats: dict | None = None) -> dict:
    """results.json, samples.jsonl and summary.md for one checkpoint."""
    import nemo_evaluator

    n = len(records)
    results = {
        "benchmark": benchmark, "model": model, "num_samples": n,
        "accuracy": sum(r["correct"] for r in records) / n if n else None,
        "tas": mean(r.get("tas") for r in records),
        "reward_attention": mean(r.get("reward_attention") for r in records),
        "answered": sum(r.get("extracted") is not None for r in records) / n if n else None,
        "mean_completion_tokens": mean(r.get("completion_tokens") for r in records),
        "decoding": decoding, "nemo_evaluator": {"version": nemo_evaluator.__version__, "scores": nemo_scores},
        "server": server_stats or {},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "summary.md").write_text(summary_markdown(results))
    return results


def fmt(value, digits: int = 4) -> str:
    """A number for a table, '-' when missing."""
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary_markdown(results: dict) -> str:
    """One checkpoint's summary table."""
    lines = [f"# {results['benchmark']}: {results['model']['name']}", "",
             f"source: `{results['model'].get('hf') or results['model'].get('megatron')}`  ",
             f"decoding: {results['decoding']}  ", f"nemo-evaluator {results['nemo_evaluator']['version']}", "",
             "| metric | value |", "|---|---|"]
    for key in ("num_samples", "accuracy", "tas", "reward_attention", "answered", "mean_completion_tokens"):
        lines.append(f"| {key} | {fmt(results.get(key))} |")
    lines += ["", "nemo-evaluator scores:", ""] + [f"- {k}: {v}" for k, v in results["nemo_evaluator"]["scores"]
                                                   .items()]
    return "\n".join(lines) + "\n"


def run_harness(args, model: dict, out: Path) -> dict:
    """A task of an installed nemo-evaluator harness (e.g. vlmeval's ChartQA) against our server."""
    check_harness_task(args.benchmark)
    decoding = decoding_params(args)
    server = start_server(model.get("hf"), model.get("megatron"), args.tp, out / "server.log")
    try:
        result = run_nemo_evaluator(args.benchmark, out / "nemo_evaluator", server, model["name"], args.limit,
                                    decoding, args.parallelism)
    finally:
        server.stop()
    scores = metric_scores(result)
    first = next(iter(scores.values()), None)
    results = {"benchmark": args.benchmark, "model": model, "accuracy": first, "tas": None, "num_samples": args.limit,
               "decoding": decoding, "nemo_evaluator": {"scores": scores}, "note": "TAS needs grounded boxes: "
               "only the grounded benchmark reports it"}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(summary_markdown({**results, "nemo_evaluator": {
        "version": require_nemo_evaluator().__version__, "scores": scores}}))
    return results


# ------------------------------------------------------------------------------------------------ compare

def model_spec(hf: str | None, megatron: str | None) -> dict:
    """{'name', 'hf' | 'megatron'} of a checkpoint."""
    path = Path(hf or megatron)
    return {"name": path.name or str(path), **({"hf": str(path)} if hf else {"megatron": str(path)})}


def detect_checkpoint(path: str) -> dict:
    """model_spec of a directory: HF (config.json + *.safetensors) or megatron (metadata.json / run dir)."""
    p = Path(path)
    if not p.is_dir():
        raise EvalError(f"--compare {path}: not a directory")
    if (p / "config.json").exists() and any(p.glob("*.safetensors")):
        return model_spec(str(p), None)
    if (p / "metadata.json").exists() or (p / "checkpoints").is_dir():
        return model_spec(None, str(p))
    raise EvalError(f"--compare {path}: neither an HF checkpoint (config.json + *.safetensors) nor a megatron "
                    f"checkpoint (metadata.json) nor a run dir (checkpoints/)")


COMPARE_KEYS = ("accuracy", "tas", "reward_attention", "answered", "mean_completion_tokens", "num_samples")


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
