"""
The backward kernels of SepLLM's sparse attention (kernels/attention.py: the forward, its schedule and the
autograd Function that launches these; kernels/attention_plan.py: the plan and the tile helpers both share).

Backward, from the saved log-sum-exp (p = exp(x − lse)), g = dO·v_j, δ = dO·O (a small kernel of its own), each
pair again visited once:
    softmax:  dx = p (g − δ)                          weights w = p
    SA-1:     dx = p (g (1 + x) − δ)                  w = x p
    SA-2:     dx = p (g (1/(b−a) + u) − δ)            w = u p,  u = (x − a)/(b − a)
              + (δ − dO·O_softmax)/(b − a) at the row's arg-min (if a < 0)
              − δ/(b − a) at the row's arg-max (if b > 0)
    dQ = Σ dx K / √d,  dK = Σ dxᵀ Q / √d,  dV = Σ wᵀ dO
(the last line of SA-2 is the gradient through the row's min and max, which the public implementation does not
detach; on an exact tie the first position takes all of it, where torch.amin would split it).
Three passes, no atomics: dQ query-major over the forward's tiles; dK/dV of the columns (a program owns BLOCK_N
gathered columns and walks the query blocks that gathered them, j < lo, into fp32 partial sums per column); dK/dV
of the window, key-major (a program owns a key block, walks the few query blocks whose window range holds it,
and adds the column partial sums of its kept keys). The key-major passes build scores key by query (k qᵀ), so no
tile is transposed. Tile sizes are autotuned on the GPU; on the CPU the same kernels run in Triton's interpreter.

Worked example (w = 256, 128 x 64 tiles, 10 % separators): the query block at q0 = 1024 is visited by dQ over
the forward's 8 tiles; the key block 768..831 by the window pass, which walks the query blocks 768, 896 and 1024
(rule (1) masks the first and the last; the middle one sees every pair); a separator at 500 is a column of
every query block from 768 on, so the column pass sums its dK, dV over those, and the window pass of key block
448..511 adds them to its own.
"""
from kernels import triton

