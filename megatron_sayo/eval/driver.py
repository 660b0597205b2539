"""Evaluation driver: start our server, run a nemo-evaluator task against it, add TAS, write the reports.

Grounded benchmark flow:
  1. grounded JSONL -> BYOB dataset rows (byob_grounded.byob_rows) in OUTDIR/byob/dataset.jsonl;
  2. nemo-evaluator's BYOB compiler compiles byob_grounded.py into a harness package under OUTDIR/byob/
     (visible to nemo-evaluator inside `nemo_glue.nemo_environment` only: nothing is installed);
  3. the server starts (server_process.py) with local media confined to the images' directory, and
     nemo-evaluator's `evaluate` runs the task against it (its runner sends the prompts, scores the answers
     with our scorer, writes byob_results.json + byob_predictions.jsonl);
  4. TAS: every prediction is teacher-forced through the server's /v1/tas (same model, same TP ranks), giving
     the sample's pooled region/image attention ratio over its top-entropy answer tokens;
  5. OUTDIR/results.json, OUTDIR/samples.jsonl, OUTDIR/summary.md (reports.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_sayo.eval import nemo_glue, reports
from megatron_sayo.eval.errors import EvalError
from megatron_sayo.eval.server_process import ServerProcess, http_json, local_media_root, start_server

__all__ = ["EvalError", "PAPER_DECODING", "run_grounded", "run_harness", "model_spec", "detect_checkpoint"]

PAPER_DECODING = {"temperature": 0.1, "top_p": 0.1, "max_new_tokens": 2048}


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
    rows = bg.byob_rows(samples, args.instruction or DataConfig().instruction, RewardConfig().accuracy_match,
                        getattr(args, "answer_field", "answer"))
    byob_dir = out / "byob"
    dataset = byob_dir / "dataset.jsonl"
    dataset.parent.mkdir(parents=True, exist_ok=True)
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_type = nemo_glue.compile_grounded_package(byob_dir / "package", "megatron_sayo.eval.byob_grounded",
                                                   bg.TASK)
    nemo_out = out / "nemo_evaluator"
    decoding = decoding_params(args)
    server = start_server(model.get("hf"), model.get("megatron"), args.tp, out / "server.log",
                          extra_args=["--allowed-local-media-path", local_media_root(r["image_url"] for r in rows)])
    try:
        with nemo_glue.nemo_environment(server.api_key, (byob_dir / "package",)) as nemo_evaluator:
            result = nemo_glue.run_evaluation(eval_type, nemo_out, server.url + "/chat/completions",
                                              model["name"], None, decoding, args.parallelism,
                                              extra={"dataset": {"path": str(dataset.resolve())}})
        predictions = read_jsonl(nemo_glue.find_output(nemo_out, "byob_predictions.jsonl", bg.TASK))
        records = sample_records(rows, predictions, server)
        stats = http_json(server.health_url)[1]
    finally:
        server.stop()
    results = reports.grounded_results("grounded", model, records, nemo_glue.metric_scores(result),
                                       nemo_evaluator.__version__, decoding, stats)
    return reports.write_reports(out, results, records)


def decoding_params(args) -> dict:
    """The paper's decoding settings unless overridden on the command line."""
    return {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_tokens}


def run_harness(args, model: dict, out: Path) -> dict:
    """A task of an installed nemo-evaluator harness (e.g. vlmeval's ChartQA) against our server."""
    nemo_glue.check_harness_task(args.benchmark)
    decoding = decoding_params(args)
    server = start_server(model.get("hf"), model.get("megatron"), args.tp, out / "server.log")
    try:
        with nemo_glue.nemo_environment(server.api_key) as nemo_evaluator:
            result = nemo_glue.run_evaluation(args.benchmark, out / "nemo_evaluator", server.url +
                                              "/chat/completions", model["name"], args.limit, decoding,
                                              args.parallelism)
    finally:
        server.stop()
    scores = nemo_glue.metric_scores(result)
    results = {"benchmark": args.benchmark, "model": model, "accuracy": next(iter(scores.values()), None),
               "tas": None, "num_samples": args.limit, "decoding": decoding,
               "nemo_evaluator": {"version": nemo_evaluator.__version__, "scores": scores},
               "note": "TAS needs grounded boxes: only the grounded benchmark reports it"}
    return reports.write_reports(out, results)


# ------------------------------------------------------------------------------------------------ checkpoints

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
