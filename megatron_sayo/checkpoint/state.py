"""Checkpoints: megatron-core dist_checkpointing of the model (any TP/PP on load), and training state with
atomic save and resume. The HF <-> Megatron converters (convert/) build on the helpers here.

On disk a model checkpoint is a torch_dist directory as `model.sharded_state_dict()` saves it (the HF converter
writes the same files itself, see models/qwen25vl/dist_layout.py): every global tensor is the TP=1 megatron tensor
(decoder layers stacked on a leading axis, SwiGLU fc1 = [gate; up], QKV packed by query group, vocabulary padded
for the TP it was written at), so megatron reshards it on load. Next to it:
`checkpoint_metadata.json` (what it is) and, when known, the HF config.json / tokenizer / processor files.

Training checkpoints live in `run_dir/checkpoints/step_XXXXXXX/` (model + optimizer + per-rank RNG + step +
scheduler + extra), are written under `.tmp` and renamed, and `run_dir/checkpoints/latest` names the newest.
"""

from __future__ import annotations

import logging
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_sayo.checkpoint.files import (
    LATEST_FILE,
    METADATA_FILE,
    STEP_PREFIX,
    CheckpointError,
    copy_side_files,
    make_metadata,
    next_resumable,
    prune_checkpoints,
    read_metadata,
)
from megatron_sayo.formats.atomic import publish_dir, write_bytes_atomic, write_json_atomic
from megatron_sayo.formats.pickle_guard import UnsafePickle, check_checkpoint_pickles

log = logging.getLogger(__name__)



# ==============================================================================================================
# Small helpers
# ==============================================================================================================

