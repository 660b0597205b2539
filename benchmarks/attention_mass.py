"""Time and peak memory of region-mass measurement at sequence 4096 (CPU, float32, batch 1).

(a) our model's plain forward; (b) the same forward with region/image masses on the last layer for the
last 512 query rows (RegionMassProbe); (c) transformers' eager forward with output_attentions=True, then
a and v from the last layer's attentions (the authors' way). Text-only tokens, random weights; the image
key set is 1024 positions (the masses only need its mask).

Each variant runs in its own subprocess: time = min over repeats after one warm-up; peak memory = the
process's peak RSS (VmHWM) (reported as a whole and as the increase over the RSS reached before the first forward).

    python benchmarks/attention_mass.py [--seq 4096 --image 1024 --rows 512 --layers 4 --hidden 1024 ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"a": "plain forward", "b": "forward + region masses", "c": "HF eager + output_attentions"}


def medium_config(args) -> dict:
    """Hub-layout Qwen2.5-VL config: the tiny preset's ids and vision tower, a medium decoder."""
    from megatron_sayo.testing.tiny_checkpoint import PRESETS, hub_config

    cfg = copy.deepcopy(hub_config(PRESETS["tiny"], source="preset 'tiny'"))
    cfg.update(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
               num_key_value_heads=args.kv_heads, intermediate_size=args.ffn, vocab_size=args.vocab,
               max_position_embeddings=max(args.seq, 4096), max_window_layers=args.layers,
               sliding_window=max(args.seq, 4096))
    cfg["vision_config"]["out_hidden_size"] = args.hidden
    half = args.hidden // args.heads // 2            # M-RoPE sections in Qwen's 2:3:3 (t, h, w) proportion
    cfg["rope_scaling"]["mrope_section"] = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    return cfg


def bench_inputs(args, image_token_id: int):
    """input_ids [1, seq] (plain text ids), query rows (last `rows`), image keys and a region inside them."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(400, image_token_id), (1, args.seq), generator=g)
    image = torch.zeros(1, args.seq, dtype=torch.bool)
    first = args.seq // 8
    image[0, first:first + args.image] = True
    cols = int(args.image ** 0.5)
    cells = torch.arange(args.image)
    region = torch.zeros_like(image)
    region[0, first:first + args.image] = ((cells // cols) % cols < cols // 4) & (cells % cols < cols // 2)
    rows = torch.zeros_like(image)
    rows[0, -args.rows:] = True
    return ids, rows, region, image


def _timed(fn, repeats: int) -> float:
    """One warm-up call, then the minimum wall time over `repeats` calls."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _megatron_step(cfg: dict, args):
    """Build our model (TP=PP=1, random weights); return step(with_probe), a no-grad forward."""
    import torch

    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    from megatron_sayo.attention.region_mass import RegionMassProbe, probe_state
    from megatron_sayo.distributed import runtime
    from megatron_sayo.models.qwen25vl.hf_config import ParallelLayout, parse_hf_config
    from megatron_sayo.models.qwen25vl.model import build_model, model_inputs
    from megatron_sayo.models.qwen25vl.transformer_config import to_transformer_config

    os.environ.setdefault("MASTER_PORT", str(runtime.free_port()))
    runtime.init_distributed(1, 1)
    hf = parse_hf_config(cfg)
    model = build_model(hf, to_transformer_config(hf, ParallelLayout(1, 1))).eval()
    ids, rows, region, image = bench_inputs(args, hf.tokens.image)
    inputs = model_inputs(hf, ids)
    result = {}

    def step(with_probe: bool):
        with torch.no_grad():
            if not with_probe:
                model(**inputs)
                return
            probe = RegionMassProbe(rows, region, image)
            model(**inputs, state=probe_state(probe, hf.text.num_layers))
            result["a"], result["v"] = probe.result.region_mean, probe.result.image_mean

    return step


