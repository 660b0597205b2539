"""The checks of the GPU acceptance run (runner: gpu_check.py); each takes a Context and returns a CheckResult.

Tolerances, stated once. fp32 parity (TF32 off): max |ours - ref| / max |ref| <= 1e-4 and top-1 identical, as on
CPU. bf16 parity: both models in bf16 on the same GPU, each compared with transformers in fp32; ours passes when its
error is at most 2 x transformers' own bf16 error + 1e-3 (bf16 has 8 mantissa bits: no fixed bound is meaningful
without that yardstick). Region masses: 1e-5 absolute on the head-mean summed masses (float32 kernel) against a
float64 eager softmax of the same q/k.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from megatron_sayo.testing.gpu_check import CheckResult, Context

FP32_REL_TOL = 1e-4
BF16_FACTOR, BF16_SLACK = 2.0, 1e-3
MASS_TOL = 1e-5
GRPO_STEPS = 20
ROLLOUT_BATCH, ROLLOUT_NEW_TOKENS = 16, 128
# dense bf16 peak of the device (vendor data sheets, TFLOP/s), for MFU; matched against the device name in order
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0))


# ---------------------------------------------------------------------------------------------- shared helpers

def peak_bf16_flops(device_name: str) -> float | None:
    """FLOP/s of the device's dense bf16 peak, or None for a device not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def transformer_engine_status() -> tuple[bool, str]:
    """(importable, version or the import error)."""
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken binary (OSError, RuntimeError)
        return False, f"{type(exc).__name__}: {exc}"
    return True, getattr(transformer_engine, "__version__", "unknown")


