"""`train --check --gpu-memory`: every example fits its stated target, today's 72B settings are refused, and the
verdicts agree with facts derived by hand from the model's config.json (parameter counts from transformers on the
meta device, the activation formula written out), not with the planner's own output."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron_sayo import train
from megatron_sayo.rl.prompts import check_text_tokens

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GIB = 1024**3
USABLE_80GB = 80 * GIB * 0.9


def target(example: Path) -> tuple[int, str | None]:
    """The file's `# target: N x 80GB` (or `N x CPU`): world size and GPU memory (None for CPU)."""
    m = re.search(r"^# target: (\d+) x (\S+)", example.read_text(), re.M)
    assert m, f"{example.name}: no '# target: N x MEMORY' line"
    return int(m.group(1)), None if m.group(2) == "CPU" else m.group(2)


def model_dir(example: Path, tmp_path: Path) -> Path:
    """A directory holding only the checkpoint's config.json for the model size the example names."""
    size = re.search(r"Qwen2\.5-VL-(\d+)B", example.read_text()).group(1)
    out = tmp_path / f"qwen25vl_{size}b"
    out.mkdir(exist_ok=True)
    shutil.copy(ROOT / f"examples/configs/qwen25vl_{size}b.config.json", out / "config.json")
    return out


def run_check(capsys, config: Path, world: int, memory: str | None, overrides: list[str]) -> tuple[int, str]:
    argv = ["--config", str(config), "--check", "--world-size", str(world), *overrides]
    rc = train.main(argv + (["--gpu-memory", memory] if memory else []))
    out = capsys.readouterr()
    return rc, out.out + out.err


def data_overrides(tmp_path: Path) -> list[str]:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"id": "x"}\n')   # --check only asks that the files exist and are not empty
    return [f"data.train_file={data}", f"data.eval_file={data}"]


def gpu_check(capsys, example: Path, tmp_path: Path, overrides: list[str] = (), world: int | None = None):
    n, memory = target(example)
    hf = model_dir(example, tmp_path)
    return run_check(capsys, example, world or n, memory,
                     [f"model.hf_path={hf}", *data_overrides(tmp_path), *overrides])


# ---------------------------------------------------------------- the examples

@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_fits_its_target_and_states_its_estimate(example, tmp_path, capsys, tiny_ckpt, monkeypatch):
    world, memory = target(example)
    if memory is None:   # the CPU demo: an estimate without a verdict
        monkeypatch.chdir(tmp_path)
        rc, out = run_check(capsys, example, world, None, [f"model.hf_path={tiny_ckpt}"])
        assert rc == 0, out
        assert re.search(r"estimate: [0-9.]+ GiB per GPU at TP=2 PP=1 DP=1 \(no --gpu-memory", out), out
        return
    text = example.read_text()
    assert re.search(r"^  max_pixels: \d+", text, re.M), f"{example.name}: data.max_pixels is not set"
    rc, out = gpu_check(capsys, example, tmp_path)
    assert rc == 0, out
    stated = re.search(r"-> ([0-9.]+) GiB per GPU", text).group(1)
    assert f"fits: {stated} GiB per GPU of 72.0 GiB usable" in out, f"{example.name} states {stated} GiB:\n{out}"


def test_todays_72b_settings_are_refused_with_row_and_fitting_alternatives(tmp_path, capsys):
    """The 72B file as it was (micro-batch 2, no recompute) is refused; every suggested change then passes."""
    example = ROOT / "examples/qwen25vl_72b.yaml"
    before = ["train.micro_batch=2", "model.recompute=none"]
    rc, out = gpu_check(capsys, example, tmp_path, before)
    assert rc == 2, out
    assert "does NOT fit" in out and re.search(r"^ +8 +2 +4 +first .* no$", out, re.M), out
    suggestions = re.findall(r"^  ((?:[a-z_]+\.[a-z_]+=\S+ ?)+)  \(", out, re.M)
    assert "train.micro_batch=1" in suggestions and "model.recompute=full" in suggestions, out
    for change in suggestions:
        rc, again = gpu_check(capsys, example, tmp_path, [*before, *change.split()])
        assert rc == 0, f"suggested {change!r} does not pass:\n{again}"


def test_unset_max_pixels_without_processor_settings_is_a_named_error(tmp_path, capsys):
    example = ROOT / "examples/qwen25vl_7b.yaml"
    rc, out = gpu_check(capsys, example, tmp_path, ["data.max_pixels=null"])
    assert rc == 2 and "data.max_pixels is unset" in out and "preprocessor_config.json" in out, out


def test_missing_config_json_is_refused_when_memory_is_asked(tmp_path, capsys):
    rc, out = run_check(capsys, ROOT / "examples/qwen25vl_7b.yaml", 8, "80GB",
                        [f"model.hf_path={tmp_path}", *data_overrides(tmp_path)])
    assert rc == 2 and "config.json" in out, out


def test_gpu_memory_needs_check(capsys):
    assert train.main(["--config", str(ROOT / "examples/qwen25vl_7b.yaml"), "--gpu-memory", "80GB"]) == 2
    assert "--gpu-memory is for --check" in capsys.readouterr().err


