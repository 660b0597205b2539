"""Decoder layer specs: megatron's local (pure PyTorch) layer or Transformer Engine's, with our core attention."""

from __future__ import annotations

import functools

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_sayo.models.qwen25vl.attention import CoreAttention

LAYER_BACKENDS = ("local", "te")


def decoder_layer_spec(layer_backend: str = "local", attention_backend: str = "sdpa",
                       mass_kernel: str = "auto") -> ModuleSpec:
    """A TransformerLayer spec (RMSNorm, QKV bias, SwiGLU) whose core attention is `CoreAttention`.

    'local' builds megatron's own TP layers (CPU and GPU); 'te' fuses RMSNorm into the QKV / fc1 linears
    with Transformer Engine (GPU only). Checkpoint keys are the same for both (megatron maps them).
    """
    if layer_backend == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    elif layer_backend == "te":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("model.layer_backend 'te' needs transformer-engine (GPU machines only: "
                               "pip install 'megatron_sayo[gpu]' --no-build-isolation)") from exc
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
    else:
        raise ValueError(f"model.layer_backend: {layer_backend!r} is not one of {LAYER_BACKENDS}")
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        CoreAttention, backend=attention_backend, mass_kernel=mass_kernel)
    return spec
