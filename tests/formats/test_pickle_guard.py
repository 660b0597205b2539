"""The allow-listed pickle check: torch's own pickles of what checkpoints hold pass; a pickle naming any other
global is refused naming the file and the global, and nothing in it runs."""

from __future__ import annotations

import io
import os
import pickle
import random

import numpy as np
import pytest
import torch

from megatron_sayo.formats.pickle_guard import UnsafePickle, check_pickle, check_torch_save


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
