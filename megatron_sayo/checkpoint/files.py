"""Checkpoint directories on disk, without torch: the metadata file, side files (config, tokenizer), atomic
publishing (formats/atomic.py), and finding a run's newest complete step. The converters use these
alone; checkpoint.py adds saving and loading models and training state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

from megatron_sayo.formats.dcp_metadata import load_dcp_metadata

METADATA_FILE = "checkpoint_metadata.json"
# Where megatron keeps the non-sharded state: common.pt up to megatron-core 0.16, an object of this key inside the
# torch_dist checkpoint from 0.17 on (0.19 still reads common.pt, so converted checkpoints keep that form).
COMMON_STATE_KEY = "common_state/shard_0_1"
FORMAT_VERSION = 1
# Files of an HF checkpoint other than weights that travel with every conversion (copied when present).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
              "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
              "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json",
              "processor_config.json")
STEP_PREFIX = "step_"
LATEST_FILE = "latest"
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, written or converted; the message names the file/tensor/field."""


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temp file + fsync + rename (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def versions() -> dict[str, str]:
    """Versions of the libraries that wrote a checkpoint."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "megatron-core", "megatron_sayo"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def make_metadata(kind: str, *, source: str, dtype: str, tp: int, pp: int, **extra) -> dict:
    """The `checkpoint_metadata.json` content: kind (converted | trained policy), source, dtype, layout, versions."""
    if kind not in ("converted", "trained policy"):
        raise ValueError(f"checkpoint kind {kind!r} is not 'converted' or 'trained policy'")
    dtype = str(dtype).replace("torch.", "")
    return {"format_version": FORMAT_VERSION, "kind": kind, "source": str(source), "dtype": dtype,
            "layout": {"tp": tp, "pp": pp}, "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra}


def read_metadata(ckpt_dir: str | Path) -> dict:
    """Parsed checkpoint_metadata.json of a checkpoint directory; CheckpointError when absent or corrupt."""
    path = Path(ckpt_dir) / METADATA_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a megatron_sayo checkpoint, or an incomplete one)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy config/tokenizer/processor files present in `src` to `dst`; returns the names copied."""
    copied = []
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def check_output_location(out: str | Path, inputs: list[str | Path]) -> None:
    """Refuse an output that is an input, lies inside one or contains one: publishing it (or --overwrite)
    would delete what it reads. Links are resolved first."""
    target = Path(out).resolve()
    for given in inputs:
        src = Path(given).resolve()
        if target == src:
            how = "is"
        elif src in target.parents:
            how = "lies inside"
        elif target in src.parents:
            how = "contains"
        else:
            continue
        raise CheckpointError(f"output {out} {how} the input {given}: choose an output outside the input "
                              f"(refused with or without --overwrite, which would delete the input)")


TMP_TAG = ".tmp-"


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temp_dirs(out: str | Path) -> list[Path]:
    """`<out>.tmp-<pid>` dirs beside `out` whose process is gone (a killed conversion's leftovers)."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.iterdir():
        pid = p.name[len(out.name) + len(TMP_TAG):]
        if (p.name.startswith(out.name + TMP_TAG) and pid.isdigit() and p.is_dir() and not p.is_symlink()
                and int(pid) != os.getpid() and not _pid_alive(int(pid))):
            found.append(p)
    return sorted(found)


def prepare_output(out: str | Path, overwrite: bool, inputs: list[str | Path] = (),
                   remove_stale: bool = False) -> Path:
    """A fresh temp dir `<out>.tmp-<pid>` next to `out`. Refuses an existing `out` without overwrite and an
    `out` that overlaps an input; reports (or, with remove_stale, deletes) temp dirs of dead conversions."""
    out = Path(out)
    check_output_location(out, list(inputs))
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
    stale = stale_temp_dirs(out)
    if stale and remove_stale:
        for p in stale:
            shutil.rmtree(p)
        log.warning("removed %d temp dir(s) of conversions that are no longer running: %s", len(stale),
                    ", ".join(map(str, stale)))
    elif stale:
        log.warning("%d temp dir(s) of conversions that are no longer running: %s (pass --remove-stale-tmp to "
                    "delete them)", len(stale), ", ".join(map(str, stale)))
    tmp = out.with_name(f"{out.name}{TMP_TAG}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A model/step checkpoint dir as given, or the newest complete one of a run dir (or its checkpoints/)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    for run_dir in (path, path.parent):
        if (run_dir / "checkpoints").is_dir() and path in (run_dir, run_dir / "checkpoints"):
            found = find_resumable(run_dir)
            if found is None:
                raise CheckpointError(f"{path}: no complete checkpoint under {run_dir / 'checkpoints'}")
            return found
    raise CheckpointError(f"{path}: not a megatron checkpoint (no metadata.json) nor a run dir with checkpoints/")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking step dirs (no .tmp), newest first."""
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[len(STEP_PREFIX):]), reverse=True)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest step dirs, and stale .tmp dirs."""
    for old in list_checkpoints(root)[max(keep, 1):]:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.glob(f"{STEP_PREFIX}*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a step dir cannot be resumed (missing files, unreadable metadata), or None when it looks complete."""
    for name in ("metadata.json", ".metadata", METADATA_FILE):
        if not (ckpt / name).is_file():
            return f"{ckpt / name} is missing"
    try:
        json.loads((ckpt / "metadata.json").read_text())
        read_metadata(ckpt)
        meta = load_dcp_metadata((ckpt / ".metadata").read_bytes())
    except Exception as exc:
        return f"{ckpt}: metadata unreadable ({exc})"
    if not (ckpt / "common.pt").is_file() and COMMON_STATE_KEY not in meta.objects:
        return f"{ckpt / 'common.pt'} is missing (nor does .metadata hold {COMMON_STATE_KEY})"
    files = {c.file for t in meta.tensors.values() for c in t.chunks} | {f for f, _, _ in meta.objects.values()}
    for rel in sorted(files):
        if not (ckpt / rel).is_file():
            return f"{ckpt / rel} is missing"
    return None


def next_resumable(root: Path, skip=frozenset()) -> tuple[Path | None, list[str]]:
    """The resume scan: the first step dir in resume order (ordered_checkpoints) not in `skip` that looks
    complete, and "name: reason" for each one passed over (each also warned about)."""
    passed = []
    for ckpt in ordered_checkpoints(root):
        if ckpt in skip:
            continue
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, passed
        warnings.warn(f"checkpoint {ckpt.name} is not usable ({problem}); falling back to an older one",
                      stacklevel=2)
        passed.append(f"{ckpt.name}: {problem}")
    return None, passed


def find_resumable(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint of a run (the `latest` one first); warns and falls back past corrupt ones."""
    return next_resumable(Path(run_dir) / "checkpoints")[0]


def ordered_checkpoints(root: Path) -> list[Path]:
    """Step dirs to try resuming from: the one `latest` names first, then newest first."""
    candidates = list_checkpoints(root)
    latest = root / LATEST_FILE
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    return candidates
