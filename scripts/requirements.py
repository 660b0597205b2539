"""Print the project's requirements for this interpreter, one per line, leaving out the packages named.

`make venv SYSTEM_TORCH=1` installs what these lines name beside a torch it must not replace (a container's):

    python scripts/requirements.py --extras test --except torch
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


def _normal(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, extras: list[str], excluded: set[str]) -> list[str]:
    """The dependencies and the named extras' requirements, minus those whose distribution name is excluded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"{pyproject}: no extra {unknown} (extras: {sorted(optional)})")
    reqs = list(project["dependencies"]) + [r for e in extras for r in optional[e]]
    dropped = {_normal(n) for n in excluded}
    return [r for r in reqs if _normal(re.match(r"[A-Za-z0-9_.\-]+", r).group()) not in dropped]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extras", default="", help="comma-separated extras to include (e.g. test)")
    parser.add_argument("--except", dest="excluded", default="torch", help="comma-separated names to leave out")
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    args = parser.parse_args()
    extras, excluded = ([x for x in s.split(",") if x] for s in (args.extras, args.excluded))
    print("\n".join(requirements(args.pyproject, extras, set(excluded))))


if __name__ == "__main__":
    main()
