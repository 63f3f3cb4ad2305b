"""
Sparse attention for SepLLM (and StreamingLLM, FixLLM) with SA-Softmax fused: Triton kernels for the forward and
backward passes, beside the dense masked reference (the CPU fast path is kernels/attention_cpu.py).

Query i attends key j iff  j ≤ i  and  ( j < a  or  keep[j]  or  i − j < w )      (sepllm.py, rule (1))
keep[j] marks separators (SepLLM), nothing (StreamingLLM) or every k-th token (FixLLM).

Where the speed comes from. A dense masked attention computes all T² scores and throws most away, and block
skipping (FlexAttention's 128 x 128 block masks) saves little, since separators are 10-25 % of the tokens and
nearly every key block holds one. Instead, for a block of queries [q0, q1):
  - the window is ONE contiguous key range [lo, q1) with lo = q0 − w + 1;
  - everything visible left of it (sinks and separators j < lo) is a prefix of ONE sorted list of kept positions
    per sequence, `cols`, read through an index (a gather).
Each (query, key) pair belongs to exactly one part (column if j < lo, window if j ≥ lo), so a separator inside the
window is counted once. The plan is three small arrays per batch, built without reading anything on the host
and shared by every layer of a forward pass: cols, kept_before[j] = #kept positions < j (so a block's columns are
cols[:kept_before[lo]]) and the separator flags (kernels/attention_plan.py, with the tile helpers both passes use).

Most tiles need no mask at all, so the kernel sorts them by what they need (the loops below, in this order):
    columns, full tiles        every query of the block sees every column: no mask
    columns, last tile         mask the columns past kept_before[lo]
    window, left edge          rows whose window ends inside the tile: rule (1) with the separator flags
    window, inside             i − j < w and j ≤ i for every pair: no mask
    window, diagonal           causal mask j ≤ i only
Worked example: w = 256, 128 x 64 tiles, q0 = 1024 → lo = 769, the window range 769..1151 is 6 tiles: 2 edge
tiles (769..896), 2 inside (897..1024), 2 diagonal (1025..1152); with 10 % separators the 77 columns left of
769 are one full tile and one of 13.

    for each query block (b, h, q0):              # FlashAttention-2: one online softmax, scores in log2 units
        m, l, acc, acc_x, x_min, x_max = -inf, 0, 0, 0, +inf, -inf
        for each tile (as above):  s = q K_tileᵀ · log2(e)/√d  (masked: -inf)
            m' = max(m, rowmax s);  p = 2^(s − m');  α = 2^(m − m')
            l = α l + Σ p;  acc = α acc + p V;  acc_x = α acc_x + (x ⊙ p) V      (x = s · ln 2; SA only)
            x_min, x_max (and where they are) = running min / max of the visible x   (SA-2)
        softmax: acc / l     SA-1: acc_x / l     SA-2: (acc_x − a acc) / ((b − a) l),  a = min(x_min, 0), b = max(x_max, 0)
(SA-2 by the flash-friendly identity Σ ((x−a)/(b−a)) p v = (Σ x p v − a Σ p v)/(b − a).)

Backward (kernels/attention_bwd.py): from the saved log-sum-exp, the same pairs again, each visited once, in
three passes without atomics: dQ query-major over the forward's tiles, dK/dV of the gathered columns, dK/dV of
the window key-major; the autograd Function below launches them. Tile sizes are autotuned on the GPU; on the
CPU the same kernels run in Triton's interpreter.

Backends (kernels/__init__.py): auto and triton = these kernels on CUDA (nothing in torch computes this pattern
without the T² mask); on the CPU auto = the gathering fast path (kernels/attention_cpu.py), triton = these kernels
interpreted; torch = the dense reference. `python bench_kernels.py --part=attention` measures them.
"""
import math

import torch
import torch.nn.functional as F

from kernels import backend, launch, triton
from kernels.attention_cpu import fast_attention, sa_weights
from kernels.attention_plan import Plan, make_plan, pairs_computed, plan_for  # noqa: F401 (importable from here)

if triton is not None:
    import triton.language as tl

    from kernels.attention_bwd import (_delta_kernel, _dkdv_cols_kernel, _dkdv_cols_tuned, _dkdv_window_kernel,
                                       _dkdv_window_tuned, _dq_kernel, _dq_tuned)
    from kernels.attention_bwd import DKDV_CONFIGS, DQ_CONFIGS  # noqa: F401 (importable from here)
    from kernels.attention_plan import CAUSAL, FULL, PARTIAL, RULE, _load_rows, _visible, _window_tiles, autotuned
    from kernels.attention_plan import attention_configs  # noqa: F401 (importable from here)

