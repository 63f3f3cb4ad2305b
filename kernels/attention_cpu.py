"""
The CPU fast path of kernels/attention.py's sparse attention, in plain PyTorch: the same split of every query
block's keys into gathered columns (sinks and kept keys left of the window) and the window range, computed by
SDPA (or SA-Softmax) on the gathered keys, with a backward as sparse as the forward.

Per block of 128 queries [q0, q1): gather the columns left of the block's window (j < lo = q0 − w + 1, kept),
append the window range [lo, q1), attend with the block's (query, key) mask. Cost per block: (#kept before lo +
w + block) keys instead of q1. The backward differentiates each block's small graph and index-adds the gathered
keys' gradients (touching only the gathered keys, as the forward did); autograd through a gather would add one
dense (B, H, T, D) gradient per block.

On a 2-core CPU this is several times faster than dense SDPA with the boolean mask at T = 1024-8192
(`python bench_kernels.py --part=attention`).
"""
import math

import torch
import torch.nn.functional as F


def sa_weights(x, mask, score):
    """The attention weights of scores x (..., S) under a bool mask: softmax, SA-1 (x ⊙ p) or SA-2
    (((x − a)/(b − a)) ⊙ p, a = min(x_min, 0), b = max(x_max, 0)); in fp32 at least, a fully masked row gives
    zeros (sa_softmax.py's definition, min and max not detached)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = x.masked_fill(~mask, float("-inf"))
    m = xf.amax(-1, keepdim=True)
    e = torch.exp(xf - torch.where(torch.isfinite(m), m, 0.0))
    p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    if score == "softmax":
        return p
    x0 = x.masked_fill(~mask, 0.0)
    if score == "sa_norm":
        a, b = x0.amin(-1, keepdim=True).clamp(max=0.0), x0.amax(-1, keepdim=True).clamp(min=0.0)
        x0 = (x0 - a) / (b - a).clamp_min(1e-12)
    return x0 * p


def _query_blocks(keep, n_init, n_local, block):
    """For each block of queries [q0, q1): the gathered key positions idx (B, S) (the columns left of the window,
    then the window range [lo, q1)) and which (query, key) pairs rule (1) allows, (B, q1 − q0, S)."""
    B, T = keep.shape
    kept = keep | (torch.arange(T, device=keep.device) < n_init)
    cols = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)             # kept positions first, in order
    kept_before = F.pad(torch.cumsum(kept, 1), (1, 0))
    for q0 in range(0, T, block):
        q1 = min(q0 + block, T)
        lo = max(0, q0 - n_local + 1)
        n = kept_before[:, lo]                                                    # (B,) columns left of the window
        n_max = int(n.max())                                                      # (a host read: fine on the CPU)
        idx = torch.cat([cols[:, :n_max], torch.arange(lo, q1, device=keep.device).expand(B, -1)], 1)   # (B, S)
        # a column (j < lo) is visible to every query of the block; in the window range rule (1) decides
        columns = (torch.arange(n_max, device=keep.device) < n[:, None])[:, None, :].expand(B, q1 - q0, n_max)
        i = torch.arange(q0, q1, device=keep.device)[:, None]                     # (Tq, 1)
        j = torch.arange(lo, q1, device=keep.device)[None, :]                     # (1, q1 - lo)
        window = (j <= i) & (kept[:, None, lo:q1] | (i - j < n_local))            # (B, Tq, q1 - lo)
        yield q0, q1, idx, torch.cat([columns, window], 2)


def _gather_rows(k, idx):
    """k (B, H, T, D) contiguous, idx (B, S) -> the flat row numbers of k[b, h, idx[b, s]], (B*H*S,)."""
    B, H, T, D = k.shape
    return (torch.arange(B * H, device=k.device).view(B, H, 1) * T + idx[:, None, :]).flatten()


def _attend(q, k, v, allowed, score):
    """Attention of q (B, H, Tq, D) over gathered keys k, v (B, H, S, D), allowed (B, Tq, S)."""
    if score == "softmax":  # an additive mask: SDPA would convert a boolean one in the forward and the backward
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None])
    x = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])                         # (B, H, Tq, S)
    return sa_weights(x, allowed[:, None], score).to(v.dtype) @ v


class _GatheredAttention(torch.autograd.Function):
    """Each query block's attention runs under autograd on its own gathered keys; the backward differentiates
    those small graphs and adds into dK, dV only at the gathered rows."""

    @staticmethod
    def forward(ctx, q, k, v, keep, n_init, n_local, score, block):
        B, H, T, D = q.shape
        k, v = k.contiguous(), v.contiguous()
        out, ctx.blocks = torch.empty_like(q), []
        for q0, q1, idx, allowed in _query_blocks(keep, n_init, n_local, block):
            rows = _gather_rows(k, idx)
            with torch.enable_grad():
                q_b = q[:, :, q0:q1].detach().requires_grad_()                    # (B, H, Tq, D)
                k_b = k.view(-1, D).index_select(0, rows).view(B, H, -1, D).requires_grad_()   # (B, H, S, D)
                v_b = v.view(-1, D).index_select(0, rows).view(B, H, -1, D).requires_grad_()
                o_b = _attend(q_b, k_b, v_b, allowed, score)
            out[:, :, q0:q1] = o_b.detach()
            ctx.blocks.append((q0, q1, rows, o_b, q_b, k_b, v_b))
        return out

    @staticmethod
    def backward(ctx, do):
        B, H, T, D = do.shape
        dq, dk, dv = torch.empty_like(do), do.new_zeros(B * H * T, D), do.new_zeros(B * H * T, D)
        for q0, q1, rows, o_b, q_b, k_b, v_b in ctx.blocks:
            dq_b, dk_b, dv_b = torch.autograd.grad(o_b, (q_b, k_b, v_b), do[:, :, q0:q1])
            dq[:, :, q0:q1] = dq_b
            dk.index_add_(0, rows, dk_b.reshape(-1, D))                           # padding columns add zeros
            dv.index_add_(0, rows, dv_b.reshape(-1, D))
        ctx.blocks = None
        return dq, dk.view(B, H, T, D), dv.view(B, H, T, D), None, None, None, None, None


def fast_attention(q, k, v, keep, n_init, n_local, score="softmax", block=128):
    """Per query block: gather the visible columns left of the window, take the window as it is, attend."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _GatheredAttention.apply(q, k, v, keep, n_init, n_local, score, block)
    B, H, T, D = q.shape
    k, v, out = k.contiguous(), v.contiguous(), torch.empty_like(q)
    for q0, q1, idx, allowed in _query_blocks(keep, n_init, n_local, block):
        rows = _gather_rows(k, idx)
        k_b, v_b = (t.view(-1, D).index_select(0, rows).view(B, H, -1, D) for t in (k, v))
        out[:, :, q0:q1] = _attend(q[:, :, q0:q1], k_b, v_b, allowed, score)
    return out
