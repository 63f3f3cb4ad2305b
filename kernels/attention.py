"""
Sparse attention for SepLLM (and StreamingLLM, FixLLM), with SA-Softmax fused: a Triton kernel, a fast CPU path
in plain PyTorch, and the dense masked reference.

Query i attends key j iff  j ≤ i  and  ( j < a  or  keep[j]  or  i − j < w )      (sepllm.py, rule (1))
keep[j] marks separators (SepLLM), nothing (StreamingLLM) or every k-th token (FixLLM).

Where the speed comes from. A dense masked attention computes all T² scores and throws most away. Block
skipping (FlexAttention's 128x128 block masks) saves little, since separators are ~10-25 % of tokens and
nearly every key tile holds one. Instead, for a block of queries [q0, q1):
  - the window is one contiguous key range [lo, q1) with lo = q0 − w + 1;
  - everything left of it that is visible (sinks and separators, the positions j < lo with j < a or keep[j])
    is a prefix of ONE sorted list of kept positions per sequence, so it is gathered as a compact column list.
Cost per query block: (#kept before lo + w + block) keys instead of q1.

    for each query block (b, h, q0):                         # FlashAttention-2 style, one online softmax
        m, l, acc, acc_x, x_min, x_max = -inf, 0, 0, 0, +inf, -inf
        for chunk of the gathered columns, then chunk of [lo, q1):
            x = q K_chunk^T / sqrt(d), masked by rule (1)
            m' = max(m, rowmax x);  p = exp(x - m');  α = exp(m - m')
            l = α l + Σ p;  acc = α acc + p V;  acc_x = α acc_x + (x ⊙ p) V        (acc_x only for SA)
            x_min, x_max = running min / max of the visible x                         (SA-2)
        softmax: acc / l     SA-1: acc_x / l     SA-2: (acc_x − a acc) / ((b − a) l),  a = min(x_min, 0), b = max(x_max, 0)

(SA-2 by the flash-friendly identity Σ ((x−a)/(b−a)) p v = (Σ x p v − a Σ p v)/(b − a).) A separator inside the
window is counted once: the gathered list stops at lo, the window starts there.

Backward: for softmax, Triton kernels dQ (query-block major, same loops as the forward) and dK/dV (key-block
major: a key block is visited by the query blocks that can see it, all later ones if it holds a sink or a kept
key, else those within w), from the saved log-sum-exp; no atomics, so deterministic. For SA-1/SA-2 the
backward recomputes the CPU path under autograd (PyTorch), which is correct but not fused.

Backends (kernels/__init__.py): auto = Triton on CUDA, the fast path elsewhere; triton; torch = the dense
reference. Under TRITON_INTERPRET=1 the Triton path runs on the CPU (fp32 / fp16; not bf16).
"""
import math

import torch
import torch.nn.functional as F

from kernels import backend, triton, use_triton
from sa_softmax import sa_softmax
from sepllm import keep_mask

if triton is not None:
    import triton.language as tl


# ----------------------------------------------------------------------------- reference and CPU fast path

def reference_attention(q, k, v, keep, n_init, n_local, score="softmax"):
    """Dense masked attention, the definition: q, k, v (B, H, T, D), keep (B, T) bool."""
    mask = keep_mask(keep, n_init, n_local)[:, None]                              # (B, 1, T, T)
    if score == "softmax":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return sa_softmax(x, mask=mask, normalized=score == "sa_norm") @ v


def kept_columns(keep, n_init):
    """The visible-beyond-the-window keys (j < a or keep[j]) of each sequence: their positions in order, padded,
    (B, T) int64, and kept_before (B, T+1): how many of them lie left of each position."""
    kept = keep.clone()
    kept[:, :n_init] = True
    cols = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)               # kept positions first, in order
    return cols, F.pad(torch.cumsum(kept, 1), (1, 0))


