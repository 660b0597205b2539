"""GPU acceptance run: each check in its own process under its own time limit, results in one JSON file.

    python -m megatron_sayo.testing.gpu_check --out gpu_check.json [--only a,b] [--skip c] [--budget-s 420]
    python -m megatron_sayo.testing.gpu_check --list

scripts/gpu_check.sh sets up the environment and calls this. A check is a function `fn(ctx) -> CheckResult`
named "module:function" (the GPU checks live in `gpu_check_cases.py`). Each runs in a fresh Python process in its
own process group (so a hung NCCL or CUDA call, or a check's own children, are killed whole), and is given
min(its limit, the time left in the budget). The summary is rewritten atomically after every check, so a run
cut short still leaves what it measured. A check that needs CUDA is skipped with the reason when there is none;
a check whose prerequisite did not pass is skipped naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sayo.formats.atomic import write_json_atomic

STATUSES = ("pass", "fail", "skip")
KILL_GRACE_S = 5.0
MIN_USEFUL_S = 10.0   # a check is not started with less time than this left in the budget
LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class Check:
    """One check: `target` is "module:function"; `needs` names checks that must pass first."""

    name: str
    target: str
    limit_s: float
    description: str
    needs_cuda: bool = True
    needs: tuple[str, ...] = ()


@dataclass
class CheckResult:
    """What a check function returns: pass/fail, its figures (JSON values), and why when it failed."""

    ok: bool
    figures: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    status: str = ""      # set by the runner: pass, fail or skip

    def to_dict(self) -> dict:
        status = self.status or ("pass" if self.ok else "fail")
        return {"status": status, "figures": self.figures, "reason": self.reason}


@dataclass(frozen=True)
class Context:
    """What a check gets: a scratch directory shared by the run's checks (checkpoints made once)."""

    workdir: Path


_CASES = "megatron_sayo.testing.gpu_check_cases"
CHECKS: tuple[Check, ...] = (
    Check("environment", f"{_CASES}:environment", 60, "torch/CUDA/device, Transformer Engine and flash-attn status",
          needs_cuda=False),
    Check("nccl_startup", f"{_CASES}:nccl_startup", 60, "runtime.init_distributed with one rank on NCCL: "
          "backend, megatron groups, an all-reduce on the GPU"),
    Check("parity_tiny", f"{_CASES}:parity_tiny", 90, "tiny random Qwen2.5-VL: our logits vs transformers on the "
          "same GPU, fp32 and bf16, local spec (and TE spec when installed)"),
    Check("region_mass", f"{_CASES}:region_mass", 90, "region/image masses on CUDA vs eager softmax, right-padded "
          "uneven batch (indicator kernel and LSE path), kernel and tiny model; memory vs full scores"),
    Check("shared_prompt_attention", f"{_CASES}:shared_prompt_attention", 60, "prompt sharing's mask-free attention "
          "(prompt part + own completion merged by log-sum-exp) vs the dense segment mask, fp32 math and bf16 "
          "flash kernels, outputs and gradients, a 1,000-token prompt with 8 completions"),
    Check("checkpoint_05b", f"{_CASES}:checkpoint_05b", 120, "write the ~0.5B random Qwen2.5-VL checkpoint the "
          "next checks share (only they need it)"),
    Check("parity_05b", f"{_CASES}:parity_05b", 120, "~0.5B random config: our logits vs transformers on the "
          "same GPU, fp32 and bf16, local spec (and TE spec when installed)", needs=("checkpoint_05b",)),
    Check("rollout", f"{_CASES}:rollout", 120, "rollout tokens/s: our KV-cached generate vs transformers' "
          "generate, bf16, batch 16, same prompt ids", needs=("checkpoint_05b",)),
    Check("grpo_steps", f"{_CASES}:grpo_steps", 240, "20 GRPO steps of the ~0.5B config in bf16 on one GPU: "
          "tokens/s, seconds per phase, peak memory, MFU of the update (Megatron-LM's FLOP count)",
          needs=("checkpoint_05b",)),
)


# ---------------------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None, checks: tuple[Check, ...] = CHECKS) -> argparse.Namespace:
    names = [c.name for c in checks]
    p = argparse.ArgumentParser(prog="python -m megatron_sayo.testing.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="summary JSON (default gpu_check.json)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: <out>.work next to --out)")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for all checks (default 420)")
    p.add_argument("--only", default="", help=f"comma-separated checks to run (of: {', '.join(names)})")
    p.add_argument("--skip", default="", help="comma-separated checks not to run")
    p.add_argument("--list", action="store_true", help="print the checks and their limits, then exit")
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)   # internal: child process
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    for opt in ("only", "skip"):
        chosen = [n for n in getattr(args, opt).split(",") if n]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            p.error(f"--{opt}: unknown check(s) {', '.join(unknown)}; the checks are: {', '.join(names)}")
        setattr(args, opt, chosen)
    if args.run_one is None and args.workdir is None:
        args.workdir = args.out.with_name(args.out.name + ".work")
    return args


def select(checks: tuple[Check, ...], only: list[str], skip: list[str]) -> list[Check]:
    """The checks to run, in the registry's order."""
    return [c for c in checks if (not only or c.name in only) and c.name not in skip]


# ---------------------------------------------------------------------------------------------------- running

