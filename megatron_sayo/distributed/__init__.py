"""The distributed runtime: launch environment (torchrun / Slurm), process groups, megatron's pipeline schedules.

`runtime` is the one module that knows whether it runs on CPU or GPU (its shims for megatron-core's hard-coded
CUDA calls live there); `megatron_import`, installed by the package's `__init__`, keeps megatron-core's import
from compiling GPU-only fusions on CPU.
"""
