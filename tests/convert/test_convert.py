"""HF <-> Megatron converters: bitwise round trips at TP=2 x PP=2, resharded loads at logits parity with
transformers, every bad input's error, interrupted conversions leave nothing final."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_sayo.checkpoint.files import CheckpointError, read_metadata
from megatron_sayo.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_sayo.convert.megatron_to_hf import convert_megatron_to_hf
from megatron_sayo.models.qwen25vl.hf_config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def read_safetensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF dir, from its raw files (independent of our reader)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} appears in two files"
                out[k] = h.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def tiny_bf16_tied(tmp_path_factory) -> Path:
    from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tied-bf16", preset="tiny-tied", dtype="bfloat16")


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory) -> Path:
    from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "untied-bf16", preset="tiny", dtype="bfloat16")


@pytest.fixture(scope="module")
def converted_tp2pp2(tiny_ckpt, tmp_path_factory) -> Path:
    """The untied float32 tiny checkpoint converted at TP=2 x PP=2."""
    out = tmp_path_factory.mktemp("meg") / "tp2pp2"
    convert_hf_to_megatron(tiny_ckpt, out, tp=2, pp=2, progress=False)
    return out


def assert_roundtrip(src: Path, meg: Path, tmp_path: Path, **kw) -> None:
    back = tmp_path / "back"
    convert_megatron_to_hf(meg, back, progress=False, **kw)
    a, b = read_safetensors(src), read_safetensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), f"{k} differs"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (back / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.compat
def test_roundtrip_float32_untied(tiny_ckpt, converted_tp2pp2, tmp_path):
    meta = read_metadata(converted_tp2pp2)
    assert meta["kind"] == "converted" and meta["layout"] == {"tp": 2, "pp": 2} and meta["dtype"] == "float32"
    assert {"torch", "megatron-core"} <= set(meta["versions"])
    assert_roundtrip(tiny_ckpt, converted_tp2pp2, tmp_path)


@pytest.mark.parametrize("which", ["tiny_bf16_tied", "tiny_bf16"])
def test_roundtrip_bfloat16(which, request, tmp_path):
    src = request.getfixturevalue(which)
    meg = tmp_path / "meg"
    convert_hf_to_megatron(src, meg, tp=2, pp=2, progress=False)
    assert read_metadata(meg)["dtype"] == "bfloat16"
    assert_roundtrip(src, meg, tmp_path)
    tied = "lm_head.weight" not in read_safetensors(src)
    assert tied == (which == "tiny_bf16_tied")  # the hub omits lm_head for tied embeddings; so do we


def test_roundtrip_tied_float32_and_sharded_output(tiny_tied_ckpt, tmp_path):
    meg = tmp_path / "meg"
    convert_hf_to_megatron(tiny_tied_ckpt, meg, tp=2, pp=2, progress=False)
    back = tmp_path / "back"
    convert_megatron_to_hf(meg, back, max_shard_size="100KB", progress=False)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in back.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    assert "lm_head.weight" not in index["weight_map"]
    a, b = read_safetensors(tiny_tied_ckpt), read_safetensors(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())


def _batch(hf_dir: Path, make_image):
    from megatron_sayo.data.image_processing import ImageProcessorConfig, process_images
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config

    hf = load_hf_config(hf_dir)
    pv, thw = process_images([make_image(112, 84, seed=1)],
                             ImageProcessorConfig.from_json(hf_dir / "preprocessor_config.json"))
    t = hf.tokens
    row = [5, 6] + [t.vision_start] + [t.image] * (int(thw[0].prod()) // 4) + [t.vision_end] + [7, 8, 9]
    ids = torch.tensor([row, [0, 0] + list(range(20, 20 + len(row) - 2))])
    am = torch.ones_like(ids)
    am[1, :2] = 0
    return dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_grid_thw=thw)


@pytest.mark.multiproc
@pytest.mark.compat
@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2)])
def test_tp2pp2_checkpoint_loads_resharded_at_parity(tiny_ckpt, converted_tp2pp2, make_image, tp, pp):
    from megatron_sayo.testing.parity import compare_logits, hf_logits, megatron_logits

    batch = _batch(tiny_ckpt, make_image)
    ref = hf_logits(str(tiny_ckpt), batch)
    ours = megatron_logits(str(tiny_ckpt), batch, tp=tp, pp=pp, megatron_dir=str(converted_tp2pp2))
    report = compare_logits(ours, ref, batch["attention_mask"].numpy())
    assert report.ok(1e-4), str(report)


# ------------------------------------------------------------------------------------------------ errors

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(d: Path, fn) -> None:
    from safetensors.torch import save_file

    tensors = read_safetensors(d)
    fn(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def test_existing_output_refused(tiny_ckpt, converted_tp2pp2, tmp_path):
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        convert_hf_to_megatron(tiny_ckpt, converted_tp2pp2, tp=1, pp=1, progress=False)
    (tmp_path / "hf").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        convert_megatron_to_hf(converted_tp2pp2, tmp_path / "hf", progress=False)


def test_layout_that_does_not_divide(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="num_key_value_heads 2 is not divisible by tp=4"):
        convert_hf_to_megatron(tiny_ckpt, tmp_path / "o", tp=4, pp=1, progress=False)
    with pytest.raises(ConfigError, match="num_hidden_layers 4 is not divisible by pp=3"):
        convert_hf_to_megatron(tiny_ckpt, tmp_path / "o", tp=1, pp=3, progress=False)
    assert not (tmp_path / "o").exists()


def test_corrupt_safetensors(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "hf")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors file"):
        convert_hf_to_megatron(d, tmp_path / "o", progress=False)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(CheckpointError, match="corrupt"):
        convert_hf_to_megatron(d, tmp_path / "o", progress=False)


def test_extra_tensor(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "hf")
    _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": torch.zeros(4)}))
    with pytest.raises(CheckpointError, match="extra tensor 'model.layers.0.self_attn.rotary.inv_freq'"):
        convert_hf_to_megatron(d, tmp_path / "o", progress=False)
    d2 = _copy(tiny_ckpt, tmp_path / "hf2")
    _rewrite(d2, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(128, 64)}))
    with pytest.raises(CheckpointError, match="extra tensor 'model.layers.9.mlp.up_proj.weight': layer 9"):
        convert_hf_to_megatron(d2, tmp_path / "o", progress=False)


def test_missing_and_misshaped_tensor(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "hf")
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.down_proj.weight'"):
        convert_hf_to_megatron(d, tmp_path / "o", tp=1, pp=1, progress=False)
    d2 = _copy(tiny_ckpt, tmp_path / "hf2")
    _rewrite(d2, lambda t: t.update({"model.layers.0.self_attn.k_proj.bias": torch.zeros(31)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.bias' has shape \[31\], "
                                              r"config.json implies \[32\]"):
        convert_hf_to_megatron(d2, tmp_path / "o", tp=1, pp=1, progress=False)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))


def test_bad_megatron_inputs(tiny_ckpt, converted_tp2pp2, tmp_path):
    with pytest.raises(CheckpointError, match="not a megatron checkpoint"):
        convert_megatron_to_hf(tiny_ckpt, tmp_path / "o", progress=False)
    d = _copy(converted_tp2pp2, tmp_path / "meg")
    (d / ".metadata").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read the dist checkpoint metadata"):
        convert_megatron_to_hf(d, tmp_path / "o", progress=False)
    d2 = _copy(converted_tp2pp2, tmp_path / "meg2")
    (d2 / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_megatron_to_hf(d2, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_interrupted_conversions_leave_no_final_dir(tiny_ckpt, converted_tp2pp2, tmp_path):
    with pytest.raises(RuntimeError, match="simulated interruption"):
        convert_hf_to_megatron(tiny_ckpt, tmp_path / "meg", tp=1, pp=1, progress=False, _fail_after=10)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        convert_megatron_to_hf(converted_tp2pp2, tmp_path / "hf", progress=False, _fail_after=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.multiproc
def test_killed_cli_leaves_no_final_dir(tiny_ckpt, tmp_path):
    """SIGKILL mid-run (after the temp dir appears): the final name never exists."""
    import os
    import signal

    out = tmp_path / "meg"
    cli = _slow_cli("convert_hf_to_megatron", ["--hf", str(tiny_ckpt), "--out", str(out), "--no-progress"])
    proc = subprocess.Popen([sys.executable, "-c", cli], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _wait_until_writing(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()


def _slow_cli(tool: str, args: list[str]) -> str:
    """python -c source running a converter CLI with each progress step slowed (the tiny conversion takes
    0.1 s, too quick for a signal to land mid-write)."""
    return (f"import sys, time; sys.path.insert(0, {str(ROOT / 'tools')!r}); import {tool} as cli; "
            "from megatron_sayo.convert import progress; step = progress.Progress.update; "
            "progress.Progress.update = lambda self, n: (time.sleep(0.05), step(self, n)); "
            f"sys.exit(cli.main({args!r}))")


def _wait_until_writing(proc, tmp_path: Path) -> None:
    """Wait until the conversion has written a data file into its `meg.tmp-<pid>` dir."""
    import time

    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("meg.tmp-*/__*.distcp")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the conversion ended before it could be signalled"
        time.sleep(0.02)


@pytest.mark.multiproc
def test_cli_roundtrip_and_error_exit(tiny_tied_ckpt, tmp_path):
    py = sys.executable
    r = subprocess.run([py, str(ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf", str(tiny_tied_ckpt),
                        "--out", str(tmp_path / "m"), "--tp", "3", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2 and "not divisible by tp=3" in r.stderr
    r = subprocess.run([py, str(ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf", str(tiny_tied_ckpt),
                        "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import re

    bar_done, bar_total = map(int, re.findall(r"(\d+)/(\d+) \[", r.stderr)[-1])   # tqdm's last count, on stderr
    said = re.search(r"wrote .*: (\d+) megatron tensors \(the bar's count\) from (\d+) HF tensors", r.stdout)
    assert said and bar_done == bar_total == int(said[1]), (r.stdout, r.stderr[-300:])
    assert int(said[2]) == len(read_safetensors(tiny_tied_ckpt))
    r = subprocess.run([py, str(ROOT / "tools" / "convert_megatron_to_hf.py"), "--megatron", str(tmp_path / "m"),
                        "--out", str(tmp_path / "h"), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = read_safetensors(tiny_tied_ckpt), read_safetensors(tmp_path / "h")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _megatron_save(ckpt: str, out: str, tp: int, pp: int) -> None:
    """One rank: our model (in the checkpoint's dtype) filled by the in-process HF loader, saved by megatron."""
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.checkpoint.state import save_model
    from megatron_sayo.distributed import runtime
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config

    runtime.init_distributed(tp, pp)
    dtype = getattr(torch, load_hf_config(ckpt).torch_dtype)
    save_model(load_model_stage(ckpt, tp=tp, pp=pp, params_dtype=dtype), out)


@pytest.mark.multiproc
@pytest.mark.compat
@pytest.mark.parametrize("which", ["tiny_ckpt", "tiny_bf16_tied"])
def test_streamed_checkpoint_equals_megatron_save(which, request, tmp_path):
    """The single-process converter writes what megatron's own TP=2 x PP=2 save of the model writes: the same
    global tensors (shape, dtype, chunks, values) and the same sharded objects."""
    import io

    from megatron.core.dist_checkpointing.serialization import load_common_state_dict
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_sayo.distributed.runtime import spawn_local

    src = request.getfixturevalue(which)
    spawn_local(_megatron_save, 4, str(src), str(tmp_path / "ref"), 2, 2)
    convert_hf_to_megatron(src, tmp_path / "ours", tp=2, pp=2, progress=False)

    def layout(d):
        md = FileSystemReader(str(d)).read_metadata()
        out = {}
        for key, m in md.state_dict_metadata.items():
            if isinstance(m, BytesStorageMetadata):
                (idx, info), = [(i, s) for i, s in md.storage_data.items() if i.fqn == key]
                raw = (d / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
                out[key] = ("object", repr(torch.load(io.BytesIO(raw), weights_only=False)))
            else:
                out[key] = (tuple(m.size), m.properties.dtype,
                            sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks))
        return out

    ref, ours = layout(tmp_path / "ref"), layout(tmp_path / "ours")
    # megatron-core 0.17+ stores the common state inside the checkpoint, 0.16 in common.pt; the converter writes
    # common.pt, which both read: the common states must load equal, everything else is the same.
    ref = {k: v for k, v in ref.items() if not k.startswith("common_state/")}
    assert load_common_state_dict(str(tmp_path / "ref")) == load_common_state_dict(str(tmp_path / "ours"))
    assert sorted(ref) == sorted(ours)
    assert {k: v for k, v in ref.items() if ref[k] != ours[k]} == {}
    ref_values, our_values = dcp_tensors(tmp_path / "ref"), dcp_tensors(tmp_path / "ours")
    for key, a in ref_values.items():
        assert torch.equal(a.view(torch.uint8), our_values[key].view(torch.uint8)), key


def dcp_tensors(d: Path) -> dict[str, torch.Tensor]:
    """Every global tensor of a torch_dist checkpoint, read by torch.distributed.checkpoint itself."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(d)).read_metadata()
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
    load(state, storage_reader=FileSystemReader(str(d)), no_dist=True)
    return state


@pytest.mark.multiproc
def test_checkpoint_keeps_its_vocab_padding_at_another_tp(tmp_path, make_image):
    """vocab 384 pads to 512 rows at TP=2 but 384 at TP=1: a TP=2 conversion (512 stored rows) loads at TP=1
    (megatron's vocab tensors allow the padding to differ) and gives transformers' logits."""
    from small_configs import small_hub_config

    from megatron_sayo.testing.parity import compare_logits, hf_logits, megatron_logits
    from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint

    cfg = small_hub_config(384, layers=2, vision_depth=2)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    ckpt = make_tiny_checkpoint(tmp_path / "hf", config_json=tmp_path / "cfg.json")
    convert_hf_to_megatron(ckpt, tmp_path / "meg", tp=2, pp=1, progress=False)
    from torch.distributed.checkpoint import FileSystemReader
    stored = FileSystemReader(str(tmp_path / "meg")).read_metadata().state_dict_metadata
    assert stored["embedding.word_embeddings.weight"].size[0] == 512

    batch = _batch(ckpt, make_image)
    ours = megatron_logits(str(ckpt), batch, tp=1, pp=1, megatron_dir=str(tmp_path / "meg"))
    report = compare_logits(ours, hf_logits(str(ckpt), batch), batch["attention_mask"].numpy())
    assert report.ok(1e-4), str(report)


@pytest.mark.multiproc
def test_converters_never_import_torch(tiny_tied_ckpt, tmp_path):
    """The converters move bytes: importing torch would cost them 1.3 s of a 1 GB conversion's 0.7 s."""
    code = ("import sys; sys.path.insert(0, 'tools'); import convert_hf_to_megatron, convert_megatron_to_hf; "
            f"assert convert_hf_to_megatron.main(['--hf', {str(tiny_tied_ckpt)!r}, '--out', "
            f"{str(tmp_path / 'm')!r}, '--tp', '2', '--no-progress']) == 0; "
            f"assert convert_megatron_to_hf.main(['--megatron', {str(tmp_path / 'm')!r}, '--out', "
            f"{str(tmp_path / 'h')!r}, '--no-progress']) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_dtype_change_rounds_as_torch_does(tiny_ckpt, tmp_path):
    """float32 HF -> bfloat16 megatron (norms stay float32, as megatron keeps them) -> float32 HF: every tensor
    equals torch's own cast t.to(bfloat16).to(float32), norms exactly the source."""
    convert_hf_to_megatron(tiny_ckpt, tmp_path / "m", tp=2, pp=2, dtype="bfloat16", progress=False)
    stored = dcp_tensors(tmp_path / "m")
    assert stored["decoder.layers.mlp.linear_fc1.weight"].dtype == torch.bfloat16
    assert stored["decoder.layers.mlp.linear_fc1.layer_norm_weight"].dtype == torch.float32
    convert_megatron_to_hf(tmp_path / "m", tmp_path / "h", progress=False)
    a, b = read_safetensors(tiny_ckpt), read_safetensors(tmp_path / "h")
    assert sorted(a) == sorted(b)
    for k, t in a.items():
        norm = k.endswith(("layernorm.weight", "model.norm.weight"))
        want = t if norm else t.to(torch.bfloat16).to(torch.float32)
        assert b[k].dtype == torch.float32 and torch.equal(b[k], want), k


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_overlapping_the_input_is_refused(tiny_ckpt, converted_tp2pp2, tmp_path, overwrite):
    """An output that is the input, contains it or lies inside it is refused, --overwrite or not; the input
    stays whole (issue 14.2: `--out RUN --overwrite` deleted the run)."""
    hf = _copy(tiny_ckpt, tmp_path / "parent" / "hf")
    run = tmp_path / "run"
    _copy(converted_tp2pp2, run / "checkpoints" / "step_0000001")
    (run / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "link").symlink_to(hf)
    before = {p: p.read_bytes() for d in (hf, run) for p in sorted(d.rglob("*")) if p.is_file()}
    for out in (hf, hf / "sub", hf.parent, tmp_path / "link"):
        with pytest.raises(CheckpointError, match=r"the input .*refused with or without --overwrite"):
            convert_hf_to_megatron(hf, out, overwrite=overwrite, progress=False)
    for out in (run, run / "checkpoints", run / "checkpoints" / "step_0000001", run / "hf", tmp_path):
        with pytest.raises(CheckpointError, match=r"the input .*refused with or without --overwrite"):
            convert_megatron_to_hf(run, out, overwrite=overwrite, progress=False)
    after = {p: p.read_bytes() for d in (hf, run) for p in sorted(d.rglob("*")) if p.is_file()}
    assert after == before
    assert not list(tmp_path.rglob("*.tmp-*"))


@pytest.mark.multiproc
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signalled_cli_removes_its_temp_dir(tiny_ckpt, tmp_path, signame):
    """SIGTERM / SIGINT mid-write: the CLI removes `<out>.tmp-<pid>` and exits 143 / 130 (issue 14.16)."""
    import signal

    out = tmp_path / "meg"
    cli = _slow_cli("convert_hf_to_megatron", ["--hf", str(tiny_ckpt), "--out", str(out), "--no-progress"])
    # A job started in the background by a non-interactive shell (as CI may run us) inherits SIGINT ignored,
    # and a process that starts with SIGINT ignored rightly keeps ignoring it: give the child the default.
    proc = subprocess.Popen([sys.executable, "-c", cli], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_until_writing(proc, tmp_path)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if signame == "SIGTERM" else 130), err
    assert "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.multiproc
def test_temp_dirs_of_dead_conversions_reported_then_removed(tiny_ckpt, tmp_path, caplog):
    """Leftover `<out>.tmp-<pid>` dirs of dead processes are reported; with remove_stale only those go, never
    a live process's, another name's or a non-matching one."""
    import logging
    import os

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "meg"
    stale = tmp_path / f"meg.tmp-{dead.pid}"
    keep = [tmp_path / "meg.tmp-1", tmp_path / f"meg.tmp-{os.getppid()}", tmp_path / "meg.tmp-x1",
            tmp_path / f"other.tmp-{dead.pid}"]
    for d in [stale, *keep]:
        d.mkdir()
        (d / "f").write_text("x")
    with caplog.at_level(logging.WARNING):
        convert_hf_to_megatron(tiny_ckpt, out, progress=False)
    import re
    assert re.findall(r"/[^ ,]*\.tmp-[^ ,]*", caplog.text) == [str(stale)]
    assert "--remove-stale-tmp" in caplog.text
    assert stale.exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        convert_hf_to_megatron(tiny_ckpt, out, overwrite=True, remove_stale=True, progress=False)
    assert not stale.exists() and all((k / "f").exists() for k in keep)
    assert "removed 1 temp dir" in caplog.text
