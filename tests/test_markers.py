"""Every test that starts processes carries the `multiproc` marker, so `-m "not multiproc"` is the in-process
suite: a static scan finds the tests whose body, or a function or fixture they reach (in the test module, a
conftest, or a project module they import), calls subprocess, spawns ranks or runs torchrun."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
STARTS = re.compile(r"\b(subprocess\.(run|Popen|call|check_call|check_output)|Popen\(|torch\.distributed\.run|"
                    r"multiprocessing|mp\.spawn|\.Process\(|get_context\(|os\.fork)")
# in project code only what starts ranks counts (its subprocess calls, e.g. scontrol, nvidia-smi, are stubbed in tests)
STARTS_RANKS = re.compile(r"\b(spawn_local\(|torch\.distributed\.run|mp\.spawn|\.Process\(|get_context\(\"spawn)")


class Module:
    """One source file: its functions by name and what its imports bind (name -> (module file, attr or None))."""

    def __init__(self, path: Path, root: Path):
        self.path, self.source = path, path.read_text()
        tree = ast.parse(self.source)
        self.functions = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions.setdefault(node.name, node)
        self.imports: dict[str, tuple[Path, str | None]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    as_module = _module_file(root, f"{node.module}.{alias.name}")
                    target = (as_module, None) if as_module else (_module_file(root, node.module), alias.name)
                    if target[0] is not None:
                        self.imports[alias.asname or alias.name] = target
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    found = _module_file(root, alias.name)
                    if found is not None and alias.asname:
                        self.imports[alias.asname] = (found, None)


def _module_file(root: Path, dotted: str) -> Path | None:
    """The project file of a dotted module name (megatron_sayo.x.y, tools.z), or None."""
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


class Scan:
    """Which tests start processes, directly or through what they call or request."""

    def __init__(self, tests: Path, root: Path):
        self.tests, self.root = tests, root
        self.modules: dict[Path, Module] = {}
        self.fixtures = {}
        for path in sorted(tests.rglob("*.py")):
            module = self.module(path)
            if not path.name.startswith("test_"):
                self.fixtures.update({name: (path, node) for name, node in module.functions.items()})
        self.known: dict[tuple[Path, str], bool] = {}

    def module(self, path: Path) -> Module:
        if path not in self.modules:
            self.modules[path] = Module(path, self.root)
        return self.modules[path]

    def starts(self, path: Path, node, seen: frozenset = frozenset()) -> bool:
        key = (path, node.name)
        if key in self.known or key in seen:
            return self.known.get(key, False)
        module, seen = self.module(path), seen | {key}
        pattern = STARTS if path.is_relative_to(self.tests) else STARTS_RANKS
        found = bool(pattern.search(ast.get_source_segment(module.source, node) or ""))
        if not found:
            for target in self._reached(module, node):
                if target[1] is not node and self.starts(*target, seen):
                    found = True
                    break
        self.known[key] = found
        return found

    def _reached(self, module: Module, node):
        """(file, function node) of each function `node` names: same module, imported, module.attr, fixtures."""
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                name = sub.id
                if name in module.functions:
                    yield module.path, module.functions[name]
                elif name in module.imports and module.imports[name][1] is not None:
                    yield from self._function(*module.imports[name])
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                bound = module.imports.get(sub.value.id)
                if bound is not None and bound[1] is None:
                    yield from self._function(bound[0], sub.attr)
        if module.path.is_relative_to(self.tests):
            for arg in node.args.args + node.args.kwonlyargs:
                if arg.arg in self.fixtures:
                    yield self.fixtures[arg.arg]

    def _function(self, path: Path, name: str):
        node = self.module(path).functions.get(name)
        if node is not None:
            yield path, node

    def unmarked(self) -> list[str]:
        """'file::test' of each test that starts processes without @pytest.mark.multiproc (on it or its module)."""
        out = []
        for path in sorted(self.tests.rglob("test_*.py")):
            module = self.module(path)
            if "pytestmark" in module.source and "multiproc" in module.source.split("pytestmark", 1)[1][:200]:
                continue
            for name, node in module.functions.items():
                marks = [ast.get_source_segment(module.source, d) or "" for d in node.decorator_list]
                if name.startswith("test_") and not any("multiproc" in m for m in marks) and self.starts(path, node):
                    out.append(f"{path.relative_to(self.tests)}::{name}")
        return out


def test_every_test_that_starts_processes_is_marked_multiproc():
    unmarked = Scan(TESTS, ROOT).unmarked()
    assert unmarked == [], "add @pytest.mark.multiproc to:\n" + "\n".join(unmarked)


def test_the_scan_sees_processes_started_through_a_helper_a_fixture_or_the_project(tmp_path):
    pkg = tmp_path / "proj"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ranks.py").write_text("import multiprocessing\n\ndef spawn():\n    multiprocessing.Process().start()\n\n"
                                  "def run_all():\n    spawn()\n\ndef pure():\n    return 1\n")
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "conftest.py").write_text("import subprocess\nimport pytest\n\n@pytest.fixture\n"
                                       "def server():\n    return subprocess.Popen(['true'])\n")
    (tests / "test_probe.py").write_text(
        "import subprocess, sys\nimport pytest\nfrom proj import ranks\nfrom proj.ranks import run_all, pure\n\n"
        "def helper():\n    subprocess.run([sys.executable])\n\n"
        "def test_direct():\n    subprocess.run(['true'])\n\ndef test_helper():\n    helper()\n\n"
        "def test_fixture(server):\n    pass\n\ndef test_project_function():\n    run_all()\n\n"
        "def test_project_attribute():\n    ranks.spawn()\n\n@pytest.mark.multiproc\ndef test_marked():\n"
        "    helper()\n\ndef test_plain():\n    assert pure() == 1\n")
    assert sorted(Scan(tests, tmp_path).unmarked()) == [
        f"test_probe.py::test_{n}" for n in ("direct", "fixture", "helper", "project_attribute", "project_function")]


@pytest.mark.multiproc
def test_a_session_lists_tests_that_start_processes_unmarked(tmp_path):
    """tests/conftest.py's guard, in a pytest run of its own: an unmarked test that starts a process is listed at
    the end of the session; a marked one and an in-process one are not."""
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_probe.py").write_text(
        "import subprocess, sys\nimport pytest\n\n"
        "def test_starts():\n    subprocess.run([sys.executable, '-c', '1'])\n\n"
        "@pytest.mark.multiproc\ndef test_marked():\n    subprocess.run([sys.executable, '-c', '1'])\n\n"
        "def test_plain():\n    assert 1\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_probe.py")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout
    listed = done.stdout.split("without @pytest.mark.multiproc", 1)[1].split("\n")
    assert [ln for ln in listed if "test_probe" in ln] == ["test_probe.py::test_starts"], done.stdout
