"""A fixed GRPO batch whose groups exercise prompt sharing: a two-image prompt, a text-only prompt and a one-image
prompt with region keys, left-padded to one width, G = 3 / 2 / 3 completions of uneven lengths (one of a single
token), with made-up old/reference log-probs and advantages."""

from __future__ import annotations

import torch

from megatron_sayo.data.processor import Processor

GROUPS = (3, 2, 3)   # completions per prompt, in row order
LENGTHS = (5, 1, 4, 3, 6, 2, 6, 4)
WIDTH = 6            # completion columns T


def shared_prompt_rollout(ckpt, make_image, seed: int = 0) -> dict:
    """The rows as `fixed_rollout` gives them (one pixel tensor per prompt, shared by its rows) plus region masks."""
    from megatron_sayo.models.qwen25vl.hf_config import load_hf_config
    from megatron_sayo.rl.batch import images_per_prompt

    hf = load_hf_config(ckpt)
    proc = Processor.from_pretrained(ckpt)
    convs = [
        [{"role": "user", "content": [{"type": "image", "image": make_image(56, 56, 1)},
                                      {"type": "image", "image": make_image(84, 56, 2)},
                                      {"type": "text", "text": "which is larger?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "say a colour, then stop"}]}],
        [{"role": "user", "content": [{"type": "image", "image": make_image(112, 84, 3)},
                                      {"type": "text", "text": "what colour?"}]}],
    ]
    prompts = proc(convs)
    ids = prompts["input_ids"]
    g = torch.Generator().manual_seed(seed)
    image = ids == hf.tokens.image
    region = image & (torch.rand(ids.shape, generator=g) < 0.4)
    region[1] = False
    rows = [p for p, n in enumerate(GROUPS) for _ in range(n)]
    N = len(rows)
    completion = torch.randint(10, 300, (N, WIDTH), generator=g)
    lengths = torch.tensor(LENGTHS)
    cmask = (torch.arange(WIDTH)[None] < lengths[:, None]).long()
    completion = torch.where(cmask.bool(), completion, torch.zeros_like(completion))
    pix, thw = images_per_prompt(prompts, hf)
    P = ids.shape[1]
    full_region = torch.zeros(N, P + WIDTH, dtype=torch.bool)
    full_region[:, :P] = region[rows]
    return dict(sequences=torch.cat([ids[rows], completion], 1),
                attention_mask=torch.cat([prompts["attention_mask"][rows], cmask], 1), prompt_length=P,
                completion_mask=cmask, pixel_values=[pix[r] for r in rows], image_grid_thw=[thw[r] for r in rows],
                region_mask=full_region, old_logp=-torch.rand(N, WIDTH, generator=g) * 3,
                ref_logp=-torch.rand(N, WIDTH, generator=g) * 3, advantages=torch.randn(N, generator=g))


def scoring_batch(data: dict, rows: slice = slice(None)):
    """The ScoringBatch of `shared_prompt_rollout` rows."""
    from megatron_sayo.rl.batch import ScoringBatch

    return ScoringBatch(data["sequences"][rows], data["attention_mask"][rows], data["prompt_length"],
                        data["completion_mask"][rows], data["pixel_values"][rows], data["image_grid_thw"][rows],
                        data["region_mask"][rows])
