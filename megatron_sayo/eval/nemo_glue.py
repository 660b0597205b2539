"""nemo-evaluator glue: compile our BYOB benchmark, find installed harness tasks, run `evaluate` against our
server, read its outputs.

nemo-evaluator is driven through process-wide state: environment variables (telemetry off, the API key it
reads by name, PATH so its `python -m ...` commands find this interpreter) and the `nemo_evaluator` namespace
package path (where our compiled benchmark package lives). `nemo_environment` sets all of it for the duration
of one evaluation and restores every value afterwards.

nemo-evaluator 0.2.8's BYOB runner writes to <out>/<task>/ while the output parser it generates reads <out>/;
our package ships its own parser (`OUTPUT_PY`) that reads either place.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from megatron_sayo.eval.errors import EvalError

API_KEY_ENV = "SAYO_EVAL_API_KEY"
TELEMETRY_ENV = {"NEMO_EVALUATOR_TELEMETRY_LEVEL": "0"}
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


@contextmanager
def scoped_environ(values: dict[str, str]):
    """os.environ updated with `values` inside the block; every touched variable restored (or removed) after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def require_nemo_evaluator():
    """The nemo_evaluator module (imported with telemetry off), or EvalError naming the extra to install."""
    with scoped_environ(TELEMETRY_ENV):
        try:
            import nemo_evaluator
        except ImportError:
            raise EvalError("nemo-evaluator is not installed: pip install 'megatron_sayo[eval]' "
                            "(or pip install nemo-evaluator==0.2.8)") from None
    return nemo_evaluator


def _forget_modules(prefix: str) -> None:
    for name in [m for m in sys.modules if m.startswith(prefix)]:
        del sys.modules[name]


@contextmanager
def nemo_environment(api_key: str, package_roots: tuple[Path, ...] = ()):
    """Telemetry off, the server's API key under API_KEY_ENV, this interpreter first on PATH, and each
    `root/nemo_evaluator` on the nemo_evaluator namespace path: for this block only."""
    nemo_evaluator = require_nemo_evaluator()
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    added = [str(Path(r) / "nemo_evaluator") for r in package_roots]
    added = [p for p in added if p not in nemo_evaluator.__path__]
    with scoped_environ({**TELEMETRY_ENV, API_KEY_ENV: api_key, "PATH": path}):
        nemo_evaluator.__path__.extend(added)
        try:
            yield nemo_evaluator
        finally:
            for p in added:
                nemo_evaluator.__path__.remove(p)
            for p in added:
                _forget_modules(f"nemo_evaluator.{Path(p).name}")


def compile_grounded_package(root: Path, module: str, task: str) -> str:
    """Compile a BYOB benchmark module with nemo-evaluator's compiler into root/nemo_evaluator/byob_<task>/
    (framework.yml + our output parser); return the task's eval type. Register root with nemo_environment."""
    import yaml

    require_nemo_evaluator()
    from nemo_evaluator.contrib.byob import decorators
    from nemo_evaluator.contrib.byob.compiler import compile_benchmark

    # compile_benchmark clears BYOB's process-wide registry, imports `module` and drops it from sys.modules
    # again while its benchmarks stay registered: a later ordinary import would then register them twice.
    # Put the registry back as it was.
    registered = dict(decorators._BENCHMARK_REGISTRY)
    try:
        fdf = compile_benchmark(module)[task]
    finally:
        decorators._BENCHMARK_REGISTRY.clear()
        decorators._BENCHMARK_REGISTRY.update(registered)
    pkg = root / "nemo_evaluator" / f"byob_{task}"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "framework.yml").write_text(yaml.safe_dump(fdf, sort_keys=False))
    (pkg / "output.py").write_text(OUTPUT_PY.format(task=task))
    _forget_modules(f"nemo_evaluator.byob_{task}")
    return fdf["evaluations"][0]["defaults"]["config"]["type"]


