"""Which HF modules each LoRA-adapted megatron linear stands for, and the adapters' names and shapes (no torch).

An adapter on a fused megatron linear holds one (A, B) pair per HF module behind it (QKV: q/k/v_proj, fc1:
gate/up_proj), so exported adapters are exactly PEFT's for the HF model. Shapes are HF's: A [rank, in],
B [out, rank]. Megatron parameter `decoder.layers.{i}.<parent>.<linear>_lora.<module>_A|_B`; its
dist-checkpoint key stacks the layers on a leading axis (`decoder.layers.<parent>.<linear>_lora.<module>_A`).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sayo.models.qwen25vl.hf_config import TextConfig


@dataclass(frozen=True)
class LoRATarget:
    """One adaptable megatron linear: its parent module, TP kind and the HF modules it fuses."""

    parent: str                 # 'self_attention' | 'mlp' (megatron), inside each decoder layer
    linear: str                 # megatron linear name, e.g. 'linear_qkv'
    parallel: str               # 'column' (B sharded on the output dim) | 'row' (A sharded on the input dim)
    hf_parent: str              # 'self_attn' | 'mlp' (HF)
    modules: tuple[str, ...]    # HF modules, in the order their outputs are fused

    @property
    def adapter_name(self) -> str:
        return f"{self.linear}_lora"


TARGETS: dict[str, LoRATarget] = {
    "linear_qkv": LoRATarget("self_attention", "linear_qkv", "column", "self_attn", ("q_proj", "k_proj", "v_proj")),
    "linear_proj": LoRATarget("self_attention", "linear_proj", "row", "self_attn", ("o_proj",)),
    "linear_fc1": LoRATarget("mlp", "linear_fc1", "column", "mlp", ("gate_proj", "up_proj")),
    "linear_fc2": LoRATarget("mlp", "linear_fc2", "row", "mlp", ("down_proj",)),
}


def module_shape(text: TextConfig, module: str) -> tuple[int, int]:
    """(out_features, in_features) of one HF decoder linear."""
    h, q, kv, ffn = text.hidden_size, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim, \
        text.intermediate_size
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (ffn, h), "up_proj": (ffn, h), "down_proj": (h, ffn)}
    return shapes[module]


def adapter_shapes(text: TextConfig, module: str, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Full (TP=1) shapes of A and B for one HF module."""
    out, inp = module_shape(text, module)
    return (rank, inp), (out, rank)


def param_name(target: LoRATarget, module: str, which: str, layer: int | None = None) -> str:
    """Megatron name of an adapter matrix (`which` 'A' or 'B'); layer None gives the stacked checkpoint key."""
    where = "decoder.layers" + (f".{layer}" if layer is not None else "")
    return f"{where}.{target.parent}.{target.adapter_name}.{module}_{which}"


def hf_module_path(target: LoRATarget, module: str, layer: int) -> str:
    """The HF module an adapter belongs to, as transformers names it inside Qwen2_5_VLForConditionalGeneration."""
    return f"model.language_model.layers.{layer}.{target.hf_parent}.{module}"


def hf_weight_name(target: LoRATarget, module: str, layer: int) -> str:
    """The hub name of the HF weight an adapter merges into."""
    return f"model.layers.{layer}.{target.hf_parent}.{module}.weight"


def sharded_dim(target: LoRATarget, which: str) -> int | None:
    """The dim of A or B split over TP ranks (None: replicated)."""
    if target.parallel == "column":
        return 0 if which == "B" else None
    return 1 if which == "A" else None


def lora_scale(rank: int, alpha: float) -> float:
    """The factor on B @ A (PEFT's default, non-rsLoRA scaling)."""
    return alpha / rank


def peft_key(target: LoRATarget, module: str, which: str, layer: int) -> str:
    """The key of an adapter matrix in PEFT's adapter_model.safetensors (adapter name dropped, as PEFT saves)."""
    return f"base_model.model.{hf_module_path(target, module, layer)}.lora_{which}.weight"


def peft_target_regex(targets) -> str:
    """PEFT `target_modules` matching exactly the language decoder's adapted modules (the vision tower has
    modules of the same short names, which must stay untouched)."""
    modules = sorted({m for t in targets for m in TARGETS[t].modules})
    return r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(modules) + ")"


def adapter_entries(text: TextConfig, targets, rank: int):
    """(target, module, layer, A shape, B shape) for every adapter of the model, in layer order."""
    for layer in range(text.num_layers):
        for name in targets:
            target = TARGETS[name]
            for module in target.modules:
                a, b = adapter_shapes(text, module, rank)
                yield target, module, layer, a, b
