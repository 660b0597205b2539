"""Training checkpoints: atomic save, keep, RNG + optimizer + scheduler round trip (bit-for-bit resume on CPU),
fallback past a corrupt latest checkpoint; 2 gloo ranks at TP=2 on the tiny model."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sayo.distributed.runtime import spawn_local

pytestmark = pytest.mark.compat     # in every cell of `make compat` (docs/compat.md)


def _train_steps(model, opt, sched, n: int) -> list[float]:
    """n toy steps whose loss depends on torch/numpy/python RNG draws; returns the draws."""
    draws = []
    ids = torch.arange(12).reshape(2, 6) + 3
    pos = torch.arange(6).expand(3, 2, 6)
    for _ in range(n):
        noise = torch.randn(()) + float(np.random.rand()) + random.random()
        draws.append(float(noise))
        logits = model(input_ids=ids, position_ids=pos)
        loss = (logits.float() ** 2).mean() * (1 + 0.01 * noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return draws


def _build(hf_dir):
    from megatron_sayo.checkpoint.loader import load_model_stage

    model = load_model_stage(hf_dir, tp=2, pp=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _scenario(hf_dir: str, run_dir: str):
    from megatron_sayo.checkpoint import state as checkpoint
    from megatron_sayo.distributed import runtime

    runtime.init_distributed(2, 1)
    torch.manual_seed(1 + torch.distributed.get_rank())
    np.random.seed(2)
    random.seed(3)
    model, opt, sched = _build(hf_dir)
    _train_steps(model, opt, sched, 1)
    for step in (1, 2, 3):          # keep=2: step 1 pruned
        checkpoint.save_training_state(run_dir, step, model, opt, sched, {"data_position": 10 * step}, keep=2,
                                       config_dir=hf_dir)
    draws_a = _train_steps(model, opt, sched, 2)
    final_a = _params(model)

    model, opt, sched = _build(hf_dir)   # a fresh process state: different RNG, untrained weights
    torch.manual_seed(99)
    state = checkpoint.load_training_state(run_dir, model, opt, sched)
    draws_b = _train_steps(model, opt, sched, 2)
    final_b = _params(model)
    same = all(torch.equal(final_a[k], final_b[k]) for k in final_a)

    # corrupt the latest (step 3): a data file goes missing -> falls back to step 2 with a warning
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        ckpt3 = Path(run_dir) / "checkpoints" / "step_0000003"
        next(ckpt3.glob("*.distcp")).unlink()
    torch.distributed.barrier()
    model, opt, sched = _build(hf_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = checkpoint.load_training_state(run_dir, model, opt, sched)
    return dict(step=state["step"], extra=state["extra"], draws_equal=draws_a == draws_b, params_equal=same,
                lr=sched.get_last_lr(), fallback_step=fallback["step"], fallback_extra=fallback["extra"],
                warned=[str(w.message) for w in caught if "falling back" in str(w.message)])


@pytest.mark.multiproc
def test_training_state_round_trip_and_fallback(tiny_ckpt, tmp_path):
    run_dir = tmp_path / "run"
    results = spawn_local(_scenario, 2, str(tiny_ckpt), str(run_dir))
    for r in results:
        assert r["step"] == 3 and r["extra"] == {"data_position": 30}
        assert r["draws_equal"] and r["params_equal"], r
        assert r["fallback_step"] == 2 and r["fallback_extra"] == {"data_position": 20}
    assert any(r["warned"] for r in results) and "step_0000003" in results[0]["warned"][0]
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000003"]
    assert (root / "latest").read_text().strip() == "step_0000003"
    assert (root / "step_0000002" / "config.json").is_file()


@pytest.mark.multiproc
def test_trained_checkpoint_exports_policy_weights(tiny_ckpt, tmp_path):
    """A trainer step dir (model + optimizer + RNG) exports to HF: same names/shapes as the source."""
    from safetensors import safe_open

    from megatron_sayo.checkpoint.files import find_resumable
    from megatron_sayo.convert.megatron_to_hf import convert_megatron_to_hf

    run_dir = tmp_path / "run"
    spawn_local(_save_one, 2, str(tiny_ckpt), str(run_dir))
    step = find_resumable(run_dir)
    assert step is not None and step.name == "step_0000001"
    convert_megatron_to_hf(run_dir, tmp_path / "hf", progress=False)
    with safe_open(tiny_ckpt / "model.safetensors", "pt") as a, safe_open(tmp_path / "hf" / "model.safetensors",
                                                                          "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert a.get_slice(k).get_shape() == b.get_slice(k).get_shape()
            assert a.get_slice(k).get_dtype() == b.get_slice(k).get_dtype()
        changed = [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
        assert "model.layers.0.mlp.down_proj.weight" in changed  # trained, not the source weights


def _load_step_and_export(step_dir: str, hf_dir: str):
    """TP=1: the training step's model loaded directly, and the HF export of it loaded through the HF reader."""
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime

    runtime.init_distributed(1, 1)
    direct = load_model_stage(megatron_dir=step_dir, params_dtype=torch.float32).state_dict()
    exported = load_model_stage(hf_dir=hf_dir, params_dtype=torch.float32).state_dict()
    return {k: torch.equal(v, exported[k]) for k, v in direct.items() if isinstance(v, torch.Tensor)}


