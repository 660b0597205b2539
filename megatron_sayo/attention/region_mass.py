"""Region and image attention mass per query row (docs/spec.md §3), exact, without the full attention matrix.

The core attention of the probed layer (the last decoder layer) hands `RegionMassProbe` its rotated q/k
[b, heads_local, sq, d] and the row log-sum-exp of the scaled, masked scores [b, heads_local, sq]. For the
chosen query rows only and over image keys only, the probe recomputes the exact softmax weights
alpha = exp(scale * q.k - lse), sums them over the region keys and over all image keys, sums the local
heads, all-reduces once over the tensor-parallel group and divides by the total head count:

    region_sum(t) = mean_h sum_{i in region} alpha_h(t, i)     a(t) = region_sum(t) / |region|
    image_sum(t)  = mean_h sum_{i in image}  alpha_h(t, i)     v(t) = image_sum(t)  / |image|

Index conventions: query rows index the queries of this forward call (0..sq-1); key masks index keys
(0..sk-1). Query row j sits at key position j + sk - sq (sk > sq only when decoding with a KV cache);
keys after it get weight 0 (causal), exactly as in the attention itself. Image keys are real tokens, so
padding never changes them. Memory is O(rows x image keys x local heads), bounded by row chunks.

The indicator form (`indicator_mass_sums`, used on CUDA) needs no log-sum-exp: an attention call whose
values are the 0/1 columns [i in region], [i in image] returns sum_i alpha(t, i) [i in set] per head, i.e.
the same sums, from any kernel that takes the mask (torch's memory-efficient kernel on CUDA). It runs per
sample on the chosen rows' span in float32 (a second, narrow attention over the last layer only).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_sayo.distributed import shm_collectives
from megatron_sayo.distributed.groups import resolve_group
from megatron_sayo.models.qwen25vl.attention import AttentionState

DEFAULT_CHUNK_ELEMENTS = 1 << 20  # float32 weights held at once per chunk (4 MiB)


@dataclass(frozen=True)
class RegionMass:
    """Per chosen query row (n rows): its batch index, query index, head-mean summed masses and key counts."""

    batch: torch.Tensor         # long [n]
    query: torch.Tensor         # long [n], query index in the forward call (= sequence position at prefill)
    region_sum: torch.Tensor    # float [n], mean_h sum_{i in region} alpha
    image_sum: torch.Tensor     # float [n], mean_h sum_{i in image} alpha
    region_count: torch.Tensor  # long [n], |region| of the row's sample
    image_count: torch.Tensor   # long [n], |image| of the row's sample
    key_weights: torch.Tensor | None = None  # float [n, sk], mean_h alpha on image keys (0 elsewhere), if asked

    @property
    def region_mean(self) -> torch.Tensor:
        """a(t) = mean_h mean_{i in region} alpha; 0 for a sample without region keys."""
        return _safe_div(self.region_sum, self.region_count)

    @property
    def image_mean(self) -> torch.Tensor:
        """v(t) = mean_h mean_{i in image} alpha; 0 for a sample without image keys."""
        return _safe_div(self.image_sum, self.image_count)

    def dense(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, v) as [batch, seq] arrays indexed by query position; rows not measured are 0."""
        a = self.region_sum.new_zeros(batch, seq)
        v = self.region_sum.new_zeros(batch, seq)
        a[self.batch, self.query] = self.region_mean
        v[self.batch, self.query] = self.image_mean
        return a, v


