"""scripts/requirements.py (what `make venv SYSTEM_TORCH=1` installs beside a kept torch) against the installed
package's own metadata and packaging's specifier logic."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import requirements  # noqa: E402

PYPROJECT = ROOT / "pyproject.toml"


def as_set(reqs, extra: str | None = None) -> set[tuple[str, str, str]]:
    """(name, specifier, marker without the extra clause) of each requirement."""
    out = set()
    for r in map(Requirement, reqs):
        marker = str(r.marker or "")
        if 'extra == "' in marker:
            if f'extra == "{extra}"' not in marker:
                continue
            marker = ""
        out.add((r.name.lower(), str(r.specifier), marker))
    return out


@pytest.mark.parametrize("extra", [None, "test", "eval"])
def test_lists_what_the_installed_metadata_requires_minus_torch(extra):
    ours = requirements.requirements(PYPROJECT, [extra] if extra else [], {"torch"})
    expected = {r for r in as_set(requires("megatron_sayo"), extra) if r[0] != "torch"}
    assert as_set(ours) == expected and all(not r.startswith("torch") for r in ours)


@pytest.mark.parametrize("version", ["2.12.9", "2.13.0", "2.13.0+cpu", "2.14.1", "2.14.1+cu130", "2.15.0",
                                     "2.10.0a0+nv25.10", "3.0.0"])
def test_torch_range_verdict_matches_packaging(version):
    torch_req = next(Requirement(r) for r in requires("megatron_sayo") if r.startswith("torch"))
    inside = Version(version) in torch_req.specifier.__class__(str(torch_req.specifier), prereleases=True)
    assert (requirements.outside_range(PYPROJECT, "torch", version) is None) == inside


@pytest.mark.multiproc
def test_cli_keeps_the_installed_torch_and_refuses_an_unknown_extra():
    # pip's own record of the installed version (a constraint is matched against it; PyPI's CUDA wheels record
    # 2.13.0 where torch.__version__ says 2.13.0+cu130)
    shown = subprocess.run([sys.executable, "-m", "pip", "show", "torch"], capture_output=True, text=True, check=True)
    installed = next(line.split(":", 1)[1].strip() for line in shown.stdout.splitlines() if line.startswith("Version:"))
    done = subprocess.run([sys.executable, "scripts/requirements.py", "--keep-installed", "torch"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"torch=={installed}" and done.stderr == ""
    bad = subprocess.run([sys.executable, "scripts/requirements.py", "--extras", "nope"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no extra ['nope']" in bad.stderr
