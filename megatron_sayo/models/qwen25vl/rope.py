"""Qwen2.5-VL 3-D multimodal RoPE (M-RoPE): position ids for prefill and decode, and the rotary angles.

Position rules (as in transformers' Qwen2_5_VLModel.get_rope_index):
- text tokens count up by one on all three channels (temporal, height, width);
- a vision block starting at position `s` gets t = s + time index, h = s + merged row, w = s + merged column;
- text after a vision block resumes at max(all positions so far) + 1;
- rope_delta = max position + 1 - number of real tokens, so a new token at decode sits at
  (its index among the real tokens) + rope_delta on all three channels.
Padded positions (attention_mask == 0) get 0, as transformers gives them.

Videos: the text after a video resumes at max + 1 (Qwen2.5-VL's original rule, which vLLM follows).
transformers 5.x resumes at start + max(h, w) / merge instead, which differs only when a video's temporal
positions outgrow its spatial ones.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tokens_per_image(image_grid_thw, merge_size: int = 2) -> list[int]:
    """Language-model tokens of each image row (t, h, w) of image_grid_thw: t * h * w / merge_size**2."""
    rows = torch.as_tensor(image_grid_thw).reshape(-1, 3).tolist()
    return [int(t * h * w) // merge_size ** 2 for t, h, w in rows]


def text_positions(length: int, start: int) -> Tensor:
    """[3, length] positions start..start+length-1 on all three channels."""
    return (torch.arange(length) + start).view(1, -1).expand(3, -1)


def vision_positions(grid_thw, start: int, spatial_merge_size: int, time_interval: float = 1.0) -> Tensor:
    """[3, t*h*w/merge^2] positions of one image/video block, row-major within each frame."""
    t, h, w = (int(x) for x in grid_thw)
    h, w = h // spatial_merge_size, w // spatial_merge_size
    time = (torch.arange(t) * time_interval).long()
    tt, hh, ww = torch.meshgrid(time, torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


class _Media:
    """The image and video grids of a batch, consumed in order across rows."""

    def __init__(self, image_grid_thw, video_grid_thw, second_per_grid_ts, tokens_per_second):
        self.grids = {"image": list(image_grid_thw) if image_grid_thw is not None else [],
                      "video": list(video_grid_thw) if video_grid_thw is not None else []}
        self.seconds = list(second_per_grid_ts) if second_per_grid_ts is not None else None
        self.tokens_per_second = tokens_per_second
        self.used = {"image": 0, "video": 0}

    def next(self, kind: str):
        """(grid_thw, time_interval) of the next image or video."""
        i = self.used[kind]
        if i >= len(self.grids[kind]):
            raise ValueError(f"get_rope_index: input_ids hold more {kind} blocks than the {len(self.grids[kind])} "
                             f"rows of {kind}_grid_thw")
        self.used[kind] += 1
        if kind == "image":
            return self.grids[kind][i], 1.0
        seconds = float(self.seconds[i]) if self.seconds is not None else 1.0
        return self.grids[kind][i], torch.tensor(self.tokens_per_second * seconds, dtype=torch.float32)

    def check_all_used(self):
        for kind, grids in self.grids.items():
            if self.used[kind] != len(grids):
                raise ValueError(f"get_rope_index: {kind}_grid_thw has {len(grids)} rows but input_ids hold "
                                 f"{self.used[kind]} {kind} blocks (each starts right after vision_start)")


def _row_positions(ids: list[int], media: _Media, media_ids: dict, vision_start: int, merge: int) -> Tensor:
    """[3, len(ids)] positions of one row's real tokens; vision blocks start right after vision_start."""
    pieces, text_from, next_pos, i = [], 0, 0, 0
    while i < len(ids):
        kind = media_ids.get(ids[i])
        if kind is None or i == 0 or ids[i - 1] != vision_start:
            i += 1
            continue
        pieces.append(text_positions(i - text_from, next_pos))
        next_pos += i - text_from
        grid, interval = media.next(kind)
        block = vision_positions(grid, next_pos, merge, interval)
        n = block.shape[1]
        if ids[i:i + n] != [ids[i]] * n:
            raise ValueError(f"get_rope_index: {kind} grid {[int(x) for x in grid]} needs {n} consecutive {kind} "
                             f"tokens after vision_start at index {i - 1}; the row has fewer")
        pieces.append(block)
        next_pos = int(block.max()) + 1
        i = text_from = i + n
    pieces.append(text_positions(len(ids) - text_from, next_pos))
    return torch.cat(pieces, dim=1)


