"""A fixed GRPO batch for gradient tests: rollouts, old/reference log-probs and advantages made up, not sampled."""

from __future__ import annotations

import torch

from megatron_sayo.data.processor import Processor


def fixed_rollout(ckpt, make_image, seed=0):
    """4 rows = 2 prompts x G=2, random completions of uneven lengths, fixed advantages and log-probs."""
    proc = Processor.from_pretrained(ckpt)
    convs = [[{"role": "user", "content": [{"type": "image", "image": make_image(w, h, i)},
                                           {"type": "text", "text": text}]}]
             for i, (w, h, text) in enumerate([(112, 84, "what colour?"), (60, 90, "which shape is on the left?")])]
    prompts = proc(convs)
    g = torch.Generator().manual_seed(seed)
    rows = [0, 0, 1, 1]
    T = 6
    completion = torch.randint(10, 300, (4, T), generator=g)
    lengths = torch.tensor([6, 3, 5, 1])
    cmask = (torch.arange(T)[None] < lengths[:, None]).long()
    seqs = torch.cat([prompts["input_ids"][rows], completion], 1)
    amask = torch.cat([prompts["attention_mask"][rows], cmask], 1)
    thw = prompts["image_grid_thw"]
    pix = list(torch.split(prompts["pixel_values"], thw.prod(-1).tolist()))
    return dict(sequences=seqs, attention_mask=amask, prompt_length=prompts["input_ids"].shape[1],
                completion_mask=cmask, pixel_values=[pix[r] for r in rows], image_grid_thw=[thw[r][None] for r in rows],
                old_logp=-torch.rand(4, T, generator=g) * 3, ref_logp=-torch.rand(4, T, generator=g) * 3,
                advantages=torch.randn(4, generator=g))


def update_config(hf_dir, tp: int = 1, pp: int = 1, **sections):
    """The run config of the gradient tests: float32, temperature 0.7, clip 0.2, KL 0.05, one row per microbatch
    (`sections` replace whole config sections, e.g. lora={...})."""
    from megatron_sayo.config import config_from_dict

    return config_from_dict({"model": {"hf_path": str(hf_dir), "params_dtype": "float32"},
                             "data": {"train_file": "unused.jsonl"}, "parallel": {"tp": tp, "pp": pp},
                             "rollout": {"temperature": 0.7}, "loss": {"kl_beta": 0.05, "clip_eps": 0.2},
                             "train": {"micro_batch": 1}, **sections})


def rollout_batch(data: dict, rows: slice = slice(None)):
    """The ScoringBatch of `fixed_rollout` rows (no region tokens)."""
    from megatron_sayo.rl.batch import ScoringBatch

    return ScoringBatch(data["sequences"][rows], data["attention_mask"][rows], data["prompt_length"],
                        data["completion_mask"][rows], data["pixel_values"][rows], data["image_grid_thw"][rows],
                        torch.zeros_like(data["sequences"][rows], dtype=torch.bool))


def random_adapters(text, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (TP=1, HF-shaped) LoRA matrices for every adapter of a model, by megatron name, with B non-zero
    (with B = 0, as training starts, every A gradient is zero and a comparison proves nothing)."""
    from megatron_sayo.models.qwen25vl.lora_names import TARGETS, adapter_entries, param_name

    g = torch.Generator().manual_seed(seed)
    out = {}
    for target, module, layer, a, b in adapter_entries(text, TARGETS, rank):
        out[param_name(target, module, "A", layer)] = torch.randn(a, generator=g) / a[1] ** 0.5
        out[param_name(target, module, "B", layer)] = torch.randn(b, generator=g) * 0.05
    return out
