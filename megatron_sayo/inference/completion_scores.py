"""`CompletionScores`: what the rollout's capture, or a teacher-forced scoring pass, measured per completion token
(the index rule that puts token j in column j is rl/batch.py's `completion_view`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class CompletionScores:
    """Per completion token, [N, T] float32 (0 where `mask` is False): the token's log-prob at the sampling
    temperature, the entropy it was sampled from, and the last layer's region / image attention mass
    a(t), v(t) of its row (None when not measured, e.g. reference log-probs)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    region_mass: torch.Tensor | None
    image_mass: torch.Tensor | None
    mask: torch.Tensor                     # bool [N, T]
    key_weights: torch.Tensor | None = None  # [N, T, S] head-mean attention on each image key (reports only)

    def __post_init__(self):
        self.mask = self.mask.bool()
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("mask", "key_weights") and value is not None:
                if value.shape != self.mask.shape:
                    raise ValueError(f"CompletionScores.{f.name} is {tuple(value.shape)}, the mask "
                                     f"{tuple(self.mask.shape)}")
                setattr(self, f.name, torch.where(self.mask, value, torch.zeros((), dtype=value.dtype)))

    @staticmethod
    def cat(parts: list[CompletionScores]) -> CompletionScores:
        """Row-wise concatenation (microbatches in order)."""
        def join(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)
        return CompletionScores(**{f.name: join(f.name) for f in fields(CompletionScores)})

    def mean_abs_difference(self, other: CompletionScores) -> dict[str, float]:
        """Mean |self - other| over real tokens, per measured field (the capture-vs-scoring check)."""
        if not torch.equal(self.mask, other.mask):
            raise ValueError("the two CompletionScores cover different tokens")
        n = max(int(self.mask.sum()), 1)
        out = {}
        for name in ("logprobs", "entropy", "region_mass", "image_mass"):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None:
                out[name] = float((a.double() - b.double()).abs().sum()) / n
        return out
