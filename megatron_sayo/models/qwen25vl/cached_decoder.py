"""This stage's decoder layers for KV-cached generation: megatron's own weights and core attention, run lean.

Rollouts call the decoder once per new token with a handful of rows, where megatron's training machinery
(an autograd Function per linear, rotary cos/sin recomputed for q and k in every layer, viewless-tensor
wrappers) costs more than the arithmetic on CPU: 13.5 ms vs 8.5 ms for the 8 layers of the rollout
benchmark's model. This path computes the same thing with plain functional calls on the same parameters
(column-parallel linears local, row-parallel ones all-reduced over TP, LoRA adapters added where attached);
tests hold it to the megatron path.
Only megatron's local layer spec with dropout 0 is supported (`supports`); anything else takes the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from megatron_sayo.distributed import shm_collectives
from megatron_sayo.models.lora import delta as lora_delta


def supports(model) -> bool:
    """Whether this stage can take the lean path: local-spec layers, no dropout, no gradients wanted."""
    config = model.config
    return (model.layer_backend == "local" and not torch.is_grad_enabled() and config.hidden_dropout == 0.0
            and not config.sequence_parallel and not getattr(config, "qk_layernorm", False))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension (non-interleaved RoPE, as megatron and transformers)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _with_adapter(out: torch.Tensor, linear, x: torch.Tensor) -> torch.Tensor:
    """`out` plus the linear's LoRA addition for input x, when it has an active adapter."""
    extra = lora_delta(linear, x)
    return out if extra is None else out + extra


def _row_parallel(x: torch.Tensor, linear) -> torch.Tensor:
    """A RowParallelLinear's output: local partial product, summed over TP, then the bias (and adapter)."""
    out = shm_collectives.all_reduce(F.linear(x, linear.weight), parallel_state.get_tensor_model_parallel_group())
    out = out if linear.bias is None else out + linear.bias
    return _with_adapter(out, linear, x)


def _qkv(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Query, key, value [s, b, heads, d] of one layer for normed input x [s, b, h], M-RoPE applied."""
    attn = layer.self_attention
    mixed = _with_adapter(F.linear(x, attn.linear_qkv.weight, attn.linear_qkv.bias), attn.linear_qkv, x)
    s, b, _ = mixed.shape
    groups = attn.num_query_groups_per_partition
    per_group = attn.num_attention_heads_per_partition // groups
    head_dim = attn.hidden_size_per_attention_head
    mixed = mixed.view(s, b, groups, per_group + 2, head_dim)     # megatron packs [q.., k, v] per query group
    query = mixed[:, :, :, :per_group].reshape(s, b, groups * per_group, head_dim)
    key, value = mixed[:, :, :, per_group], mixed[:, :, :, per_group + 1]
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin, value


def _attention(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_mask) -> torch.Tensor:
    """Self-attention of one layer on normed input x [s, b, h]: QKV, M-RoPE, cached core attention, proj."""
    attn = layer.self_attention
    context = attn.core_attention(*_qkv(layer, x, cos, sin), attention_mask)
    return _row_parallel(context, attn.linear_proj)


def _mlp(layer, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP: the fused fc1 weight [gate; up] (per TP rank) as two GEMMs, then fc2 over TP."""
    fc1 = layer.mlp.linear_fc1
    gate_w, up_w = fc1.weight.chunk(2, dim=0)
    gate_b, up_b = fc1.bias.chunk(2) if fc1.bias is not None else (None, None)
    gate, up = F.linear(x, gate_w, gate_b), F.linear(x, up_w, up_b)
    extra = lora_delta(fc1, x)
    if extra is not None:
        d_gate, d_up = extra.chunk(2, dim=-1)
        gate, up = gate + d_gate, up + d_up
    hidden = layer.mlp.config.activation_func(gate) * up
    return _row_parallel(hidden, layer.mlp.linear_fc2)


def run(model, hidden: torch.Tensor | None, rotary_freqs: torch.Tensor,
        attention_mask: torch.Tensor | None) -> torch.Tensor:
    """This stage's layers (and the final norm on the last stage) over hidden [s, b, h]; the KV cache and
    padding mask go to each layer's core attention. Non-first stages read the pipeline's input tensor.
    With AttentionState.probe_only it stops at the probed layer once the probe has measured (the hidden
    states it returns then are not the stage's output)."""
    block = model.decoder
    if hidden is None:
        hidden = block.input_tensor
    cos, sin = rotary_freqs.cos().to(hidden.dtype), rotary_freqs.sin().to(hidden.dtype)
    for layer in block.layers:
        core = layer.self_attention.core_attention
        if core.state.probe_only and core.state.probe_layer == layer.layer_number:
            core.measure(*_qkv(layer, layer.input_layernorm(hidden), cos, sin), attention_mask)
            return hidden    # nothing after the probed attention is wanted
        hidden = hidden + _attention(layer, layer.input_layernorm(hidden), cos, sin, attention_mask)
        hidden = hidden + _mlp(layer, layer.pre_mlp_layernorm(hidden))
    if block.final_layernorm is not None:
        hidden = block.final_layernorm(hidden)
    return hidden
