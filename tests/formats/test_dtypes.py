"""The one dtype table against torch and the safetensors library: element sizes, safetensors codes, torch.save
storage classes."""

from __future__ import annotations

import io
import pickletools

import pytest
import torch
from safetensors.torch import _TYPES as SAFETENSORS_TYPES

from megatron_sayo.formats.dtypes import DTYPES, dtype, torch_dtype


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_table_matches_torch_and_safetensors(name):
    d = DTYPES[name]
    t = torch_dtype(name)
    assert t is getattr(torch, name)
    assert d.itemsize == torch.empty((), dtype=t).element_size()
    assert SAFETENSORS_TYPES[d.safetensors] is t
    buf = io.BytesIO()
    torch.save(torch.zeros(2, dtype=t), buf)
    pkl = __import__("zipfile").ZipFile(buf).read("archive/data.pkl")
    globals_ = {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}
    if d.storage == "UntypedStorage":
        assert "torch._utils _rebuild_tensor_v3" in globals_
    else:
        assert f"torch {d.storage}" in globals_


def test_lookup_errors_name_the_choices():
    assert dtype("torch.bfloat16").itemsize == 2
    with pytest.raises(ValueError, match="dtype 'complex64' is not supported.*float32"):
        dtype("complex64")
