"""The decoder's core attention, plugged into megatron-core's SelfAttention through the layer spec.

megatron computes q/k/v (TP-sharded heads) and applies M-RoPE; this module does softmax(q k^T) v.
It adds two things megatron's DotProductAttention lacks: a KV cache for rollouts that lives with the
attention (keys arrive already rotated), and a probe hook that, on the last layer, receives the
attention's row log-sum-exp so region masses can be recomputed exactly for chosen query rows.
Backends: 'sdpa' (torch, CPU and GPU) and 'flash' (flash-attn on GPU).
Mass kernels (`model.region_mass_kernel`): 'lse' hands the probe the row log-sum-exp (the CPU kernels return
it for any mask); 'indicator' runs the layer's attention as usual and hands the probe the mask instead, and
the probe gets its masses from a second, narrow attention call whose values are 0/1 key indicators (torch's
memory-efficient CUDA kernel takes any mask, so padded batches never materialise the scores); 'auto' is
'indicator' on CUDA and 'lse' on CPU.

Mask convention (megatron's): a bool tensor [b, 1, sq, sk], True = masked out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from megatron.core.transformer.module import MegatronModule

BACKENDS = ("sdpa", "flash")
MASS_KERNELS = ("auto", "lse", "indicator")


class AttentionProbe(Protocol):
    """Receives, for one layer, the rotated q (b, heads, sq, d) and k (b, heads or kv groups, sk, d), and either
    the row log-sum-exp (b, heads, sq) with k expanded to the query heads, or lse=None and `allowed`, the
    attention's mask (SDPA convention: True = attend; None = causal, query j at key j + sk - sq). A probe with
    `needs_lse = False` always gets the second form (the layer's own output then takes the ordinary path)."""

    def __call__(self, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor | None, scale: float,
                 allowed: torch.Tensor | None = None) -> None: ...


def resolve_mass_kernel(mass_kernel: str, device: torch.device) -> str:
    """'lse' or 'indicator' for a configured kernel on `device` ('auto': indicator on CUDA, lse elsewhere)."""
    if mass_kernel not in MASS_KERNELS:
        raise ValueError(f"model.region_mass_kernel: {mass_kernel!r} is not one of {MASS_KERNELS}")
    if mass_kernel == "auto":
        return "indicator" if device.type == "cuda" else "lse"
    return mass_kernel


@dataclass
class KVCache:
    """Per-layer keys/values of the tokens seen so far, [b, groups, max_len, d], filled left to right."""

    max_len: int
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new [b, g, s, d] keys/values for `layer`; return everything cached so far."""
        b, g, s, d = key.shape
        if layer not in self.keys:
            self.keys[layer] = key.new_empty(b, g, self.max_len, d)
            self.values[layer] = value.new_empty(b, g, self.max_len, d)
            self.lengths[layer] = 0
        start = self.lengths[layer]
        if start + s > self.max_len:
            raise RuntimeError(f"KV cache overflow: {start}+{s} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, start:start + s] = key
        self.values[layer][:, :, start:start + s] = value
        self.lengths[layer] = start + s
        return self.keys[layer][:, :, :start + s], self.values[layer][:, :, :start + s]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (drop finished sequences)."""
        for layer in self.keys:
            self.keys[layer] = self.keys[layer][rows]
            self.values[layer] = self.values[layer][rows]


@dataclass
class AttentionState:
    """What one forward call asks of the core attention modules (set by the model before the decoder)."""

    kv_cache: KVCache | None = None
    probe: AttentionProbe | None = None
    probe_layer: int | None = None  # global 1-based layer number whose attention the probe sees
    probe_only: bool = False        # fed only for the probe: the lean decoder stops once it has measured
    shared_segments: torch.Tensor | None = None  # packed prompt-sharing rows [b, S] (no mask: split attention)


class CoreAttention(MegatronModule):
    """softmax(scale * q k^T + mask) v over local (TP-sharded) heads, GQA-aware, with cache and probe."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type=None, softmax_scale: float | None = None, pg_collection=None,
                 backend: str = "sdpa", mass_kernel: str = "auto"):
        super().__init__(config=config)
        if backend not in BACKENDS:
            raise ValueError(f"model.attention_backend: {backend!r} is not one of {BACKENDS}")
        resolve_mass_kernel(mass_kernel, torch.device("cpu"))  # validates the name
        self.layer_number = layer_number
        self.backend = backend
        self.mass_kernel = mass_kernel
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.state = AttentionState()

    def _with_cache(self, query, key, value, attention_mask):
        """q, k, v as [b, heads, s, d] (k, v with the cached keys before them) and SDPA's boolean mask."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))   # megatron layout [s, b, heads, d]
        if self.state.kv_cache is not None:
            k, v = self.state.kv_cache.append(self.layer_number, k, v)
        return q, k, v, _allowed(attention_mask, q.shape[2], k.shape[2], q.device)

    def measure(self, query, key, value, attention_mask) -> None:
        """Cache this step's keys and values and run the probe on them, without the attention output (a
        decode step fed only for the probe, AttentionState.probe_only); the probe must take the mask."""
        if getattr(self.state.probe, "needs_lse", True):
            raise ValueError("a measure-only step needs a probe that takes the attention mask (needs_lse False)")
        q, k, _, allowed = self._with_cache(query, key, value, attention_mask)
        self.state.probe(q.detach(), k.detach(), None, self.scale, allowed)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        q, k, v, allowed = self._with_cache(query, key, value, attention_mask)
        rep = q.shape[1] // k.shape[1]
        wants_probe = self.state.probe is not None and self.state.probe_layer == self.layer_number
        if self.state.shared_segments is not None and attention_mask is None:
            return self._split(q, k, v, wants_probe)
        if wants_probe and (not getattr(self.state.probe, "needs_lse", True)
                            or resolve_mass_kernel(self.mass_kernel, q.device) == "indicator"):
            self.state.probe(q.detach(), k.detach(), None, self.scale, allowed)
            wants_probe = False  # the layer's own output below takes the ordinary path
        if wants_probe or (self.backend == "flash" and attention_mask is None and q.is_cuda):
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out, lse = (attention_with_lse(q, k, v, allowed, self.scale, self.backend) if wants_probe
                        else _flash_with_lse(q, k, v, self.scale))
            if wants_probe:
                self.state.probe(q.detach(), k.detach(), lse.detach(), self.scale)
        else:  # GQA inside SDPA: no copy of the (cached) keys/values per query head
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale,
                                                                   is_causal=allowed is None, enable_gqa=rep > 1)
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


    def _split(self, q, k, v, wants_probe: bool) -> torch.Tensor:
        """Packed prompt-sharing rows without a dense mask (shared_prompt_attention.py); the probe gets
        the merged row log-sum-exp (image keys are prompt keys, which every completion query sees)."""
        from megatron_sayo.models.qwen25vl.shared_prompt_attention import kernel_for, split_attention

        out, lse = split_attention(q, k, v, self.state.shared_segments, self.scale, kernel_for(q.device, q.dtype))
        if wants_probe:
            rep = q.shape[1] // k.shape[1]
            self.state.probe(q.detach(), k.detach().repeat_interleave(rep, dim=1), lse.detach(), self.scale)
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def build_attention_mask(attention_mask: torch.Tensor | None, sq: int) -> torch.Tensor | None:
    """Megatron mask [b, 1, sq, sk] (True = masked) from a [b, sk] padding mask (1 = real token).

    Queries are the last sq of sk positions (sq < sk at decode). Causal plus padding; a padded query row
    keeps its own key so no row is fully masked (its output is unused, but must not be NaN).
    None when there is no padding and sq == sk: plain causal, the fast path.
    """
    if attention_mask is None:
        return None
    real = attention_mask.bool()
    b, sk = real.shape
    if sq == sk and bool(real.all()):
        return None
    causal = torch.ones(sq, sk, dtype=torch.bool, device=real.device).tril(sk - sq)
    allowed = causal[None] & real[:, None, :]
    rows = torch.arange(sq, device=real.device)
    allowed[:, rows, rows + sk - sq] = True
    return ~allowed[:, None]