def fast_attention(q, k, v, keep, n_init, n_local, score="softmax", block=128):
    """Per query block: gather the visible columns left of the window, take the window as it is, attend."""
    B, H, T, D = q.shape
    cols, kept_before = kept_columns(keep, n_init)
    outs = []
    for q0 in range(0, T, block):
        q1 = min(q0 + block, T)
        lo = max(0, q0 - n_local + 1)
        n = kept_before[:, lo]                                                    # (B,) gathered columns
        n_max = int(n.max())
        idx = torch.cat([cols[:, :n_max], torch.arange(lo, q1, device=q.device).expand(B, -1)], 1)   # (B, S)
        valid = torch.cat([torch.arange(n_max, device=q.device)[None] < n[:, None],
                           torch.ones(B, q1 - lo, dtype=torch.bool, device=q.device)], 1)
        gather = idx[:, None, :, None].expand(B, H, -1, D)
        k_b, v_b = k.gather(2, gather), v.gather(2, gather)                      # (B, H, S, D)
        i = torch.arange(q0, q1, device=q.device)[None, :, None]                 # (1, Tq, 1)
        j = idx[:, None, :]                                                       # (B, 1, S)
        allowed = valid[:, None, :] & (j <= i) & ((j < n_init) | keep.gather(1, idx)[:, None, :] | (i - j < n_local))
        x = q[:, :, q0:q1] @ k_b.transpose(-2, -1) / math.sqrt(D)               # (B, H, Tq, S)
        mask = allowed[:, None]
        if score == "softmax":
            w = torch.softmax(x.masked_fill(~mask, float("-inf")), -1)
        else:
            w = sa_softmax(x, mask=mask, normalized=score == "sa_norm")
        outs.append(w @ v_b)
    return torch.cat(outs, 2)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    @triton.jit
    def _scores(q, k, kpos, kvalid, offs_m, sep_ptr, n_init, n_local, scale):
        """Scaled scores of a query block against one chunk of keys k (BLOCK_N, D), and which rule (1) allows."""
        x = tl.dot(q, tl.trans(k)) * scale                                        # (BLOCK_M, BLOCK_N)
        sep = tl.load(sep_ptr + kpos, mask=kvalid, other=0) != 0
        rule = (kpos[None, :] < n_init) | sep[None, :] | (offs_m[:, None] - kpos[None, :] < n_local)
        allowed = kvalid[None, :] & (kpos[None, :] <= offs_m[:, None]) & rule
        return x, allowed

    @triton.jit
    def _fwd_chunk(q, kpos, kvalid, offs_m, k_base, v_base, sep_ptr, stride_kt, n_init, n_local, scale,
                   m_i, l_i, acc, acc_x, x_min, x_max, D: tl.constexpr, SCORE: tl.constexpr):
        d = tl.arange(0, D)
        k = tl.load(k_base + kpos[:, None] * stride_kt + d[None, :], mask=kvalid[:, None], other=0.0)
        v = tl.load(v_base + kpos[:, None] * stride_kt + d[None, :], mask=kvalid[:, None], other=0.0)
        x, allowed = _scores(q, k, kpos, kvalid, offs_m, sep_ptr, n_init, n_local, scale)
        x_masked = tl.where(allowed, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x_masked, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                     # a row with nothing visible yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(x_masked - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        if SCORE > 0:
            acc_x = acc_x * alpha[:, None] + tl.dot((tl.where(allowed, x, 0.0) * p).to(v.dtype), v)
            x_min = tl.minimum(x_min, tl.min(tl.where(allowed, x, float("inf")), 1))
            x_max = tl.maximum(x_max, tl.max(x_masked, 1))
        return m_new, l_i, acc, acc_x, x_min, x_max

    @triton.jit
    def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, sep_ptr, cols_ptr, ncols_ptr,
                    H, T, n_init, n_local, scale, stride_b, stride_h, stride_t, n_qblocks,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCORE: tl.constexpr):
        # SCORE: 0 softmax, 1 SA-1, 2 SA-2. q, k, v, o contiguous (B, H, T, D); sep (B, T) int8;
        # cols (B, T) kept positions in order; ncols (B, n_qblocks) how many lie left of each block's window
        qb, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        base = b * stride_b + h * stride_h
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + base + offs_m[:, None] * stride_t + d[None, :], mask=offs_m[:, None] < T, other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        acc_x = tl.zeros((BLOCK_M, D), tl.float32)
        x_min = tl.full((BLOCK_M,), float("inf"), tl.float32)
        x_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        sep_b = sep_ptr + b * T
        # 1. the gathered columns (sinks and kept keys left of the window)
        n_cols = tl.load(ncols_ptr + b * n_qblocks + qb)
        for c0 in range(0, n_cols, BLOCK_N):
            c = c0 + tl.arange(0, BLOCK_N)
            kvalid = c < n_cols
            kpos = tl.load(cols_ptr + b * T + c, mask=kvalid, other=0)
            m_i, l_i, acc, acc_x, x_min, x_max = _fwd_chunk(
                q, kpos, kvalid, offs_m, k_ptr + base, v_ptr + base, sep_b, stride_t, n_init, n_local, scale,
                m_i, l_i, acc, acc_x, x_min, x_max, D, SCORE)
        # 2. the window, contiguous: [lo, q1)
        lo = tl.maximum(qb * BLOCK_M - n_local + 1, 0)
        q1 = tl.minimum(qb * BLOCK_M + BLOCK_M, T)
        for n0 in range(lo, q1, BLOCK_N):
            kpos = n0 + tl.arange(0, BLOCK_N)
            kvalid = kpos < q1
            m_i, l_i, acc, acc_x, x_min, x_max = _fwd_chunk(
                q, kpos, kvalid, offs_m, k_ptr + base, v_ptr + base, sep_b, stride_t, n_init, n_local, scale,
                m_i, l_i, acc, acc_x, x_min, x_max, D, SCORE)
        row_ok = offs_m < T
        l_i = tl.where(row_ok, l_i, 1.0)                                           # rows past T are not stored
        if SCORE == 0:
            out = acc / l_i[:, None]
        elif SCORE == 1:
            out = acc_x / l_i[:, None]
        else:
            a = tl.minimum(x_min, 0.0)
            den = (tl.maximum(x_max, 0.0) - a) * l_i
            den_safe = tl.where(den > 0, den, 1.0)                                 # all scores 0: weights 0
            out = tl.where(den[:, None] > 0, (acc_x - a[:, None] * acc) / den_safe[:, None], 0.0)
        tl.store(o_ptr + base + offs_m[:, None] * stride_t + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(lse_ptr + bh * T + offs_m, m_i + tl.log(l_i), mask=row_ok)

    @triton.jit
    def _dq_chunk(q, do, lse, delta, kpos, kvalid, offs_m, k_base, v_base, sep_ptr, stride_kt, n_init, n_local,
                  scale, dq, D: tl.constexpr):
        d = tl.arange(0, D)
        k = tl.load(k_base + kpos[:, None] * stride_kt + d[None, :], mask=kvalid[:, None], other=0.0)
        v = tl.load(v_base + kpos[:, None] * stride_kt + d[None, :], mask=kvalid[:, None], other=0.0)
        x, allowed = _scores(q, k, kpos, kvalid, offs_m, sep_ptr, n_init, n_local, scale)
        p = tl.where(allowed, tl.exp(x - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        return dq + tl.dot(ds.to(k.dtype), k) * scale

    @triton.jit
    def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, sep_ptr, cols_ptr, ncols_ptr,
                   H, T, n_init, n_local, scale, stride_b, stride_h, stride_t, n_qblocks,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        qb, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        base = b * stride_b + h * stride_h
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        row_ok = offs_m < T
        q = tl.load(q_ptr + base + offs_m[:, None] * stride_t + d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptr + base + offs_m[:, None] * stride_t + d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + bh * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + bh * T + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros((BLOCK_M, D), tl.float32)
        sep_b = sep_ptr + b * T
        n_cols = tl.load(ncols_ptr + b * n_qblocks + qb)
        for c0 in range(0, n_cols, BLOCK_N):
            c = c0 + tl.arange(0, BLOCK_N)
            kvalid = c < n_cols
            kpos = tl.load(cols_ptr + b * T + c, mask=kvalid, other=0)
            dq = _dq_chunk(q, do, lse, delta, kpos, kvalid, offs_m, k_ptr + base, v_ptr + base, sep_b, stride_t,
                           n_init, n_local, scale, dq, D)
        lo = tl.maximum(qb * BLOCK_M - n_local + 1, 0)
        q1 = tl.minimum(qb * BLOCK_M + BLOCK_M, T)
        for n0 in range(lo, q1, BLOCK_N):
            kpos = n0 + tl.arange(0, BLOCK_N)
            dq = _dq_chunk(q, do, lse, delta, kpos, kpos < q1, offs_m, k_ptr + base, v_ptr + base, sep_b,
                           stride_t, n_init, n_local, scale, dq, D)
        tl.store(dq_ptr + base + offs_m[:, None] * stride_t + d[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=row_ok[:, None])

    @triton.jit
    def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, sep_ptr, qend_ptr,
                     H, T, n_init, n_local, scale, stride_b, stride_h, stride_t, n_kblocks,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # qend (B, n_kblocks): the last query that can see any key of the block, + 1
        kb, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        base = b * stride_b + h * stride_h
        kpos = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        kvalid = kpos < T
        d = tl.arange(0, D)
        k = tl.load(k_ptr + base + kpos[:, None] * stride_t + d[None, :], mask=kvalid[:, None], other=0.0)
        v = tl.load(v_ptr + base + kpos[:, None] * stride_t + d[None, :], mask=kvalid[:, None], other=0.0)
        sep = tl.load(sep_ptr + b * T + kpos, mask=kvalid, other=0) != 0
        dk = tl.zeros((BLOCK_N, D), tl.float32)
        dv = tl.zeros((BLOCK_N, D), tl.float32)
        q_end = tl.load(qend_ptr + b * n_kblocks + kb)
        for m0 in range((kb * BLOCK_N // BLOCK_M) * BLOCK_M, q_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            q = tl.load(q_ptr + base + offs_m[:, None] * stride_t + d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptr + base + offs_m[:, None] * stride_t + d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_ptr + bh * T + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + bh * T + offs_m, mask=row_ok, other=0.0)
            x = tl.dot(q, tl.trans(k)) * scale                                    # (BLOCK_M, BLOCK_N)
            rule = (kpos[None, :] < n_init) | sep[None, :] | (offs_m[:, None] - kpos[None, :] < n_local)
            allowed = row_ok[:, None] & kvalid[None, :] & (kpos[None, :] <= offs_m[:, None]) & rule
            p = tl.where(allowed, tl.exp(x - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q) * scale
        tl.store(dk_ptr + base + kpos[:, None] * stride_t + d[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=kvalid[:, None])
        tl.store(dv_ptr + base + kpos[:, None] * stride_t + d[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=kvalid[:, None])


BLOCK_M, BLOCK_N = 32, 32
SCORES = {"softmax": 0, "sa": 1, "sa_norm": 2}


def _layout(keep, n_init, n_local, T):
    """Host-side schedule: kept columns, how many lie left of each query block's window, and for each key block
    the end of the queries that can see it."""
    B = keep.shape[0]
    cols, kept_before = kept_columns(keep, n_init)
    n_q = triton.cdiv(T, BLOCK_M)
    lo = (torch.arange(n_q, device=keep.device) * BLOCK_M - n_local + 1).clamp(min=0)                   # (n_q,)
    ncols = kept_before[:, lo]                                                                          # (B, n_q)
    n_k = triton.cdiv(T, BLOCK_N)
    k1 = torch.clamp(torch.arange(1, n_k + 1, device=keep.device) * BLOCK_N, max=T)
    any_kept = F.pad(keep, (0, n_k * BLOCK_N - T)).view(B, n_k, BLOCK_N).any(2)
    any_kept |= (torch.arange(n_k, device=keep.device) * BLOCK_N < n_init)[None]
    q_end = torch.where(any_kept, torch.full_like(any_kept, T, dtype=torch.int32),
                        torch.clamp(k1 - 1 + n_local, max=T).to(torch.int32)[None].expand(B, -1))
    return (keep.to(torch.int8).contiguous(), cols.to(torch.int32).contiguous(), ncols.to(torch.int32).contiguous(),
            q_end.to(torch.int32).contiguous(), n_q, n_k)


class TritonSepAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keep, n_init, n_local, score):
        B, H, T, D = q.shape
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        sep, cols, ncols, q_end, n_q, n_k = _layout(keep, n_init, n_local, T)
        o = torch.empty_like(q)
        lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
        scale = 1.0 / math.sqrt(D)
        _fwd_kernel[(n_q, B * H)](q, k, v, o, lse, sep, cols, ncols, H, T, n_init, n_local, scale,
                                  q.stride(0), q.stride(1), q.stride(2), n_q,
                                  D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SCORE=SCORES[score])
        ctx.save_for_backward(q, k, v, o, lse, keep, sep, cols, ncols, q_end)
        ctx.args = (n_init, n_local, score, n_q, n_k)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, keep, sep, cols, ncols, q_end = ctx.saved_tensors
        n_init, n_local, score, n_q, n_k = ctx.args
        if score != "softmax":  # SA: recompute the PyTorch path under autograd
            with torch.enable_grad():
                qkv = [t.detach().requires_grad_() for t in (q, k, v)]
                out = fast_attention(*qkv, keep, n_init, n_local, score)
                return (*torch.autograd.grad(out, qkv, do), None, None, None, None)
        B, H, T, D = q.shape
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).view(B * H, T)                   # D_i = rowsum(dO ⊙ O)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        scale = 1.0 / math.sqrt(D)
        strides = (q.stride(0), q.stride(1), q.stride(2))
        _dq_kernel[(n_q, B * H)](q, k, v, do, lse, delta, dq, sep, cols, ncols, H, T, n_init, n_local, scale,
                                 *strides, n_q, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        _dkdv_kernel[(n_k, B * H)](q, k, v, do, lse, delta, dk, dv, sep, q_end, H, T, n_init, n_local, scale,
                                   *strides, n_k, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        return dq, dk, dv, None, None, None, None


def sepllm_attention(q, k, v, keep, n_init, n_local, score="softmax"):
    """Causal attention where query i sees keys j < n_init, keys with keep[j], and keys with i − j < n_local.
    q, k, v (B, H, T, D); keep (B, T) bool; score softmax | sa | sa_norm."""
    if score not in SCORES:
        raise ValueError(f"score must be softmax, sa or sa_norm, got {score!r}")
    if backend() == "torch":
        return reference_attention(q, k, v, keep, n_init, n_local, score)
    if use_triton(q):
        return TritonSepAttention.apply(q, k, v, keep, n_init, n_local, score)
    return fast_attention(q, k, v, keep, n_init, n_local, score)
