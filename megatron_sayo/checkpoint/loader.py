"""The one way to get this rank's model stage: build it from a checkpoint's config.json and fill its weights.

The source is an HF directory (safetensors, filled by megatron_sayo.models.qwen25vl.weights) or a megatron
dist_checkpointing directory (a converted checkpoint, a training step dir or a run dir: newest complete step;
megatron reshards it on load; a LoRA step is its base checkpoint with the step's adapters attached). The
layout (TP, PP), dtype and TransformerConfig overrides are the caller's. `for_training` adds the trainer's
loss contract (megatron's per-token loss, see rl/loss.py). parallel_state must be initialised. The model
comes back in eval mode. (checkpoint imports models, never the other way.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_sayo.checkpoint.files import METADATA_FILE, CheckpointError, read_metadata, resolve_checkpoint_dir
from megatron_sayo.checkpoint.state import load_model, trained_sharded_state
from megatron_sayo.formats.dtypes import FLOAT_DTYPES, torch_dtype
from megatron_sayo.models.qwen25vl.hf_config import ParallelLayout, load_hf_config
from megatron_sayo.models.qwen25vl.model import Qwen25VLModel, build_model
from megatron_sayo.models.qwen25vl.transformer_config import to_transformer_config

TRAINING_OVERRIDES = {"calculate_per_token_loss": True}


def checkpoint_source(hf_dir: str | Path | None, megatron_dir: str | Path | None) -> tuple[str, Path]:
    """("hf" | "megatron", directory) from exactly one of the two; a clear error otherwise."""
    if (hf_dir is None) == (megatron_dir is None):
        raise ValueError(f"give exactly one of an HF directory or a megatron directory "
                         f"(got hf={hf_dir!r}, megatron={megatron_dir!r})")
    return ("hf", Path(hf_dir)) if hf_dir is not None else ("megatron", resolve_checkpoint_dir(megatron_dir))


def resolve_dtype(dtype: str | torch.dtype | None, kind: str, directory: Path) -> torch.dtype:
    """The parameter dtype: as given, else float32 for HF and the recorded one for a megatron checkpoint."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        dtype = (read_metadata(directory).get("dtype") if kind == "megatron" else None) or "float32"
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{directory}: parameter dtype {dtype!r} is not one of {FLOAT_DTYPES}")
    return torch_dtype(dtype)


def load_model_stage(hf_dir: str | Path | None = None, megatron_dir: str | Path | None = None, *, tp: int = 1,
                     pp: int = 1, params_dtype: str | torch.dtype | None = None,
                     config_overrides: dict | None = None, for_training: bool = False,
                     recompute: str | None = None, sequence_parallel: bool = False,
                     **model_kwargs) -> Qwen25VLModel:
    """This rank's stage of the checkpoint at hf_dir or megatron_dir, at TP x PP, weights loaded, eval mode.

    model_kwargs go to Qwen25VLModel (layer_backend, attention_backend, vision_attention_backend).
    """
    kind, directory = checkpoint_source(hf_dir, megatron_dir)
    dtype = resolve_dtype(params_dtype, kind, directory)
    lora = read_metadata(directory).get("lora") if kind == "megatron" else None
    if lora is not None:
        return _load_lora_step(directory, lora, tp=tp, pp=pp, params_dtype=dtype, config_overrides=config_overrides,
                               for_training=for_training, recompute=recompute, sequence_parallel=sequence_parallel,
                               **model_kwargs)
    hf = load_hf_config(directory)
    overrides = {**(TRAINING_OVERRIDES if for_training else {}), **(config_overrides or {})}
    # built (initialised) before loading: megatron marks TP-sharded parameters (tensor_model_parallel,
    # partition_dim) only while initialising them, and grad norms, clipping and DDP need those marks
    config = to_transformer_config(hf, ParallelLayout(tp, pp), params_dtype=dtype, recompute=recompute,
                                   sequence_parallel=sequence_parallel, **overrides)
    model = build_model(hf, config, **model_kwargs)
    if kind == "megatron":
        load_model(model, directory)
    else:
        from megatron_sayo.models.qwen25vl.weights import HFCheckpointReader, load_hf_into_model

        reader = HFCheckpointReader(directory)
        try:
            load_hf_into_model(model, reader, hf.text, parallel_state.get_tensor_model_parallel_rank(), tp)
        finally:
            reader.close()
    return model.eval()


def _load_lora_step(ckpt: Path, lora: dict, **kwargs) -> Qwen25VLModel:
    """A LoRA training step: its base (HF or megatron, from the step's pointer) with the step's adapters."""
    from megatron.core import dist_checkpointing

    from megatron_sayo.models.lora import attach_lora, is_adapter_key

    base = lora.get("base") or {}
    if base.get("format") not in ("hf", "megatron") or not Path(str(base.get("path"))).exists():
        raise CheckpointError(f"{ckpt}/{METADATA_FILE}: lora.base = {base!r}: expected {{format: hf|megatron, "
                              f"path}} naming an existing checkpoint (the weights the adapters apply to)")
    source = (base["path"], None) if base["format"] == "hf" else (None, base["path"])
    model = load_model_stage(*source, **kwargs)
    attach_lora(model, model.hf.text, rank=lora["rank"], alpha=lora["alpha"], targets=lora["targets"])
    template = trained_sharded_state(model)
    state = dist_checkpointing.load(template, str(ckpt))   # also returns the step's common objects: dropped
    result = model.load_state_dict({k: state[k] for k in template}, strict=False)
    missing = [k for k in result.missing_keys if is_adapter_key(k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{ckpt}: adapters do not match the model (missing {missing[:3]}, unexpected "
                              f"{result.unexpected_keys[:3]})")
    return model.eval()
