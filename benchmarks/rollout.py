"""Rollout throughput on one CPU process: our KV-cached generate vs transformers' generate vs no-cache recompute.

The no-cache path re-runs the whole prefix (vision tower included) through our model for every new token,
as Megatron-Bridge's VL generation does. All three decode greedily for exactly --new-tokens tokens (no stop
ids) from the same left-padded batch of prompts with one image each, so they do identical work and emit the
same ids (checked). Prints tokens/s side by side with ratios.

    python benchmarks/rollout.py [--new-tokens 256] [--batch 4] [--threads N] [--repeats N] [--ckpt DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# ~57M parameters: 8 layers, hidden 512, GQA 8/2 heads, vocab 32000 (untied), small ViT.
BENCH_TEXT = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
              "intermediate_size": 1408, "max_window_layers": 8,
              "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}}
BENCH_VISION = {"depth": 4, "hidden_size": 128, "num_heads": 4, "intermediate_size": 256, "out_hidden_size": 512}
VOCAB = 32000
ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "vision_start_token_id", "vision_end_token_id",
             "vision_token_id", "image_token_id", "video_token_id")


def bench_config() -> dict:
    """The tiny preset scaled up; special ids moved to the top of the 32k vocabulary (hub layout)."""
    from megatron_sayo.testing.tiny_checkpoint import PRESETS

    cfg = copy.deepcopy(PRESETS["tiny"])
    shift = VOCAB - cfg["vocab_size"]
    cfg.update(BENCH_TEXT, vocab_size=VOCAB, initializer_range=0.1)
    cfg.update({k: cfg[k] + shift for k in ID_FIELDS})
    cfg["vision_config"].update(BENCH_VISION)
    return cfg


def ensure_checkpoint(ckpt: Path) -> Path:
    """The benchmark checkpoint at `ckpt`, made once."""
    from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint

    if (ckpt / "model.safetensors").exists():
        return ckpt
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(bench_config()))
        return make_tiny_checkpoint(ckpt, config_json=cfg_path, overwrite=True)


def make_batch(ckpt: Path, batch: int) -> dict:
    """`batch` left-padded chat prompts, each with one 112x112 image and a question of varying length."""
    from megatron_sayo.data.processor import Processor

    proc = Processor.from_pretrained(ckpt)
    rng = np.random.default_rng(0)
    convs = []
    for b in range(batch):
        image = Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), "RGB")
        question = "What is in the box at the top left of the chart?" + " Explain." * b
        convs.append([{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": question}]}])
    return proc(convs)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def ours_cached(model, batch: dict, new_tokens: int) -> torch.Tensor:
    from megatron_sayo.inference.decode import generate
    from megatron_sayo.inference.sampling import SamplingParams

    params = SamplingParams(greedy=True, max_new_tokens=new_tokens, stop_token_ids=())
    return generate(model, batch, params).sequences


def ours_no_cache(model, batch: dict, new_tokens: int) -> torch.Tensor:
    """Re-run the full prefix (vision included) for each new token; greedy."""
    from megatron_sayo.testing.reference_decode import greedy_without_cache

    return greedy_without_cache(model, batch, new_tokens)


def hf_generate(model, batch: dict, new_tokens: int) -> torch.Tensor:
    kwargs = {k: v for k, v in batch.items() if v is not None}
    kwargs["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).int()
    with torch.no_grad():
        return model.generate(**kwargs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              eos_token_id=[], pad_token_id=model.config.text_config.pad_token_id)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sequence")
    ap.add_argument("--batch", type=int, default=4, help="prompts decoded together")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--ckpt", type=Path, default=Path(tempfile.gettempdir()) / "megatron_sayo_bench_rollout",
                    help="where the benchmark checkpoint is made (reused when present)")
    ap.add_argument("--repeats", type=int, default=1, help="best of N runs for the two cached paths (noisy hosts)")
    ap.add_argument("--skip-no-cache", action="store_true", help="skip the slow no-cache path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime

    ckpt = ensure_checkpoint(args.ckpt)
    batch = make_batch(ckpt, args.batch)
    runtime.init_distributed(1, 1)
    ours = load_model_stage(ckpt)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"model: {n_params / 1e6:.1f}M params, batch {args.batch}, prompt {batch['input_ids'].shape[1]} tokens "
          f"(one image each), {args.new_tokens} new tokens, {torch.get_num_threads()} threads")

    runs = {"ours (KV cache)": lambda: ours_cached(ours, batch, args.new_tokens),
            "transformers generate": lambda: hf_generate(hf, batch, args.new_tokens)}
    if not args.skip_no_cache:
        runs["ours (no cache)"] = lambda: ours_no_cache(ours, batch, args.new_tokens)
    ours_cached(ours, batch, 4), hf_generate(hf, batch, 4)      # warm-up
    seconds, outputs = {}, {}
    for rep in range(args.repeats):       # interleaved, so load changes hit both paths alike
        for name, fn in runs.items():
            if rep and name == "ours (no cache)":
                continue
            s, outputs[name] = timed(fn)
            seconds[name] = min(s, seconds.get(name, s))
    tokens = args.batch * args.new_tokens
    base = seconds["ours (KV cache)"]
    print(f"{'path':<24}{'seconds':>10}{'tokens/s':>12}{'ours-cached speed-up':>24}")
    for name, s in seconds.items():
        print(f"{name:<24}{s:>10.2f}{tokens / s:>12.1f}{s / base:>23.2f}x")
    reference = outputs["ours (KV cache)"]
    same = {name: bool(torch.equal(out, reference)) for name, out in outputs.items()}
    print("same ids as ours (KV cache):", same)
    runtime.shutdown()
    return {"seconds": seconds, "tokens_per_s": {k: tokens / s for k, s in seconds.items()}, "same_ids": same}


if __name__ == "__main__":
    main()