SCORES = {"softmax": 0, "sa": 1, "sa_norm": 2}
LOG2E = 1.4426950408889634


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


# ----------------------------------------------------------------------------- Triton kernels: the forward

if triton is not None:
    @triton.jit
    def _fwd_tile(acc, acc_x, m_i, l_i, x_min, x_max, i_min, i_max, q, offs_m, kpos, kvalid, k_base, v_base,
                  stride_kt, stride_vt, sep_ptr, T, n_init, n_local, qk_scale,
                  D: tl.constexpr, MODE: tl.constexpr, SCORE: tl.constexpr):
        """One tile of the online softmax (module docstring); scores s in log2 units, x = s ln 2."""
        k = _load_rows(k_base, kpos, stride_kt, T, D, MODE)
        v = _load_rows(v_base, kpos, stride_vt, T, D, MODE)
        s = tl.dot(q, tl.trans(k)) * qk_scale                                    # (BLOCK_M, BLOCK_N)
        if MODE != FULL:
            ok = _visible(kpos, kvalid, offs_m, sep_ptr, T, n_init, n_local, MODE)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MODE >= CAUSAL:                            # a row may see nothing yet: keep its shift finite
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        alpha = tl.exp2(m_i - m_new_safe)
        p = tl.exp2(s - m_new_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        if SCORE > 0:
            x = s * 0.6931471805599453                                            # q kᵀ / √d
            if MODE != FULL:
                x = tl.where(ok, x, 0.0)
            acc_x = acc_x * alpha[:, None] + tl.dot((x * p).to(v.dtype), v)
            if SCORE == 2:  # running min / max of the visible scores and where they are (first position on ties)
                if MODE != FULL:
                    x_hi, x_lo = tl.where(ok, x, float("inf")), tl.where(ok, x, float("-inf"))
                else:
                    x_hi, x_lo = x, x
                c_min, c_max = tl.min(x_hi, 1), tl.max(x_lo, 1)
                p_min = tl.min(tl.where(x_hi == c_min[:, None], kpos[None, :], 1 << 30), 1)
                p_max = tl.min(tl.where(x_lo == c_max[:, None], kpos[None, :], 1 << 30), 1)
                i_min = tl.where(c_min < x_min, p_min, i_min)
                i_max = tl.where(c_max > x_max, p_max, i_max)
                x_min, x_max = tl.minimum(x_min, c_min), tl.maximum(x_max, c_max)
        return acc, acc_x, m_new, l_i, x_min, x_max, i_min, i_max

    @triton.jit
    def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, o1_ptr, ab_ptr, arg_ptr, sep_ptr, cols_ptr, kb_ptr,
                    H, T, n_init, n_local, qk_scale,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                    D: tl.constexpr, SCORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # program (query block, b·H + h). lse (B·H, T) fp32 in log2 units. SCORE: 0 softmax, 1 SA-1, 2 SA-2; for
        # SA-2 also o1 = the softmax output (like o), ab = (a, b) and arg = where x_min, x_max are, (B·H, T, 2).
        # sep (B, T) uint8; cols, kb (B, T+1) int32: the plan
        qb, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        q0 = qb * BLOCK_M
        offs_m = q0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + d[None, :],
                    mask=offs_m[:, None] < T, other=0.0)
        k_base, v_base = k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh
        sep_b, cols_b = sep_ptr + b * T, cols_ptr + b * (T + 1)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        acc_x = tl.zeros((BLOCK_M, D), tl.float32)
        x_min = tl.full((BLOCK_M,), float("inf"), tl.float32)
        x_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        i_min = tl.zeros((BLOCK_M,), tl.int32)
        i_max = tl.zeros((BLOCK_M,), tl.int32)
        lo, n_tiles, t_edge, t_diag = _window_tiles(q0, T, n_local, BLOCK_M, BLOCK_N)
        n_cols = tl.load(kb_ptr + b * (T + 1) + lo)                               # columns left of the window
        n_full = (n_cols // BLOCK_N) * BLOCK_N
        # 1. the gathered columns: full tiles, then the last one
        for c0 in range(0, n_full, BLOCK_N):
            kpos = tl.load(cols_b + c0 + tl.arange(0, BLOCK_N))
            acc, acc_x, m_i, l_i, x_min, x_max, i_min, i_max = _fwd_tile(
                acc, acc_x, m_i, l_i, x_min, x_max, i_min, i_max, q, offs_m, kpos, kpos, k_base, v_base,
                stride_kt, stride_vt, sep_b, T, n_init, n_local, qk_scale, D, FULL, SCORE)
        if n_full < n_cols:
            c = n_full + tl.arange(0, BLOCK_N)
            kpos = tl.load(cols_b + c, mask=c < n_cols, other=0)
            acc, acc_x, m_i, l_i, x_min, x_max, i_min, i_max = _fwd_tile(
                acc, acc_x, m_i, l_i, x_min, x_max, i_min, i_max, q, offs_m, kpos, c < n_cols, k_base, v_base,
                stride_kt, stride_vt, sep_b, T, n_init, n_local, qk_scale, D, PARTIAL, SCORE)
        # 2. the window [lo, q1): left edge, inside, diagonal
        for t in range(0, t_edge):
            kpos = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
            acc, acc_x, m_i, l_i, x_min, x_max, i_min, i_max = _fwd_tile(
                acc, acc_x, m_i, l_i, x_min, x_max, i_min, i_max, q, offs_m, kpos, kpos, k_base, v_base,
                stride_kt, stride_vt, sep_b, T, n_init, n_local, qk_scale, D, RULE, SCORE)
        for t in range(t_edge, t_diag):
            kpos = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
            acc, acc_x, m_i, l_i, x_min, x_max, i_min, i_max = _fwd_tile(
                acc, acc_x, m_i, l_i, x_min, x_max, i_min, i_max, q, offs_m, kpos, kpos, k_base, v_base,
                stride_kt, stride_vt, sep_b, T, n_init, n_local, qk_scale, D, FULL, SCORE)
        for t in range(t_diag, n_tiles):
            kpos = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
            acc, acc_x, m_i, l_i, x_min, x_max, i_min, i_max = _fwd_tile(
                acc, acc_x, m_i, l_i, x_min, x_max, i_min, i_max, q, offs_m, kpos, kpos, k_base, v_base,
                stride_kt, stride_vt, sep_b, T, n_init, n_local, qk_scale, D, CAUSAL, SCORE)
        row_ok = offs_m < T
        l_i = tl.where(row_ok, l_i, 1.0)                                           # rows past T are not stored
        o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + d[None, :]
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
            o1_ptrs = o1_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + d[None, :]
            tl.store(o1_ptrs, (acc / l_i[:, None]).to(o1_ptr.dtype.element_ty), mask=row_ok[:, None])
            rows = bh * T + offs_m
            tl.store(ab_ptr + rows * 2, a, mask=row_ok)
            tl.store(ab_ptr + rows * 2 + 1, bb, mask=row_ok)
            tl.store(arg_ptr + rows * 2, i_min, mask=row_ok)
            tl.store(arg_ptr + rows * 2 + 1, i_max, mask=row_ok)
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptr + bh * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)

    # tile configs the autotuner tries on a GPU: (BLOCK_M, BLOCK_N), num_warps, num_stages. Checked with
    # `python -m kernels.compile_report` for Hopper: wgmma, pipelined loads, and no spilled registers at D = 128
    # except (128, 64) x 4 warps (fine at D = 64)
    FWD_CONFIGS = [((128, 64), 8, 3), ((128, 128), 8, 3), ((128, 64), 4, 3), ((64, 64), 4, 3)]

    _fwd_tuned = autotuned(_fwd_kernel, FWD_CONFIGS)

