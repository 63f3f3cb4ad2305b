"""
Grouped matmul for MoE dispatch, in Triton (forward and backward), beside a plain PyTorch reference.

After routing, the T·k (token, expert) assignments are sorted by expert, so expert e owns the contiguous rows
offsets[e] .. offsets[e+1] of x. Each expert's FFN weight is one slice of a stacked tensor w (E, K, N):

    y[rows of e] = x[rows of e] @ w[e]                         for every expert e         (forward)
    dx[rows of e] = dy[rows of e] @ w[e]^T                                                 (backward, input)
    dw[e] = x[rows of e]^T @ dy[rows of e]                      zero for an expert without rows  (backward, weight)

The PyTorch reference runs one matmul per expert from Python: E launches, each too small to fill a GPU when
E is large. The kernels run every expert in ONE launch. The forward grid is (row-blocks, column-blocks); a
row-block is BLOCK_M rows of a single expert, so an expert with n rows gets ceil(n / BLOCK_M) blocks. We pad
the block LIST, not the data: the last block of an expert masks its tail rows, so with top-1 and many
experts no zero rows are multiplied (padding each expert's rows to BLOCK_M in memory, as inference kernels
do, would double the work when experts hold few tokens).

    for each program (b, n):                    # b: a row-block, n: a block of output columns
        e, start = block_expert[b], block_start[b];  rows = start + arange(BLOCK_M), kept while < offsets[e+1]
        acc = 0
        for k in blocks of K:  acc += x[rows, k] @ w[e, k, n]       # fp32 accumulation
        y[rows, n] = acc

dx is the same kernel on w viewed as (E, N, K) (transposed strides, no copy). dw has its own grid
(E, K-blocks, N-blocks): each program walks its expert's rows in steps of BLOCK_M and accumulates x^T dy.
No atomics anywhere, so results are deterministic.

Inputs may be fp32, fp16 or bf16; accumulation is fp32, outputs take the input dtype. On GPUs with tensor cores
tl.dot runs fp32 inputs in TF32 (as torch does with allow_tf32). Under TRITON_INTERPRET=1 (CPU) fp32 and fp16
are exact but bf16 is not supported correctly: test bf16 on a GPU only.

Backend (kernels/__init__.py): auto = Triton for CUDA tensors, the reference elsewhere.
"""
import torch

from kernels import triton, use_triton

if triton is not None:
    import triton.language as tl


# ----------------------------------------------------------------------------- reference

def grouped_mm_reference(x, w, offsets):
    """y[rows of e] = x[rows of e] @ w[e]. split/unbind, not x[a:b] and w[e]: their backwards are one cat and one
    stack, where slicing would allocate a full-size zero gradient of w for every expert."""
    x_e = x.split(offsets.diff().tolist())
    return torch.cat([xe @ we for xe, we in zip(x_e, w.unbind(0))], dim=0)


# ----------------------------------------------------------------------------- kernels

if triton is not None:
    @triton.jit
    def _grouped_mm_kernel(x_ptr, w_ptr, y_ptr, block_expert_ptr, block_start_ptr, offsets_ptr, N, K,
                           stride_xm, stride_xk,                 # x (rows, K)
                           stride_we, stride_wk, stride_wn,      # w (E, K, N), any strides (a transposed view too)
                           stride_ym, stride_yn,                 # y (rows, N)
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_b, pid_n = tl.program_id(0), tl.program_id(1)
        e = tl.load(block_expert_ptr + pid_b)
        rows = tl.load(block_start_ptr + pid_b) + tl.arange(0, BLOCK_M)
        row_ok = rows < tl.load(offsets_ptr + e + 1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
            b = tl.load(w_ptr + e * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
            acc += tl.dot(a, b)
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cols[None, :] < N))

    @triton.jit
    def _grouped_dw_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, K, N,
                           stride_xm, stride_xk, stride_dym, stride_dyn, stride_de, stride_dk, stride_dn,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        e, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start, end = tl.load(offsets_ptr + e), tl.load(offsets_ptr + e + 1)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)          # (BLOCK_M, BLOCK_K)
            g = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                        mask=row_ok[:, None] & (cols[None, :] < N), other=0.0)        # (BLOCK_M, BLOCK_N)
            acc += tl.dot(tl.trans(a), g)
        tl.store(dw_ptr + e * stride_de + ks[:, None] * stride_dk + cols[None, :] * stride_dn,
                 acc.to(dw_ptr.dtype.element_ty), mask=(ks[:, None] < K) & (cols[None, :] < N))


BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 32


def block_schedule(offsets, block_m=BLOCK_M):
    """Row-blocks of BLOCK_M rows, each inside one expert: (block_expert, block_start), int32 on x's device."""
    counts = offsets.diff()
    n_blocks = (counts + block_m - 1) // block_m                                  # (E,)
    block_expert = torch.repeat_interleave(torch.arange(len(counts), device=offsets.device), n_blocks)
    first_block = torch.cumsum(n_blocks, 0) - n_blocks                            # (E,) index of e's first block
    within = torch.arange(len(block_expert), device=offsets.device) - first_block[block_expert]
    block_start = offsets[:-1][block_expert] + within * block_m
    return block_expert.to(torch.int32), block_start.to(torch.int32)


def _launch_mm(x, w, offsets, schedule):
    """y = grouped x @ w for w of shape (E, K, N) with any strides."""
    K, N = w.shape[1], w.shape[2]
    y = torch.empty(x.shape[0], N, device=x.device, dtype=x.dtype)
    block_expert, block_start = schedule
    if len(block_expert) == 0:
        return y
    grid = (len(block_expert), triton.cdiv(N, BLOCK_N))
    _grouped_mm_kernel[grid](x, w, y, block_expert, block_start, offsets, N, K, x.stride(0), x.stride(1),
                             w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
                             BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


def _launch_dw(x, dy, offsets, n_experts):
    K, N = x.shape[1], dy.shape[1]
    dw = torch.empty(n_experts, K, N, device=x.device, dtype=x.dtype)
    grid = (n_experts, triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N))
    _grouped_dw_kernel[grid](x, dy, dw, offsets, K, N, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                             dw.stride(0), dw.stride(1), dw.stride(2), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    return dw


class GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets):
        offsets = offsets.to(device=x.device, dtype=torch.int32)
        schedule = block_schedule(offsets)
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w, offsets, *schedule)
        return _launch_mm(x, w, offsets, schedule)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets, block_expert, block_start = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _launch_mm(dy, w.transpose(1, 2), offsets, (block_expert, block_start)) if ctx.needs_input_grad[0] else None
        dw = _launch_dw(x, dy, offsets, w.shape[0]) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm(x, w, offsets):
    """y[rows of e] = x[rows of e] @ w[e]; x (rows, K) sorted by expert, w (E, K, N), offsets (E+1,)."""
    return GroupedMM.apply(x, w, offsets) if use_triton(x) else grouped_mm_reference(x, w, offsets)
