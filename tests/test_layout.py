"""The package layout holds: no import cycles between its folders, and the torch-free modules import without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "megatron_sayo"

# Modules that must never import torch: the converters, the file formats, the checkpoint directory conventions,
# the HF config / name map / layout they plan from, and the planner.
TORCH_FREE = [
    "megatron_sayo.formats.pickle_writer", "megatron_sayo.formats.torch_save_writer",
    "megatron_sayo.formats.torch_save_reader", "megatron_sayo.formats.dcp_metadata",
    "megatron_sayo.formats.tensor_copy",
    "megatron_sayo.formats.safetensors_files", "megatron_sayo.formats.jsonfiles", "megatron_sayo.formats.dist_writer",
    "megatron_sayo.formats.dtypes", "megatron_sayo.formats.atomic", "megatron_sayo.formats.pickle_guard",
    "megatron_sayo.formats.unpickling",
    "megatron_sayo.convert.lora_export",
    "megatron_sayo.checkpoint.files", "megatron_sayo.convert.hf_to_megatron", "megatron_sayo.convert.megatron_to_hf",
    "megatron_sayo.convert.rectangles", "megatron_sayo.convert.progress",
    "megatron_sayo.models.qwen25vl.hf_config", "megatron_sayo.models.qwen25vl.name_map",
    "megatron_sayo.models.qwen25vl.dist_layout", "megatron_sayo.models.qwen25vl.lora_names", "megatron_sayo.plan",
    "megatron_sayo.memory", "megatron_sayo.distributed.megatron_import",
]


def node(module: str) -> str:
    """The layout unit of a dotted module name: its first folder below the package, or the top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def folder_graph() -> dict[str, set[str]]:
    """unit -> units it imports (every import statement, function-local ones included)."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        me = node(".".join(p for p in rel.parts if p != "__init__"))
        deps = graph.setdefault(me, set())
        for n in ast.walk(ast.parse(path.read_text())):
            names = [n.module] if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 else \
                [a.name for a in n.names] if isinstance(n, ast.Import) else []
            for name in names:
                if name.startswith("megatron_sayo.") and node(name) != me:
                    deps.add(node(name))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m] if m in stack else [n, m]
            if m not in state and (c := visit(m, stack + [m])):
                return c
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n, [n])):
            return c
    return None


def test_no_import_cycles_between_folders():
    graph = folder_graph()
    assert {"formats", "distributed", "checkpoint", "convert", "models", "attention", "data", "inference", "rl",
            "eval", "testing", "config"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle between folders: {' -> '.join(find_cycle(graph))}"


def test_cycle_finder_finds_a_planted_cycle():
    graph = folder_graph()
    graph["formats"] = graph["formats"] | {"rl"}     # rl reaches formats through models
    assert find_cycle(graph) is not None


def packages_without_docstring() -> list[str]:
    """The package __init__.py files under megatron_sayo/ that do not open with a docstring."""
    return [str(p.relative_to(PKG.parent)) for p in sorted(PKG.rglob("__init__.py"))
            if not ast.get_docstring(ast.parse(p.read_text()))]


def test_every_package_says_what_its_folder_is_for():
    assert not packages_without_docstring(), f"package __init__.py without a docstring: {packages_without_docstring()}"


def test_lower_layers_do_not_import_upper_ones():
    graph = folder_graph()
    for low, high in [("formats", "distributed"), ("formats", "models"), ("models", "checkpoint"),
                      ("models", "rl"), ("attention", "rl"), ("data", "rl"), ("rl", "eval"), ("convert", "rl"),
                      ("models", "inference"), ("inference", "rl"), ("inference", "eval"), ("config", "eval")]:
        assert high not in graph[low], f"{low} imports {high}"


@pytest.mark.multiproc
def test_torch_free_modules_import_with_torch_blocked():
    script = f"""
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test: " + name)
sys.meta_path.insert(0, Block())
for m in {TORCH_FREE!r}:
    importlib.import_module(m)
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=PKG.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
