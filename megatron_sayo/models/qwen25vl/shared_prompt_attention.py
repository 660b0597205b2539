"""Attention over packed [prompt | c_1 | ... | c_k] rows (train.prompt_sharing) without a dense mask.

Per packed row (segments: -1 padding, 0 prompt, i completion i; rl/shared_prompt.py): prompt queries attend
causally to the prompt; each completion's queries attend to the whole prompt (part A, no mask) and causally to
their own completion (part B), and the two parts merge by their row log-sum-exps:
    lse = logaddexp(lse_A, lse_B),  out = exp(lse_A - lse) out_A + exp(lse_B - lse) out_B.
A padded query attends to its own key only (as the masked form). Backward runs each part's attention backward
with the merged output and log-sum-exp (the softmax statistics of the whole row), which gives the exact
gradient. Each part is one plain (causal or full) attention, so any kernel that returns the log-sum-exp and
takes it back in its backward serves: `MathKernel` (float32 scores, the reference) or `AtenFlashKernel`
(torch's fused flash kernels: the CPU one, and CUDA's for half precision).
"""

from __future__ import annotations

import torch


class MathKernel:
    """Explicit float32 scores; forward (out, lse) and backward of one [h, sq, d] x [h, sk, d] attention."""

    @staticmethod
    def forward(q, k, v, causal: bool, scale: float):
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        lse = torch.logsumexp(s, -1)
        return torch.matmul(torch.exp(s - lse[..., None]), v.float()).to(q.dtype), lse

    @staticmethod
    def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
        qf, kf, vf, do = q.float(), k.float(), v.float(), dout.float()
        s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        p = torch.exp(s - lse[..., None].float())
        dv = torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, vf.transpose(-1, -2))
        ds = p * (dp - (do * out.float()).sum(-1, keepdim=True))
        return (torch.matmul(ds, kf) * scale).to(q.dtype), (torch.matmul(ds.transpose(-1, -2), qf) * scale).to(
            k.dtype), dv.to(v.dtype)


class AtenFlashKernel:
    """torch's fused flash-attention kernels (aten ops that return the log-sum-exp and take it in backward):
    `_scaled_dot_product_flash_attention_for_cpu` on CPU, `_scaled_dot_product_flash_attention` on CUDA
    (float16/bfloat16). Causal parts have sq == sk, so the diagonal is unambiguous."""

    @staticmethod
    def forward(q, k, v, causal: bool, scale: float):
        q4, k4, v4 = q[None], k[None], v[None]
        if q.is_cuda:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q4, k4, v4, 0.0, causal, False, scale=scale)
            return res[0][0], res[1][0]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q4, k4, v4, 0.0, causal,
                                                                            scale=scale)[:2]
        return out[0], lse[0]

    @staticmethod
    def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
        args = (dout[None].contiguous(), q[None], k[None], v[None], out[None].contiguous(), lse[None].contiguous())
        if q.is_cuda:
            sq, sk = q.shape[1], k.shape[1]
            empty = torch.empty(0, dtype=torch.long, device=q.device)
            zero = torch.zeros((), dtype=torch.long, device=q.device)
            grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                *args, empty, empty, sq, sk, 0.0, causal, zero, zero, scale=scale)
        else:
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*args, 0.0, causal,
                                                                                       scale=scale)
        return tuple(g[0] for g in grads[:3])


def row_parts(segments: torch.Tensor) -> list[tuple[int, int, list[tuple[int, int]], list[int]]]:
    """Per packed row: (prompt start, prompt end, completion spans (start, length), padded columns)."""
    out = []
    for seg in segments.tolist():
        prompt = [c for c, s in enumerate(seg) if s == 0]
        lo, hi = (prompt[0], prompt[-1] + 1) if prompt else (0, 0)
        spans: list[tuple[int, int]] = []
        for c, s in enumerate(seg):
            if s > 0:
                if spans and seg[c - 1] == s:
                    spans[-1] = (spans[-1][0], spans[-1][1] + 1)
                else:
                    spans.append((c, 1))
        out.append((lo, hi, spans, [c for c, s in enumerate(seg) if s < 0]))
    return out


def _calls(parts):
    """The plain attentions of a batch: (row, query cols, key cols, causal); prompt, part A, part B, padding."""
    calls = []
    for b, (lo, hi, spans, pads) in enumerate(parts):
        if hi > lo:
            calls.append((b, slice(lo, hi), slice(lo, hi), True))
        for start, n in spans:
            if hi > lo:
                calls.append((b, slice(start, start + n), slice(lo, hi), False))
            calls.append((b, slice(start, start + n), slice(start, start + n), True))
        for c in pads:
            calls.append((b, slice(c, c + 1), slice(c, c + 1), True))
    return calls


class _SplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segments, scale, kernel):
        calls = _calls(row_parts(segments))
        b, h, S, _ = q.shape
        lse = torch.full((b, h, S), float("-inf"), dtype=torch.float32, device=q.device)
        pieces = []
        for row, qs, ks, causal in calls:
            o, part_lse = kernel.forward(q[row, :, qs], k[row, :, ks], v[row, :, ks], causal, scale)
            pieces.append((row, qs, o.float(), part_lse.float()))
            lse[row, :, qs] = torch.logaddexp(lse[row, :, qs], part_lse.float())
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        for row, qs, o, part_lse in pieces:
            out[row, :, qs] += torch.exp(part_lse - lse[row, :, qs])[..., None] * o
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.calls, ctx.scale, ctx.kernel = calls, scale, kernel
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
        for row, qs, ks, causal in ctx.calls:
            gq, gk, gv = ctx.kernel.backward(dout[row, :, qs].to(q.dtype), q[row, :, qs], k[row, :, ks],
                                             v[row, :, ks], out[row, :, qs], lse[row, :, qs], causal, ctx.scale)
            dq[row, :, qs] += gq.float()
            dk[row, :, ks] += gk.float()
            dv[row, :, ks] += gv.float()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def split_attention(q, k, v, segments: torch.Tensor, scale: float, kernel=MathKernel):
    """(out [b, h, S, d], lse [b, h, S]) of packed rows: the masked form's attention, computed part by part and
    merged by log-sum-exp. q [b, h, S, d]; k, v [b, h or kv groups, S, d]; segments long [b, S]. The gradient of
    lse is not propagated (the probe reads it detached)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return _SplitAttention.apply(q, k, v, segments.to("cpu"), scale, kernel)


def kernel_for(device: torch.device, dtype: torch.dtype):
    """The fused kernel where torch has one for this device and dtype (CPU any; CUDA half precision), else math."""
    if device.type == "cpu" or dtype in (torch.float16, torch.bfloat16):
        return AtenFlashKernel
    return MathKernel


def shared_allowed(segments: torch.Tensor) -> torch.Tensor:
    """bool [b, S, S] (True = attend) of packed rows' segment ids [b, S]: causal, real keys, prompt keys or the
    query's own completion; a padded query keeps only its own key (no empty softmax row)."""
    q, k = segments[:, :, None], segments[:, None, :]
    S = segments.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q)) & (q >= 0)
    return allowed | torch.eye(S, dtype=torch.bool, device=segments.device)
