"""load_restricted: the one failure rule of the restricted unpicklers."""

from __future__ import annotations

import io
import pickle

import pytest

from megatron_sayo.formats.unpickling import load_restricted


class _Refusing(pickle.Unpickler):
    def find_class(self, module, name):
        raise ValueError(f"refused {module}.{name}")


def test_a_good_pickle_loads():
    data = pickle.dumps({"a": [1, 2.5, "x"]})
    assert load_restricted(pickle.Unpickler(io.BytesIO(data)), "x.pkl") == {"a": [1, 2.5, "x"]}


def test_truncated_pickle_becomes_a_value_error_naming_the_file():
    data = pickle.dumps(list(range(100)))[:-7]
    with pytest.raises(ValueError, match=r"^x\.pkl: (UnpicklingError|EOFError): "):
        load_restricted(pickle.Unpickler(io.BytesIO(data)), "x.pkl")


def test_the_unpicklers_own_value_error_passes_unchanged():
    data = pickle.dumps(io.BytesIO)
    with pytest.raises(ValueError, match=r"^refused _io\.BytesIO$"):
        load_restricted(_Refusing(io.BytesIO(data)), "x.pkl")
