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
