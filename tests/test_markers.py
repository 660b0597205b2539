"""Every test that starts processes carries the `multiproc` marker, so `-m "not multiproc"` is the in-process
suite: a static scan of each test module finds the tests whose body, or a helper or fixture they use (in the
module or a conftest), calls subprocess, spawns ranks or runs torchrun."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
STARTS = re.compile(r"\b(subprocess\.(run|Popen|call|check_call|check_output)|Popen\(|spawn_local|"
                    r"torch\.distributed\.run|multiprocessing|mp\.spawn|\.Process\(|get_context\(|os\.fork)")


class Scan:
    """Which functions of the test tree start processes, directly or through what they call or request."""

    def __init__(self, files: list[Path]):
        self.sources = {f: f.read_text() for f in files}
        self.functions = {f: self._functions(ast.parse(src)) for f, src in self.sources.items()}
        self.fixtures = {name: (f, node) for f, fs in self.functions.items() if not f.name.startswith("test_")
                         for name, node in fs.items()}
        self.known: dict[tuple[Path, str], bool] = {}

    @staticmethod
    def _functions(tree) -> dict:
        out = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.setdefault(node.name, node)
        return out

    def starts(self, f: Path, node, seen: frozenset = frozenset()) -> bool:
        key = (f, node.name)
        if key in self.known or key in seen:
            return self.known.get(key, False)
        found = bool(STARTS.search(ast.get_source_segment(self.sources[f], node) or ""))
        if not found:
            used = ({n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                    | {a.arg for a in node.args.args + node.args.kwonlyargs})
            local = self.functions[f]
            found = any((name in local and local[name] is not node and self.starts(f, local[name], seen | {key}))
                        or (name in self.fixtures and self.starts(*self.fixtures[name], seen | {key}))
                        for name in used)
        self.known[key] = found
        return found

    def unmarked(self, root: Path = TESTS) -> list[str]:
        """'file::test' of each test that starts processes without @pytest.mark.multiproc (on it or its module)."""
        out = []
        for f, fs in self.functions.items():
            if not f.name.startswith("test_") or "pytestmark" in self.sources[f] and "multiproc" in self.sources[f]:
                continue
            for name, node in fs.items():
                marks = [ast.get_source_segment(self.sources[f], d) or "" for d in node.decorator_list]
                if name.startswith("test_") and self.starts(f, node) and not any("multiproc" in m for m in marks):
                    out.append(f"{f.relative_to(root)}::{name}")
        return out


def test_every_test_that_starts_processes_is_marked_multiproc():
    files = sorted(TESTS.rglob("*.py"))
    unmarked = Scan(files).unmarked()
    assert unmarked == [], "add @pytest.mark.multiproc to:\n" + "\n".join(unmarked)


def test_the_scan_sees_processes_started_through_a_helper_or_fixture(tmp_path):
    (tmp_path / "conftest.py").write_text("import subprocess\nimport pytest\n\n@pytest.fixture\n"
                                          "def server():\n    return subprocess.Popen(['true'])\n")
    (tmp_path / "test_probe.py").write_text(
        "import subprocess, sys\nimport pytest\n\ndef helper():\n    subprocess.run([sys.executable])\n\n"
        "def test_direct():\n    subprocess.run(['true'])\n\ndef test_helper():\n    helper()\n\n"
        "def test_fixture(server):\n    pass\n\n@pytest.mark.multiproc\ndef test_marked():\n    helper()\n\n"
        "def test_plain():\n    assert 1\n")
    unmarked = Scan(sorted(tmp_path.glob("*.py"))).unmarked(tmp_path)
    assert sorted(unmarked) == [f"test_probe.py::test_{n}" for n in ("direct", "fixture", "helper")]