if triton is not None:
    import triton.language as tl

    from kernels.attention_plan import CAUSAL, FULL, PARTIAL, RULE, _load_rows, _visible, _window_tiles, autotuned

    @triton.jit
    def _delta_kernel(o_ptr, do_ptr, delta_ptr, H, T, stride_ob, stride_oh, stride_ot,
                      stride_db, stride_dh, stride_dt, D: tl.constexpr, BLOCK_M: tl.constexpr):
        """δ_i = dO_i · O_i in fp32, (B·H, T)."""
        qb, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        ok = offs_m[:, None] < T
        o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + d[None, :], mask=ok,
                    other=0.0)
        do = tl.load(do_ptr + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + d[None, :], mask=ok,
                     other=0.0)
        tl.store(delta_ptr + bh * T + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < T)

    @triton.jit
    def _bwd_weights(p, x, dp, delta, sa_a, sa_inv, sa_ga, sa_gb, at_min, at_max, SCORE: tl.constexpr):
        """A tile's weights w (for dV) and dL/dx (for dQ, dK) from p, the scores x (0 where masked) and
        dp = dO·v; the row statistics come broadcast to the tile (module docstring, Backward)."""
        if SCORE == 0:
            w = p
            ds = p * (dp - delta)
        elif SCORE == 1:
            w = x * p
            ds = p * (dp * (1.0 + x) - delta)
        else:
            u = (x - sa_a) * sa_inv
            w = u * p
            ds = p * (dp * (sa_inv + u) - delta) + tl.where(at_min, sa_ga, 0.0) + tl.where(at_max, sa_gb, 0.0)
        return w, ds

    @triton.jit
    def _row_stats(lse_ptr, delta_ptr, sa_ptr, arg_ptr, rows, row_ok, SCORE: tl.constexpr):
        """Per query row: lse (+inf past T, so p = 0 there), δ and, for SA-2, a, 1/(b − a), dL/da, dL/db and
        where x_min, x_max are."""
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
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
    def _dq_tile(dq, q, do, lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max, offs_m, kpos, kvalid, k_base,
                 v_base, stride_kt, stride_vt, sep_ptr, T, n_init, n_local, qk_scale,
                 D: tl.constexpr, MODE: tl.constexpr, SCORE: tl.constexpr):
        k = _load_rows(k_base, kpos, stride_kt, T, D, MODE)
        v = _load_rows(v_base, kpos, stride_vt, T, D, MODE)
        s = tl.dot(q, tl.trans(k)) * qk_scale                                    # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])
        x = s * 0.6931471805599453
        ok = kpos[None, :] >= 0
        if MODE != FULL:
            ok = _visible(kpos, kvalid, offs_m, sep_ptr, T, n_init, n_local, MODE)
            p = tl.where(ok, p, 0.0)
            x = tl.where(ok, x, 0.0)
        dp = tl.dot(do, tl.trans(v))
        w, ds = _bwd_weights(p, x, dp, delta[:, None], sa_a[:, None], sa_inv[:, None], sa_ga[:, None],
                             sa_gb[:, None], ok & (kpos[None, :] == i_min[:, None]),
                             ok & (kpos[None, :] == i_max[:, None]), SCORE)
        return dq + tl.dot(ds.to(k.dtype), k)

    @triton.jit
    def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, sa_ptr, arg_ptr, sep_ptr, cols_ptr,
                   kb_ptr, H, T, n_init, n_local, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                   stride_db, stride_dh, stride_dt, stride_ob, stride_oh, stride_ot,
                   D: tl.constexpr, SCORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # the forward's tiles, in the same order; dq (like o: stride_o*) = Σ dx K / √d
        qb, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        q0 = qb * BLOCK_M
        offs_m = q0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        row_ok = offs_m < T
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptr + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + d[None, :],
                     mask=row_ok[:, None], other=0.0)
        lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max = _row_stats(lse_ptr, delta_ptr, sa_ptr, arg_ptr,
                                                                          bh * T + offs_m, row_ok, SCORE)
        k_base, v_base = k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh
        sep_b, cols_b = sep_ptr + b * T, cols_ptr + b * (T + 1)
        dq = tl.zeros((BLOCK_M, D), tl.float32)
        lo, n_tiles, t_edge, t_diag = _window_tiles(q0, T, n_local, BLOCK_M, BLOCK_N)
        n_cols = tl.load(kb_ptr + b * (T + 1) + lo)
        n_full = (n_cols // BLOCK_N) * BLOCK_N
        for c0 in range(0, n_full, BLOCK_N):
            kpos = tl.load(cols_b + c0 + tl.arange(0, BLOCK_N))
            dq = _dq_tile(dq, q, do, lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max, offs_m, kpos, kpos,
                          k_base, v_base, stride_kt, stride_vt, sep_b, T, n_init, n_local, qk_scale, D, FULL, SCORE)
        if n_full < n_cols:
            c = n_full + tl.arange(0, BLOCK_N)
            kpos = tl.load(cols_b + c, mask=c < n_cols, other=0)
            dq = _dq_tile(dq, q, do, lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max, offs_m, kpos, c < n_cols,
                          k_base, v_base, stride_kt, stride_vt, sep_b, T, n_init, n_local, qk_scale, D, PARTIAL,
                          SCORE)
        for t in range(0, t_edge):
            kpos = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
            dq = _dq_tile(dq, q, do, lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max, offs_m, kpos, kpos,
                          k_base, v_base, stride_kt, stride_vt, sep_b, T, n_init, n_local, qk_scale, D, RULE, SCORE)
        for t in range(t_edge, t_diag):
            kpos = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
            dq = _dq_tile(dq, q, do, lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max, offs_m, kpos, kpos,
                          k_base, v_base, stride_kt, stride_vt, sep_b, T, n_init, n_local, qk_scale, D, FULL, SCORE)
        for t in range(t_diag, n_tiles):
            kpos = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
            dq = _dq_tile(dq, q, do, lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max, offs_m, kpos, kpos,
                          k_base, v_base, stride_kt, stride_vt, sep_b, T, n_init, n_local, qk_scale, D, CAUSAL,
                          SCORE)
        tl.store(dq_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + d[None, :],
                 (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _dkdv_tile(dk, dv, k, v, kpos, kvalid, kept, m0, q_base, do_base, stride_qt, stride_dt, lse_ptr, delta_ptr,
                   sa_ptr, arg_ptr, bh, T, n_local, qk_scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, MODE: tl.constexpr, SCORE: tl.constexpr):
        """Keys kpos (BLOCK_N) against the query block at m0, key by query: sᵀ = k qᵀ, no transposed tile.
        MODE FULL: every pair; PARTIAL: the column pass's pairs, j < lo (= j + w ≤ m0); RULE: the window pass's
        pairs, rule (1) with j ≥ lo."""
        offs_m = m0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        row_ok = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * stride_qt + d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dt + d[None, :], mask=row_ok[:, None], other=0.0)
        lse, delta, sa_a, sa_inv, sa_ga, sa_gb, i_min, i_max = _row_stats(lse_ptr, delta_ptr, sa_ptr, arg_ptr,
                                                                          bh * T + offs_m, row_ok, SCORE)
        s = tl.dot(k, tl.trans(q)) * qk_scale                                    # (BLOCK_N, BLOCK_M)
        p = tl.exp2(s - lse[None, :])
        x = s * 0.6931471805599453
        ok = kpos[:, None] >= 0
        if MODE == PARTIAL:
            ok = kvalid[:, None] & (kpos[:, None] + n_local <= m0) & row_ok[None, :]
        elif MODE == RULE:
            ok = ((kpos[:, None] >= m0 - n_local + 1) & (kpos[:, None] <= offs_m[None, :])
                  & (kept[:, None] | (offs_m[None, :] - kpos[:, None] < n_local)))
        if MODE != FULL:
            p = tl.where(ok, p, 0.0)
            x = tl.where(ok, x, 0.0)
        dp = tl.dot(v, tl.trans(do))                                             # (BLOCK_N, BLOCK_M)
        w, ds = _bwd_weights(p, x, dp, delta[None, :], sa_a[None, :], sa_inv[None, :], sa_ga[None, :],
                             sa_gb[None, :], ok & (kpos[:, None] == i_min[None, :]),
                             ok & (kpos[:, None] == i_max[None, :]), SCORE)
        dv += tl.dot(w.to(do.dtype), do)
        dk += tl.dot(ds.to(q.dtype), q)
        return dk, dv

    @triton.jit
    def _dkdv_cols_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, sa_ptr, arg_ptr, dkc_ptr, dvc_ptr,
                          cols_ptr, kb_ptr, H, T, n_local, qk_scale, sm_scale,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
                          stride_vt, stride_db, stride_dh, stride_dt,
                          D: tl.constexpr, SCORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # program (column block, b·H + h) owns the gathered columns [cb BLOCK_N, cb BLOCK_N + BLOCK_N) and walks the
        # query blocks that gathered them (j < lo ⇔ q0 ≥ j + w); its sums go to dkc, dvc (B·H, T, D) fp32 at row
        # (column index), for the window pass to add
        cb, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        n_kept = tl.load(kb_ptr + b * (T + 1) + T)
        c0 = cb * BLOCK_N
        if c0 < n_kept:
            c = c0 + tl.arange(0, BLOCK_N)
            cvalid = c < n_kept
            cols_b = cols_ptr + b * (T + 1)
            kpos = tl.load(cols_b + c, mask=cvalid, other=0)
            k = _load_rows(k_ptr + b * stride_kb + h * stride_kh, kpos, stride_kt, T, D, FULL)
            v = _load_rows(v_ptr + b * stride_vb + h * stride_vh, kpos, stride_vt, T, D, FULL)
            q_base, do_base = q_ptr + b * stride_qb + h * stride_qh, do_ptr + b * stride_db + h * stride_dh
            dk = tl.zeros((BLOCK_N, D), tl.float32)
            dv = tl.zeros((BLOCK_N, D), tl.float32)
            n_q = tl.cdiv(T, BLOCK_M)
            first = tl.minimum(tl.cdiv(tl.load(cols_b + c0) + n_local, BLOCK_M), n_q)       # some columns gathered
            every = tl.minimum(tl.cdiv(tl.load(cols_b + tl.minimum(c0 + BLOCK_N, n_kept) - 1) + n_local, BLOCK_M),
                               n_q)                                                             # all of them
            if c0 + BLOCK_N > n_kept:       # the last, partial block of columns: masked everywhere
                every = n_q
            for qb in range(first, every):
                dk, dv = _dkdv_tile(dk, dv, k, v, kpos, cvalid, cvalid, qb * BLOCK_M, q_base, do_base, stride_qt,
                                    stride_dt, lse_ptr, delta_ptr, sa_ptr, arg_ptr, bh, T, n_local, qk_scale, D,
                                    BLOCK_M, PARTIAL, SCORE)
            for qb in range(every, n_q):
                dk, dv = _dkdv_tile(dk, dv, k, v, kpos, cvalid, cvalid, qb * BLOCK_M, q_base, do_base, stride_qt,
                                    stride_dt, lse_ptr, delta_ptr, sa_ptr, arg_ptr, bh, T, n_local, qk_scale, D,
                                    BLOCK_M, FULL, SCORE)
            d = tl.arange(0, D)
            rows = bh * T + c
            tl.store(dkc_ptr + rows[:, None] * D + d[None, :], dk * sm_scale, mask=cvalid[:, None])
            tl.store(dvc_ptr + rows[:, None] * D + d[None, :], dv, mask=cvalid[:, None])

    @triton.jit
    def _dkdv_window_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, sa_ptr, arg_ptr, dk_ptr, dv_ptr,
                            dkc_ptr, dvc_ptr, sep_ptr, kb_ptr, H, T, n_init, n_local, qk_scale, sm_scale,
                            stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
                            stride_vt, stride_db, stride_dh, stride_dt, stride_ob, stride_oh, stride_ot,
                            D: tl.constexpr, SCORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # program (key block, b·H + h) owns keys [k0, k0 + BLOCK_N) and walks the query blocks whose window range
        # [lo, q1) holds one of them: from k0's block to the last with lo < k0 + BLOCK_N. The ones in the middle
        # see every pair (k0 + BLOCK_N − 1 ≤ q0 and q0 + BLOCK_M − 1 − k0 < w): no mask there
        kb, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        k0 = kb * BLOCK_N
        kpos = k0 + tl.arange(0, BLOCK_N)
        kvalid = kpos < T
        k = _load_rows(k_ptr + b * stride_kb + h * stride_kh, kpos, stride_kt, T, D, CAUSAL)
        v = _load_rows(v_ptr + b * stride_vb + h * stride_vh, kpos, stride_vt, T, D, CAUSAL)
        kept = kvalid & ((tl.load(sep_ptr + b * T + kpos, mask=kvalid, other=0) != 0) | (kpos < n_init))
        q_base, do_base = q_ptr + b * stride_qb + h * stride_qh, do_ptr + b * stride_db + h * stride_dh
        dk = tl.zeros((BLOCK_N, D), tl.float32)
        dv = tl.zeros((BLOCK_N, D), tl.float32)
        first = k0 // BLOCK_M
        end = tl.minimum((k0 + BLOCK_N + n_local - 2) // BLOCK_M, tl.cdiv(T, BLOCK_M) - 1) + 1
        full_lo = tl.minimum(tl.maximum(tl.cdiv(k0 + BLOCK_N - 1, BLOCK_M), first), end)
        full_hi = tl.maximum(tl.minimum(tl.cdiv(tl.maximum(k0 + n_local - BLOCK_M + 1, 0), BLOCK_M), end), full_lo)
        for qb in range(first, full_lo):
            dk, dv = _dkdv_tile(dk, dv, k, v, kpos, kvalid, kept, qb * BLOCK_M, q_base, do_base, stride_qt,
                                stride_dt, lse_ptr, delta_ptr, sa_ptr, arg_ptr, bh, T, n_local, qk_scale, D,
                                BLOCK_M, RULE, SCORE)
        for qb in range(full_lo, full_hi):
            dk, dv = _dkdv_tile(dk, dv, k, v, kpos, kvalid, kept, qb * BLOCK_M, q_base, do_base, stride_qt,
                                stride_dt, lse_ptr, delta_ptr, sa_ptr, arg_ptr, bh, T, n_local, qk_scale, D,
                                BLOCK_M, FULL, SCORE)
        for qb in range(full_hi, end):
            dk, dv = _dkdv_tile(dk, dv, k, v, kpos, kvalid, kept, qb * BLOCK_M, q_base, do_base, stride_qt,
                                stride_dt, lse_ptr, delta_ptr, sa_ptr, arg_ptr, bh, T, n_local, qk_scale, D,
                                BLOCK_M, RULE, SCORE)
        # a kept key's column-pass sums sit at row (its column index) = kept_before[j]
        d = tl.arange(0, D)
        col = bh * T + tl.load(kb_ptr + b * (T + 1) + kpos, mask=kept, other=0)
        dk = dk * sm_scale + tl.load(dkc_ptr + col[:, None] * D + d[None, :], mask=kept[:, None], other=0.0)
        dv += tl.load(dvc_ptr + col[:, None] * D + d[None, :], mask=kept[:, None], other=0.0)
        out = b * stride_ob + h * stride_oh + kpos[:, None] * stride_ot + d[None, :]
        tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=kvalid[:, None])
        tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kvalid[:, None])

    # tile configs the autotuner tries on a GPU, ((BLOCK_M, BLOCK_N), num_warps, num_stages): checked with
    # `python -m kernels.compile_report` for Hopper (wgmma, pipelined loads)
    DQ_CONFIGS = [((128, 64), 8, 3), ((64, 64), 4, 3), ((64, 32), 4, 3)]
    DKDV_CONFIGS = [((64, 128), 8, 3), ((64, 64), 8, 2), ((32, 64), 8, 3), ((32, 128), 8, 3)]

    _dq_tuned = autotuned(_dq_kernel, DQ_CONFIGS)
    _dkdv_cols_tuned = autotuned(_dkdv_cols_kernel, DKDV_CONFIGS)
    _dkdv_window_tuned = autotuned(_dkdv_window_kernel, DKDV_CONFIGS)
