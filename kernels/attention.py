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
    is a prefix of ONE sorted list of kept positions per sequence (the "columns"), gathered.
Cost per query block: (#kept before lo + w + block) keys instead of q1. Each (query, key) pair belongs to exactly
one of the two parts (column if j < lo, window if j ≥ lo), so a separator inside the window is counted once.

    for each query block (b, h, q0):                         # FlashAttention-2 style, one online softmax
        m, l, acc, acc_x, x_min, x_max = -inf, 0, 0, 0, +inf, -inf
        for chunk of the gathered columns, then chunk of [lo, q1):
            x = q K_chunk^T / sqrt(d), masked by rule (1)
            m' = max(m, rowmax x);  p = exp(x - m');  α = exp(m - m')
            l = α l + Σ p;  acc = α acc + p V;  acc_x = α acc_x + (x ⊙ p) V        (acc_x only for SA)
            x_min, x_max (and where they are) = running min / max of the visible x    (SA-2)
        softmax: acc / l     SA-1: acc_x / l     SA-2: (acc_x − a acc) / ((b − a) l),  a = min(x_min, 0), b = max(x_max, 0)

(SA-2 by the flash-friendly identity Σ ((x−a)/(b−a)) p v = (Σ x p v − a Σ p v)/(b − a).)

Backward, from the saved log-sum-exp (p = exp(x − lse)), g = dO·v_j, δ = dO·O, each pair again visited once:
    softmax:  dx = p (g − δ)                          weights w = p
    SA-1:     dx = p (g (1 + x) − δ)                  w = x p
    SA-2:     dx = p (g (1/(b−a) + u) − δ)            w = u p,  u = (x − a)/(b − a)
              + (δ − dO·O_softmax)/(b − a) at the row's arg-min (if a < 0)
              − δ/(b − a) at the row's arg-max (if b > 0)
    dQ = Σ dx K / sqrt(d),  dK = Σ dx^T Q / sqrt(d),  dV = Σ w^T dO
(the last line of SA-2 is the gradient through the row's min and max, which the public implementation does not
detach; on an exact tie the first position takes all of it, where torch.amin would split it).
Three Triton passes, none with atomics: dQ (query-block major, the forward's loops); dK/dV over the columns (each
program owns BLOCK_N gathered columns and walks the query blocks whose forward gathered them, j < lo); dK/dV over
the window (each program owns a key block and walks the few query blocks whose window range [lo, q1) holds it),
adding the column pass's partial sums for its kept keys. dQ computes the forward's pairs; dK/dV the same column
pairs and about the same window pairs (`pairs_computed`, printed by kernels/bench.py). The forward saves what
SA-2's backward needs (the softmax output for dO·O_softmax, a, b and where x_min, x_max are), so SA-1/SA-2 run the
same three passes as softmax.

The CPU fast path gathers, per block of 128 queries, the columns left of the block's window plus the window range,
and runs SDPA (or SA-Softmax) on the gathered keys; its backward differentiates each block's small graph and
index-adds the gathered keys' gradients (touching only the gathered keys, as the forward did).

Backends (kernels/__init__.py): auto = Triton on CUDA, the fast path elsewhere; triton; torch = the dense
reference. Under TRITON_INTERPRET=1 the Triton path runs on the CPU (fp32 / fp16; not bf16).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels import backend, triton, use_triton
from sa_softmax import sa_softmax
from sepllm import keep_mask

if triton is not None:
    import triton.language as tl

SCORES = {"softmax": 0, "sa": 1, "sa_norm": 2}


def check_inputs(q, k, v, keep):
    """One clear error for inputs the kernels would misread: q, k, v (B, H, T, D) alike, keep (B, T) bool."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be (B, H, T, D) with the same shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}; repeat grouped key/value heads "
                         "(repeat_interleave) and pass keys for every query position")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}; cast them with .to() first")
    if keep.dtype != torch.bool or keep.shape != (q.shape[0], q.shape[2]) or keep.device != q.device:
        raise ValueError(f"keep must be a bool (B, T) = {(q.shape[0], q.shape[2])} tensor on {q.device}, got "
                         f"{keep.dtype} {tuple(keep.shape)} on {keep.device}")


# ----------------------------------------------------------------------------- reference and CPU fast path

def reference_attention(q, k, v, keep, n_init, n_local, score="softmax"):
    """Dense masked attention, the definition: q, k, v (B, H, T, D), keep (B, T) bool."""
    mask = keep_mask(keep, n_init, n_local)[:, None]                              # (B, 1, T, T)
    if score == "softmax":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return sa_softmax(x, mask=mask, normalized=score == "sa_norm") @ v


def kept_columns(keep, n_init):
    """The visible-beyond-the-window keys (j < a or keep[j]) of each sequence: their positions in order, followed
    by the other positions, (B, T) int64, and kept_before (B, T+1): how many of them lie left of each position."""
    kept = keep.clone()
    kept[:, :n_init] = True
    cols = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)               # kept positions first, in order
    return cols, F.pad(torch.cumsum(kept, 1), (1, 0))


def _query_blocks(keep, n_init, n_local, block):
    """For each block of queries [q0, q1): the gathered key positions idx (B, S) (the columns left of the window,
    then the window range [lo, q1)) and which (query, key) pairs rule (1) allows, (B, q1 − q0, S)."""
    B, T = keep.shape
    cols, kept_before = kept_columns(keep, n_init)
    kept = keep | (torch.arange(T, device=keep.device) < n_init)
    for q0 in range(0, T, block):
        q1 = min(q0 + block, T)
        lo = max(0, q0 - n_local + 1)
        n = kept_before[:, lo]                                                    # (B,) columns left of the window
        n_max = int(n.max())
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
    return sa_softmax(x, mask=allowed[:, None], normalized=score == "sa_norm") @ v


class _GatheredAttention(torch.autograd.Function):
    """The CPU fast path with a backward as sparse as its forward. Each query block's attention runs under autograd
    on its own gathered keys; the backward differentiates those small graphs and adds into dK, dV only at the
    gathered rows (autograd through a gather would instead add one dense (B, H, T, D) gradient per block)."""

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


# ----------------------------------------------------------------------------- the Triton schedule and its cost

BLOCK_M, BLOCK_N = 32, 32       # queries, keys per tile


class Schedule(NamedTuple):
    """Host-side plan shared by the kernels and by `pairs_computed`."""
    sep: torch.Tensor          # (B, T) int8: keep[j]
    cols: torch.Tensor         # (B, T) int32: kept positions (j < a or keep[j]) in order, then the others
    kept_before: torch.Tensor  # (B, T+1) int32: kept positions left of each position (= a kept key's column)
    ncols: torch.Tensor        # (B, n_q) int32: columns left of each query block's window, j < lo
    col_qstart: torch.Tensor   # (B, n_c) int32: first query block that gathers each block of BLOCK_N columns
    n_init: int                # a and w, clamped to T
    n_local: int
    n_q: int                   # query blocks
    n_c: int                   # key blocks = column blocks


def schedule(keep, n_init, n_local):
    """The kept columns and, per query block and per column block, where the kernels' loops start and end."""
    B, T = keep.shape
    a, w = min(n_init, T), min(n_local, T)
    cols, kept_before = kept_columns(keep, a)
    n_q, n_c = -(-T // BLOCK_M), -(-T // BLOCK_N)
    lo = (torch.arange(n_q, device=keep.device) * BLOCK_M - w + 1).clamp(min=0)                         # (n_q,)
    c0 = torch.arange(n_c, device=keep.device) * BLOCK_N
    # the first query block whose window starts right of the block's first column j: q0 − w + 1 > j ⇔ q0 ≥ j + w
    q_start = (cols[:, c0] + w + BLOCK_M - 1) // BLOCK_M
    col_qstart = torch.where(c0 < kept_before[:, T:], q_start.clamp(max=n_q), n_q)
    i32 = lambda t: t.to(torch.int32).contiguous()
    return Schedule(keep.to(torch.int8).contiguous(), i32(cols), i32(kept_before), i32(kept_before[:, lo]),
                    i32(col_qstart), a, w, n_q, n_c)


def pairs_computed(keep, n_init, n_local):
    """(query, key) pairs per head, summed over the batch: `kept` by rule (1), and the pairs each Triton pass
    evaluates (BLOCK_M x BLOCK_N per tile it visits, masked entries included): forward, dq, dkdv."""
    s = schedule(keep, n_init, n_local)
    B, T = keep.shape
    w, tile, dev = s.n_local, BLOCK_M * BLOCK_N, keep.device
    i = torch.arange(T, device=dev)
    # row i keeps min(w, i + 1) window keys and the kept keys left of its window
    kept = (i + 1).clamp(max=w).sum() * B + s.kept_before[:, (i - w + 1).clamp(min=0)].sum()
    q0 = torch.arange(s.n_q, device=dev) * BLOCK_M
    q1, lo = (q0 + BLOCK_M).clamp(max=T), (q0 - w + 1).clamp(min=0)
    cdiv = lambda x: (x + BLOCK_N - 1) // BLOCK_N
    fwd = (cdiv(s.ncols).sum() + B * cdiv(q1 - lo).sum()) * tile
    k0 = torch.arange(s.n_c, device=dev) * BLOCK_N
    window_qblocks = ((k0 + BLOCK_N + w - 2) // BLOCK_M).clamp(max=s.n_q - 1) - k0 // BLOCK_M + 1
    dkdv = ((s.n_q - s.col_qstart).sum() + B * window_qblocks.sum()) * tile
    return {"kept": int(kept), "forward": int(fwd), "dq": int(fwd), "dkdv": int(dkdv)}


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
                   m_i, l_i, acc, acc_x, x_min, x_max, i_min, i_max, D: tl.constexpr, SCORE: tl.constexpr):
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
        if SCORE == 2:  # running min / max of the visible scores and where they are (first position on ties)
            x_hi = tl.where(allowed, x, float("inf"))
            c_min, c_max = tl.min(x_hi, 1), tl.max(x_masked, 1)
            p_min = tl.min(tl.where(x_hi == c_min[:, None], kpos[None, :], 1 << 30), 1)
            p_max = tl.min(tl.where(x_masked == c_max[:, None], kpos[None, :], 1 << 30), 1)
            i_min = tl.where(c_min < x_min, p_min, i_min)
            i_max = tl.where(c_max > x_max, p_max, i_max)
            x_min, x_max = tl.minimum(x_min, c_min), tl.maximum(x_max, c_max)
        return m_new, l_i, acc, acc_x, x_min, x_max, i_min, i_max

    @triton.jit
    def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, o1_ptr, ab_ptr, arg_ptr, sep_ptr, cols_ptr, ncols_ptr,
                    H, T, n_init, n_local, scale, stride_b, stride_h, stride_t, n_qblocks,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCORE: tl.constexpr):
        # SCORE: 0 softmax, 1 SA-1, 2 SA-2. q, k, v, o contiguous (B, H, T, D); lse (B*H, T); for SA-2 also
        # o1 = the softmax output (B, H, T, D), ab = (a, b) (B*H, T, 2), arg = where x_min, x_max are (B*H, T, 2).
        # sep (B, T) int8; cols (B, T) kept positions in order; ncols (B, n_qblocks) how many lie left of the window
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
        i_min = tl.zeros((BLOCK_M,), tl.int32)
        i_max = tl.zeros((BLOCK_M,), tl.int32)
        sep_b = sep_ptr + b * T
        # 1. the gathered columns (sinks and kept keys left of the window)
        n_cols = tl.load(ncols_ptr + b * n_qblocks + qb)
        for c0 in range(0, n_cols, BLOCK_N):
            c = c0 + tl.arange(0, BLOCK_N)
            kvalid = c < n_cols
            kpos = tl.load(cols_ptr + b * T + c, mask=kvalid, other=0)
            m_i, l_i, acc, acc_x, x_min, x_max, i_min, i_max = _fwd_chunk(
                q, kpos, kvalid, offs_m, k_ptr + base, v_ptr + base, sep_b, stride_t, n_init, n_local, scale,
                m_i, l_i, acc, acc_x, x_min, x_max, i_min, i_max, D, SCORE)
        # 2. the window, contiguous: [lo, q1)
        lo = tl.maximum(qb * BLOCK_M - n_local + 1, 0)
        q1 = tl.minimum(qb * BLOCK_M + BLOCK_M, T)
        for n0 in range(lo, q1, BLOCK_N):
            kpos = n0 + tl.arange(0, BLOCK_N)
            m_i, l_i, acc, acc_x, x_min, x_max, i_min, i_max = _fwd_chunk(
                q, kpos, kpos < q1, offs_m, k_ptr + base, v_ptr + base, sep_b, stride_t, n_init, n_local, scale,
                m_i, l_i, acc, acc_x, x_min, x_max, i_min, i_max, D, SCORE)
        row_ok = offs_m < T
        l_i = tl.where(row_ok, l_i, 1.0)                                           # rows past T are not stored
        out_ptrs = base + offs_m[:, None] * stride_t + d[None, :]
        if SCORE == 0:
            out = acc / l_i[:, None]
        elif SCORE == 1:
            out = acc_x / l_i[:, None]
        else:
            a = tl.minimum(x_min, 0.0)
            bb = tl.maximum(x_max, 0.0)
            den = (bb - a) * l_i
            den_safe = tl.where(den > 0, den, 1.0)                                 # all scores 0: weights 0
            out = tl.where(den[:, None] > 0, (acc_x - a[:, None] * acc) / den_safe[:, None], 0.0)
            tl.store(o1_ptr + out_ptrs, (acc / l_i[:, None]).to(o1_ptr.dtype.element_ty), mask=row_ok[:, None])
            rows = bh * T + offs_m
            tl.store(ab_ptr + rows * 2, a, mask=row_ok)
            tl.store(ab_ptr + rows * 2 + 1, bb, mask=row_ok)
            tl.store(arg_ptr + rows * 2, i_min, mask=row_ok)
            tl.store(arg_ptr + rows * 2 + 1, i_max, mask=row_ok)
        tl.store(o_ptr + out_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptr + bh * T + offs_m, m_i + tl.log(l_i), mask=row_ok)

    @triton.jit
    def _row_stats(lse_ptr, delta_ptr, sa_ptr, arg_ptr, rows, row_ok, SCORE: tl.constexpr):
        """Per query row: lse, δ = dO·O and, for SA-2, a, 1/(b − a), dL/da, dL/db and where x_min, x_max are."""
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        if SCORE == 2:
            sa_a = tl.load(sa_ptr + rows * 4, mask=row_ok, other=0.0)
            sa_inv = tl.load(sa_ptr + rows * 4 + 1, mask=row_ok, other=0.0)
            sa_ga = tl.load(sa_ptr + rows * 4 + 2, mask=row_ok, other=0.0)
            sa_gb = tl.load(sa_ptr + rows * 4 + 3, mask=row_ok, other=0.0)
            i_min = tl.load(arg_ptr + rows * 2, mask=row_ok, other=-1)
            i_max = tl.load(arg_ptr + rows * 2 + 1, mask=row_ok, other=-1)
        else:
            sa_a = tl.zeros_like(lse)
            sa_inv = tl.zeros_like(lse)
            sa_ga = tl.zeros_like(lse)
            sa_gb = tl.zeros_like(lse)
            i_min = tl.zeros_like(lse).to(tl.int32)
            i_max = tl.zeros_like(lse).to(tl.int32)
        return lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max

    @triton.jit
    def _bwd_tile(x, allowed, g, kpos, lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max, SCORE: tl.constexpr):
        """One tile of the backward: the weights w (for dV) and dL/dx (for dQ, dK); g = dO V^T."""
        p = tl.where(allowed, tl.exp(x - lse[:, None]), 0.0)
        if SCORE == 0:
            w = p
            ds = p * (g - delta[:, None])
        elif SCORE == 1:
            x0 = tl.where(allowed, x, 0.0)
            w = x0 * p
            ds = p * (g * (1.0 + x0) - delta[:, None])
        else:
            u = (tl.where(allowed, x, 0.0) - sa_a[:, None]) * sa_inv[:, None]
            w = u * p
            ds = p * (g * (sa_inv[:, None] + u) - delta[:, None])
            ds += tl.where(allowed & (kpos[None, :] == i_min[:, None]), sa_ga[:, None], 0.0)
            ds += tl.where(allowed & (kpos[None, :] == i_max[:, None]), sa_gb[:, None], 0.0)
        return w, ds

    @triton.jit
    def _dq_chunk(q, do, kpos, kvalid, offs_m, k_base, v_base, sep_ptr, stride_kt, n_init, n_local, scale,
                  lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max, dq, D: tl.constexpr, SCORE: tl.constexpr):
        d = tl.arange(0, D)
        k = tl.load(k_base + kpos[:, None] * stride_kt + d[None, :], mask=kvalid[:, None], other=0.0)
        v = tl.load(v_base + kpos[:, None] * stride_kt + d[None, :], mask=kvalid[:, None], other=0.0)
        x, allowed = _scores(q, k, kpos, kvalid, offs_m, sep_ptr, n_init, n_local, scale)
        w, ds = _bwd_tile(x, allowed, tl.dot(do, tl.trans(v)), kpos, lse, delta, sa_a, sa_inv, sa_ga, sa_gb,
                          i_min, i_max, SCORE)
        return dq + tl.dot(ds.to(k.dtype), k) * scale

    @triton.jit
    def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, sa_ptr, arg_ptr, dq_ptr, sep_ptr, cols_ptr,
                   ncols_ptr, H, T, n_init, n_local, scale, stride_b, stride_h, stride_t, n_qblocks,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCORE: tl.constexpr):
        # the forward's loops: the gathered columns, then the window range
        qb, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        base = b * stride_b + h * stride_h
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        row_ok = offs_m < T
        q = tl.load(q_ptr + base + offs_m[:, None] * stride_t + d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptr + base + offs_m[:, None] * stride_t + d[None, :], mask=row_ok[:, None], other=0.0)
        lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max = _row_stats(lse_ptr, delta_ptr, sa_ptr, arg_ptr,
                                                                          bh * T + offs_m, row_ok, SCORE)
        dq = tl.zeros((BLOCK_M, D), tl.float32)
        sep_b = sep_ptr + b * T
        n_cols = tl.load(ncols_ptr + b * n_qblocks + qb)
        for c0 in range(0, n_cols, BLOCK_N):
            c = c0 + tl.arange(0, BLOCK_N)
            kvalid = c < n_cols
            kpos = tl.load(cols_ptr + b * T + c, mask=kvalid, other=0)
            dq = _dq_chunk(q, do, kpos, kvalid, offs_m, k_ptr + base, v_ptr + base, sep_b, stride_t, n_init,
                           n_local, scale, lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max, dq, D, SCORE)
        lo = tl.maximum(qb * BLOCK_M - n_local + 1, 0)
        q1 = tl.minimum(qb * BLOCK_M + BLOCK_M, T)
        for n0 in range(lo, q1, BLOCK_N):
            kpos = n0 + tl.arange(0, BLOCK_N)
            dq = _dq_chunk(q, do, kpos, kpos < q1, offs_m, k_ptr + base, v_ptr + base, sep_b, stride_t, n_init,
                           n_local, scale, lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max, dq, D, SCORE)
        tl.store(dq_ptr + base + offs_m[:, None] * stride_t + d[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=row_ok[:, None])

    @triton.jit
    def _dkdv_cols_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, sa_ptr, arg_ptr, dkc_ptr, dvc_ptr,
                          cols_ptr, kept_before_ptr, qstart_ptr, H, T, n_local, scale, stride_b, stride_h, stride_t,
                          n_qblocks, n_cblocks,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCORE: tl.constexpr):
        # program (cb, bh) owns the gathered columns [cb BLOCK_N, cb BLOCK_N + BLOCK_N) of sequence b and walks
        # the query blocks whose forward gathered them (j < lo); its sums go to dkc, dvc (B*H, T, D) fp32, row =
        # column index, for the window pass to add
        cb, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        base = b * stride_b + h * stride_h
        d = tl.arange(0, D)
        c = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        cvalid = c < tl.load(kept_before_ptr + b * (T + 1) + T)
        kpos = tl.load(cols_ptr + b * T + c, mask=cvalid, other=0)
        k = tl.load(k_ptr + base + kpos[:, None] * stride_t + d[None, :], mask=cvalid[:, None], other=0.0)
        v = tl.load(v_ptr + base + kpos[:, None] * stride_t + d[None, :], mask=cvalid[:, None], other=0.0)
        dk = tl.zeros((BLOCK_N, D), tl.float32)
        dv = tl.zeros((BLOCK_N, D), tl.float32)
        q_start = tl.load(qstart_ptr + b * n_cblocks + cb)
        for m0 in range(q_start * BLOCK_M, n_qblocks * BLOCK_M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            q = tl.load(q_ptr + base + offs_m[:, None] * stride_t + d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptr + base + offs_m[:, None] * stride_t + d[None, :], mask=row_ok[:, None], other=0.0)
            lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max = _row_stats(lse_ptr, delta_ptr, sa_ptr, arg_ptr,
                                                                              bh * T + offs_m, row_ok, SCORE)
            # a kept column left of the block's window is visible to all its rows (sinks and kept keys, j < i)
            allowed = row_ok[:, None] & cvalid[None, :] & (kpos[None, :] < m0 - n_local + 1)
            x = tl.dot(q, tl.trans(k)) * scale
            w, ds = _bwd_tile(x, allowed, tl.dot(do, tl.trans(v)), kpos, lse, delta, sa_a, sa_inv, sa_ga, sa_gb,
                              i_min, i_max, SCORE)
            dv += tl.dot(tl.trans(w).to(do.dtype), do)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q)
        rows = bh * T + c
        tl.store(dkc_ptr + rows[:, None] * D + d[None, :], dk * scale, mask=cvalid[:, None])
        tl.store(dvc_ptr + rows[:, None] * D + d[None, :], dv, mask=cvalid[:, None])

    @triton.jit
    def _dkdv_window_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, sa_ptr, arg_ptr, dk_ptr, dv_ptr,
                            dkc_ptr, dvc_ptr, sep_ptr, kept_before_ptr, H, T, n_init, n_local, scale,
                            stride_b, stride_h, stride_t, n_qblocks,
                            D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCORE: tl.constexpr):
        # program (kb, bh) owns keys [k0, k0 + BLOCK_N) and walks the query blocks whose window range [lo, q1)
        # holds one of them: from the block of k0 to the last with lo < k0 + BLOCK_N
        kb, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        base = b * stride_b + h * stride_h
        d = tl.arange(0, D)
        k0 = kb * BLOCK_N
        kpos = k0 + tl.arange(0, BLOCK_N)
        kvalid = kpos < T
        k = tl.load(k_ptr + base + kpos[:, None] * stride_t + d[None, :], mask=kvalid[:, None], other=0.0)
        v = tl.load(v_ptr + base + kpos[:, None] * stride_t + d[None, :], mask=kvalid[:, None], other=0.0)
        dk = tl.zeros((BLOCK_N, D), tl.float32)
        dv = tl.zeros((BLOCK_N, D), tl.float32)
        q_last = tl.minimum((k0 + BLOCK_N + n_local - 2) // BLOCK_M, n_qblocks - 1)
        for m0 in range((k0 // BLOCK_M) * BLOCK_M, (q_last + 1) * BLOCK_M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            q = tl.load(q_ptr + base + offs_m[:, None] * stride_t + d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptr + base + offs_m[:, None] * stride_t + d[None, :], mask=row_ok[:, None], other=0.0)
            lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max = _row_stats(lse_ptr, delta_ptr, sa_ptr, arg_ptr,
                                                                              bh * T + offs_m, row_ok, SCORE)
            x, allowed = _scores(q, k, kpos, kvalid, offs_m, sep_ptr + b * T, n_init, n_local, scale)
            # keys left of this block's window range were the column pass's
            allowed = allowed & row_ok[:, None] & (kpos[None, :] >= m0 - n_local + 1)
            w, ds = _bwd_tile(x, allowed, tl.dot(do, tl.trans(v)), kpos, lse, delta, sa_a, sa_inv, sa_ga, sa_gb,
                              i_min, i_max, SCORE)
            dv += tl.dot(tl.trans(w).to(do.dtype), do)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q)
        # a kept key's column-pass sums sit at row (its column index) = kept_before[j]
        kept = kvalid & ((tl.load(sep_ptr + b * T + kpos, mask=kvalid, other=0) != 0) | (kpos < n_init))
        col = bh * T + tl.load(kept_before_ptr + b * (T + 1) + kpos, mask=kept, other=0)
        dk = dk * scale + tl.load(dkc_ptr + col[:, None] * D + d[None, :], mask=kept[:, None], other=0.0)
        dv += tl.load(dvc_ptr + col[:, None] * D + d[None, :], mask=kept[:, None], other=0.0)
        tl.store(dk_ptr + base + kpos[:, None] * stride_t + d[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=kvalid[:, None])
        tl.store(dv_ptr + base + kpos[:, None] * stride_t + d[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=kvalid[:, None])


# ----------------------------------------------------------------------------- the wrapper

class TritonSepAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keep, n_init, n_local, score):
        check_inputs(q, k, v, keep)
        B, H, T, D = q.shape
        if D < 16 or D & (D - 1):
            raise ValueError(f"the Triton attention kernel needs a head dim that is a power of two >= 16, got {D}; "
                             "choose n_embd / n_head accordingly or use --kernels=torch")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()                  # one set of strides for all
        s = schedule(keep, n_init, n_local)
        SCORE = SCORES[score]
        o = torch.empty_like(q)
        lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
        if SCORE == 2:  # what SA-2's backward needs: the softmax output, (a, b) and where x_min, x_max are
            o1 = torch.empty_like(q)
            ab = torch.empty(B * H, T, 2, device=q.device, dtype=torch.float32)
            arg = torch.empty(B * H, T, 2, device=q.device, dtype=torch.int32)
        else:
            o1, ab, arg = o, lse, lse                                             # unused by the kernel
        _fwd_kernel[(s.n_q, B * H)](q, k, v, o, lse, o1, ab, arg, s.sep, s.cols, s.ncols, H, T, s.n_init, s.n_local,
                                    1.0 / math.sqrt(D), q.stride(0), q.stride(1), q.stride(2), s.n_q,
                                    D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SCORE=SCORE)
        ctx.save_for_backward(q, k, v, o, lse, o1, ab, arg, *s[:5])
        ctx.args = (*s[5:], SCORE)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, o1, ab, arg, *plan = ctx.saved_tensors
        *sizes, SCORE = ctx.args
        s = Schedule(*plan, *sizes)
        B, H, T, D = q.shape
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).view(B * H, T)                   # δ_i = dO_i · O_i
        sa = delta                                                                # unused unless SA-2
        if SCORE == 2:
            a, b = ab.unbind(-1)
            inv = 1 / (b - a).clamp_min(1e-12)
            s0 = (do.float() * o1.float()).sum(-1).view(B * H, T)                 # dO · O_softmax
            # dL/da = (δ − dO·O_softmax) / (b − a) if a < 0,   dL/db = −δ / (b − a) if b > 0
            sa = torch.stack([a, inv, torch.where(a < 0, (delta - s0) * inv, 0.0),
                              torch.where(b > 0, -delta * inv, 0.0)], -1).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dkc = torch.empty(B * H, T, D, device=q.device, dtype=torch.float32)     # column pass, per column index
        dvc = torch.empty_like(dkc)
        scale, strides = 1.0 / math.sqrt(D), (q.stride(0), q.stride(1), q.stride(2))
        meta = dict(D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SCORE=SCORE)
        _dq_kernel[(s.n_q, B * H)](q, k, v, do, lse, delta, sa, arg, dq, s.sep, s.cols, s.ncols, H, T, s.n_init,
                                   s.n_local, scale, *strides, s.n_q, **meta)
        _dkdv_cols_kernel[(s.n_c, B * H)](q, k, v, do, lse, delta, sa, arg, dkc, dvc, s.cols, s.kept_before,
                                          s.col_qstart, H, T, s.n_local, scale, *strides, s.n_q, s.n_c, **meta)
        _dkdv_window_kernel[(s.n_c, B * H)](q, k, v, do, lse, delta, sa, arg, dk, dv, dkc, dvc, s.sep,
                                            s.kept_before, H, T, s.n_init, s.n_local, scale, *strides, s.n_q, **meta)
        return dq, dk, dv, None, None, None, None


def sepllm_attention(q, k, v, keep, n_init, n_local, score="softmax"):
    """Causal attention where query i sees keys j < n_init, keys with keep[j], and keys with i − j < n_local.
    q, k, v (B, H, T, D); keep (B, T) bool; score softmax | sa | sa_norm."""
    if score not in SCORES:
        raise ValueError(f"score must be softmax, sa or sa_norm, got {score!r}")
    if n_local < 1 or n_init < 0:
        raise ValueError(f"need n_local >= 1 (the window counts the query itself) and n_init >= 0, got "
                         f"n_local={n_local}, n_init={n_init}")
    check_inputs(q, k, v, keep)
    if backend() == "torch":
        return reference_attention(q, k, v, keep, n_init, n_local, score)
    if use_triton(q):
        return TritonSepAttention.apply(q, k, v, keep, n_init, n_local, score)
    return fast_attention(q, k, v, keep, n_init, n_local, score)