# ---------------------------------------------------------------- verdicts against hand-derived facts

def hand_counts(size: str) -> dict[str, int]:
    """Parameters per module, counted by transformers on the meta device from the example's config.json."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig.from_pretrained(ROOT / f"examples/configs/qwen25vl_{size}.config.json"))
    lm = model.model.language_model
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"vision": n(model.model.visual), "embed": n(lm.embed_tokens), "layer": n(lm.layers[0]),
            "layers": len(lm.layers), "head": n(model.lm_head) + n(lm.norm)}


def printed_total(out: str) -> float:
    return float(re.search(r"(?:fits|does NOT fit|estimate): ([0-9.]+) GiB per GPU", out).group(1)) * GIB


def test_72b_on_one_node_is_refused_by_its_static_state_alone(tmp_path, capsys):
    """72B full fine-tuning with the vision tower trained at TP=8 PP=1 DP=1: bf16 weights, fp32 grads and fp32
    main weights + Adam (2 + 4 + 12 bytes) of 1/8 of the language model plus the whole tower exceed 72 GiB
    before any activation, so the check must refuse, and its total must be at least that."""
    c = hand_counts("72b")
    per_gpu = (c["embed"] + c["layers"] * c["layer"] + c["head"]) / 8 + c["vision"]
    static = 18 * per_gpu
    assert static > USABLE_80GB
    rc, out = gpu_check(capsys, ROOT / "examples/qwen25vl_72b.yaml", tmp_path,
                        ["model.freeze_vision=false", "parallel.tp=8", "parallel.pp=1"], world=8)
    assert rc == 2 and "does NOT fit" in out, out
    assert printed_total(out) >= static * 0.999


def test_72b_example_row_equals_hand_derived_terms(tmp_path, capsys):
    """First stage of TP=8 PP=2 DP=4, vision frozen, micro-batch 1, selective recompute, no sequence parallel:
    weights 2 bytes x (tower + (embedding + 40 layers) / 8), grads 4 and optimizer 12/4 bytes of the trainable
    part, a bf16 reference copy, and Korthikanti's s*b*h*(10 + 24/t) bytes per layer for 40 layers x 2
    micro-batches in flight, s = 802816 / 28^2 image + 512 text + 110 new tokens."""
    c = hand_counts("72b")
    lm = (c["embed"] + 40 * c["layer"]) / 8
    s, b, h, t = 802816 // 28**2 + 512 + 110, 1, 8192, 8
    weights, grads, optim, ref = 2 * (lm + c["vision"]), 4 * lm, 12 * lm / 4, 2 * (lm + c["vision"])
    activ = s * b * h * (10 + 24 / t) * 40 * 2
    rc, out = gpu_check(capsys, ROOT / "examples/qwen25vl_72b.yaml", tmp_path)
    assert rc == 0, out
    row = re.search(r"^ +8 +2 +4 +first +(.*) yes$", out, re.M).group(1).split()
    got = dict(zip(("weights", "grads", "optim", "activ", "vis-act", "logits", "ref", "kv", "total"), map(float, row)))
    for name, want in (("weights", weights), ("grads", grads), ("optim", optim), ("ref", ref), ("activ", activ)):
        assert got[name] == pytest.approx(want / GIB, abs=0.051), name


# ---------------------------------------------------------------- the prompt length the estimate assumed

def test_prompt_longer_than_max_text_tokens_names_the_sample():
    from types import SimpleNamespace

    image = 7
    ids = torch.tensor([[0, 0, 5, image, image, 6], [5, 5, 5, image, image, 6]])
    inputs = {"input_ids": ids, "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])}
    samples = [SimpleNamespace(id="short"), SimpleNamespace(id="long")]
    check_text_tokens(inputs, samples, image, limit=4)
    with pytest.raises(ValueError, match=r"sample long: its prompt has 4 text tokens, more than "
                                         r"data.max_text_tokens = 3"):
        check_text_tokens(inputs, samples, image, limit=3)


# ---------------------------------------------------------------- --cpu-smoke: the examples shrunk for CPU

@pytest.mark.parametrize("name, changed", [
    ("qwen25vl_72b", {"parallel.tp=2 (was 8)", "model.attention_backend=sdpa (was flash)"}),
    ("qwen25vl_7b_lora", {"model.attention_backend=sdpa (was flash)"}),
])
def test_cpu_smoke_shrinks_layout_and_kernels_only(name, changed, tmp_path, capsys, tiny_ckpt):
    """--cpu-smoke --check at 4 processes on the tiny model: it prints exactly the changes (TP/PP at most 2, flash
    -> sdpa) and the memory estimate is taken with the file's other settings (recompute, micro-batch, LoRA)."""
    example = ROOT / f"examples/{name}.yaml"
    pp = re.search(r"^  pp: (\d+)", example.read_text(), re.M).group(1)
    rc = train.main(["--config", str(example), "--cpu-smoke", "--check", "--world-size", "4",
                     f"model.hf_path={tiny_ckpt}", *data_overrides(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    printed = set(re.findall(r"^cpu-smoke: (.*)$", out.out, re.M))
    assert printed == changed, printed
    assert "recompute selective" in out.out and f"PP={pp}" in out.out, out.out
