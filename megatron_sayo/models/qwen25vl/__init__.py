"""Qwen2.5-VL on megatron-core: config.json reader, M-RoPE, vision tower, attention, specs, model, name map, layout."""
