"""The allow-listed pickle check: torch's own pickles of what checkpoints hold pass; a pickle naming any other
global is refused naming the file and the global, and nothing in it runs."""

from __future__ import annotations

import base64
import collections
import io
import json
import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING
from torch.distributed.checkpoint.planner import WriteItemType

from megatron_sayo.formats.pickle_guard import ENUM_MEMBERS, UnsafePickle, check_pickle, check_torch_save

pytestmark = pytest.mark.compat     # in every cell of `make compat` (docs/compat.md)


class _Touch:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_contents_pass(tmp_path):
    """What torch.save writes for optimizer / RNG / scheduler state (the pickles megatron and DCP load)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    opt.step()
    state = {"rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
             "optimizer": opt.state_dict(), "bf16": torch.zeros(2, dtype=torch.bfloat16), "size": torch.Size([2])}
    torch.save(state, tmp_path / "state.pt")
    with open(tmp_path / "state.pt", "rb") as f:
        check_torch_save(f.fileno(), "state.pt")
    check_pickle(pickle.dumps({"a": [1, 2.0, "x", None, (True,)]}), "plain")


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_command_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if how == "pickle":
        path.write_bytes(pickle.dumps({"ok": [1], "evil": _Touch(marker)}))
        check = lambda: check_pickle(path.read_bytes(), str(path))     # noqa: E731
    else:
        torch.save({"ok": torch.ones(2), "evil": _Touch(marker)}, path)
        check = lambda: check_torch_save(os.open(path, os.O_RDONLY), str(path))   # noqa: E731
    with pytest.raises(UnsafePickle, match=rf"{path}.*global posix\.system"):
        check()
    assert not marker.exists()


def test_allowed_torch_save_and_a_record_inside_a_bigger_file(tmp_path):
    buf = io.BytesIO()
    torch.save({"rng": np.random.get_state(), "t": torch.arange(3)}, buf)
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100 + buf.getvalue() + b"y" * 50)
    with open(path, "rb") as f:
        check_torch_save(f.fileno(), "record", 100, len(buf.getvalue()))
        with pytest.raises(ValueError, match="not a torch.save record"):
            check_torch_save(f.fileno(), "record", 0, 100)


@pytest.mark.parametrize("data", [b"garbage", pickle.dumps(1)[:-1], b"(" * 100000])
def test_unreadable_pickles_are_errors_not_crashes(data):
    with pytest.raises(ValueError, match="not a pickle we can check|too deep"):
        check_pickle(data, "x")


# ------------------------------------------------------------------ what every supported Python writes

SAMPLES = sorted((Path(__file__).parent / "pickle_samples").glob("*.json"))


def sample_pickles(path: Path) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in json.loads(path.read_text())["pickles"].items()}


def check_sample(name: str, data: bytes, where: str) -> None:
    if name.startswith("torch.save/"):
        with tempfile.NamedTemporaryFile() as f:
            f.write(data)
            f.flush()
            check_torch_save(f.fileno(), where)
    else:
        check_pickle(data, where)


def test_samples_cover_every_supported_python():
    """The samples were written by `make compat` in each cell: 3.11.2 (getattr enums), 3.11.7 and 3.13."""
    pythons = {p.name.split("-")[0] for p in SAMPLES}
    assert {"python3.11.2", "python3.11.7"} <= pythons and any(v.startswith("python3.13") for v in pythons)
    old = sample_pickles(next(p for p in SAMPLES if p.name.startswith("python3.11.2-")))
    assert b"getattr" in old["megatron/.metadata"], "3.11.2 pickles DCP's enum through getattr: the case to allow"


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_what_each_supported_python_writes_passes(path):
    for name, data in sample_pickles(path).items():
        check_sample(name, data, f"{path.name}:{name}")


def test_enum_members_are_torchs():
    """ENUM_MEMBERS names exactly the members of the enum classes this torch's DCP pickles."""
    from torch.distributed.checkpoint import metadata, planner

    for cls in (metadata._MEM_FORMAT_ENCODING, planner.WriteItemType, planner.LoadItemType):
        assert ENUM_MEMBERS[(cls.__module__, cls.__name__)] == {m.name for m in cls}


class _GetAttr:
    """Pickles as getattr(*args), the form early Python 3.11 releases give an enum member."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return getattr, self.args


@pytest.mark.parametrize("args,shown", [
    ((_MEM_FORMAT_ENCODING, "__class__"), "_MEM_FORMAT_ENCODING, '__class__'"),     # allowed class, not a member
    ((collections.OrderedDict, "fromkeys"), "collections.OrderedDict, 'fromkeys'"),  # allowed global, no enum
    ((WriteItemType, "TENSOR", None), "WriteItemType, 'TENSOR'"),                   # a third argument
    ((WriteItemType, 3), "WriteItemType, 3"),                                      # not a name
], ids=["not-a-member", "not-an-enum", "three-args", "not-a-name"])
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_getattr_other_than_an_enum_member_is_refused(args, shown, protocol):
    data = pickle.dumps({"ok": [1], "x": _GetAttr(*args)}, protocol)
    with pytest.raises(UnsafePickle, match=rf"builtins\.getattr on \(.*{re.escape(shown)}"):
        check_pickle(data, "crafted")


def test_getattr_on_a_refused_global_names_that_global():
    data = pickle.dumps(_GetAttr(os.system, "__call__"))
    with pytest.raises(UnsafePickle, match=r"global posix\.system"):
        check_pickle(data, "crafted")