def cuda_status() -> tuple[bool, str]:
    """(available, reason when not): whether this torch sees a CUDA device."""
    try:
        import torch
    except ImportError as exc:
        return False, f"torch is not importable ({exc})"
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (CPU-only build)"
        return False, f"CUDA is not available: torch {torch.__version__}, CUDA build {built}, " \
                      f"{torch.cuda.device_count()} device(s) visible"
    return True, ""


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the check's process group, SIGKILL what is left after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_isolated(check: Check, limit_s: float, workdir: Path) -> dict:
    """Run one check in a child process group under `limit_s`; its result entry (status, figures, reason)."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result_path, log_path = logs / f"{check.name}.result.json", logs / f"{check.name}.log"
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "megatron_sayo.testing.gpu_check", "--run-one", check.target,
           "--result", str(result_path), "--workdir", str(workdir)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return {"status": "fail", "figures": {}, "reason": f"timed out after {limit_s:.0f} s (killed)",
                    "log_tail": _tail(log_path)}
    if result_path.is_file():
        try:
            entry = json.loads(result_path.read_text())
        except ValueError as exc:
            entry = {"status": "fail", "figures": {}, "reason": f"unreadable result file {result_path}: {exc}"}
    else:
        entry = {"status": "fail", "figures": {}, "reason": f"the check process exited with code {code} "
                                                            f"without a result"}
    if entry.get("status") not in STATUSES:
        entry = {"status": "fail", "figures": {}, "reason": f"bad status {entry.get('status')!r} in {result_path}"}
    if entry["status"] == "fail":
        entry["log_tail"] = _tail(log_path)
    return entry


def run_checks(checks: list[Check], out: Path, workdir: Path, budget_s: float,
               cuda: tuple[bool, str] | None = None, clock: Callable[[], float] = time.monotonic) -> dict:
    """Run `checks` in order within `budget_s`; write and return the summary (rewritten after each check)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cuda_ok, cuda_reason = cuda if cuda is not None else cuda_status()
    start = clock()
    summary = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": budget_s,
               "cuda": cuda_ok, "cuda_reason": cuda_reason,
               "setup_notes": os.environ.get("GPU_CHECK_SETUP_NOTES", ""), "checks": [], "seconds": 0.0}
    status: dict[str, str] = {}
    for check in checks:
        left = budget_s - (clock() - start)
        limit = min(check.limit_s, left)
        entry = {"name": check.name, "description": check.description, "limit_s": round(limit, 1)}
        missing = [n for n in check.needs if status.get(n) != "pass"]
        t0 = clock()
        if check.needs_cuda and not cuda_ok:
            result = {"status": "skip", "figures": {}, "reason": cuda_reason}
        elif missing:
            result = {"status": "skip", "figures": {}, "reason": f"needs {', '.join(missing)} to pass first"}
        elif limit < min(MIN_USEFUL_S, check.limit_s):
            result = {"status": "skip", "figures": {}, "reason": f"only {left:.0f} s left of the {budget_s:.0f} s "
                                                                 f"budget"}
        else:
            print(f"[gpu-check] {check.name} (limit {limit:.0f} s): {check.description}", flush=True)
            result = run_isolated(check, limit, workdir)
        entry.update(result, seconds=round(clock() - t0, 2))
        status[check.name] = entry["status"]
        summary["checks"].append(entry)
        summary["seconds"] = round(clock() - start, 2)
        summary.update({s: sum(e["status"] == s for e in summary["checks"]) for s in STATUSES})
        write_json_atomic(out, summary)
        print(f"[gpu-check] {check.name}: {entry['status'].upper()} in {entry['seconds']:.1f} s"
              + (f" ({entry['reason']})" if entry.get("reason") else ""), flush=True)
    return summary


def run_child(target: str, result: Path, workdir: Path) -> int:
    """Child process: import and call the check, write its result file (a raised error is a failure)."""
    import importlib

    module, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
        outcome = fn(Context(workdir=workdir))
        entry = outcome.to_dict() if isinstance(outcome, CheckResult) else {
            "status": "fail", "figures": {}, "reason": f"{target} returned {type(outcome).__name__}, not CheckResult"}
    except Exception as exc:  # the check failed; say how, with where
        traceback.print_exc()
        entry = {"status": "fail", "figures": {}, "reason": f"{type(exc).__name__}: {exc}"[:2000]}
    write_json_atomic(result, json.loads(json.dumps(entry, default=_jsonable)))
    return 0


def _jsonable(value):
    """Figures may hold numpy/torch scalars or dataclasses; make them JSON values."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_one:
        if args.result is None or args.workdir is None:
            print("--run-one needs --result and --workdir", file=sys.stderr)
            return 2
        return run_child(args.run_one, args.result, args.workdir)
    checks = select(CHECKS, args.only, args.skip)
    if args.list:
        for c in checks:
            needs = f"  [needs {', '.join(c.needs)}]" if c.needs else ""
            print(f"{c.name:<16}{c.limit_s:>5.0f} s  {'CUDA' if c.needs_cuda else 'any '}  {c.description}{needs}")
        return 0
    summary = run_checks(checks, args.out, args.workdir, args.budget_s)
    print(f"[gpu-check] {summary['pass']} passed, {summary['fail']} failed, {summary['skip']} skipped in "
          f"{summary['seconds']:.0f} s -> {args.out}")
    return 1 if summary["fail"] else 0


if __name__ == "__main__":  # run as the imported module, so checks' CheckResult is this module's class
    from megatron_sayo.testing.gpu_check import main as _main

    sys.exit(_main())
