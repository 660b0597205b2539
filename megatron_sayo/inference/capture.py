"""The capture (`generate(capture_region=...)`, docs/spec.md §3): during decode, record what a teacher-forced
scoring pass would compute, as CompletionScores on the last pipeline stage.

Per new token: its log-prob and the entropy of the full distribution softmax(logits / temperature) it was
sampled from (logits column p - 1; drawn with the token, StepDraw.capture_logprobs / entropy), and the last
layer's region / image attention mass of its own row (query column p), measured while the token is fed in the
next decode step (a row that stops is fed once more, then leaves the cache; when every row has stopped, that
last feed stops at the last layer's attention, where the probe reads it). Each step keeps the masses over this
rank's heads; one all-reduce over TP at the end of the rollout makes them the mean over all heads.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_sayo.attention.region_mass import DecodeMassProbe
from megatron_sayo.distributed import shm_collectives
from megatron_sayo.inference.completion_scores import CompletionScores
from megatron_sayo.inference.parallel import group_size
from megatron_sayo.inference.step_draw import StepDraw
from megatron_sayo.models.qwen25vl.attention import AttentionState, KVCache


class DecodeCapture:
    """Per-token arrays [n, steps] the capture fills: log-prob, entropy, region and image mass."""

    def __init__(self, model, region: torch.Tensor, image: torch.Tensor, n: int, steps: int):
        self.region, self.image = region, image          # bool [n, P] per rollout row
        self.num_layers = model.config.num_layers
        self.logprobs = torch.zeros(n, steps, dtype=torch.float32, device=region.device)
        self.entropy = torch.zeros_like(self.logprobs)
        self.region_mass = torch.zeros_like(self.logprobs)
        self.image_mass = torch.zeros_like(self.logprobs)
        self.probe: DecodeMassProbe | None = None
        self.probe_rows: torch.Tensor | None = None

    def state(self, cache: KVCache, active: torch.Tensor, probe_only: bool = False) -> AttentionState:
        """The decode step's attention state: the cache and a probe over the fed rows' prompt keys (this
        rank's heads only: `scores` reduces over TP once); the probe is kept while the fed rows stay.
        `probe_only`: the step is fed only for the probe (the last one, every row stopped)."""
        if self.probe is None or self.probe_rows is not active:
            self.probe = DecodeMassProbe(self.region[active], self.image[active], group=None)
            self.probe_rows = active
        return AttentionState(kv_cache=cache, probe=self.probe, probe_layer=self.num_layers, probe_only=probe_only)

    def record_draw(self, draw: StepDraw, active: torch.Tensor, live: torch.Tensor, step: int) -> None:
        """The drawn tokens' log-probs and entropies (0 for rows not live)."""
        self.logprobs[active, step] = torch.where(live, draw.capture_logprobs, torch.zeros(()))
        self.entropy[active, step] = torch.where(live, draw.entropy, torch.zeros(()))

    def record_masses(self, active: torch.Tensor, live: torch.Tensor, step: int) -> None:
        """The fed tokens' region / image masses over this rank's heads, from the probe (last pipeline stage)."""
        means = self.probe.means if self.probe is not None else None
        if means is not None:   # the last pipeline stage
            region, image = torch.where(live, means.to(self.region_mass), torch.zeros(()))
            self.region_mass[active, step] = region
            self.image_mass[active, step] = image

    def scores(self, completion_mask: torch.Tensor) -> CompletionScores | None:
        """The captured CompletionScores of the completions (masses averaged over all heads); None off the last
        stage."""
        if not parallel_state.is_pipeline_last_stage():
            return None
        t = completion_mask.shape[1]
        masses = torch.stack([self.region_mass[:, :t], self.image_mass[:, :t]])
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if group_size(tp_group) > 1:     # local-head means -> the mean over all heads
            shm_collectives.all_reduce(masses, tp_group).div_(group_size(tp_group))
        region, image = masses
        return CompletionScores(logprobs=self.logprobs[:, :t], entropy=self.entropy[:, :t], region_mass=region,
                                image_mass=image, mask=completion_mask)