def _strict_fp32() -> None:
    """fp32 means fp32: no TF32 in matmuls or convolutions (parity tolerances assume it)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _init_rank():
    from megatron_sayo.distributed import runtime

    _strict_fp32()
    return runtime.init_distributed(1, 1)


def _to_device(batch: dict) -> dict:
    """The batch on this rank's device (the GPU; CPU when a test smoke-runs a check body without one)."""
    from megatron_sayo.distributed.runtime import device

    return {k: (v.to(device()) if hasattr(v, "to") else v) for k, v in batch.items()}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release() -> None:
    """Return freed CUDA memory (callers drop their references first)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tiny_checkpoint(ctx: Context) -> Path:
    """The tiny preset, made once per run directory."""
    from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint

    path = ctx.workdir / "tiny"
    return path if (path / "model.safetensors").is_file() else make_tiny_checkpoint(path, overwrite=True)


def config_05b() -> dict:
    """A ~0.6B random Qwen2.5-VL: Qwen2.5-0.5B's language model (24 layers, hidden 896, 14/2 heads, vocab 151936,
    tied) and a 4-block ViT of the real width (1280); special ids at the top of the vocabulary, as on the hub."""
    import copy

    from megatron_sayo.testing.tiny_checkpoint import PRESETS

    cfg = copy.deepcopy(PRESETS["tiny"])
    vocab = 151936
    shift = vocab - cfg["vocab_size"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "vision_start_token_id", "vision_end_token_id",
                "vision_token_id", "image_token_id", "video_token_id"):
        cfg[key] += shift
    cfg.update(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
               intermediate_size=4864, max_window_layers=24, vocab_size=vocab, tie_word_embeddings=True,
               rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
               max_position_embeddings=32768)
    cfg["vision_config"].update(depth=4, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=896,
                                window_size=112, fullatt_block_indexes=[1, 3])
    return cfg


def checkpoint_05b_path(ctx: Context) -> Path:
    return ctx.workdir / "qwen25vl_05b"


def prompt_batch(ckpt: Path, n: int, side: int = 224, padding_side: str = "left", seed: int = 0) -> dict:
    """n chat prompts of uneven length, one random side x side image each, through our processor."""
    import numpy as np
    from PIL import Image

    from megatron_sayo.data.processor import Processor

    proc = Processor.from_pretrained(ckpt)
    rng = np.random.default_rng(seed)
    convs = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")
        text = "What is in the box at the top left of the chart?" + " Explain the colours." * (i % 5)
        convs.append([{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": text}]}])
    return proc(convs, padding_side=padding_side)


def hf_model(ckpt: Path, dtype, attn: str = "eager"):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, attn_implementation=attn)
    return model.to("cuda").eval().requires_grad_(False) if torch.cuda.is_available() else model.eval()


def _hf_kwargs(model, batch: dict) -> dict:
    kwargs = {k: v for k, v in batch.items() if v is not None}
    ids = kwargs["input_ids"]
    # transformers >= 5 builds 3-D M-RoPE positions only when told which tokens are image/video slots
    kwargs["mm_token_type_ids"] = ((ids == model.config.image_token_id).int()
                                   + 2 * (ids == model.config.video_token_id).int())
    return kwargs


# ---------------------------------------------------------------------------------------------- checks

def environment(ctx: Context) -> CheckResult:
    """Versions and devices (informational; fails only if torch cannot say)."""
    import platform

    import torch

    figures = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
               "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(device=props.name, capability=f"{props.major}.{props.minor}",
                       memory_gib=round(props.total_memory / 2**30, 1), devices=torch.cuda.device_count(),
                       nccl=_nccl_version(),
                       peak_bf16_tflops=(peak_bf16_flops(props.name) or 0) / 1e12 or None)
    for name in ("megatron.core", "transformers", "flash_attn"):
        try:
            module = __import__(name, fromlist=["__version__"])
            figures[name] = getattr(module, "__version__", "installed")
        except Exception as exc:
            figures[name] = f"not available ({type(exc).__name__}: {exc})"[:300]
    te_ok, te_info = transformer_engine_status()
    figures["transformer_engine"] = te_info if te_ok else f"not available ({te_info})"[:300]
    return CheckResult(True, figures)


def _nccl_version() -> str:
    import torch

    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def nccl_startup(ctx: Context) -> CheckResult:
    """runtime.init_distributed(1, 1) on NCCL, megatron's groups, one all-reduce, clean shutdown."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_sayo.distributed import runtime

    t0 = time.perf_counter()
    launch = runtime.init_distributed(1, 1)
    init_s = time.perf_counter() - t0
    backend = dist.get_backend()
    x = torch.arange(4.0, device="cuda")
    t1 = time.perf_counter()
    dist.all_reduce(x, group=parallel_state.get_data_parallel_group())
    torch.cuda.synchronize()
    figures = {"backend": backend, "launcher": launch.launcher,
               "init_s": round(init_s, 3), "all_reduce_s": round(time.perf_counter() - t1, 3),
               "tp": parallel_state.get_tensor_model_parallel_world_size(),
               "pp": parallel_state.get_pipeline_model_parallel_world_size(),
               "dp": parallel_state.get_data_parallel_world_size(), "device": str(runtime.device())}
    flag = torch.ones(1)                                   # CPU tensors (the trainer's flags) go through gloo
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    figures["cpu_all_reduce"] = flag.item() == 1.0
    ok = ("nccl" in backend and torch.equal(x.cpu(), torch.arange(4.0)) and figures["tp"] == figures["dp"] == 1
          and figures["cpu_all_reduce"])
    runtime.shutdown()
    figures["shutdown_clean"] = not dist.is_initialized()
    return CheckResult(ok and figures["shutdown_clean"], figures,
                       "" if ok else f"backend {backend}, all-reduce result {x.tolist()}")


def _our_logits(ckpt: Path, batch: dict, dtype, layer_backend: str):
    """[b, s, vocab] float32 CPU logits of our model (TP=1) on the GPU."""
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed.schedule import run_forward
    from megatron_sayo.models.qwen25vl.model import model_inputs

    _release()                              # the previous model is gone by now; hand its memory back
    model = load_model_stage(ckpt, params_dtype=dtype, layer_backend=layer_backend)
    inputs = model_inputs(model.hf, **_to_device(batch))
    out = run_forward(model, [dict(inputs=inputs)], collect=lambda logits, mb: model.full_logits(logits))
    return out[0].float().cpu()


def _hf_logits(ckpt: Path, batch: dict, dtype):
    import torch

    model = hf_model(ckpt, dtype)
    with torch.no_grad():
        logits = model(**_hf_kwargs(model, _to_device(batch))).logits.float().cpu()
    del model
    _release()
    return logits


