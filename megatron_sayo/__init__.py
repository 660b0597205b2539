"""megatron_sayo: SAYO attention-reward GRPO for Qwen2.5-VL on megatron-core."""

import warnings

# megatron-core announces at import that the optional GPU kernels are absent; on CPU that is expected.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from megatron_sayo.distributed import megatron_import  # noqa: E402

megatron_import.install()
