#!/usr/bin/env python
"""Converter benchmark: a random ~1 GB Qwen2.5-VL checkpoint converted HF -> Megatron -> HF at TP=2 x PP=2.

Prints wall time next to a plain copy of the same bytes, and each process's peak RSS next to the memory goal
0.6 GB + 1.5 x (checkpoint size / (TP*PP)).

    python benchmarks/convert.py [--gb 1.0] [--dtype bfloat16] [--repeats 9] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_config(target_bytes: float, esize: int) -> dict:
    """A hub-layout config whose weights total about target_bytes (layers scaled; GQA 8/2, head_dim 128)."""
    from megatron_sayo.testing.tiny_checkpoint import PRESETS

    cfg = json.loads(json.dumps(PRESETS["tiny"]))
    h, inter, vocab = 1024, 4096, 32000
    per_layer = h * (h + 2 * 256) + 3 * h + 256 * 2 + h * h + 3 * h * inter + 2 * h
    vision = 4 * (3 * 512 * 512 + 512 * 512 + 3 * 512 * 2048) + 2048 * 2048 + 2048 * h
    layers = max(2, round((target_bytes / esize - 2 * vocab * h - vision) / per_layer / 2) * 2)
    ids = {k: v - 480 + vocab - 32 for k, v in cfg.items() if k.endswith("token_id") and isinstance(v, int)}
    cfg.update(ids, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=vocab, max_window_layers=layers,
               rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    cfg["vision_config"].update(depth=4, hidden_size=512, num_heads=8, intermediate_size=2048, out_hidden_size=h,
                                fullatt_block_indexes=[3])
    return cfg


def make_random_checkpoint(out: Path, target_bytes: float, dtype: str) -> int:
    """Random weights with HF names/shapes (from transformers on the meta device), 2 safetensors shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tdtype = getattr(torch, dtype)
    cfg = bench_config(target_bytes, torch.empty(0, dtype=tdtype).element_size())
    cfg["torch_dtype"] = dtype
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg))
    shapes = {}
    for k, v in model.state_dict().items():
        name = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        shapes[name] = tuple(v.shape)
    names = sorted(shapes)
    half = len(names) // 2
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=g) * 0.02).to(tdtype) for n in part}
        save_file(tensors, out / fname, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: fname for n in part})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return total


def fresh(out: Path) -> None:
    """Every timed step, copy or conversion alike, starts the same way: its previous output removed and no
    dirty pages left (on this VM a step's speed depends on whether the pages it writes were freed just before
    or were handed back to the host a while ago: up to 8x)."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()


def timed(cmd: list[str], out: Path) -> tuple[float, str]:
    fresh(out)
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - start, r.stdout


def copy_time(src: Path, dst: Path) -> float:
    fresh(dst)
    start = time.perf_counter()
    shutil.copytree(src, dst)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the random checkpoint in GB")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="dtype of the random checkpoint")
    ap.add_argument("--workdir", default=None, help="folder for the checkpoints (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    ap.add_argument("--repeats", type=int, default=9, help="timed runs; the best time and the worst memory count")
    args = ap.parse_args()
    tp, pp = 2, 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert-bench-"))
    hf, meg, back = work / "hf", work / "megatron", work / "hf_back"
    size = make_random_checkpoint(hf, args.gb * 1e9, args.dtype)
    gb = size / 1e9
    goal = 0.6 + 1.5 * gb / (tp * pp)
    runs = []
    for _ in range(args.repeats):   # this VM's page cache makes single timings noisy: interleave, keep the best
        t_copy_hf = copy_time(hf, work / "copy_hf")
        t_h2m, out_h2m = timed([sys.executable, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf", str(hf),
                                "--out", str(meg), "--tp", str(tp), "--pp", str(pp), "--no-progress"], meg)
        t_copy_meg = copy_time(meg, work / "copy_meg")
        t_m2h, out_m2h = timed([sys.executable, str(ROOT / "tools/convert_megatron_to_hf.py"), "--megatron",
                                str(meg), "--out", str(back), "--max-shard-size", "500MB", "--no-progress"], back)
        runs.append((t_copy_hf, t_h2m, float(re.search(r"peak RSS (\d+) MB", out_h2m).group(1)),
                     t_copy_meg, t_m2h, float(re.search(r"peak RSS (\d+) MB", out_m2h).group(1))))
    t_copy_hf, t_h2m, t_copy_meg, t_m2h = (min(r[i] for r in runs) for i in (0, 1, 3, 4))
    rss_ranks, rss_export = [max(r[2] for r in runs)], max(r[5] for r in runs)
    print(f"checkpoint: {gb:.3f} GB {args.dtype}, TP={tp} x PP={pp}; memory goal per process {goal:.3f} GB")
    print(f"{'direction':<14}{'wall s':>9}{'copy s':>9}{'ratio':>8}   peak RSS per process (GB)")
    print(f"{'hf->megatron':<14}{t_h2m:>9.2f}{t_copy_hf:>9.2f}{t_h2m / t_copy_hf:>8.1f}   "
          f"{[round(r / 1024, 3) for r in rss_ranks]}")
    print(f"{'megatron->hf':<14}{t_m2h:>9.2f}{t_copy_meg:>9.2f}{t_m2h / t_copy_meg:>8.1f}   {rss_export / 1024:.3f}")
    worst = max(rss_ranks + [rss_export]) / 1024
    print(f"max peak RSS {worst:.3f} GB vs goal {goal:.3f} GB: {'OK' if worst <= goal else 'OVER'}; "
          f"time ratios vs goal 3x: {t_h2m / t_copy_hf:.1f}x, {t_m2h / t_copy_meg:.1f}x")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
