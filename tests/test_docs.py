"""README.md and docs/*.md name only things that exist (as Megatron-Bridge checks its README).

For every page: each repository path exists; each `python -m X` module resolves to a file; each `--flag` after a
tool of ours is one that tool's argparse defines (read from its source with ast; shell scripts: the flag is in the
script's text), and a `--flag` named outside a command is defined by some tool of ours; each `make X` is a Makefile
target; each dotted config key (`rollout.group_size`, `train.steps=500`) resolves in megatron_sayo/config/schema.py's
dataclasses. For README.md also: it is at most 12 KB, and every command in its code blocks is one that a test or
script runs (its tool, and each of its flags, appear in a file of tests/, scripts/, .ci/, mk/, slurm/ or the
Makefile that names the tool). What cannot be checked here is in the commented allow-lists below.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import re
import subprocess
import sys
import typing
from functools import cache
from pathlib import Path

import pytest

from megatron_sayo import config as run_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 12 * 1024
# top-level folders whose paths must exist; a path starting with a package folder (rl/loss.py) is tried under
# megatron_sayo/ too
TOP = ("megatron_sayo", "tools", "scripts", "slurm", "examples", "benchmarks", "docs", "tests", "mk", ".ci")
PACKAGES = tuple(p.name for p in (ROOT / "megatron_sayo").iterdir() if (p / "__init__.py").exists())
# where "a test or script runs it" is looked for
RUNNERS = ["tests/**/*.py", "scripts/*", ".ci/*", "mk/*", "slurm/*", "Makefile"]
# command words that start a command line in a code block or an inline span
COMMANDS = {"python", "torchrun", "make", "sbatch", "pip", "bash", "srun"}
# files named by a page that are not ours (the SAYO authors' code, megatron-core's) or are written by a run
NOT_OURS = {"utils/pre_processor_data.py", "torch_norm.py",
            "eval/utils/data_loaders.py", "eval/utils/processing.py", "eval/score.py"}  # the SAYO authors' repository
# `python -m` modules that are not ours
EXTERNAL_MODULES = {"pytest", "pip", "venv", "torch.distributed.run"}
# flags named outside a command that belong to other programs: sbatch/srun (docs/slurm.md), pip, pytest, torchrun
EXTERNAL_FLAGS = {
    "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time", "--signal", "--output",
    "--requeue", "--open-mode", "--partition", "--account", "--kill-on-bad-exit", "--container-image",
    "--container-mounts", "--container-workdir", "--batch", "--index-url", "--no-build-isolation", "--no-deps",
    "--durations", "--strict-markers", "--nproc-per-node", "--nnodes", "--system-site-packages", "--gres",
    "--no-requeue",
}
# inline spans that start with another program: their flags are that program's (docs/eval.md's download)
EXTERNAL_PROGRAMS = {"huggingface-cli", "scancel", "scontrol", "sinfo", "squeue", "git"}
# README commands no test can run here: pip is not ours (the Makefile's venv target runs the same installs);
# sbatch needs a GPU cluster (tests/slurm runs the scripts on a local CPU Slurm, with other arguments)
README_NOT_RUN = {"pip", "sbatch"}
# README lines that test_readme_quickstart_data_commands (below) runs as written
QUICKSTART_RUN = ("python -m megatron_sayo.data.synthetic", "python -m megatron_sayo.data.validate")


# ---------------------------------------------------------------- reading the pages


def code_lines(text: str) -> list[str]:
    """Lines of indented (4+ spaces) and fenced code blocks, backslash continuations joined, comments cut."""
    out, fenced, in_block, prev_blank = [], False, False, True
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        indented = line.startswith("    ") and (prev_blank or in_block)
        in_block = bool(line.strip()) and (fenced or indented) or (in_block and not line.strip())
        if (fenced or indented) and line.strip():
            out.append(line.strip())
        prev_blank = not line.strip()
    joined: list[str] = []
    for line in out:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line
        else:
            joined.append(line)
    return [re.sub(r"\s+#.*$", "", line) for line in joined if not line.startswith("#")]


def inline_spans(text: str) -> list[str]:
    """The `code` spans outside code blocks."""
    prose = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    return re.findall(r"`([^`\n]+)`", prose)


def tokens(command: str) -> list[str]:
    """Words of a command, with quotes, brackets and alternatives split off ([--a X|--b Y] -> --a X --b Y)."""
    return [t for t in re.split(r"[\s\[\]|()\"'<>]+", command) if t]


def strip_env(words: list[str]) -> list[str]:
    """Drop leading VAR=value assignments (a bare DATA="..." line leaves nothing: not a command)."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        words = words[1:]
    return words


def is_command(line: str) -> bool:
    words = strip_env(tokens(line))
    return bool(words) and (words[0] in COMMANDS or words[0].startswith(("tools/", "scripts/", "slurm/")))


# ---------------------------------------------------------------- what exists


