"""Print the project's requirements for this interpreter, one per line, leaving out the packages named.

`make venv SYSTEM_TORCH=1` installs what these lines name beside a torch it must not replace (a container's),
pinned by the constraint `--keep-installed torch` prints (with a warning when that torch lies outside our range):

    python scripts/requirements.py --extras test --except torch
    python scripts/requirements.py --keep-installed torch
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
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


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version ("2.10.0a0+nv25.10" -> (2, 10, 0))."""
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def outside_range(pyproject: Path, name: str, version: str) -> str | None:
    """Why `version` of `name` lies outside the project's >= / < bounds for it (None when inside)."""
    for req in requirements(pyproject, [], set()):
        if _normal(re.match(r"[A-Za-z0-9_.\-]+", req).group()) != _normal(name):
            continue
        for op, bound in re.findall(r"(>=|<)\s*([0-9][0-9.]*)", req.split(";")[0]):
            ours, theirs = _release(version), _release(bound)
            if (op == ">=" and ours < theirs) or (op == "<" and ours[:len(theirs)] >= theirs):
                return f"{name} {version} lies outside the proven range {req!r} (docs/compat.md)"
    return None


def keep_installed(pyproject: Path, name: str) -> str:
    """A pip constraint pinning the installed `name`, warning on stderr when it lies outside our range."""
    from importlib.metadata import version

    installed = version(name)
    problem = outside_range(pyproject, name, installed)
    if problem:
        print(f"warning: {problem}; kept, as asked", file=sys.stderr)
    return f"{name}=={installed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extras", default="", help="comma-separated extras to include (e.g. test)")
    parser.add_argument("--except", dest="excluded", default="torch", help="comma-separated names to leave out")
    parser.add_argument("--keep-installed", metavar="NAME", help="print a constraint pinning the installed NAME")
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml",
                        help="the project file to read (default: this repository's)")
    args = parser.parse_args()
    if args.keep_installed:
        print(keep_installed(args.pyproject, args.keep_installed))
        return
    extras, excluded = ([x for x in s.split(",") if x] for s in (args.extras, args.excluded))
    print("\n".join(requirements(args.pyproject, extras, set(excluded))))


if __name__ == "__main__":
    main()
