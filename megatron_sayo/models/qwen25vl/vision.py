"""Qwen2.5-VL vision tower: Conv3d patch embed, 2-D RoPE, window/full attention blocks, patch merger.

The tower is replicated on every tensor-parallel rank (it is not tensor-parallel) and runs on the first
pipeline stage only. Parameter names equal transformers' `visual.*` state-dict keys, so an HF visual state
dict loads with `load_state_dict(strict=True)`.

Token order: pixel_values rows are patches ordered frame-major, then merge block (row-major), then patch
within the block; `spatial_merge_size**2` consecutive rows form one merged (LLM) token. Window attention
permutes merged tokens into windows of `window_size` pixels; the output is un-permuted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_sayo.models.qwen25vl.hf_config import VISION_ACTIVATIONS, VisionConfig


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
}
assert tuple(ACTIVATIONS) == VISION_ACTIVATIONS

# ---- index bookkeeping (pure functions of grid_thw) -------------------------------------------------------

def _grids(grid_thw: Tensor) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in row) for row in grid_thw.tolist()]


def patch_coordinates(grid_thw: Tensor, merge: int) -> Tensor:
    """[N, 2] (row, col) of every patch, in pixel_values order (frame, merge block, patch in block)."""
    coords = []
    for t, h, w in _grids(grid_thw):
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rc = torch.stack([rows, cols], dim=-1)                                      # [h, w, 2]
        rc = rc.reshape(h // merge, merge, w // merge, merge, 2).transpose(1, 2)    # block row, block col, i, j
        coords.append(rc.reshape(-1, 2).repeat(t, 1))
    return torch.cat(coords)


def frame_seqlens(grid_thw: Tensor) -> Tensor:
    """cu_seqlens (int32) of full attention: every frame of every image/video is one segment."""
    lengths = [h * w for t, h, w in _grids(grid_thw) for _ in range(t)]
    return F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


def window_order(grid_thw: Tensor, merge: int, window_merged: int) -> tuple[Tensor, Tensor]:
    """(merged-token permutation into windows, cu_seqlens of the windows in patches, int32).

    Windows are window_merged x window_merged merged tokens within one frame, taken row-major; partial
    windows at the bottom/right edges keep only their real tokens.
    """
    order, lengths, offset = [], [], 0
    for t, h, w in _grids(grid_thw):
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw) + offset
        for frame in ids:
            for r in range(0, gh, window_merged):
                for c in range(0, gw, window_merged):
                    window = frame[r:r + window_merged, c:c + window_merged].reshape(-1)
                    order.append(window)
                    lengths.append(window.numel() * merge * merge)
        offset += t * gh * gw
    cu = F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return torch.cat(order), cu


def permute_merged(x: Tensor, order: Tensor, unit: int) -> Tensor:
    """Reorder rows of x [N, ...] in groups of `unit` consecutive rows by the group permutation `order`."""
    return x.reshape(-1, unit, *x.shape[1:])[order.to(x.device)].reshape(x.shape)


# ---- attention ---------------------------------------------------------------------------------------------

def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate x [N, H, D] by angles [N, D] (non-interleaved halves), computed in float32."""
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def varlen_sdpa(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Bidirectional attention within each segment of q, k, v [N, H, D]; segments of equal length batched."""
    out = torch.empty_like(q)
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    for length in lengths.unique().tolist():
        if length == 0:
            continue
        idx = (starts[lengths == length, None] + torch.arange(length)).to(q.device)   # [n, L]
        qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))                     # [n, H, L, D]
        out[idx] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
    return out


def flash_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> Tensor:
    """flash_attn_varlen_func over segments of q, k, v [N, H, D] (CUDA, fp16/bf16)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError("vision attn_impl='flash' needs the flash-attn package; use attn_impl='sdpa'") from e
    if not q.is_cuda:
        raise RuntimeError("vision attn_impl='flash' needs CUDA tensors; use attn_impl='sdpa' on CPU")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=False)


ATTENTION = {"sdpa": varlen_sdpa, "flash": flash_varlen}


# ---- modules (names match transformers' visual.* keys) -----------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.shape = (c.in_channels, *kernel)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.view(-1, *self.shape).to(self.proj.weight.dtype)
        return self.proj(x).flatten(1)


class Attention(nn.Module):
    def __init__(self, c: VisionConfig, attn_impl: str):
        super().__init__()
        self.heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.attend = ATTENTION[attn_impl]

    def forward(self, x: Tensor, cu_seqlens: Tensor, angles: Tensor) -> Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, -1).unbind(1)
        out = self.attend(apply_rope(q, angles), apply_rope(k, angles), v, cu_seqlens)
        return self.proj(out.reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: VisionConfig, attn_impl: str):
        super().__init__()
        self.norm1 = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c, attn_impl)
        self.norm2 = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: Tensor, cu_seqlens: Tensor, angles: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, angles)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then merge^2 consecutive patches -> Linear -> GELU -> Linear(out_hidden_size)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.merged = c.hidden_size * c.spatial_merge_size ** 2
        self.ln_q = RMSNorm(c.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(),
                                 nn.Linear(self.merged, c.out_hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged))


class Qwen25VisionModel(nn.Module):
    """The Qwen2.5-VL ViT. Replicated on every TP rank (not tensor-parallel); runs on the first pipeline stage.

    forward(pixel_values [N, C*T*P*P], grid_thw [n, 3]) -> [N / merge^2, out_hidden_size], images in order.
    attn_impl: 'sdpa' (CPU or GPU) or 'flash' (flash_attn_varlen_func, CUDA only).
    """

    def __init__(self, config: VisionConfig, attn_impl: str = "sdpa"):
        super().__init__()
        if attn_impl not in ATTENTION:
            raise ValueError(f"vision attn_impl {attn_impl!r} is not one of {sorted(ATTENTION)}")
        config.validate()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(Block(config, attn_impl) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def rope_angles(self, grid_thw: Tensor) -> Tensor:
        """[N, head_dim] float32 angles: (row * inv_freq, col * inv_freq), repeated for the second half.

        inv_freq is computed here in float32 (not a buffer) so casting the module to bf16 cannot round it.
        """
        half = self.config.head_dim // 2
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)
        coords = patch_coordinates(grid_thw, self.config.spatial_merge_size)
        angles = (coords[..., None].float() * inv_freq).flatten(1)   # [N, head_dim / 2]
        return torch.cat([angles, angles], dim=-1).to(self.patch_embed.proj.weight.device)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        c = self.config
        unit = c.spatial_merge_size ** 2
        expected = int(grid_thw.prod(-1).sum())
        if pixel_values.shape != (expected, c.patch_dim):
            raise ValueError(f"pixel_values shape {list(pixel_values.shape)} does not match grid_thw "
                             f"(expected [{expected}, {c.patch_dim}])")
        order, window_cu = window_order(grid_thw, c.spatial_merge_size,
                                        c.window_size // c.spatial_merge_size // c.patch_size)
        full_cu = frame_seqlens(grid_thw)
        x = permute_merged(self.patch_embed(pixel_values), order, unit)
        angles = permute_merged(self.rope_angles(grid_thw), order, unit)
        for i, block in enumerate(self.blocks):
            x = block(x, full_cu if i in c.fullatt_block_indexes else window_cu, angles)
        return self.merger(x)[torch.argsort(order.to(x.device))]
