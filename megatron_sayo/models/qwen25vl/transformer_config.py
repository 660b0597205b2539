"""The megatron TransformerConfig of Qwen2.5-VL's decoder, from the typed config read out of config.json."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_sayo.models.qwen25vl.hf_config import ParallelLayout, Qwen25VLConfig, validate_layout


def to_transformer_config(cfg: Qwen25VLConfig, layout: ParallelLayout, *, params_dtype: torch.dtype = torch.float32,
                          recompute: str | None = None, sequence_parallel: bool = False,
                          **overrides):
    """The megatron TransformerConfig of the decoder for this layout (validated first)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    validate_layout(cfg, layout)
    t = cfg.text
    gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=t.num_layers,
        hidden_size=t.hidden_size,
        ffn_hidden_size=t.intermediate_size,
        num_attention_heads=t.num_heads,
        num_query_groups=t.num_kv_heads,
        kv_channels=t.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=t.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        sequence_parallel=sequence_parallel and layout.tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not gpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        share_embeddings_and_output_weights=t.tie_word_embeddings,
    )
    if recompute in ("selective", "full"):
        kwargs.update(recompute_granularity=recompute)
        if recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(overrides)
    share = kwargs.pop("share_embeddings_and_output_weights")
    config = TransformerConfig(**kwargs)
    config.share_embeddings_and_output_weights = share
    return config