def _hf_step(cfg: dict, args):
    """Build transformers' model (eager attention, random weights) and return a no-grad forward closure."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig.from_dict(cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    ids, rows, region, image = bench_inputs(args, cfg["image_token_id"])

    def step():
        with torch.no_grad():
            attn = model(input_ids=ids, output_attentions=True).attentions[-1][0]   # [h, s, s]
            sel = attn[:, rows[0]]
            a = sel[..., region[0]].mean(-1).mean(0)
            v = sel[..., image[0]].mean(-1).mean(0)
        return a, v

    return step


def _interleaved(step, repeats: int) -> dict:
    """(a) and (b) alternately on one model after a warm-up of each: min times, robust to a busy machine."""
    step(False), step(True)
    best = {"a": float("inf"), "b": float("inf")}
    for _ in range(repeats):
        for key, probe in (("a", False), ("b", True)):
            start = time.perf_counter()
            step(probe)
            best[key] = min(best[key], time.perf_counter() - start)
    return {"variant": "ab", "seconds_a": best["a"], "seconds_b": best["b"]}


def run_variant(variant: str, cfg: dict, args) -> dict:
    """Time and peak RSS of one variant in this process ('ab': the interleaved a/b timing)."""
    import torch

    torch.set_num_threads(args.threads)
    if variant == "ab":
        return _interleaved(_megatron_step(cfg, args), args.repeats)
    if variant == "c":
        step = _hf_step(cfg, args)
    else:
        ours, probe = _megatron_step(cfg, args), variant == "b"

        def step():
            ours(probe)
    from megatron_sayo.memory import peak_rss_mb

    before = peak_rss_mb()
    seconds = _timed(step, args.repeats)
    peak = peak_rss_mb()
    return {"variant": variant, "seconds": seconds, "peak_rss_mib": peak, "forward_rss_mib": peak - before}


def spawn(variant: str, cfg_path: Path, argv: list[str]) -> dict:
    """Run one variant in a fresh interpreter; its last stdout line is the JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": argv[argv.index("--threads") + 1] if "--threads" in argv else "2"}
    out = subprocess.run([sys.executable, __file__, "--variant", variant, "--config", str(cfg_path), *argv],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], args) -> str:
    """Side-by-side table and the two goal ratios."""
    lines = [f"seq {args.seq}, image keys {args.image}, query rows {args.rows}; decoder {args.layers} layers, "
             f"hidden {args.hidden}, heads {args.heads}/{args.kv_heads} kv, ffn {args.ffn}, vocab {args.vocab}; "
             f"float32 CPU, {args.threads} threads, min of {args.repeats} after 1 warm-up",
             f"{'variant':<34}{'time s':>9}{'peak RSS MiB':>14}{'forward RSS MiB':>17}"]
    for key, name in VARIANTS.items():
        r = results[key]
        lines.append(f"({key}) {name:<30}{r['seconds']:>9.2f}{r['peak_rss_mib']:>14.0f}{r['forward_rss_mib']:>17.0f}")
    a, b, c = results["a"], results["b"], results["c"]
    lines += [f"time (b)/(a) = {b['seconds'] / a['seconds']:.3f}   (goal <= 1.15; separate processes)",
              f"time (c)/(b) = {c['seconds'] / b['seconds']:.2f}",
              *([_interleaved_line(results["ab"])] if "ab" in results else []),
              f"peak RSS (c)/(b) = {c['peak_rss_mib'] / b['peak_rss_mib']:.1f}x   (goal >= 10x)",
              f"forward RSS increase (c)/(b) = {c['forward_rss_mib'] / max(b['forward_rss_mib'], 1.0):.1f}x"]
    return "\n".join(lines)


def _interleaved_line(ab: dict) -> str:
    return (f"time (b)/(a) interleaved in one process = {ab['seconds_b'] / ab['seconds_a']:.3f}   "
            f"({ab['seconds_b']:.2f} s / {ab['seconds_a']:.2f} s; goal <= 1.15)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=4096, help="sequence length")
    p.add_argument("--image", type=int, default=1024, help="image key positions within the sequence")
    p.add_argument("--rows", type=int, default=512, help="last query rows whose masses are measured")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size")
    p.add_argument("--heads", type=int, default=16, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--ffn", type=int, default=2816, help="MLP intermediate size")
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary size")
    p.add_argument("--threads", type=int, default=2, help="torch threads per variant")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed forwards per variant (after one warm-up); the minimum counts")
    p.add_argument("--variants", default="abc", help="which variants to run (default all)")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="skip the extra process timing (a) and (b) alternately on one model")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.seq < args.image + args.rows + args.seq // 8:
        raise SystemExit(f"--seq {args.seq} is too short for {args.image} image keys and {args.rows} query rows")
    if args.variant:
        print(json.dumps(run_variant(args.variant, json.loads(args.config.read_text()), args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(medium_config(args)))
        results = {}
        for v in args.variants:
            results[v] = spawn(v, cfg_path, argv)
            print(f"({v}) {VARIANTS[v]}: {results[v]['seconds']:.2f} s, peak RSS {results[v]['peak_rss_mib']:.0f} MiB",
                  flush=True)
        if args.interleave and {"a", "b"} <= set(args.variants):
            results["ab"] = spawn("ab", cfg_path, argv)
            print(f"(a)/(b) interleaved: {results['ab']['seconds_a']:.2f} s / {results['ab']['seconds_b']:.2f} s",
                  flush=True)
    if set(VARIANTS) <= set(results):
        print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
