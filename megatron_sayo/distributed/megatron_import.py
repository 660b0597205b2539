"""How megatron-core is imported: on a machine without CUDA, its fused kernels are left undecorated.

megatron-core wraps its fusions (bias-GeLU, SwiGLU, rotary, ...) in `torch.compile` at import time, which loads
torch's dynamo and inductor (about 1.3 s of each process start on CPU) for kernels that only GPU runs use. This
module is torch-free at import (the package's `__init__` installs it) and acts once, when `megatron.core.jit` is
first imported: without CUDA it calls megatron's own `disable_jit_fuser()` before any fusion is decorated, so the
functions run as plain PyTorch; with CUDA it changes nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

JIT_MODULE = "megatron.core.jit"


class _PlainFusionsOnCpu(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for `megatron.core.jit` it wraps the normal loader's `exec_module`."""

    def find_spec(self, name, path, target=None):
        if name != JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module) -> None:
            load(module)
            if not sys.modules["torch"].cuda.is_available():   # megatron.core.jit has just imported torch
                module.disable_jit_fuser()
        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Put the finder first on `sys.meta_path` (once), unless megatron-core is already imported."""
    if JIT_MODULE in sys.modules or any(isinstance(f, _PlainFusionsOnCpu) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PlainFusionsOnCpu())