@cache
def argparse_flags(path: Path) -> frozenset[str]:
    """--flag string constants (add_argument's, hand-parsed ones) in a file and in the megatron_sayo modules it
    imports (one level)."""
    files = [path]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_sayo"):
            files += [f for f in (module_file(node.module),) if f]
            files += [f for a in node.names if (f := module_file(f"{node.module}.{a.name}"))]
    flags = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            # add_argument("--x", ...), or a hand-parsed one: a constant "--x" (config/__main__: args == ["--markdown"])
            if isinstance(node, ast.Constant) and re.fullmatch(r"--[a-z][a-z0-9-]*", str(node.value)):
                flags.add(node.value)
    return frozenset(flags)


def module_file(module: str) -> Path | None:
    base = ROOT / module.replace(".", "/")
    for f in (base.with_suffix(".py"), base / "__main__.py", base / "__init__.py"):
        if f.exists():
            return f
    return None


def tool_flags(tool: str) -> frozenset[str]:
    """Flags of a tool: a module name, or a repo script (.py: argparse; shell: the words in its text)."""
    path = module_file(tool) if not tool.endswith((".py", ".sh", ".sbatch")) else ROOT / tool
    if path is None or not path.exists():
        return frozenset()
    if path.suffix == ".py":
        return argparse_flags(path)
    text = path.read_text()
    if path.suffix == ".sbatch":  # the batch scripts hand their arguments to launch.sh and from there to tools
        text += (ROOT / "slurm/launch.sh").read_text()
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", text)) | all_flags()


