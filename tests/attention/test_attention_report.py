"""tools/attention_report.py end to end on the tiny checkpoint; every number checked against an independent
computation: transformers eager (output_attentions, full-vocab logits) + a naive top-k and TAS.
Tolerances: masses 1e-5 absolute, entropies 1e-4 absolute (float32 logits), rewards 1e-4."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parents[2] / "tools" / "attention_report.py"
PROMPT = "What colour is the square?"
COMPLETION = "<think>The square in the upper right is red.</think><answer>red</answer>"
BOX = [120, 40, 190, 110]


def _tool():
    """The tool as an importable module (spawned ranks unpickle its rank function by module name)."""
    if str(TOOL.parent) not in sys.path:
        sys.path.insert(0, str(TOOL.parent))
    return importlib.import_module("attention_report")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory, make_image):
    path = tmp_path_factory.mktemp("img") / "sample.png"
    make_image(224, 168, seed=3).save(path)
    return path


def _run(ckpt, image_path, out, *extra):
    return _tool().main(["--hf", str(ckpt), "--image", str(image_path), "--bbox", ",".join(map(str, BOX)),
                         "--prompt", PROMPT, "--out", str(out), *extra])


def _eager_reference(ckpt, image_path, input_ids, region_positions, temperature):
    """(a [S], v [S], entropy [S] at logits positions) from transformers eager on the report's sequence."""
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_sayo.data.image_processing import ImageProcessorConfig, process_image

    pix, thw = process_image(Image.open(image_path).convert("RGB"), ImageProcessorConfig.from_json(ckpt))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ids = torch.tensor([input_ids])
    image = ids[0] == model.config.image_token_id
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.from_numpy(pix), image_grid_thw=torch.tensor([thw]),
                    mm_token_type_ids=image[None].int(), output_attentions=True)
    alpha = out.attentions[-1][0].double().mean(0)                          # [S, S], head mean
    a = alpha[:, region_positions].mean(-1)
    v = alpha[:, image].mean(-1)
    logp = torch.log_softmax(out.logits[0].double() / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return a, v, entropy, image.nonzero().reshape(-1).tolist()


def _naive_rewards(a_sel, v_sel, eps=1e-8):
    x = (sum(a_sel) / len(a_sel) + eps) / (sum(v_sel) / len(v_sel) + eps)
    return x, x * x / (1 + x * x), math.tanh(math.log(x))


def _check_against_eager(ckpt, image_path, report, temperature):
    ids = report["input_ids"]
    a, v, entropy, image_pos = _eager_reference(ckpt, image_path, ids, report["region_token_positions"], temperature)
    assert report["image_token_positions"] == image_pos
    assert set(report["region_token_positions"]) < set(image_pos)
    toks = report["tokens"]
    start = toks[0]["position"]
    assert [t["position"] for t in toks] == list(range(start, len(ids)))
    for t in toks:
        p = t["position"]
        assert t["token_id"] == ids[p]
        assert abs(t["region_mass"] - float(a[p])) < 1e-5
        assert abs(t["image_mass"] - float(v[p])) < 1e-5
        assert abs(t["entropy"] - float(entropy[p - 1])) < 1e-4        # the distribution token p came from
    # naive selection: the k highest entropies among completion tokens, k = max(1, floor(0.3 n))
    n = len(toks)
    k = max(1, math.floor(0.3 * n))
    ranked = sorted(range(n), key=lambda j: (-float(entropy[toks[j]["position"] - 1]), j))
    assert {j for j, t in enumerate(toks) if t["selected"]} == set(ranked[:k])
    sel = [toks[j]["position"] for j in ranked[:k]]
    x, paper, code = _naive_rewards([float(a[p]) for p in sel], [float(v[p]) for p in sel])
    assert report["tas"] == pytest.approx(x, abs=1e-4)
    assert report["reward_paper"] == pytest.approx(paper, abs=1e-4)
    assert report["reward_code"] == pytest.approx(code, abs=1e-4)


FIELDS = ["input_ids", "image_token_positions", "region_token_positions", "temperature", "top_entropy_ratio",
          "tokens", "tas", "reward_paper", "reward_code"]
TOKEN_FIELDS = ["position", "token_id", "entropy", "region_mass", "image_mass", "selected"]


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_report_teacher_forced_equals_eager(tiny_ckpt, image_path, tmp_path, tp):
    assert _run(tiny_ckpt, image_path, tmp_path, "--completion", COMPLETION, "--temperature", "0.7",
                "--tp", str(tp)) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report) == FIELDS
    assert all(list(t) == TOKEN_FIELDS for t in report["tokens"])
    assert report["temperature"] == 0.7 and report["top_entropy_ratio"] == 0.3
    _check_against_eager(tiny_ckpt, image_path, report, 0.7)
    png = (tmp_path / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.multiproc
@pytest.mark.slow
def test_report_generate_mode(tiny_ckpt, image_path, tmp_path):
    assert _run(tiny_ckpt, image_path, tmp_path, "--generate", "6", "--seed", "1") == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert 1 <= len(report["tokens"]) <= 6
    _check_against_eager(tiny_ckpt, image_path, report, 1.0)


@pytest.mark.parametrize("extra,message", [
    (["--completion", "x", "--bbox", "5,5,1,9"], "x1 < x2"),
    (["--completion", "x", "--bbox", "1,2,3"], "four"),
    (["--completion", "x", "--temperature", "0"], "temperature"),
    (["--completion", ""], "empty"),
    (["--completion", "x", "--bbox", "500,500,600,600"], "empty after clamping"),
])
def test_report_errors(tiny_ckpt, image_path, tmp_path, capsys, extra, message):
    args = ["--hf", str(tiny_ckpt), "--image", str(image_path), "--bbox", "1,1,50,50", "--prompt", PROMPT,
            "--out", str(tmp_path), *extra]
    assert _tool().main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