@pytest.mark.multiproc
def test_training_step_loads_as_a_model(tiny_ckpt, tmp_path):
    """load_model_stage(megatron_dir=<trainer step dir>) (eval, serve, reports) gets the trained weights, equal
    to the step's HF export (a TP=2 step loaded at TP=1), not an error about the step's optimizer state."""
    from megatron_sayo.checkpoint.files import find_resumable
    from megatron_sayo.convert.megatron_to_hf import convert_megatron_to_hf

    run_dir = tmp_path / "run"
    spawn_local(_save_one, 2, str(tiny_ckpt), str(run_dir))
    convert_megatron_to_hf(run_dir, tmp_path / "hf", progress=False)
    equal = next(r for r in spawn_local(_load_step_and_export, 1, str(find_resumable(run_dir)),
                                        str(tmp_path / "hf")) if r is not None)
    assert len(equal) > 10 and all(equal.values()), [k for k, v in equal.items() if not v]


def _save_one(hf_dir: str, run_dir: str):
    from megatron_sayo.checkpoint import state as checkpoint
    from megatron_sayo.distributed import runtime

    runtime.init_distributed(2, 1)
    model, opt, sched = _build(hf_dir)
    _train_steps(model, opt, sched, 1)
    checkpoint.save_training_state(run_dir, 1, model, opt, sched, {"data_position": 1}, config_dir=hf_dir)


def test_find_resumable_skips_tmp_and_broken_metadata(tmp_path):
    from megatron_sayo.checkpoint.files import find_resumable

    root = tmp_path / "checkpoints"
    (root / "step_0000005.tmp").mkdir(parents=True)
    assert find_resumable(tmp_path) is None
    broken = root / "step_0000004"
    broken.mkdir()
    for name in ("metadata.json", "common.pt", ".metadata", "checkpoint_metadata.json"):
        (broken / name).write_text("{")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_resumable(tmp_path) is None
    assert any("metadata unreadable" in str(w.message) for w in caught)