@cache
def all_flags() -> frozenset[str]:
    files = [p for d in ("megatron_sayo", "tools", "scripts", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    flags = set().union(*(argparse_flags(p) for p in files))
    for sh in [*(ROOT / "scripts").glob("*.sh"), *(ROOT / "slurm").glob("*")]:
        flags |= set(re.findall(r"--[a-z][a-z0-9-]*", sh.read_text()))
    return frozenset(flags)


@cache
def make_targets() -> frozenset[str]:
    text = "\n".join(p.read_text() for p in [ROOT / "Makefile", *(ROOT / "mk").glob("*.mk")])
    return frozenset(re.findall(r"^([\w-]+):", text, re.M))


@cache
def repo_basenames() -> frozenset[str]:
    return frozenset(p.name for d in TOP for p in (ROOT / d).rglob("*.py"))


def config_key_ok(key: str) -> bool:
    """Does a dotted key resolve through RunConfig's dataclasses? (a dict-typed field takes any sub-key)"""
    cls: typing.Any = run_config.RunConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return typing.get_origin(cls) is dict or cls is dict
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return True


CONFIG_SECTIONS = {f.name for f in dataclasses.fields(run_config.RunConfig)}
FILE_SUFFIXES = ("py", "json", "jsonl", "yaml", "md", "png", "pt", "parquet", "txt", "log", "sh", "safetensors")


def tool_of(words: list[str]) -> tuple[str | None, int]:
    """The tool of ours a command runs, and the index of its word: `-m module` or a repo script."""
    for i, w in enumerate(words):
        if i and words[i - 1] == "-m":
            return w, i
        if w.startswith(("tools/", "scripts/", "slurm/", "benchmarks/")):
            return w, i
    return None, -1


# ---------------------------------------------------------------- the checks


def check_page(name: str, text: str) -> list[str]:
    """Every problem of one page, as `page: what`."""
    problems: list[str] = []
    code = code_lines(text)
    spans = inline_spans(text)
    commands = [c for c in code + spans if is_command(c)]
    # paths
    for word in itertools.chain.from_iterable(tokens(c) for c in code + spans):
        word = word.strip(".,;:")
        for path in expand_braces(word):
            if not path_ok(path):
                problems.append(f"{name}: no such path {path!r}")
    # modules and flags of commands
    for command in commands:
        words = strip_env(tokens(command))
        if words[0] == "make":
            target = next((w for w in words[1:] if "=" not in w and not w.startswith("-")), None)
            if target and target not in make_targets():
                problems.append(f"{name}: no make target {target!r} ({command})")
            continue
        tool, at = tool_of(words)
        if tool is None:
            continue
        if words[at - 1] == "-m" and tool not in EXTERNAL_MODULES and module_file(tool) is None:
            problems.append(f"{name}: no module {tool!r} ({command})")
            continue
        known = tool_flags(tool)
        for w in words[at + 1:]:
            flag = w.split("=")[0]
            if flag.startswith("--") and flag not in known:
                problems.append(f"{name}: {tool} has no flag {flag!r} ({command})")
    # flags named outside a command
    for span in spans:
        if not is_command(span) and span.split()[0] not in EXTERNAL_PROGRAMS:
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span):
                if flag not in all_flags() and flag not in EXTERNAL_FLAGS:
                    problems.append(f"{name}: no tool defines {flag!r} (`{span}`)")
    # config keys: `key`, `key=value`, `key: value` spans and key=value words of code lines
    keys = [m.group(1) for s in spans if (m := re.fullmatch(r"([a-z_]+(?:\.[a-z_0-9]+)+)(?:\s*[=:].*)?", s))]
    keys += [w.split("=")[0] for c in code for w in tokens(c) if re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+=\S*", w)]
    for key in keys:
        if key.split(".")[0] in CONFIG_SECTIONS and key.rsplit(".")[-1] not in FILE_SUFFIXES:
            if not config_key_ok(key):
                problems.append(f"{name}: no config key {key!r}")
    return problems


def expand_braces(word: str) -> list[str]:
    m = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not m:
        return [word]
    return [x for alt in m.group(1).split(",") for x in expand_braces(word[:m.start()] + alt + word[m.end():])]


def path_ok(word: str) -> bool:
    """True unless the word names a repository path (or one of our .py files) that does not exist."""
    if any(c in word for c in "<>$") or "..." in word or word in NOT_OURS or word.startswith("/"):
        return True
    first = word.split("/")[0]
    if "/" in word and first in TOP:
        candidates = [ROOT / word]
    elif "/" in word and first in PACKAGES and word.endswith(".py"):
        candidates = [ROOT / "megatron_sayo" / word]
    elif "/" not in word and re.fullmatch(r"[\w]+\.py", word):
        return word in repo_basenames()
    else:
        return True
    return any(p.exists() or ("*" in word and list(ROOT.glob(word))) for p in candidates)


def check_readme_commands(text: str) -> list[str]:
    """Every README command is one a test or script runs: its tool and each of its --flags appear in a runner
    file that names the tool."""
    runners = {p: p.read_text(errors="replace") for g in RUNNERS for p in ROOT.glob(g)
               if p.is_file() and p.name != Path(__file__).name}  # not this file: it names every flag it checks
    problems = []
    for command in filter(is_command, code_lines(text)):
        words = strip_env(tokens(command))
        if words[0] in README_NOT_RUN and tool_of(words)[0] is None or words[0] == "sbatch":
            continue
        if command.startswith(QUICKSTART_RUN):  # test_readme_quickstart_data_commands runs these lines
            continue
        if words[0] == "make":
            # `make X` is run when a runner says so (.ci/run: make test) or runs the module of X's recipe
            needle, flags = f"make {words[1]}", []
            module = re.search(rf"^{words[1]}:.*\n\t.*-m ([\w.]+)", (ROOT / "Makefile").read_text(), re.M)
            names = [t for p, t in runners.items() if p.name != "Makefile"
                     and (needle in t or (module and module.group(1) in t))]
        else:
            tool, at = tool_of(words)
            if tool is None:
                problems.append(f"README.md: command of no tool of ours, not in README_NOT_RUN: {command}")
                continue
            needle = tool if not tool.endswith((".py", ".sh")) else Path(tool).name
            flags = [w.split("=")[0] for w in words[at + 1:] if w.startswith("--")]
            names = [t for t in runners.values() if needle in t]
        if not names:
            problems.append(f"README.md: no test or script runs {needle!r} ({command})")
        for flag in flags:
            if not any(flag in t for t in names):
                problems.append(f"README.md: no test or script runs {needle} {flag} ({command})")
    return problems


# ---------------------------------------------------------------- tests


def test_readme_size():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, more than {README_MAX_BYTES}: move text to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_things_exist(page):
    problems = check_page(page.name, page.read_text())
    assert not problems, "\n".join(problems)


def test_readme_commands_are_run_by_tests():
    problems = check_readme_commands(README.read_text())
    assert not problems, "\n".join(problems)


def test_checker_fails_on_renamed_things():
    """The checks can fail: a renamed flag, module, path, config key or make target is each reported."""
    text = README.read_text()
    assert "--world-size" in text and "megatron_sayo.data.validate" in text and "rollout" not in "x"
    broken = {
        "--world-size": "--world-sizes",
        "megatron_sayo.data.validate": "megatron_sayo.data.validates",
        "examples/qwen25vl_7b_lora.yaml": "examples/qwen25vl_7b_lorra.yaml",
        "train.steps=500": "train.stepz=500",
        "make demo": "make demoo",
    }
    for old, new in broken.items():
        problems = check_page("README.md", text.replace(old, new))
        assert any(new.split("=")[0].split()[-1] in p for p in problems), (old, new, problems)
    # a flag the tool has but no test runs
    assert check_readme_commands("    python tools/plot_metrics.py RUN --no-such-flag\n")


@pytest.mark.multiproc
def test_readme_quickstart_data_commands(tmp_path):
    """The own-data quickstart's data lines run as written (fewer samples): synthetic stand-ins, then validate."""
    lines = [c for c in code_lines(README.read_text())
             if c.startswith(QUICKSTART_RUN)]
    assert len(lines) == 3, lines
    for line in lines:
        line = re.sub(r"--n \d+", "--n 3", line).replace("python", sys.executable, 1)
        proc = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, (line, proc.stdout, proc.stderr)
    assert "OK: 3 good row(s)" in proc.stdout
