"""LoRA adapters on megatron-core's tensor-parallel linears (docs/spec.md §5: rank 16, alpha 32, every linear).

y = W x + alpha/r * B A x, added to the output of the frozen megatron linear by a forward hook, so the base
keeps its names, checkpoint layout and kernels. TP: on a column-parallel linear A is replicated and B holds
this rank's output rows (the low-rank activation A x is replicated; its gradient is all-reduced over TP, an
r-wide tensor); on a row-parallel linear A holds this rank's input columns and B is replicated (A x is summed
over TP before B). A fused linear (QKV packed by query group, fc1 = [gate; up]) carries one (A, B) pair per
HF module and lays their outputs out as megatron packs the fused output. B starts at zero.
"""

from __future__ import annotations

import contextlib
import math

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from megatron_sayo.models.qwen25vl.lora_names import TARGETS, LoRATarget, adapter_shapes, lora_scale, sharded_dim


def init_a(shape: tuple[int, int], seed: int, layer: int, module: str) -> torch.Tensor:
    """PEFT's A initialisation (kaiming-uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) from a generator
    keyed by (seed, layer, module), so every TP/PP layout starts from the same full matrix."""
    key = sum(ord(c) * 31 ** i for i, c in enumerate(module)) % 1_000_003
    gen = torch.Generator().manual_seed(seed * 1_000_003 * 1009 + layer * 1_000_003 + key)
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def shard_of(full: torch.Tensor, dim: int | None, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's slice of a full adapter matrix along `dim` (None: replicated)."""
    return full if dim is None or tp == 1 else full.chunk(tp, dim=dim)[tp_rank]


class LoRAAdapter(torch.nn.Module):
    """The adapters of one megatron linear on this TP rank: `<module>_A`, `<module>_B` per HF module."""

    def __init__(self, target: LoRATarget, text, *, rank: int, alpha: float, dropout: float, layer: int,
                 seed: int, dtype: torch.dtype, device, sequence_parallel: bool, query_groups: int = 1):
        super().__init__()
        self.target, self.rank, self.scale, self.dropout = target, rank, lora_scale(rank, alpha), dropout
        self.sequence_parallel = sequence_parallel
        self.query_groups = query_groups          # this rank's query groups (QKV layout)
        self.enabled = True
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp, tp_rank = self.tp_group.size(), self.tp_group.rank()
        for module in target.modules:
            a_shape, b_shape = adapter_shapes(text, module, rank)
            a = shard_of(init_a(a_shape, seed, layer, module), sharded_dim(target, "A"), tp_rank, tp)
            b = shard_of(torch.zeros(b_shape), sharded_dim(target, "B"), tp_rank, tp)
            for which, value in (("A", a), ("B", b)):
                param = torch.nn.Parameter(value.to(device=device, dtype=dtype).contiguous())
                dim = sharded_dim(target, which)
                if dim is not None:
                    tensor_parallel.set_tensor_model_parallel_attributes(param, True, dim, 1)
                elif sequence_parallel:
                    # this matrix sees only this rank's sequence chunk: megatron sums its grad over TP
                    param.sequence_parallel = True
                self.register_parameter(f"{module}_{which}", param)

    def matrices(self, which: str) -> list[torch.Tensor]:
        return [getattr(self, f"{m}_{which}") for m in self.target.modules]

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dropout or not self.training:
            return x
        if self.target.parallel == "row" and torch.cuda.is_available():
            with tensor_parallel.get_cuda_rng_tracker().fork():   # x is sharded: each rank its own mask
                return torch.nn.functional.dropout(x, self.dropout, True)
        return torch.nn.functional.dropout(x, self.dropout, True)  # replicated x: the same mask on every rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's addition to the linear's (local) output for input x as the linear receives it."""
        x = self._dropped(x)
        if self.target.parallel == "row":
            (a,), (b,) = self.matrices("A"), self.matrices("B")
            low = torch.nn.functional.linear(x, a)                   # partial sum over this rank's inputs
            if self.sequence_parallel:
                low = tensor_parallel.reduce_scatter_to_sequence_parallel_region(low, group=self.tp_group)
            else:
                low = tensor_parallel.reduce_from_tensor_model_parallel_region(low, group=self.tp_group)
            return torch.nn.functional.linear(low, b) * self.scale
        low = torch.nn.functional.linear(x, torch.cat(self.matrices("A")))   # [.., r * modules], replicated
        if self.sequence_parallel:
            low = tensor_parallel.gather_from_sequence_parallel_region(low, group=self.tp_group)
        else:
            low = tensor_parallel.copy_to_tensor_model_parallel_region(low, group=self.tp_group)
        parts = [torch.nn.functional.linear(piece, b) for piece, b in zip(low.split(self.rank, -1),
                                                                          self.matrices("B"))]
        return fuse_outputs(self.target, parts, self.query_groups) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """dist_checkpointing view: the split matrices sharded on their TP dim, the others replicated."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        axes = {f"{m}_{w}": sharded_dim(self.target, w) for m in self.target.modules for w in "AB"}
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {k: d for k, d in axes.items() if d is not None},
            sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])


def fuse_outputs(target: LoRATarget, parts: list[torch.Tensor], query_groups: int) -> torch.Tensor:
    """Per-HF-module outputs laid out as the fused megatron linear's local output: QKV interleaved per query
    group [q heads of the group, k, v]; fc1 [gate; up]."""
    if len(parts) == 1:
        return parts[0]
    if target.linear == "linear_qkv":
        lead = parts[0].shape[:-1]
        grouped = [p.reshape(*lead, query_groups, p.shape[-1] // query_groups) for p in parts]
        return torch.cat(grouped, dim=-1).reshape(*lead, -1)
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Attaching to a model, switching off, freezing
# ----------------------------------------------------------------------------------------------------------

def _add_delta(linear, args, kwargs, output):
    """Forward hook on a megatron linear: output (y, bias) -> (y + adapter(x), bias)."""
    adapter = linear.__dict__["lora_adapter"]
    if not adapter.enabled:
        return output
    y, bias = output
    return y + adapter(args[0] if args else kwargs["input_"]), bias


def attach_lora(model, text, *, rank: int, alpha: float, dropout: float = 0.0, targets=tuple(TARGETS),
                seed: int = 0) -> list[LoRAAdapter]:
    """Add adapters to the named linears of every decoder layer of this stage and freeze everything else.

    Call after the base weights are loaded and before DDP/optimizer are built (only adapters train).
    """
    config = model.config
    device = next(model.parameters()).device
    adapters = []
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.decoder.layers:
        for name in targets:
            target = TARGETS[name]
            parent = getattr(layer, target.parent)
            if hasattr(parent, target.adapter_name):
                raise RuntimeError(f"layer {layer.layer_number - 1}: {target.linear} already has a LoRA adapter")
            groups = getattr(parent, "num_query_groups_per_partition", 1)
            adapter = LoRAAdapter(target, text, rank=rank, alpha=alpha, dropout=dropout, layer=layer.layer_number - 1,
                                  seed=seed, dtype=config.params_dtype, device=device,
                                  sequence_parallel=config.sequence_parallel, query_groups=groups)
            parent.add_module(target.adapter_name, adapter)
            linear = getattr(parent, target.linear)
            linear.__dict__["lora_adapter"] = adapter      # not a submodule: the parent owns it
            linear.register_forward_hook(_add_delta, with_kwargs=True)
            adapters.append(adapter)
    return adapters


def adapters_of(model) -> list[LoRAAdapter]:
    return [m for m in model.modules() if isinstance(m, LoRAAdapter)]


def delta(linear, x: torch.Tensor) -> torch.Tensor | None:
    """The adapter's addition for a linear called outside its forward (the lean KV-cached decoder), or None."""
    adapter = linear.__dict__.get("lora_adapter")
    return adapter(x) if adapter is not None and adapter.enabled else None


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model: every adapter of `model` off inside the block (the reference policy, no second copy)."""
    adapters = adapters_of(model)
    saved = [a.enabled for a in adapters]
    for a in adapters:
        a.enabled = False
    try:
        yield model
    finally:
        for a, s in zip(adapters, saved):
            a.enabled = s


def is_adapter_key(key: str) -> bool:
    """Whether a (sharded) state-dict key names an adapter matrix."""
    return any(f".{t.adapter_name}." in key for t in TARGETS.values())


def trainable_parameters(model) -> int:
    """Count of this stage's parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def local_adapters(model) -> dict[str, torch.Tensor]:
    """This rank's adapter matrices by global megatron name (layer index made global)."""
    return {model.global_param_name(n): p for n, p in model.named_parameters() if is_adapter_key(n)}


def load_full_adapters(model, full: dict[str, torch.Tensor]) -> None:
    """Fill this rank's adapters from full (TP=1, HF-shaped) matrices keyed by global megatron name."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for name, param in local_adapters(model).items():
        if name not in full:
            raise KeyError(f"adapter '{name}' missing from the given matrices")
        target = next(t for t in TARGETS.values() if f".{t.adapter_name}." in name)
        value = shard_of(full[name], sharded_dim(target, name[-1]), tp_group.rank(), tp_group.size())
        if value.shape != param.shape:
            raise ValueError(f"adapter '{name}': full matrix gives {tuple(value.shape)} on this rank, "
                             f"expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value)