def parity(ckpt: Path, batch_size: int = 3) -> CheckResult:
    """Our logits vs transformers' on the same GPU (fp32 and bf16), local spec and, when installed, TE."""
    import torch

    from megatron_sayo.testing.parity import compare_logits

    _init_rank()
    batch = prompt_batch(ckpt, batch_size, side=112)
    mask = batch["attention_mask"].numpy()
    ref32 = _hf_logits(ckpt, batch, torch.float32).numpy()
    hf16 = compare_logits(_hf_logits(ckpt, batch, torch.bfloat16).numpy(), ref32, mask)
    figures = {"tokens": int(mask.sum()), "transformers_bf16_rel": hf16.rel}
    te_ok, te_info = transformer_engine_status()
    backends = ["local"] + (["te"] if te_ok else [])
    if not te_ok:
        figures["te"] = f"skipped: Transformer Engine not importable ({te_info})"[:300]
    failures = []
    for lb in backends:
        r32 = compare_logits(_our_logits(ckpt, batch, torch.float32, lb).numpy(), ref32, mask)
        r16 = compare_logits(_our_logits(ckpt, batch, torch.bfloat16, lb).numpy(), ref32, mask)
        bound16 = BF16_FACTOR * hf16.rel + BF16_SLACK
        figures[lb] = {"fp32_rel": r32.rel, "fp32_max_abs": r32.max_abs, "fp32_top1": r32.top1_agreement,
                       "bf16_rel": r16.rel, "bf16_max_abs": r16.max_abs, "bf16_top1": r16.top1_agreement,
                       "bf16_bound": bound16}
        if not r32.ok(FP32_REL_TOL):
            failures.append(f"{lb} fp32: {r32} (tolerance {FP32_REL_TOL})")
        if not r16.rel <= bound16:
            failures.append(f"{lb} bf16: relative {r16.rel:.3e} > {bound16:.3e}")
    return CheckResult(not failures, figures, "; ".join(failures))


def parity_tiny(ctx: Context) -> CheckResult:
    return parity(tiny_checkpoint(ctx))


def parity_05b(ctx: Context) -> CheckResult:
    return parity(checkpoint_05b_path(ctx), batch_size=2)


def checkpoint_05b(ctx: Context) -> CheckResult:
    """Write the ~0.5B checkpoint (bf16 safetensors) once; later checks read it."""
    from megatron_sayo import plan
    from megatron_sayo.testing.tiny_checkpoint import make_tiny_checkpoint

    path = checkpoint_05b_path(ctx)
    t0 = time.perf_counter()
    if not (path / "model.safetensors").is_file():
        cfg_file = ctx.workdir / "config_05b.json"
        cfg_file.write_text(json.dumps(config_05b()))
        make_tiny_checkpoint(path, config_json=cfg_file, dtype="bfloat16", overwrite=True)
    params = plan.total_params(plan.load_arch(path / "config.json"))
    size = sum(f.stat().st_size for f in path.iterdir())
    return CheckResult(True, {"params": params, "bytes": size, "seconds": round(time.perf_counter() - t0, 1)})


# ---------------------------------------------------------------------------------------------- region masses

def _eager_sums(q, k, allowed, scale, pairs, region, image):
    """[2, n] head-summed region/image weights of the chosen rows from a float64 softmax (the reference)."""
    import torch

    out = torch.zeros(2, pairs.shape[0], dtype=torch.float64)
    rep = q.shape[1] // k.shape[1]
    for b in pairs[:, 0].unique().tolist():
        idx = (pairs[:, 0] == b).nonzero().squeeze(1)
        rows = pairs[idx, 1].to(q.device)
        scores = (q[b][:, rows].double() @ k[b].double().repeat_interleave(rep, 0).transpose(-1, -2)) * scale
        alpha = torch.softmax(scores.masked_fill(~allowed[b, 0][rows][None], float("-inf")), dim=-1).sum(0)
        out[0, idx] = (alpha * region[b].to(q.device)).sum(-1).cpu()
        out[1, idx] = (alpha * image[b].to(q.device)).sum(-1).cpu()
    return out


