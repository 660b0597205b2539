"""The one dtype table: each dtype's name (torch's), element size, torch.save storage class and safetensors
code. Torch-free; `torch_dtype` imports torch only when called."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """A torch dtype as torch.save and safetensors name it."""

    name: str           # torch's name: "bfloat16"
    itemsize: int       # bytes per element
    storage: str        # storage class in torch.save pickles; "UntypedStorage" for dtypes torch saves via v3
    safetensors: str    # safetensors' name: "BF16"


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float64", 8, "DoubleStorage", "F64"),
    DType("float32", 4, "FloatStorage", "F32"),
    DType("bfloat16", 2, "BFloat16Storage", "BF16"),
    DType("float16", 2, "HalfStorage", "F16"),
    DType("int64", 8, "LongStorage", "I64"),
    DType("int32", 4, "IntStorage", "I32"),
    DType("int16", 2, "ShortStorage", "I16"),
    DType("int8", 1, "CharStorage", "I8"),
    DType("uint8", 1, "ByteStorage", "U8"),
    DType("bool", 1, "BoolStorage", "BOOL"),
    DType("float8_e4m3fn", 1, "UntypedStorage", "F8_E4M3"),
    DType("float8_e5m2", 1, "UntypedStorage", "F8_E5M2"),
)}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")    # parameter dtypes: what models train in and casts convert


def dtype(name: str) -> DType:
    """The DType called `name` (a "torch." prefix is allowed), or ValueError listing the known ones."""
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported (known: {', '.join(DTYPES)})")
    return DTYPES[name]


def torch_dtype(name: str):
    """torch's dtype object for a name of the table (imports torch)."""
    import torch

    return getattr(torch, dtype(name).name)