class _RunsACommand:
    """Unpickling this runs a shell command (what a crafted checkpoint would carry)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def _guard_scenario(hf_dir: str, run_dir: str, marker: str):
    """1 rank, TP=1: finite check on save (14.3), all-corrupt error (14.4), unsafe pickles refused (14.5)."""
    import pickle
    import shutil

    from megatron_sayo.checkpoint import state as checkpoint
    from megatron_sayo.checkpoint.files import CheckpointError
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime

    runtime.init_distributed(1, 1)
    out = {}

    def build():
        model = load_model_stage(hf_dir, tp=1, pp=1).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    model, opt, sched = build()
    root = Path(run_dir) / "checkpoints"
    for step in (1, 2):
        checkpoint.save_training_state(run_dir, step, model, opt, sched, {"data_position": step}, keep=1,
                                       config_dir=hf_dir)
    good = _params(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["diverged_save"] = checkpoint.save_training_state(run_dir, 3, model, opt, sched, {"data_position": 3},
                                                              keep=1)
    out["diverged_warning"] = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    out["kept"] = sorted(p.name for p in root.iterdir())
    out["latest"] = (root / "latest").read_text().strip()
    model, opt, sched = build()
    out["resumed_step"] = checkpoint.load_training_state(run_dir, model, opt, sched)["step"]
    out["resumed_equal"] = all(torch.equal(good[k], v) for k, v in _params(model).items())

    # 14.5: a crafted .metadata / common.pt is refused before torch or megatron unpickles it
    for name in (".metadata", "common.pt"):
        evil_run = Path(run_dir + "-evil-" + name.strip("."))
        step_dir = evil_run / "checkpoints" / "step_0000002"
        shutil.copytree(root / "step_0000002", step_dir)
        if name == ".metadata":      # the real metadata (our own file), carrying the command in planner_data
            md = pickle.loads((step_dir / name).read_bytes())
            md.planner_data = _RunsACommand(marker)
            (step_dir / name).write_bytes(pickle.dumps(md))
        else:
            torch.save({"x": _RunsACommand(marker)}, step_dir / name)
        for what, load in (("resume", lambda evil_run=evil_run: checkpoint.load_training_state(evil_run, *build())),
                           ("inference", lambda step_dir=step_dir: load_model_stage(megatron_dir=step_dir))):
            try:
                load()
                out[f"{name} {what}"] = "loaded"
            except CheckpointError as exc:
                out[f"{name} {what}"] = f"{type(exc).__name__}: {exc}"
    out["marker_exists"] = Path(marker).exists()

    # 14.4: every checkpoint corrupt -> one clear error naming each
    checkpoint.save_training_state(run_dir, 4, model, opt, sched, {"data_position": 4}, keep=2)
    next((root / "step_0000004").glob("*.distcp")).unlink()                 # looks incomplete: skipped
    data = next((root / "step_0000002").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])                                # truncated: fails to load
    model, opt, sched = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            checkpoint.load_training_state(run_dir, model, opt, sched)
            out["all_corrupt"] = "loaded"
        except CheckpointError as exc:
            out["all_corrupt"] = str(exc)
    return out


@pytest.mark.multiproc
def test_diverged_unsafe_and_all_corrupt_checkpoints(tiny_ckpt, tmp_path):
    marker = tmp_path / "PWNED"
    (r,) = spawn_local(_guard_scenario, 1, str(tiny_ckpt), str(tmp_path / "run"), str(marker))
    # 14.3: the diverged model is not written; the newest finite checkpoint is neither replaced nor pruned
    assert r["diverged_save"] is None and r["diverged_warning"]
    assert r["kept"] == ["latest", "step_0000002"] and r["latest"] == "step_0000002"
    assert r["resumed_step"] == 2 and r["resumed_equal"]
    # 14.5: refused, naming the file and the global; the command never ran
    assert not r["marker_exists"] and not marker.exists()
    for name in (".metadata", "common.pt"):
        for what in ("resume", "inference"):
            msg = r[f"{name} {what}"]
            assert msg.startswith("UnsafeCheckpoint") and name in msg and "posix.system" in msg, msg
    # 14.4: a clear error naming every checkpoint tried, not a KeyError from half-filled state
    msg = r["all_corrupt"]
    assert "no checkpoint could be loaded" in msg and "step_0000004" in msg and "step_0000002" in msg, msg
