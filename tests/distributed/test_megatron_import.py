"""distributed/megatron_import: without CUDA, megatron-core's fusions are imported undecorated (no dynamo, no
inductor at start-up); with CUDA, megatron's own `torch.compile` decoration is left as it is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import torch
if sys.argv[1] == "cuda":
    torch.cuda.is_available = lambda: True      # what a GPU machine answers; nothing here runs on it
if sys.argv[2] == "package-first":
    import megatron_sayo
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_geglu
plain = fused_bias_geglu.geglu.__code__.co_filename.endswith("fused_bias_geglu.py")   # not dynamo's wrapper
print(json.dumps({"fuser": jit.jit_fuser.__name__, "geglu_plain": plain,
                  "dynamo": "torch._dynamo" in sys.modules, "inductor": "torch._inductor.compile_fx" in sys.modules}))
"""


def probe(device: str, order: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, device, order], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.multiproc
def test_without_cuda_the_fusions_are_plain_functions():
    megatron_alone = probe("cpu", "megatron-alone")       # the reference: megatron's own import
    assert megatron_alone == {"fuser": "compile", "geglu_plain": False, "dynamo": True, "inductor": True}, \
        megatron_alone
    ours = probe("cpu", "package-first")
    assert ours == {"fuser": "noop_decorator", "geglu_plain": True, "dynamo": False, "inductor": False}, ours


@pytest.mark.multiproc
def test_with_cuda_megatron_keeps_its_compiled_fusions():
    ours = probe("cuda", "package-first")
    assert ours == probe("cuda", "megatron-alone") and ours["fuser"] == "compile" and not ours["geglu_plain"], ours
