"""console.setup: at the default level other libraries' INFO lines and the known warnings are hidden while this
project's INFO lines stay; --log-level info brings the libraries' lines back."""

from __future__ import annotations

import logging
import warnings

import pytest

from megatron_sayo import console


@pytest.fixture
def restore_logging():
    saved = {name: logging.getLogger(name).level for name in (*console.LIBRARIES, "megatron_sayo", "")}
    with warnings.catch_warnings():
        yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("level, library_shown", [("warning", False), ("info", True)])
def test_library_noise_follows_the_level(restore_logging, level, library_shown):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")     # pytest's own filters out of the way; console's go in front of it
        console.setup(level)
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning, stacklevel=1)
        warnings.warn("something new", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == (["Apex is not installed. Falling back to Torch Norm"]
                                                if library_shown else []) + ["something new"]
    bucket = logging.getLogger("megatron.core.distributed.param_and_grad_buffer")
    assert bucket.isEnabledFor(logging.INFO) is library_shown
    assert logging.getLogger("megatron_sayo.train").isEnabledFor(logging.INFO)


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="log level must be one of debug, info, warning, error"):
        console.setup("loud")
