"""megatron_sayo.formats.torch_save_writer against torch itself: our records are torch.save's bytes (but the
telemetry id) and torch.load reads them."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.serialization import config
from torch_reference import SHAPES, load_bytes, raw, sample, torch_save

from megatron_sayo.formats.dtypes import DTYPES
from megatron_sayo.formats.torch_save_writer import object_record, tensor_record

pytestmark = pytest.mark.compat     # in every cell of `make compat` (docs/compat.md)

SERIALIZATION_ID = re.compile(rb"(serialization_idFB..Z*)(\d{40})", re.S)


def mask_id(b: bytes) -> bytes:
    masked, n = SERIALIZATION_ID.subn(lambda m: m.group(1) + b"0" * 40, b)
    assert n == 1
    return masked


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensor_record_is_torch_save(dtype, shape):
    t = sample(dtype, shape)
    head, tail = tensor_record(dtype, shape)
    ours = head + raw(t) + tail
    assert mask_id(ours) == mask_id(torch_save(t))
    back = load_bytes(ours)
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


@pytest.mark.parametrize("dtype", sorted(set(DTYPES) - {"float32", "bfloat16", "float16"}))
def test_tensor_record_other_dtypes(dtype):
    t = sample(dtype, (3, 5), seed=1)
    head, tail = tensor_record(dtype, (3, 5))
    assert DTYPES[dtype].itemsize == t.element_size()
    assert mask_id(head + raw(t) + tail) == mask_id(torch_save(t))
    back = load_bytes(head + raw(t) + tail)
    assert back.dtype == t.dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_serialization_id_is_zeros_and_torch_loads_it():
    """The telemetry id is not reproduced (zeros); everything else is torch's bytes, and torch loads it."""
    head, tail = tensor_record("float32", (2, 3))
    ours = head + raw(torch.ones(2, 3)) + tail
    assert SERIALIZATION_ID.search(ours).group(2) == b"0" * 40
    assert torch.equal(load_bytes(ours), torch.ones(2, 3))


def test_archive_name_of_a_path(tmp_path):
    t = sample("bfloat16", (4, 2))
    torch.save(t, tmp_path / "foo.pt")
    head, tail = tensor_record("bfloat16", (4, 2), archive="foo")
    with config.patch({"save.compute_crc32": False}):
        torch.save(t, tmp_path / "foo.pt")
    assert mask_id(head + raw(t) + tail) == mask_id((tmp_path / "foo.pt").read_bytes())


@pytest.mark.parametrize("obj", [[None], {"a": 1}, {"iteration": 7, "args": (1, "x", 2.5)}], ids=str)
def test_object_record(obj):
    ours = object_record(obj)
    assert load_bytes(ours) == obj
    assert mask_id(ours) == mask_id(torch_save(obj))


def test_bad_inputs_to_writers():
    with pytest.raises(ValueError, match="dtype 'complex64'"):
        tensor_record("complex64", (2,))
    with pytest.raises(ValueError, match="shape"):
        tensor_record("float32", (2, -1))
    with pytest.raises(ValueError, match="torch"):
        object_record([torch.Size([1])])