def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_pickles(ckpt_dir: Path) -> None:
    """Refuse a checkpoint with a pickle naming a global outside the allow-list (UnsafeCheckpoint naming the
    file and the global), or one that is unreadable (CheckpointError), before torch or megatron unpickles it."""
    try:
        check_checkpoint_pickles(ckpt_dir)
    except UnsafePickle as exc:
        raise UnsafeCheckpoint(str(exc)) from None
    except ValueError as exc:          # unreadable: corrupt, not unsafe (resume falls back past it)
        raise CheckpointError(f"corrupt checkpoint: {exc}") from None


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint whose pickles name globals a checkpoint never needs: refused, never fallen back past."""


def parameters_finite(model) -> bool:
    """Collective: whether every parameter of every rank is finite (a diverged model is never checkpointed)."""
    ok = torch.tensor([1.0 if all(bool(torch.isfinite(p).all()) for p in model.parameters()) else 0.0])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item() == 1.0)


# ==============================================================================================================
# Model checkpoints (dist_checkpointing, resharding on load)
# ==============================================================================================================

def save_model(model, ckpt_dir: str | Path, metadata: dict | None = None) -> None:
    """Collective: write this model (every rank's stage) to `ckpt_dir` in torch_dist format (+ metadata)."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    _in_process_write_results()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))
    if _rank() == 0 and metadata is not None:
        write_json_atomic(ckpt_dir / METADATA_FILE, metadata)
    _barrier()


def load_model(model, ckpt_dir: str | Path) -> None:
    """Collective: fill `model` from a model or training checkpoint written at any TP/PP."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise CheckpointError(f"{ckpt_dir}: no metadata.json (not a dist_checkpointing checkpoint)")
    check_pickles(ckpt_dir)
    template = model.sharded_state_dict()
    state = dist_checkpointing.load(template, str(ckpt_dir))
    # a training step also returns its common objects (step, optimizer, scheduler, extra): not model weights
    model.load_state_dict({k: state[k] for k in template})


# ==============================================================================================================
# Training checkpoints: atomic, resumable, RNG restored
# ==============================================================================================================

def rng_state() -> dict:
    """This process's RNG states: torch CPU, CUDA (when present), numpy, python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        try:
            from megatron.core import tensor_parallel

            state["cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
        except Exception:  # tracker not initialised
            pass
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
        if "cuda_tracker" in state:
            from megatron.core import tensor_parallel

            tensor_parallel.get_cuda_rng_tracker().set_states(state["cuda_tracker"])


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def _is_megatron_optimizer(optimizer) -> bool:
    return hasattr(optimizer, "sharded_state_dict") and not isinstance(optimizer, torch.optim.Optimizer)


def _world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def trained_sharded_state(model) -> dict:
    """The model part of a training checkpoint: every weight, or with LoRA adapters attached only the adapters
    (the frozen base stays where the run's metadata points)."""
    from megatron_sayo.models.lora import adapters_of, is_adapter_key

    model_sd = model.sharded_state_dict()
    if adapters_of(model):
        model_sd = {k: v for k, v in model_sd.items() if is_adapter_key(k)}
    return model_sd


# How megatron's distributed optimizer writes its state: 'fully_reshardable' (each state tensor in the model's
# shape, so a run resumes at any TP/PP/DP as the model does), gathered over the DP group's gloo group onto DP rank
# 0 ('mem_efficient': host memory for the gathered state on one rank of each DP group, not on all of them). Its
# default, 'fully_sharded_model_space', fails to save in megatron-core 0.16 ("ShardedTensor.flattened_range is not
# supported"). The plain megatron optimizers ignore this.
OPTIMIZER_CHECKPOINT_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable",
                               "distrib_optim_fully_reshardable_mem_efficient": True}


def _training_sharded_state(model, optimizer, scheduler, step: int, extra: dict, *, loading: bool,
                            world_size_saved: int | None = None) -> dict:
    """The dict handed to dist_checkpointing for a training checkpoint (save, or load template)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = _world()
    model_sd = trained_sharded_state(model)
    state = {"model": model_sd, "step": step, "extra": extra,
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    same_world = world_size_saved in (None, world)
    per_rank = {"rng": rng_state()}
    if optimizer is not None:
        if _is_megatron_optimizer(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(
                trained_sharded_state(model) if loading else model_sd, is_loading=loading,
                metadata=OPTIMIZER_CHECKPOINT_FORMAT)
        else:
            per_rank["optimizer"] = optimizer.state_dict()
    if same_world:
        state["rank_state"] = ShardedObject("rank_state", per_rank, (world,), (rank,), replica_id=0)
    return state


def save_training_state(run_dir: str | Path, step: int, model, optimizer=None, scheduler=None,
                        extra: dict | None = None, *, keep: int = 2, config_dir: str | Path | None = None,
                        metadata: dict | None = None) -> Path | None:
    """Collective: write step `step` atomically into run_dir/checkpoints/step_XXXXXXX, update `latest`, prune.
    A model with a non-finite parameter is not written (None, with a warning), so pruning never drops the
    newest finite checkpoint for a diverged one.

    Model + optimizer (megatron's sharded form for a megatron optimizer; per-rank otherwise) + scheduler + RNG of
    every rank + step + `extra` (must be identical on all ranks: data position, counters). `config_dir`: HF
    files (config.json, tokenizer...) copied in so the step can be exported or served. Returns the final dir.
    """
    from megatron.core import dist_checkpointing

    root = Path(run_dir) / "checkpoints"
    if not parameters_finite(model):
        warnings.warn(f"step {step}: the model has non-finite parameters; checkpoint not written (the older "
                      f"ones are kept)", stacklevel=2)
        return None
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    rank, world = _world()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state = _training_sharded_state(model, optimizer, scheduler, step, dict(extra or {}), loading=False)
    _in_process_write_results()
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if rank == 0:
        if config_dir is not None:
            copy_side_files(config_dir, tmp)
        tp, pp = _layout()
        write_json_atomic(tmp / METADATA_FILE, make_metadata(
            "trained policy", source=str(Path(run_dir).resolve()), dtype=_model_dtype(model), tp=tp, pp=pp,
            step=step, world_size=world,
            optimizer="megatron" if _is_megatron_optimizer(optimizer) else ("torch" if optimizer else None),
            **(metadata or {})))
        publish_dir(tmp, final)
        write_bytes_atomic(root / LATEST_FILE, (final.name + "\n").encode())
        prune_checkpoints(root, keep)
    _barrier()
    return final


def _in_process_write_results() -> None:
    """Have megatron's torch_dist writer pass its results through an in-process queue. Our saves are synchronous,
    so its results are put and taken by this same process; megatron's default (a multiprocessing manager: one
    spawned helper per rank, started by the first save) cost each rank a process start (about 2 s on CPU) and a
    process that had to ignore Slurm's step signals and die with a SIGKILLed trainer."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()


def _layout() -> tuple[int, int]:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
    return 1, 1


def _model_dtype(model) -> str:
    p = next(iter(model.parameters()), None)
    return str(p.dtype).replace("torch.", "") if p is not None else "float32"


def _broadcast_choice(path: Path | None, skipped: list[str]) -> tuple[Path | None, list[str]]:
    """Rank 0's choice (and the checkpoints it skipped) on every rank (all ranks must load the same step)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return path, skipped
    obj = [str(path) if path is not None else None, skipped]
    torch.distributed.broadcast_object_list(obj, src=0)
    return (Path(obj[0]) if obj[0] is not None else None), obj[1]


def load_training_state(run_dir: str | Path, model, optimizer=None, scheduler=None, *,
                        restore_rng: bool = True) -> dict | None:
    """Collective: resume from the newest usable checkpoint of `run_dir` (None when there is none).

    Restores model, optimizer, scheduler and (same world size) each rank's RNG; returns
    {"step", "extra", "path"}. A checkpoint that fails to load is skipped with a warning for the previous one;
    when every one fails, CheckpointError names each with its reason. A checkpoint with an unsafe pickle is
    refused outright (UnsafeCheckpoint), never skipped.
    """
    root = Path(run_dir) / "checkpoints"
    tried: set[Path] = set()
    failures: list[str] = []
    while True:
        choice, skipped = None, []
        if _rank() == 0:
            choice, skipped = next_resumable(root, tried)
        choice, skipped = _broadcast_choice(choice, skipped)
        failures += skipped
        tried.update(root / s.split(":")[0] for s in skipped)     # every rank skips the same ones
        if choice is None:
            if failures:
                raise CheckpointError(f"{root}: no checkpoint could be loaded; tried {len(failures)}: "
                                      + "; ".join(failures))
            return None
        tried.add(choice)
        try:
            check_pickles(choice)         # every rank: the refusal must not leave others waiting
            return _load_step(choice, model, optimizer, scheduler, restore_rng)
        except UnsafeCheckpoint:
            raise
        except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
            failures.append(f"{choice.name}: failed to load ({type(exc).__name__}: {str(exc)[:300]})")
            warnings.warn(f"checkpoint {choice.name} failed to load ({type(exc).__name__}: {exc}); "
                          f"falling back to an older one", stacklevel=2)
            _barrier()


def _load_step(ckpt: Path, model, optimizer, scheduler, restore_rng: bool) -> dict:
    """Load one step dir into model/optimizer/scheduler (+ RNG); returns its step and extra."""
    from megatron.core import dist_checkpointing

    meta = read_metadata(ckpt)
    _, world = _world()
    saved_world = meta.get("world_size")
    if saved_world != world:
        per_rank = optimizer is not None and not _is_megatron_optimizer(optimizer)
        warnings.warn(f"{ckpt.name}: saved with {saved_world} ranks, resuming with {world}: the per-rank RNG states "
                      + ("and this optimizer's per-rank state are not restored" if per_rank else
                         "are not restored (model, optimizer and scheduler state are)"), stacklevel=3)
    template = _training_sharded_state(model, optimizer, scheduler, 0, {}, loading=True,
                                       world_size_saved=saved_world)
    state = dist_checkpointing.load(template, str(ckpt))
    model.load_state_dict(state["model"], strict=False)
    rank_state = state.get("rank_state")
    if optimizer is not None:
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        elif rank_state is not None and "optimizer" in rank_state:
            optimizer.load_state_dict(rank_state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and rank_state is not None:
        set_rng_state(rank_state["rng"])
    _barrier()
    return {"step": int(state["step"]), "extra": state.get("extra") or {}, "path": ckpt}