def _allowed(mask: torch.Tensor | None, sq: int, sk: int, device) -> torch.Tensor | None:
    """SDPA's boolean mask (True = attend) from megatron's (True = masked); None means plain causal."""
    if mask is None:
        if sq != sk:  # queries are the last sq positions of sk keys (decode)
            return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)
        return None
    return ~mask


def attention_with_lse(q, k, v, allowed, scale: float, backend: str):
    """Attention output and the per-row log-sum-exp of the scaled, masked scores ([b, h, sq])."""
    if backend == "flash" and q.is_cuda and allowed is None and q.shape[2] == k.shape[2]:
        return _flash_with_lse(q, k, v, scale)
    cpu_flash = q.device.type == "cpu" and q.dtype == torch.float32 and not q.requires_grad
    if cpu_flash and allowed is None and q.shape[2] == k.shape[2]:  # plain causal: the kernel skips masked blocks
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True, scale=scale)[:2]
    if allowed is None:
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    if cpu_flash:
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias.expand(
            q.shape[0], q.shape[1], q.shape[2], k.shape[2]), scale=scale)[:2]
        return out, lse
    # float32 scores: the LSE of bf16-rounded scores would be off by ~1e-2 in log space (masses by ~1 %)
    scores = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v)
    return out, lse


def _flash_with_lse(q, k, v, scale):
    """flash-attn (GPU) causal attention without padding; padded batches take the SDPA path."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:  # pragma: no cover - GPU only
        raise RuntimeError("model.attention_backend 'flash' needs the flash-attn package (pip install "
                           "megatron_sayo[gpu] --no-build-isolation)") from exc
    out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                                  causal=True, return_attn_probs=True)
    return out.transpose(1, 2), lse