def _peak_extra_mib(fn):
    """(fn(), peak CUDA memory it added in MiB)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - base) / 2**20


def _kernel_mass_case(seed: int = 0):
    """A right-padded GRPO-like batch on CUDA: uneven lengths up to 2048, GQA 16/2 heads of 128, bf16 q/k,
    512 image keys from column 16, a random region inside them, the last 110 real rows of each sample chosen."""
    import torch

    from megatron_sayo.attention.region_mass import query_row_pairs

    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.tensor([2048, 1500, 1903, 777, 1024, 1999])
    b, s, h, groups, d = len(lengths), int(lengths.max()), 16, 2, 128
    q = torch.randn(b, h, s, d, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(b, groups, s, d, generator=g).to("cuda", torch.bfloat16)
    real = torch.arange(s)[None] < lengths[:, None]
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None] & real[:, None, :]
    allowed[:, torch.arange(s), torch.arange(s)] = True
    image = torch.zeros(b, s, dtype=torch.bool)
    image[:, 16:528] = True
    region = image & (torch.rand(b, s, generator=g) < 0.15)
    rows = torch.zeros(b, s, dtype=torch.bool)
    for i, n in enumerate(lengths.tolist()):
        rows[i, n - 110:n] = True
    return q, k, allowed[:, None].cuda(), region, image, query_row_pairs(rows), 1 / math.sqrt(d)


def region_mass(ctx: Context) -> CheckResult:
    """Masses on CUDA vs eager: the kernel on a right-padded uneven batch, then the tiny model end to end."""
    _init_rank()
    figures, failures = _kernel_masses()
    _release()
    model_figures, model_failures = _model_masses(tiny_checkpoint(ctx))
    figures["tiny_model"] = model_figures
    failures += model_failures
    return CheckResult(not failures, figures, "; ".join(failures))


def _kernel_masses() -> tuple[dict, list[str]]:
    """Both mass kernels on the GRPO-like CUDA batch against float64 eager softmax; the memory each adds."""
    import warnings

    from megatron_sayo.attention.region_mass import indicator_mass_sums, local_head_mass_sums
    from megatron_sayo.models.qwen25vl.attention import attention_with_lse

    q, k, allowed, region, image, pairs, scale = _kernel_mass_case()
    ref = _eager_sums(q, k, allowed, scale, pairs, region, image)
    with warnings.catch_warnings(record=True) as caught:  # a fallback from the efficient kernel is reported
        warnings.simplefilter("always")
        ind, ind_mib = _peak_extra_mib(lambda: indicator_mass_sums(q, k, allowed, scale, pairs, region, image))
    k_full = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)

    def lse_path():  # what a padded batch cost before: the full score matrix for the layer's output and LSE
        _, lse = attention_with_lse(q, k_full, k_full, allowed, scale, "sdpa")
        return local_head_mass_sums(q, k_full, lse, scale, pairs, region, image)

    via_lse, lse_mib = _peak_extra_mib(lse_path)
    heads = q.shape[1]
    err_ind = float((ind.double().cpu() - ref).abs().max()) / heads
    err_lse = float((via_lse.double().cpu() - ref).abs().max()) / heads
    figures = {"rows": int(pairs.shape[0]), "indicator_max_err": err_ind, "lse_max_err": err_lse,
               "indicator_peak_mib": round(ind_mib, 1), "full_scores_peak_mib": round(lse_mib, 1),
               "memory_ratio": round(lse_mib / max(ind_mib, 1e-9), 1), "tolerance": MASS_TOL,
               "indicator_warnings": [str(w.message)[:300] for w in caught]}
    failures = [f"{name} masses off by {err:.2e} > {MASS_TOL}" for name, err in
                (("indicator", err_ind), ("lse", err_lse)) if not err <= MASS_TOL]
    if not ind_mib < lse_mib:
        failures.append(f"the indicator path used {ind_mib:.0f} MiB, not less than full scores ({lse_mib:.0f} MiB)")
    return figures, failures


def _model_masses(ckpt: Path) -> tuple[dict, list[str]]:
    """score_region_mass on the GPU (each kernel) against transformers' eager attentions, right-padded batch."""
    import numpy as np
    import torch
    from PIL import Image

    from megatron_sayo.attention.region_mass import score_region_mass
    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.data.processor import Processor
    from megatron_sayo.data.regions import RegionSpec, batch_region_mask
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config
    from megatron_sayo.models.qwen25vl.model import model_inputs

    rng = np.random.default_rng(1)
    sizes = [(112, 84), (84, 112), (56, 56)]
    convs = [[{"role": "user", "content": [
        {"type": "image", "image": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")},
        {"type": "text", "text": "what is in the box?" + " Look closely." * i}]}] for i, (w, h) in enumerate(sizes)]
    batch = Processor.from_pretrained(ckpt)(convs, padding_side="right")
    hf = load_hf_config(ckpt)
    specs = [RegionSpec(boxes=[[10, 5, 60, 50]], orig_size=sizes[0]), RegionSpec(boxes=[[0, 60, 40, 112]],
             orig_size=sizes[1]), RegionSpec(boxes=[[0, 0, 28, 28]], orig_size=sizes[2])]
    region = batch_region_mask(batch["input_ids"], batch["image_grid_thw"], hf.tokens.image, specs)
    image = batch["input_ids"] == hf.tokens.image
    real = batch["attention_mask"].bool()

    ref_model = hf_model(ckpt, torch.float32)
    with torch.no_grad():
        alpha = ref_model(**_hf_kwargs(ref_model, _to_device(batch)), output_attentions=True).attentions[-1]
    alpha = alpha.double().cpu()
    del ref_model
    _release()
    a_ref = (alpha * region[:, None, None, :]).sum(-1).mean(1) / region.sum(1, keepdim=True)
    v_ref = (alpha * image[:, None, None, :]).sum(-1).mean(1) / image.sum(1, keepdim=True)
    figures, failures = {"padded_rows": int((~real).sum())}, []
    for kernel in ("indicator", "lse"):
        model = load_model_stage(ckpt, mass_kernel=kernel)
        mb = dict(inputs=model_inputs(model.hf, **_to_device(batch)), query_rows=real, region_mask=region,
                  image_mask=image)
        out = score_region_mass(model, [mb])[0]
        err = max(float((out.region_mass.double().cpu() - torch.where(real, a_ref, 0)).abs().max()),
                  float((out.image_mass.double().cpu() - torch.where(real, v_ref, 0)).abs().max()))
        figures[f"{kernel}_max_err"] = err
        if not err <= MASS_TOL:
            failures.append(f"tiny model, {kernel} kernel: masses off by {err:.2e} > {MASS_TOL}")
    return figures, failures


# ---------------------------------------------------------------------------------------------- throughput

def rollout(ctx: Context) -> CheckResult:
    """Greedy decode of ROLLOUT_NEW_TOKENS for a batch of 16 (bf16): ours vs transformers' generate, interleaved."""
    import torch

    return rollout_throughput(checkpoint_05b_path(ctx), ROLLOUT_BATCH, ROLLOUT_NEW_TOKENS, torch.bfloat16)


def rollout_throughput(ckpt: Path, batch_size: int, new_tokens: int, dtype) -> CheckResult:
    """Tokens/s of our KV-cached generate and transformers' generate on the same left-padded prompts."""
    import torch

    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.inference.decode import generate
    from megatron_sayo.inference.sampling import SamplingParams

    _init_rank()
    batch = _to_device(prompt_batch(ckpt, batch_size))
    ours = load_model_stage(ckpt, params_dtype=dtype)
    ref = hf_model(ckpt, dtype, attn="sdpa")
    pad = ref.config.text_config.pad_token_id

    def run_ours(n):
        params = SamplingParams(greedy=True, max_new_tokens=n, stop_token_ids=())
        return generate(ours, batch, params).sequences

    def run_hf(n):
        with torch.no_grad():
            return ref.generate(**_hf_kwargs(ref, batch), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                eos_token_id=[], pad_token_id=pad)

    run_ours(4), run_hf(4)                                 # warm-up (kernels, allocator)
    seconds, outputs = {}, {}
    for _ in range(2):                                     # interleaved: the same conditions for both
        for name, fn in (("ours", run_ours), ("transformers", run_hf)):
            _sync()
            t0 = time.perf_counter()
            outputs[name] = fn(new_tokens)
            _sync()
            seconds[name] = min(time.perf_counter() - t0, seconds.get(name, math.inf))
    p = batch["input_ids"].shape[1]
    new = {name: out[:, p:p + new_tokens].cpu() for name, out in outputs.items()}
    tokens = batch_size * new_tokens
    shapes_ok = all(t.shape == (batch_size, new_tokens) for t in new.values())
    figures = {"batch": batch_size, "new_tokens": new_tokens, "prompt_tokens": p, "dtype": str(dtype),
               "ours_tokens_per_s": tokens / seconds["ours"],
               "transformers_tokens_per_s": tokens / seconds["transformers"],
               "speedup_vs_transformers": seconds["transformers"] / seconds["ours"]}
    if shapes_ok:
        same = new["ours"] == new["transformers"]
        figures.update(identical_rows=int(same.all(1).sum()), token_agreement=float(same.float().mean()))
    return CheckResult(shapes_ok, figures, "" if shapes_ok else
                       f"unexpected output shapes {[tuple(t.shape) for t in new.values()]}")


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak (None when the peak is unknown)."""
    return None if not peak or seconds <= 0 else flops / seconds / peak


def grpo_run_config(ctx: Context, run_dir: Path, ckpt: Path | None = None, steps: int = GRPO_STEPS,
                    dtype: str = "bfloat16", max_new_tokens: int = 110) -> Path:
    """The YAML of the bf16 GRPO run (default: the ~0.5B checkpoint) on a synthetic grounded task."""
    import yaml

    cfg = {"run_dir": str(run_dir),
           "model": {"hf_path": str(ckpt or checkpoint_05b_path(ctx)), "params_dtype": dtype},
           "data": {"synthetic_dir": str(ctx.workdir / "grpo_data"), "synthetic_n": 64},
           "rollout": {"group_size": 8, "max_new_tokens": max_new_tokens},
           "train": {"steps": steps, "global_batch": 4, "micro_batch": 8},
           "checkpoint": {"interval": 0, "keep": 1}, "log": {"tensorboard": False}}
    path = run_dir.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def summarize_steps(rows: list[dict], text, peak: float | None) -> dict:
    """Means over the steps after the first (compile/allocator warm-up), and the update's MFU."""
    from megatron_sayo import plan

    steady = rows[1:] or rows
    mean = lambda key: sum(float(r[key]) for r in steady) / len(steady)  # noqa: E731
    out = {"steps": len(rows), "tokens_per_s": mean("tokens_per_s"),
           **{k: mean(k) for k in ("time_rollout", "time_score", "time_reference", "time_update", "time_step")}}
    if all("sequences" in r and "sequence_length" in r for r in steady):
        flops = [plan.training_flops(text, int(r["sequences"]), int(r["sequence_length"])) for r in steady]
        out["update_tflops_per_step"] = sum(flops) / len(flops) / 1e12
        values = [mfu(f, float(r["time_update"]), peak) for f, r in zip(flops, steady)]
        out["mfu_update"] = None if None in values else sum(values) / len(values)
    return out


def grpo_steps(ctx: Context) -> CheckResult:
    """GRPO_STEPS bf16 steps of the ~0.5B checkpoint through the real entry point."""
    return grpo_run(ctx, checkpoint_05b_path(ctx), GRPO_STEPS)


def grpo_run(ctx: Context, ckpt: Path, steps: int, dtype: str = "bfloat16", max_new_tokens: int = 110
             ) -> CheckResult:
    """`python -m megatron_sayo.train` for `steps` steps in a fresh run directory, then its metrics.jsonl."""
    import subprocess
    import sys

    from megatron_sayo import plan

    run_dir = ctx.workdir / f"grpo_run_{time.strftime('%Y%m%d_%H%M%S')}"
    config = grpo_run_config(ctx, run_dir, ckpt, steps, dtype, max_new_tokens)
    t0 = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        code = subprocess.run([sys.executable, "-m", "megatron_sayo.train", "--config", str(config)], stdout=log,
                              stderr=subprocess.STDOUT).returncode
    total_s = time.perf_counter() - t0
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    figures = {"exit_code": code, "wall_s": round(total_s, 1), "device": _device_name(), "dtype": dtype}
    if rows:
        text = plan.load_arch(Path(ckpt) / "config.json").text
        figures.update(summarize_steps(rows, text, peak_bf16_flops(figures["device"])))
        figures["peak_memory_gib"] = max((float(r.get("peak_memory_gib", 0.0)) for r in rows), default=None)
        figures["loss_finite"] = all(math.isfinite(float(r.get("loss", 0.0))) for r in rows)
    ok = code == 0 and len(rows) == steps and figures.get("loss_finite", False)
    reason = "" if ok else f"exit code {code}, {len(rows)} of {steps} steps logged (log: {run_dir}.log)"
    if not ok:
        figures["train_log_tail"] = run_dir.with_suffix(".log").read_text(errors="replace").splitlines()[-30:]
    return CheckResult(ok, figures, reason)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- prompt sharing

def _shared_case(device, dtype, prompt: int = 1000, lengths=(110, 97, 64, 110, 3, 88, 110, 71), seed: int = 0):
    """A SAYO-shaped packed row (issue 30): 8 left-padded prompt columns, the prompt, G completions, q/k/v with
    GQA 14/2 heads, head dim 64, plus a random upstream gradient."""
    import torch

    seg = [-1] * 8 + [0] * prompt + [i for i, n in enumerate(lengths, 1) for _ in range(n)] + [-1] * 5
    segments = torch.tensor([seg])
    g = torch.Generator().manual_seed(seed)
    S = segments.shape[1]
    q, k, v = (torch.randn(1, h, S, 64, generator=g).to(device, dtype) for h in (14, 2, 2))
    return segments, q, k, v, torch.randn(1, 14, S, 64, generator=g).to(device, dtype)


def shared_prompt_attention(ctx: Context) -> CheckResult:
    """The mask-free prompt-sharing attention on CUDA vs the masked form (SDPA with the dense segment mask):
    fp32 with the math kernel within 1e-5 relative (outputs and q/k/v gradients), bf16 with torch's flash kernel
    within 2 x the masked bf16 error + 1e-3 of an fp32 reference."""
    import torch
    import torch.nn.functional as F

    from megatron_sayo.models.qwen25vl.shared_prompt_attention import (
        AtenFlashKernel,
        MathKernel,
        shared_allowed,
        split_attention,
    )

    _strict_fp32()
    figures, failures = {}, []

    def run(kernel, dtype, masked: bool):
        segments, q, k, v, dout = _shared_case("cuda", dtype)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        if masked:
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(7, 1), v.repeat_interleave(7, 1),
                                                 attn_mask=shared_allowed(segments.cuda())[:, None], scale=0.125)
        else:
            out = split_attention(q, k, v, segments, 0.125, kernel)[0]
        grads = torch.autograd.grad(out, (q, k, v), dout)
        return [t.float() for t in (out, *grads)]

    def rel(a, b):
        return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))

    ref = run(None, torch.float32, True)
    figures["fp32_math_rel_err"] = rel(run(MathKernel, torch.float32, False), ref)
    if figures["fp32_math_rel_err"] > 1e-5:
        failures.append(f"fp32 split (math) vs masked: {figures['fp32_math_rel_err']:.2e} > 1e-5")
    masked_bf16 = rel(run(None, torch.bfloat16, True), ref)
    split_bf16 = rel(run(AtenFlashKernel, torch.bfloat16, False), ref)
    figures.update(bf16_masked_rel_err=masked_bf16, bf16_split_flash_rel_err=split_bf16)
    if split_bf16 > BF16_FACTOR * masked_bf16 + BF16_SLACK:
        failures.append(f"bf16 split (flash) error {split_bf16:.2e} > {BF16_FACTOR} x masked {masked_bf16:.2e} + "
                        f"{BF16_SLACK}")
    return CheckResult(not failures, figures, "; ".join(failures))