# the tile sizes when nothing is autotuned (the CPU interpreter; tests try others)
FIXED_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32)


# ----------------------------------------------------------------------------- the wrapper

def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


class TritonSepAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keep, n_init, n_local, score, plan=None):
        check_inputs(q, k, v, keep)
        B, H, T, D = q.shape
        if D < 16 or D & (D - 1):
            raise ValueError(f"the Triton attention kernel needs a head dim that is a power of two >= 16, got {D}; "
                             "choose n_embd / n_head accordingly or use --kernels=torch")
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        plan = plan if plan is not None else plan_for(keep, n_init)
        SCORE = SCORES[score]
        o = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
        lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
        if SCORE == 2:  # what SA-2's backward needs: the softmax output, (a, b) and where x_min, x_max are
            o1 = torch.empty_like(o)
            ab = torch.empty(B * H, T, 2, device=q.device, dtype=torch.float32)
            arg = torch.empty(B * H, T, 2, device=q.device, dtype=torch.int32)
        else:
            o1, ab, arg = o, lse, lse                                             # unused by the kernel
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
        launch(_fwd_kernel, grid, (q, k, v, o, lse, o1, ab, arg, plan.sep, plan.cols, plan.kept_before, H, T, n_init,
                                   n_local, LOG2E / math.sqrt(D), *_strides(q), *_strides(k), *_strides(v),
                                   *_strides(o), D, SCORE), q, FIXED_BLOCKS, _fwd_tuned)
        ctx.save_for_backward(q, k, v, o, lse, o1, ab, arg, plan.sep, plan.cols, plan.kept_before)
        ctx.args = (n_init, n_local, SCORE)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, o1, ab, arg, sep, cols, kept_before = ctx.saved_tensors
        n_init, n_local, SCORE = ctx.args
        B, H, T, D = q.shape
        if do.stride(-1) != 1:
            do = do.contiguous()
        delta = torch.empty(B * H, T, device=q.device, dtype=torch.float32)     # δ_i = dO_i · O_i
        launch(_delta_kernel, (triton.cdiv(T, 64), B * H), (o, do, delta, H, T, *_strides(o), *_strides(do), D),
               q, dict(BLOCK_M=64), None)
        sa = delta                                                                # unused unless SA-2
        if SCORE == 2:
            a, b = ab.unbind(-1)
            inv = 1 / (b - a).clamp_min(1e-12)
            s0 = (do.float() * o1.float()).sum(-1).view(B * H, T)                 # dO · O_softmax
            # dL/da = (δ − dO·O_softmax) / (b − a) if a < 0,   dL/db = −δ / (b − a) if b > 0
            sa = torch.stack([a, inv, torch.where(a < 0, (delta - s0) * inv, 0.0),
                              torch.where(b > 0, -delta * inv, 0.0)], -1).contiguous()
        dq, dk, dv = (torch.empty(B, H, T, D, device=q.device, dtype=q.dtype) for _ in range(3))
        dkc = torch.empty(B * H, T, D, device=q.device, dtype=torch.float32)     # column pass, per column index
        dvc = torch.empty_like(dkc)
        qk_scale, sm_scale = LOG2E / math.sqrt(D), 1 / math.sqrt(D)
        strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
        launch(_dq_kernel, grid, (q, k, v, do, dq, lse, delta, sa, arg, sep, cols, kept_before, H, T, n_init, n_local,
                                  qk_scale, sm_scale, *strides, *_strides(dq), D, SCORE), q, FIXED_BLOCKS, _dq_tuned)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)
        launch(_dkdv_cols_kernel, grid, (q, k, v, do, lse, delta, sa, arg, dkc, dvc, cols, kept_before, H, T, n_local,
                                         qk_scale, sm_scale, *strides, D, SCORE), q, FIXED_BLOCKS, _dkdv_cols_tuned)
        launch(_dkdv_window_kernel, grid, (q, k, v, do, lse, delta, sa, arg, dk, dv, dkc, dvc, sep, kept_before, H, T,
                                           n_init, n_local, qk_scale, sm_scale, *strides, *_strides(dk), D, SCORE),
               q, FIXED_BLOCKS, _dkdv_window_tuned)
        return dq, dk, dv, None, None, None, None, None


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
    if backend() == "triton" or (q.is_cuda and triton is not None):
        return TritonSepAttention.apply(q, k, v, keep, n_init, n_local, score)
    return fast_attention(q, k, v, keep, n_init, n_local, score)


# ----------------------------------------------------------------------------- reference

def rule_mask(keep, n_init, n_local):
    """Rule (1) as a dense (B, T, T) bool mask, True = query i may attend key j."""
    T = keep.shape[-1]
    i = torch.arange(T, device=keep.device)[:, None]
    j = torch.arange(T, device=keep.device)[None, :]
    return (j <= i) & ((j < n_init) | keep[:, None, :] | (i - j < n_local))


def reference_attention(q, k, v, keep, n_init, n_local, score="softmax"):
    """Dense masked attention, the definition: q, k, v (B, H, T, D), keep (B, T) bool."""
    mask = rule_mask(keep, n_init, n_local)[:, None]                               # (B, 1, T, T)
    if score == "softmax":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    f32 = torch.promote_types(q.dtype, torch.float32)                             # fp32 at least (bf16 scores)
    x = q.to(f32) @ k.to(f32).transpose(-2, -1) / math.sqrt(q.shape[-1])         # (B, H, T, T)
    return sa_weights(x, mask, score).to(v.dtype) @ v

