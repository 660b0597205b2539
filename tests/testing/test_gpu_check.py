"""The GPU acceptance runner on CPU: arguments, the check list, the JSON summary, per-check time limits (a hung
check is killed with its children and the rest still run), prerequisites, the budget, and the GPU checks
skipping with the reason when CUDA is absent. The checks' own GPU work cannot run here (no GPU)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sayo.testing import gpu_check, gpu_check_cases

ME = __name__


# ------------------------------------------------------------------------ checks the runner runs in children

def check_pass(ctx):
    (ctx.workdir / "ran_pass").write_text("yes")
    return gpu_check.CheckResult(True, {"answer": 42, "ratio": 1.5})


def check_fail(ctx):
    return gpu_check.CheckResult(False, {"err": 0.1}, "error 0.1 > 1e-4")


def check_raises(ctx):
    raise RuntimeError("CUDA error: an illegal memory access")


def check_hangs(ctx):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (ctx.workdir / "grandchild.pid").write_text(str(child.pid))
    time.sleep(600)


def check_wrong_type(ctx):
    return {"ok": True}


def _check(name, fn, limit=30.0, **kw):
    return gpu_check.Check(name, f"{ME}:{fn.__name__}", limit, f"test check {name}", needs_cuda=False, **kw)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ------------------------------------------------------------------------ runner

@pytest.mark.multiproc
def test_results_statuses_json_and_a_hung_check_killed_while_the_rest_run(tmp_path):
    checks = [_check("first", check_pass), _check("hangs", check_hangs, limit=4.0), _check("fails", check_fail),
              _check("raises", check_raises), _check("wrong_type", check_wrong_type),
              _check("after", check_pass, needs=("first",)), _check("blocked", check_pass, needs=("fails",))]
    out = tmp_path / "gpu_check.json"
    t0 = time.monotonic()
    summary = gpu_check.run_checks(checks, out, tmp_path / "work", budget_s=120, cuda=(False, "no CUDA here"))
    took = time.monotonic() - t0
    by = {e["name"]: e for e in summary["checks"]}
    assert [e["name"] for e in summary["checks"]] == [c.name for c in checks]
    assert by["first"]["status"] == "pass" and by["first"]["figures"] == {"answer": 42, "ratio": 1.5}
    assert (tmp_path / "work" / "ran_pass").read_text() == "yes"
    assert by["hangs"]["status"] == "fail" and "timed out after 4 s" in by["hangs"]["reason"]
    assert 4.0 <= by["hangs"]["seconds"] < 4.0 + 2 * gpu_check.KILL_GRACE_S
    pid = int((tmp_path / "work" / "grandchild.pid").read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), "the hung check's own child survived the kill"
    assert by["fails"]["status"] == "fail" and by["fails"]["reason"] == "error 0.1 > 1e-4"
    assert by["raises"]["status"] == "fail" and "illegal memory access" in by["raises"]["reason"]
    assert "Traceback" in by["raises"]["log_tail"]
    assert by["wrong_type"]["status"] == "fail" and "not CheckResult" in by["wrong_type"]["reason"]
    assert by["after"]["status"] == "pass"                          # ran after the hang was killed
    assert by["blocked"]["status"] == "skip" and "needs fails" in by["blocked"]["reason"]
    assert (summary["pass"], summary["fail"], summary["skip"]) == (2, 4, 1)
    assert json.loads(out.read_text()) == summary                  # the file is the summary, valid JSON
    assert took < 60
    assert not list(out.parent.glob("*.tmp*"))                     # atomic write left nothing behind


@pytest.mark.multiproc
def test_budget_cuts_limits_and_skips_what_no_longer_fits(tmp_path):
    ticks = iter([0.0, 0.0, 0.0, 95.0, 95.0, 95.0, 95.0, 95.0, 95.0, 95.0, 95.0])
    checks = [_check("a", check_pass, limit=30.0), _check("b", check_pass, limit=30.0)]
    summary = gpu_check.run_checks(checks, tmp_path / "s.json", tmp_path / "w", budget_s=100,
                           cuda=(True, ""), clock=lambda: next(ticks))
    a, b = summary["checks"]
    assert a["status"] == "pass" and a["limit_s"] == 30.0
    assert b["status"] == "skip" and "only 5 s left of the 100 s budget" in b["reason"]


@pytest.mark.multiproc
def test_gpu_checks_skip_with_the_reason_without_cuda(tmp_path):
    """The real check list on this CPU machine: every CUDA check is skipped, naming why; the environment
    check still runs and reports the versions."""
    ok, reason = gpu_check.cuda_status()
    assert not ok and "CUDA is not available" in reason and "torch" in reason
    checks = [dataclasses.replace(c, limit_s=600) for c in gpu_check.CHECKS]  # a busy CI machine imports slowly
    summary = gpu_check.run_checks(checks, tmp_path / "gpu_check.json", tmp_path / "w", budget_s=300)
    by = {e["name"]: e for e in summary["checks"]}
    assert by["environment"]["status"] == "pass"
    assert by["environment"]["figures"]["cuda_available"] is False
    assert by["environment"]["figures"]["torch"].startswith("2.")
    for name in ("nccl_startup", "parity_tiny", "region_mass", "checkpoint_05b", "parity_05b", "rollout",
                 "grpo_steps"):                            # CUDA is checked before prerequisites
        assert by[name]["status"] == "skip" and by[name]["reason"] == reason
    assert summary["fail"] == 0 and summary["cuda"] is False


# ------------------------------------------------------------------------ arguments and the check list

def test_parse_args_defaults_and_errors(tmp_path, capsys):
    args = gpu_check.parse_args(["--out", str(tmp_path / "r.json")])
    assert args.budget_s == 420 and args.only == [] and args.skip == []
    assert args.workdir == tmp_path / "r.json.work"
    args = gpu_check.parse_args(["--only", "parity_tiny,region_mass", "--skip", "rollout", "--budget-s", "90"])
    assert args.only == ["parity_tiny", "region_mass"] and args.skip == ["rollout"] and args.budget_s == 90
    assert [c.name for c in gpu_check.select(gpu_check.CHECKS, args.only, args.skip)] == ["parity_tiny", "region_mass"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "parity,region_mass"])
    assert "unknown check(s) parity" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget-s", "0"])
    assert "--budget-s must be > 0" in capsys.readouterr().err


def test_check_list_covers_the_issue_and_resolves():
    names = [c.name for c in gpu_check.CHECKS]
    assert len(set(names)) == len(names)
    assert {"nccl_startup", "parity_tiny", "parity_05b", "region_mass", "grpo_steps", "rollout"} <= set(names)
    for i, check in enumerate(gpu_check.CHECKS):
        module, _, fn = check.target.partition(":")
        assert callable(getattr(importlib.import_module(module), fn)), check.target
        assert set(check.needs) <= set(names[:i]), f"{check.name} needs a later check"
        assert 0 < check.limit_s <= 300
    assert sum(c.limit_s for c in gpu_check.CHECKS if c.name != "grpo_steps") < 900


@pytest.mark.multiproc
def test_list_command_prints_every_check():
    proc = subprocess.run([sys.executable, "-m", "megatron_sayo.testing.gpu_check", "--list"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 0, proc.stderr
    for check in gpu_check.CHECKS:
        assert check.name in proc.stdout


@pytest.mark.multiproc
def test_script_runs_the_checks_and_writes_the_summary(tmp_path):
    """scripts/gpu_check.sh with an existing environment (this venv, no CUDA): the runner's JSON and the log."""
    root = Path(__file__).resolve().parents[2]
    script = root / "scripts" / "gpu_check.sh"
    assert os.access(script, os.X_OK) and "gpu-check:" in (root / "Makefile").read_text()
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, GPU_CHECK_NO_INSTALL="1", GPU_CHECK_VENV=sys.prefix, GPU_CHECK_OUT=str(out),
               PYTHONPATH=str(root))
    proc = subprocess.run(["bash", str(script), "--only", "nccl_startup,rollout"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    by = {e["name"]: e for e in summary["checks"]}
    assert list(by) == ["nccl_startup", "rollout"]
    assert all(e["status"] == "skip" and "CUDA is not available" in e["reason"] for e in by.values())
    assert "GPU_CHECK_NO_INSTALL=1" in summary["setup_notes"]
    assert "running the checks with a budget of" in (tmp_path / "gpu_check.log").read_text()


@pytest.mark.multiproc
def test_script_reports_a_setup_failure_as_json(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, GPU_CHECK_NO_INSTALL="1", GPU_CHECK_VENV=str(tmp_path / "missing"), GPU_CHECK_OUT=str(out))
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    summary = json.loads(out.read_text())
    assert proc.returncode == 1 and summary["setup"] == "failed" and "missing/bin/python" in summary["reason"]


# ------------------------------------------------------------------------ the checks' pure parts

def test_peak_table_matches_the_specific_part_first():
    assert gpu_check_cases.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check_cases.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check_cases.peak_bf16_flops("NVIDIA H200") == 989e12
    assert gpu_check_cases.peak_bf16_flops("Some Future GPU") is None
    assert gpu_check_cases.mfu(989e12, 2.0, 989e12) == 0.5 and gpu_check_cases.mfu(1.0, 1.0, None) is None


def test_grpo_run_config_is_a_valid_run_config(tmp_path):
    from megatron_sayo.config import load_config

    ctx = gpu_check.Context(workdir=tmp_path)
    cfg = load_config(str(gpu_check_cases.grpo_run_config(ctx, tmp_path / "run")))
    assert cfg.train.steps == gpu_check_cases.GRPO_STEPS and cfg.model.params_dtype == "bfloat16"
    assert cfg.model.region_mass_kernel == "auto"
    assert cfg.validate_world(1) == 1


def test_05b_config_is_about_half_a_billion_parameters():
    from megatron_sayo import plan
    from megatron_sayo.testing.tiny_checkpoint import hub_config

    cfg = hub_config(gpu_check_cases.config_05b(), source="config_05b")
    assert 0.45e9 < plan.total_params(plan.parse_arch(cfg)) < 0.7e9
    assert cfg["image_token_id"] < cfg["vocab_size"]


def test_summarize_steps_means_after_the_first_and_mfu():
    from megatron_sayo import plan

    text = plan.TextArch(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, head_dim=64,
                         vocab=151936, tied=True)
    rows = [dict(tokens_per_s=t, time_rollout=1.0, time_score=0.2, time_reference=0.1, time_update=u,
                 time_step=2.0, sequences=32, sequence_length=300)
            for t, u in ((10.0, 9.0), (100.0, 0.5), (300.0, 1.5))]
    out = gpu_check_cases.summarize_steps(rows, text, peak=1e15)
    assert out["steps"] == 3 and out["tokens_per_s"] == 200.0 and out["time_update"] == 1.0
    flops = plan.training_flops(text, 32, 300)
    assert out["mfu_update"] == pytest.approx((flops / 0.5 + flops / 1.5) / 2 / 1e15)


# ------------------------------------------------------------------------ the check bodies, smoke-run on CPU

def smoke_parity(ctx):
    return gpu_check_cases.parity(gpu_check_cases.tiny_checkpoint(ctx), batch_size=2)


def smoke_model_masses(ctx):
    gpu_check_cases._init_rank()
    figures, failures = gpu_check_cases._model_masses(gpu_check_cases.tiny_checkpoint(ctx))
    return gpu_check.CheckResult(not failures, figures, "; ".join(failures))


def smoke_rollout(ctx):
    import torch

    return gpu_check_cases.rollout_throughput(gpu_check_cases.tiny_checkpoint(ctx), 2, 6, torch.float32)


def smoke_grpo(ctx):
    return gpu_check_cases.grpo_run(ctx, gpu_check_cases.tiny_checkpoint(ctx), steps=2, dtype="float32",
                                    max_new_tokens=12)


@pytest.mark.slow
@pytest.mark.multiproc
def test_check_bodies_run_on_cpu_with_the_tiny_checkpoint(tmp_path):
    """The GPU checks' code paths on CPU (tiny model): parity against transformers (fp32 within 1e-4; bf16 within
    the stated bound), masses of both kernels against eager attention within 1e-5, both generators, and a
    2-step run of the real trainer whose metrics give the MFU inputs. What only CUDA can show is not shown."""
    checks = [_check("parity", smoke_parity, 300), _check("masses", smoke_model_masses, 300),
              _check("rollout", smoke_rollout, 300), _check("grpo", smoke_grpo, 400)]
    summary = gpu_check.run_checks(checks, tmp_path / "s.json", tmp_path / "w", budget_s=1200, cuda=(False, ""))
    by = {e["name"]: e for e in summary["checks"]}
    for name, entry in by.items():
        assert entry["status"] == "pass", f"{name}: {entry.get('reason')}\n{entry.get('log_tail', '')}"
    parity = by["parity"]["figures"]
    assert parity["local"]["fp32_rel"] <= 1e-4 and parity["local"]["fp32_top1"] == 1.0
    assert by["masses"]["figures"]["indicator_max_err"] <= 1e-5 and by["masses"]["figures"]["padded_rows"] > 0
    assert by["rollout"]["figures"]["ours_tokens_per_s"] > 0
    assert by["rollout"]["figures"]["identical_rows"] == 2          # fp32 greedy: the same ids as transformers
    grpo = by["grpo"]["figures"]
    assert grpo["steps"] == 2 and grpo["update_tflops_per_step"] > 0 and grpo["mfu_update"] is None  # CPU: no peak