def get_rope_index(input_ids: Tensor, image_grid_thw: Tensor | None = None, attention_mask: Tensor | None = None, *,
                   image_token_id: int, vision_start_token_id: int, spatial_merge_size: int = 2,
                   video_grid_thw: Tensor | None = None, video_token_id: int | None = None,
                   second_per_grid_ts: Tensor | None = None, tokens_per_second: int = 2) -> tuple[Tensor, Tensor]:
    """Prefill M-RoPE positions [3, B, S] and rope_deltas [B, 1]; grids are consumed in order across the batch."""
    batch, seq = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    media = _Media(image_grid_thw, video_grid_thw, second_per_grid_ts, tokens_per_second)
    media_ids = {image_token_id: "image"}
    if video_token_id is not None:
        media_ids[video_token_id] = "video"
    position_ids = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    for b in range(batch):
        ids = input_ids[b][mask[b].to(input_ids.device)].tolist()
        if not ids:
            continue
        pos = _row_positions(ids, media, media_ids, vision_start_token_id, spatial_merge_size)
        position_ids[:, b, mask[b].cpu()] = pos
        deltas[b, 0] = int(pos.max()) + 1 - len(ids)
    media.check_all_used()
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def decode_position_ids(cache_position: Tensor, rope_deltas: Tensor, batch_size: int,
                        attention_mask: Tensor | None = None) -> Tensor:
    """Positions [3, B, n] of n new tokens: index among the row's real tokens + rope_delta, on all channels.

    Without attention_mask the index is cache_position (exact when no row is left-padded). With the full
    mask [B, past + n] (as generate keeps it), the index is the count of real tokens before each new one.
    """
    cache_position = cache_position.reshape(-1)
    n = cache_position.numel()
    if attention_mask is None:
        index = cache_position.view(1, n).expand(batch_size, n)
    else:
        index = (attention_mask.long().cumsum(-1) - 1)[:, -n:]
    deltas = rope_deltas.reshape(-1, 1).to(index.device)
    if deltas.shape[0] != batch_size:
        deltas = deltas.repeat_interleave(batch_size // deltas.shape[0], dim=0)
    return (index + deltas).unsqueeze(0).expand(3, -1, -1)


def mrope_inv_freq(head_dim: int, theta: float) -> Tensor:
    """Inverse frequencies theta^(-2i/head_dim), i < head_dim/2, float32."""
    if head_dim % 2:
        raise ValueError(f"mrope_inv_freq: head_dim must be even, got {head_dim}")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def mrope_freqs(position_ids: Tensor, inv_freq: Tensor, mrope_section) -> Tensor:
    """Rotary angles [S, B, 1, head_dim] for megatron's apply_rotary_pos_emb (non-interleaved, rotate_half).

    Frequency j < head_dim/2 takes its position from channel c where j falls in mrope_section[c]
    (t, h, w); the angles are repeated for the second half of the head.
    """
    half = inv_freq.numel()
    if sum(mrope_section) != half or len(mrope_section) != 3:
        raise ValueError(f"mrope_section {list(mrope_section)} must have 3 entries summing to head_dim/2 = {half}")
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must be [3, B, S], got {list(position_ids.shape)}")
    channel = torch.repeat_interleave(torch.arange(3), torch.tensor(list(mrope_section)))
    pos = position_ids.float()[channel.to(position_ids.device)]           # [half, B, S]
    angles = pos.permute(2, 1, 0) * inv_freq.float().to(pos.device)       # [S, B, half]
    return torch.cat([angles, angles], dim=-1).unsqueeze(2)
