"""Model code: Qwen2.5-VL on megatron-core (qwen25vl/) and LoRA adapters on its tensor-parallel linears."""
