"""Logits of our megatron model (any TP x PP, ranks started here) next to transformers' on the same inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


def _rank_logits(hf_dir: str, tp: int, pp: int, batch: dict, megatron_dir: str | None):
    from megatron.core import parallel_state

    from megatron_sayo.checkpoint.loader import load_model_stage
    from megatron_sayo.distributed import runtime
    from megatron_sayo.distributed.schedule import run_forward
    from megatron_sayo.models.qwen25vl.model import model_inputs

    runtime.init_distributed(tp, pp)
    model = load_model_stage(None if megatron_dir else hf_dir, megatron_dir or None, tp=tp, pp=pp)
    batch = {k: (torch.as_tensor(v) if v is not None else None) for k, v in batch.items()}
    inputs = model_inputs(model.hf, **batch)
    out = run_forward(model, [dict(inputs=inputs)], collect=lambda logits, mb: model.full_logits(logits))
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        return out[0].float().numpy()
    return None


def megatron_logits(hf_dir: str, batch: dict, *, tp: int = 1, pp: int = 1, megatron_dir: str | None = None
                    ) -> np.ndarray:
    """[b, s, vocab] float32 logits of our model on `tp*pp` local ranks (gloo on CPU)."""
    from megatron_sayo.distributed.runtime import spawn_local

    batch = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k in INPUT_KEYS}
    results = spawn_local(_rank_logits, tp * pp, str(hf_dir), tp, pp, batch, megatron_dir)
    return next(r for r in results if r is not None)


def hf_logits(hf_dir: str, batch: dict) -> np.ndarray:
    """transformers' float32 eager logits [b, s, vocab] for the same batch (the parity reference)."""
    try:
        from transformers import Qwen2_5_VLForConditionalGeneration
    except ImportError as exc:
        raise RuntimeError("the parity reference needs transformers: pip install 'megatron_sayo[test]'") from exc
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    kwargs = {k: torch.as_tensor(v) for k, v in batch.items() if k in INPUT_KEYS and v is not None}
    ids = kwargs["input_ids"]
    # transformers >= 5 builds 3-D M-RoPE positions only when told which tokens are image/video slots
    kwargs["mm_token_type_ids"] = ((ids == model.config.image_token_id).int()
                                   + 2 * (ids == model.config.video_token_id).int())
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


@dataclass(frozen=True)
class ParityReport:
    max_abs: float
    rel: float          # max |ours - ref| / max |ref|, over real (unpadded) positions
    top1_agreement: float

    def ok(self, rel_tol: float = 1e-4) -> bool:
        return self.rel <= rel_tol and self.top1_agreement == 1.0

    def __str__(self) -> str:
        return f"max abs {self.max_abs:.3e}  relative {self.rel:.3e}  top-1 agreement {self.top1_agreement:.4f}"


def compare_logits(ours: np.ndarray, ref: np.ndarray, attention_mask: np.ndarray | None = None) -> ParityReport:
    """Errors between two [b, s, vocab] logit arrays over the positions the mask marks real."""
    if ours.shape != ref.shape:
        raise ValueError(f"logit shapes differ: ours {ours.shape} vs reference {ref.shape}")
    real = np.ones(ours.shape[:2], bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    a, b = ours[real], ref[real]
    diff = np.abs(a - b)
    return ParityReport(float(diff.max()), float(diff.max() / np.abs(b).max()),
                        float((a.argmax(-1) == b.argmax(-1)).mean()))