def available_tasks() -> set[str]:
    """'framework.task' and bare task names of the installed nemo-evaluator harness packages."""
    require_nemo_evaluator()
    from nemo_evaluator.core.input import get_available_evaluations

    by_framework, _, by_task = get_available_evaluations()
    names = set(by_task)
    for framework, tasks in by_framework.items():
        names.update(f"{framework}.{t}" for t in tasks)
    return names


def check_harness_task(name: str) -> None:
    """EvalError naming the package to install when no installed harness provides `name`."""
    if name in available_tasks():
        return
    bare = name.split(".")[-1].lower()
    package = HARNESS_PACKAGES.get(bare)
    hint = (f"install the harness package that provides it: pip install {package}" if package else
            "install the nemo-evaluator harness package that provides it")
    extra = " (the VLM harnesses need a GPU machine with torchvision)" if package == "nvidia-vlmeval" else ""
    raise EvalError(f"benchmark {name!r} is not provided by any installed nemo-evaluator harness; {hint}{extra}. "
                    f"Built in: 'grounded'.")


def run_evaluation(eval_type: str, out_dir: Path, url: str, model_id: str, limit: int | None, decoding: dict,
                   parallelism: int, extra: dict | None = None):
    """nemo-evaluator's `evaluate` for one task against a chat-completions URL; returns its EvaluationResult.
    Call inside nemo_environment (the API key is read from API_KEY_ENV)."""
    from nemo_evaluator.api.api_dataclasses import (
        ApiEndpoint,
        ConfigParams,
        EndpointType,
        EvaluationConfig,
        EvaluationTarget,
    )
    from nemo_evaluator.core.evaluate import evaluate

    params = ConfigParams(limit_samples=limit, parallelism=parallelism, request_timeout=3600, extra=extra or {},
                          **decoding)
    cfg = EvaluationConfig(type=eval_type, output_dir=str(out_dir), params=params)
    target = EvaluationTarget(api_endpoint=ApiEndpoint(url=url, model_id=model_id, type=EndpointType.CHAT,
                                                       api_key_name=API_KEY_ENV))
    log_path = Path(out_dir) / LOG_FILE
    print(f"nemo-evaluator: {eval_type} (its output: {log_path})", flush=True)
    try:
        with output_to(log_path):
            return evaluate(cfg, target)
    except SystemExit as exc:   # nemo-evaluator exits on a failed command
        raise EvalError(f"nemo-evaluator failed (exit {exc.code}) for {eval_type}; see {log_path}") from None


LOG_FILE = "nemo_evaluator.log"


@contextmanager
def output_to(path: Path):
    """This process's stdout and stderr appended to `path` while the block runs, restored after: file descriptors
    1 and 2 (the harness's subprocesses, logging handlers bound to the console) and sys.stdout / sys.stderr.
    nemo-evaluator logs at INFO meanwhile: all of it goes to the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    streams = sys.stdout, sys.stderr
    harness_log = logging.getLogger("nemo_evaluator")
    level = harness_log.level
    harness_log.setLevel(logging.INFO)
    for stream in streams:
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "a", buffering=1, encoding="utf-8", errors="replace") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            sys.stdout = sys.stderr = log
            try:
                yield
            finally:
                log.flush()
                sys.stdout, sys.stderr = streams
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        harness_log.setLevel(level)
        for fd in saved:
            os.close(fd)


def find_output(out_dir: Path, name: str, task: str) -> Path:
    """nemo-evaluator output file `name` in out_dir/ or out_dir/<task>/ (0.2.8 writes the latter)."""
    for path in (out_dir / name, out_dir / task / name):
        if path.exists():
            return path
    raise EvalError(f"nemo-evaluator wrote no {name} in {out_dir} or {out_dir / task}")


def metric_scores(result) -> dict[str, float]:
    """{task/metric/score: value} flattened from a nemo-evaluator EvaluationResult."""
    out = {}
    for task_name, task in (result.tasks or {}).items():
        for metric_name, metric in task.metrics.items():
            for score_name, score in metric.scores.items():
                out[f"{task_name}/{metric_name}/{score_name}"] = score.value
    return out