def _safe_div(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, 0 where count is 0."""
    return torch.where(count > 0, total / count.clamp(min=1).to(total.dtype), torch.zeros_like(total))


def query_row_pairs(rows: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """(batch, query) pairs [n, 2] from a bool [b, sq] row mask or a long [n, 2] pair tensor, sorted."""
    rows = torch.as_tensor(rows)
    if rows.dtype == torch.bool:
        if rows.dim() != 2:
            raise ValueError(f"a boolean query-row mask must be [b, sq], got shape {tuple(rows.shape)}")
        return rows.nonzero()
    if rows.dim() != 2 or rows.shape[1] != 2 or rows.is_floating_point():
        raise ValueError(f"query rows must be bool [b, sq] or integer (batch, query) pairs [n, 2], "
                         f"got {rows.dtype} {tuple(rows.shape)}")
    pairs = rows.long()
    if pairs.numel() and (pairs.min() < 0 or (batch is not None and pairs[:, 0].max() >= batch)):
        raise ValueError(f"query row pairs out of range (batch size {batch}): {pairs.tolist()[:4]}...")
    order = torch.argsort(pairs[:, 0] * (int(pairs[:, 1].max()) + 1 if pairs.numel() else 1) + pairs[:, 1])
    return pairs[order]


def image_key_mask(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """bool [b, s]: positions holding an image token (the image key set)."""
    return input_ids == image_token_id


def _check_masks(region_mask: torch.Tensor, image_mask: torch.Tensor) -> None:
    """Both bool [b, sk] of one shape, region keys a subset of image keys."""
    if region_mask.shape != image_mask.shape or region_mask.dim() != 2:
        raise ValueError(f"region mask {tuple(region_mask.shape)} and image mask {tuple(image_mask.shape)} "
                         f"must both be [b, sk]")
    stray = region_mask & ~image_mask
    if bool(stray.any()):
        b, i = stray.nonzero()[0].tolist()
        raise ValueError(f"region key {i} of sample {b} is not an image key (region must lie inside the image)")


def local_head_mass_sums(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float,
                         pairs: torch.Tensor, region_mask: torch.Tensor, image_mask: torch.Tensor,
                         chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, key_weights: bool = False) -> torch.Tensor:
    """[2, n] float32: softmax weights of the chosen rows summed over local heads and region / image keys.

    q [b, h, sq, d], k [b, h, sk, d] (GQA-expanded), lse [b, h, sq]; pairs [n, 2] (batch, query) sorted.
    key_weights=True: [2 + sk, n], rows 2.. hold the head-summed weight of every image key (0 elsewhere).
    """
    sq, sk = q.shape[2], k.shape[2]
    offset = sk - sq
    out = torch.zeros(2 + (sk if key_weights else 0), pairs.shape[0], dtype=torch.float32, device=q.device)
    for b in pairs[:, 0].unique().tolist():
        idx = (pairs[:, 0] == b).nonzero().squeeze(1)
        keys = image_mask[b].nonzero().squeeze(1).to(q.device)
        if keys.numel() == 0:
            continue
        k_img = k[b][:, keys]                                           # [h, m, d]
        in_region = region_mask[b, keys.cpu()].to(device=q.device, dtype=torch.float32)  # [m]
        step = max(1, chunk_elements // (k_img.shape[0] * keys.numel()))
        for start in range(0, idx.numel(), step):
            sel = idx[start:start + step]
            rows = pairs[sel, 1].to(q.device)
            weights = _row_weights(q[b][:, rows], k_img, lse[b][:, rows], scale, rows + offset, keys)
            per_key = weights.sum(0)                                    # [r, m]
            cols = sel.to(q.device)
            out[0, cols] = per_key @ in_region
            out[1, cols] = per_key.sum(1)
            if key_weights:
                out[2 + keys[:, None], cols[None, :]] = per_key.T
    return out


def _row_weights(q_rows: torch.Tensor, k_img: torch.Tensor, lse_rows: torch.Tensor, scale: float,
                 row_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Exact softmax weights [h, r, m] = exp(scale q.k - lse), 0 for keys after the query (causal)."""
    weights = torch.matmul(q_rows.float(), k_img.float().transpose(-1, -2))   # one buffer, updated in place
    weights.mul_(scale).sub_(lse_rows.float()[..., None])
    return weights.masked_fill_(key_pos[None, None, :] > row_pos[None, :, None], float("-inf")).exp_()


VALUE_ALIGN = 8  # value columns padded to a multiple of 8: torch's memory-efficient kernel needs it


def indicator_values(region_row: torch.Tensor, image_row: torch.Tensor, keys: torch.Tensor,
                     key_weights: bool = False) -> torch.Tensor:
    """float32 [sk, W]: column 0 = [key in region], 1 = [key in image], then (key_weights) one column per image
    key `keys[j]` (its one-hot); zero columns up to W, a multiple of VALUE_ALIGN."""
    sk = region_row.shape[0]
    used = 2 + (keys.numel() if key_weights else 0)
    values = torch.zeros(sk, -(-used // VALUE_ALIGN) * VALUE_ALIGN, dtype=torch.float32)
    values[:, 0] = region_row.float()
    values[:, 1] = image_row.float()
    if key_weights:
        values[keys, 2 + torch.arange(keys.numel())] = 1.0
    return values


def _span_mask(allowed: torch.Tensor | None, b: int, lo: int, hi: int, sq: int, sk: int, device) -> torch.Tensor:
    """bool [hi - lo, sk] (True = attend) of query rows lo..hi-1 of sample b; None means causal at offset sk-sq."""
    if allowed is None:
        return torch.ones(hi - lo, sk, dtype=torch.bool, device=device).tril(lo + sk - sq)
    rows = allowed[b, 0] if allowed.dim() == 4 else allowed
    if rows.shape != (sq, sk):
        raise ValueError(f"attention mask {tuple(allowed.shape)} does not fit {sq} queries x {sk} keys")
    return rows[lo:hi].to(device)


def _indicator_attention(q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """SDPA [h, r, W] of one sample; on CUDA the memory-efficient kernel (any mask, no score matrix)."""
    q, k, values, mask = q[None], k[None], values[None], mask[None, None]
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, values, attn_mask=mask, scale=scale)[0]
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # no efficient kernel for this device/shape: torch's own choice
            warnings.warn(f"region masses: torch's memory-efficient attention refused the indicator call ({exc}); "
                          f"falling back to scaled_dot_product_attention's default kernel", stacklevel=3)
    return F.scaled_dot_product_attention(q, k, values, attn_mask=mask, scale=scale)[0]


def indicator_mass_sums(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, scale: float,
                        pairs: torch.Tensor, region_mask: torch.Tensor, image_mask: torch.Tensor,
                        key_weights: bool = False) -> torch.Tensor:
    """What `local_head_mass_sums` returns, from the attention kernel with 0/1 indicator values (no LSE).

    q [b, h, sq, d]; k [b, h or kv groups, sk, d]; allowed: the attention's mask (bool [b, 1, sq, sk] or
    [sq, sk], True = attend; None = causal with query j at key j + sk - sq); pairs [n, 2] sorted.
    """
    sq, sk = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    out = torch.zeros(2 + (sk if key_weights else 0), pairs.shape[0], dtype=torch.float32, device=q.device)
    for b in pairs[:, 0].unique().tolist():
        idx = (pairs[:, 0] == b).nonzero().squeeze(1)
        keys = image_mask[b].nonzero().squeeze(1)
        if keys.numel() == 0:
            continue
        rows = pairs[idx, 1]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        values = indicator_values(region_mask[b], image_mask[b], keys, key_weights).to(q.device)
        kb = k[b].float().repeat_interleave(rep, dim=0)                  # [h, sk, d]
        values = values[None].expand(kb.shape[0], -1, -1)                # [h, sk, W], shared by the heads
        summed = _indicator_attention(q[b, :, lo:hi].float(), kb, values,
                                      _span_mask(allowed, b, lo, hi, sq, sk, q.device), scale).sum(0)  # [r, W]
        picked = summed[(rows - lo).to(q.device)]                        # [n_b, W]
        cols = idx.to(q.device)
        out[0, cols] = picked[:, 0]
        out[1, cols] = picked[:, 1]
        if key_weights:
            out[2 + keys.to(q.device)[:, None], cols[None, :]] = picked[:, 2:2 + keys.numel()].T
    return out


class RegionMassProbe:
    """AttentionProbe measuring region/image mass for chosen query rows; the result lands in `.result`.

    rows: bool [b, sq] or (batch, query) pairs [n, 2]; region_mask, image_mask: bool [b, sk];
    group: the TP process group ('default' = megatron's, None = single rank); key_weights: also keep the
    head-mean weight of every image key per row (for heatmaps; memory rows x keys).
    """

    def __init__(self, rows: torch.Tensor, region_mask: torch.Tensor, image_mask: torch.Tensor,
                 group="default", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, key_weights: bool = False):
        # bookkeeping lives on the CPU whatever device the batch came from (the kernels move what they need)
        region_mask, image_mask = torch.as_tensor(region_mask).bool().cpu(), torch.as_tensor(image_mask).bool().cpu()
        _check_masks(region_mask, image_mask)
        self.pairs = query_row_pairs(torch.as_tensor(rows).cpu(), region_mask.shape[0])
        self.region_mask, self.image_mask = region_mask, image_mask
        self.group = group
        self.chunk_elements = chunk_elements
        self.key_weights = key_weights
        self.result: RegionMass | None = None

    def __call__(self, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor | None, scale: float,
                 allowed: torch.Tensor | None = None) -> None:
        """Measure the chosen rows (no autograd); one all-reduce over the TP group.

        With the row log-sum-exp `lse`: recompute the weights (key expanded to the query heads). With
        lse=None: the indicator form over the attention's mask `allowed` (see `indicator_mass_sums`).
        """
        if key.shape[0] != self.image_mask.shape[0] or key.shape[2] != self.image_mask.shape[1]:
            raise ValueError(f"key masks are {tuple(self.image_mask.shape)} but the attention has batch "
                             f"{key.shape[0]} and {key.shape[2]} keys")
        if self.pairs.numel() and int(self.pairs[:, 1].max()) >= query.shape[2]:
            raise ValueError(f"query row {int(self.pairs[:, 1].max())} outside the {query.shape[2]} queries")
        with torch.no_grad():
            if lse is None:
                sums = indicator_mass_sums(query, key, allowed, scale, self.pairs, self.region_mask,
                                           self.image_mask, self.key_weights)
            else:
                sums = local_head_mass_sums(query, key, lse, scale, self.pairs, self.region_mask,
                                            self.image_mask, self.chunk_elements, self.key_weights)
            sums = head_mean_over_tp(sums, query.shape[1], self.group)
        b = self.pairs[:, 0]
        self.result = RegionMass(batch=b, query=self.pairs[:, 1], region_sum=sums[0].cpu(), image_sum=sums[1].cpu(),
                                 region_count=self.region_mask.sum(1)[b], image_count=self.image_mask.sum(1)[b],
                                 key_weights=sums[2:].T.cpu() if self.key_weights else None)


def head_mean_over_tp(sums: torch.Tensor, local_heads: int, group="default") -> torch.Tensor:
    """Local-head sums -> the mean over all heads: one all-reduce over the TP group, divided by the head count."""
    group = resolve_group(group, "tp")
    tp = 1
    if group is not None and dist.get_world_size(group) > 1:
        shm_collectives.all_reduce(sums, group)
        tp = dist.get_world_size(group)
    return sums / (local_heads * tp)


def decode_mass_sums(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, allowed: torch.Tensor | None,
                     scale: float, key_masks: torch.Tensor) -> torch.Tensor:
    """[n, 2] float32 local-head sums of the softmax weights on region / image keys for ONE new query per row.

    The KV-cached decode step: q [n, h, 1, d], k [n, h or kv groups, sk, d] (all rows at once, no per-row
    loop); key_masks float [n, m, 2]: region and image indicators over the first m <= sk keys (the prompt:
    image keys are prompt tokens, all visible to the new query). With the attention's row log-sum-exp `lse`
    [n, h, 1] the weights are exp(scale q.k - lse); without it they are the softmax over the keys `allowed`
    (True = attend) lets in.
    """
    n, h, sq, d = q.shape
    if sq != 1:
        raise ValueError(f"decode_mass_sums measures one new query per row, got {sq}")
    groups, m = k.shape[1], key_masks.shape[1]
    scores = torch.matmul(q.float().reshape(n, groups, h // groups, d), k.float().transpose(-1, -2))
    scores = scores.reshape(n, h, k.shape[2]).mul_(scale)       # head j uses kv group j // (h / groups)
    if lse is None:
        if allowed is not None:
            scores.masked_fill_(~allowed.reshape(allowed.shape[0], 1, -1).expand_as(scores), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = (scores[..., :m] - lse.float().reshape(n, h, 1)).exp_().sum(1)   # [n, m], summed over local heads
    return torch.bmm(weights[:, None], key_masks).squeeze(1)


class DecodeMassProbe:
    """AttentionProbe for KV-cached decode steps: the region/image mass of every row's new token.

    region_mask, image_mask: bool [n, m] over the prompt keys (region inside image); the same rows are fed
    at every step the probe is used for. The attention's output takes its ordinary path (needs_lse False).
    After a call, `.means` [2, n] holds a(t), v(t) over this rank's heads (group=None) or all heads (the TP
    group's all-reduce), and `.result` the same as a RegionMass with query 0 for each row.
    """

    needs_lse = False

    def __init__(self, region_mask: torch.Tensor, image_mask: torch.Tensor, group="default"):
        region_mask, image_mask = torch.as_tensor(region_mask).bool(), torch.as_tensor(image_mask).bool()
        _check_masks(region_mask, image_mask)
        self.region_mask, self.image_mask, self.group = region_mask, image_mask, group
        self.key_masks = torch.stack([region_mask, image_mask], dim=-1).float()        # [n, m, 2]
        self.counts = self.key_masks.sum(1).T                                            # [2, n]
        self.sums: torch.Tensor | None = None
        self.means: torch.Tensor | None = None

    def __call__(self, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor | None, scale: float,
                 allowed: torch.Tensor | None = None) -> None:
        if key.shape[0] != self.image_mask.shape[0] or key.shape[2] < self.image_mask.shape[1]:
            raise ValueError(f"prompt key masks are {tuple(self.image_mask.shape)} but the attention has batch "
                             f"{key.shape[0]} and {key.shape[2]} keys")
        with torch.no_grad():
            if self.key_masks.device != query.device:
                self.key_masks, self.counts = self.key_masks.to(query.device), self.counts.to(query.device)
            self.sums = head_mean_over_tp(decode_mass_sums(query, key, lse, allowed, scale, self.key_masks).T,
                                          query.shape[1], self.group)
            self.means = _safe_div(self.sums, self.counts)

    @property
    def result(self) -> RegionMass | None:
        if self.sums is None:
            return None
        n, counts = self.sums.shape[1], self.counts.long().cpu()
        return RegionMass(batch=torch.arange(n), query=torch.zeros(n, dtype=torch.long), region_sum=self.sums[0].cpu(),
                          image_sum=self.sums[1].cpu(), region_count=counts[0], image_count=counts[1])


def probe_state(probe: RegionMassProbe, num_layers: int, kv_cache=None) -> AttentionState:
    """The AttentionState that asks the last decoder layer (global number num_layers) to run `probe`."""
    return AttentionState(kv_cache=kv_cache, probe=probe, probe_layer=num_layers)


@dataclass
class ScoredMicrobatch:
    """One microbatch's scoring-pass output on the last stage: collect(...) and the region masses."""

    output: object
    mass: RegionMass
    region_mass: torch.Tensor   # a [b, s], indexed by query position (0 where not measured)
    image_mass: torch.Tensor    # v [b, s], likewise


def score_region_mass(model, microbatches: list[dict], collect=None, key_weights: bool = False
                      ) -> list[ScoredMicrobatch]:
    """Scoring forward with region masses on the last layer; one ScoredMicrobatch per mb on the last stage.

    Each microbatch: `inputs` (forward kwargs, e.g. from model_inputs), `query_rows`, `region_mask`,
    `image_mask` (see RegionMassProbe), plus anything `collect(logits, mb)` reads. Runs megatron's
    forward-only schedule (any PP); other stages return []. key_weights: see RegionMassProbe.
    """
    from megatron_sayo.distributed.schedule import run_forward

    num_layers = model.config.num_layers
    prepared = []
    for mb in microbatches:
        probe = RegionMassProbe(mb["query_rows"], mb["region_mask"], mb["image_mask"], key_weights=key_weights)
        prepared.append({**mb, "probe": probe, "inputs": {**mb["inputs"], "state": probe_state(probe, num_layers)}})

    def finish(logits, mb):
        mass = mb["probe"].result
        if mass is None:
            raise RuntimeError(f"the region-mass probe did not run on layer {num_layers} of the last stage")
        b, s = mb["inputs"]["input_ids"].shape
        a, v = (x.to(logits.device) for x in mass.dense(b, s))  # beside the log-probs collect() returns
        return ScoredMicrobatch(output=collect(logits, mb) if collect else None, mass=mass, region_mass=a,
                                image_mass=v)

    return run_forward(model, prepared, finish)
