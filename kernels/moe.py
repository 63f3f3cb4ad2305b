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

Rows at or past offsets[E] belong to no expert (unipool.py puts the (token, expert) pairs with a zero gate
there): their output and input gradient are zero and they cost no matmul. The Triton schedule treats them as a
group E whose programs skip the K loop and store zeros.

Inputs may be fp32, fp16 or bf16; accumulation is fp32, outputs take the input dtype. Under autocast every
backend first casts x and w to the autocast dtype, as torch does for a plain x @ w, so the backends train
alike. On GPUs with tensor cores tl.dot runs fp32 inputs in TF32 (as torch does with allow_tf32). Under
TRITON_INTERPRET=1 (CPU) fp32 and fp16 are exact but bf16 is not supported correctly: test bf16 on a GPU only.

On the CPU the per-expert loop already runs the same matmuls as a dense layer; what it adds is the cat of the
outputs and the stack of the weight gradients. torch._grouped_mm (it has a CPU implementation in the torch
2.13 build used here) writes every expert's rows straight into one output, forward and backward: it is the CPU
fast path when the shapes allow it (fp32/fp16/bf16, rows 16-byte aligned), the per-expert loop otherwise
(7-11 % slower at T = 4096, d = 256, E = 16). A capacity-padded bmm (every expert padded to the largest
expert's rows) was 11-15 % slower than torch._grouped_mm there: it multiplies the padding and copies the rows
twice more.

Backend (kernels/__init__.py): auto = Triton for CUDA tensors, torch._grouped_mm elsewhere; triton; torch =
the per-expert reference.
"""
from typing import NamedTuple, Optional

import torch

from kernels import backend, triton, use_triton

if triton is not None:
    import triton.language as tl


# ----------------------------------------------------------------------------- reference

def grouped_mm_reference(x, w, offsets):
    """y[rows of e] = x[rows of e] @ w[e], zero for rows past offsets[-1]. split/unbind, not x[a:b] and w[e]:
    their backwards are one cat and one stack, where slicing would allocate a full-size zero gradient of w for
    every expert."""
    *x_e, x_rest = x.split(offsets.diff().tolist() + [x.shape[0] - int(offsets[-1])])
    return torch.cat([xe @ we for xe, we in zip(x_e, w.unbind(0))] + [x_rest.new_zeros(len(x_rest), w.shape[2])])


# ----------------------------------------------------------------------------- CPU fast path

def _fits_torch_grouped_mm(x, w):
    """torch._grouped_mm needs fp32/fp16/bf16 and 16-byte aligned rows of x, w and wᵀ."""
    align = 16 // x.element_size()
    return (hasattr(torch, "_grouped_mm") and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and x.dtype == w.dtype and x.shape[1] % align == 0 and w.shape[2] % align == 0)


class TorchGroupedMM(torch.autograd.Function):
    """torch._grouped_mm with the conventions above: rows past offsets[-1] zero, any incoming gradient layout
    (its own backward needs a contiguous one)."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        n, ends = int(offsets[-1]), offsets[1:].to(torch.int32)
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w, ends)
        ctx.n = n
        return _pad_rows(torch._grouped_mm(x[:n], w, offs=ends), x.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w, ends = ctx.saved_tensors
        dy = dy[:ctx.n].contiguous()
        # dx[rows of e] = dy[rows of e] @ w[e]ᵀ;   dw[e] = x[rows of e]ᵀ @ dy[rows of e]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _pad_rows(torch._grouped_mm(dy, w.transpose(1, 2), offs=ends), x.shape[0])
        if ctx.needs_input_grad[1]:
            dw = torch._grouped_mm(x[:ctx.n].t(), dy, offs=ends)
        return dx, dw, None


def _pad_rows(y, rows):
    return y if y.shape[0] == rows else torch.cat([y, y.new_zeros(rows - y.shape[0], y.shape[1])])


# ----------------------------------------------------------------------------- kernels

if triton is not None:
    @triton.jit
    def _grouped_mm_kernel(x_ptr, w_ptr, y_ptr, block_expert_ptr, block_start_ptr, offsets_ptr, E, N, K,
                           stride_xm, stride_xk,                 # x (rows, K)
                           stride_we, stride_wk, stride_wn,      # w (E, K, N), any strides (a transposed view too)
                           stride_ym, stride_yn,                 # y (rows, N)
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # offsets_ptr: E + 2 entries, the last one = rows; group E (rows past offsets[E]) stores zeros.
        # Pointer offsets in int64: rows * stride_xm and e * stride_we pass 2^31 on large layers.
        pid_b, pid_n = tl.program_id(0), tl.program_id(1)
        e = tl.load(block_expert_ptr + pid_b).to(tl.int64)
        rows = tl.load(block_start_ptr + pid_b).to(tl.int64) + tl.arange(0, BLOCK_M)
        row_ok = rows < tl.load(offsets_ptr + e + 1)
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_end = tl.where(e < E, K, 0)
        for k0 in range(0, k_end, BLOCK_K):
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
        e, pid_k, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        start, end = tl.load(offsets_ptr + e), tl.load(offsets_ptr + e + 1)
        ks = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_ok = rows < end
            a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)          # (BLOCK_M, BLOCK_K)
            g = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                        mask=row_ok[:, None] & (cols[None, :] < N), other=0.0)        # (BLOCK_M, BLOCK_N)
            acc += tl.dot(tl.trans(a), g)
        tl.store(dw_ptr + e * stride_de + ks[:, None] * stride_dk + cols[None, :] * stride_dn,
                 acc.to(dw_ptr.dtype.element_ty), mask=(ks[:, None] < K) & (cols[None, :] < N))


BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 32


def block_schedule(offsets, n_rows, block_m=BLOCK_M):
    """Row-blocks of BLOCK_M rows, each inside one group: (block_expert, block_start), int32, and the offsets
    with n_rows appended (group E: rows past offsets[E], which the kernel zeroes). Built without a host sync:
    the block count is bounded by ceil(n_rows / BLOCK_M) + E + 1 on the host, and the blocks past the true count
    fall after the last row (fully masked)."""
    offsets = torch.cat([offsets, offsets.new_tensor([n_rows])])                 # (E+2,)
    counts = offsets.diff()                                                       # (E+1,)
    n_blocks = (counts + block_m - 1) // block_m
    last_block = torch.cumsum(n_blocks, 0)                                        # (E+1,) one past g's last block
    b = torch.arange((n_rows + block_m - 1) // block_m + len(counts), device=offsets.device)
    block_expert = torch.searchsorted(last_block, b, right=True).clamp_(max=len(counts) - 1)
    block_start = offsets[block_expert] + (b - (last_block - n_blocks)[block_expert]) * block_m
    return block_expert.to(torch.int32), block_start.to(torch.int32), offsets


def _launch_mm(x, w, schedule):
    """y = grouped x @ w for w of shape (E, K, N) with any strides."""
    K, N = w.shape[1], w.shape[2]
    y = torch.empty(x.shape[0], N, device=x.device, dtype=x.dtype)
    block_expert, block_start, offsets = schedule
    if x.shape[0] == 0:
        return y
    grid = (len(block_expert), triton.cdiv(N, BLOCK_N))
    _grouped_mm_kernel[grid](x, w, y, block_expert, block_start, offsets, w.shape[0], N, K, x.stride(0), x.stride(1),
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
    def forward(ctx, x, w, offsets, schedule=None):
        if schedule is None:
            schedule = block_schedule(offsets.to(device=x.device, dtype=torch.int32), x.shape[0])
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w, *schedule)
        return _launch_mm(x, w, schedule)

    @staticmethod
    def backward(ctx, dy):
        x, w, *schedule = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _launch_mm(dy, w.transpose(1, 2), schedule) if ctx.needs_input_grad[0] else None
        dw = _launch_dw(x, dy, schedule[2], w.shape[0]) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


# ----------------------------------------------------------------------------- entry point

class ExpertGroups(NamedTuple):
    """The row ranges of one MoE layer's dispatch, and (Triton) its block list: built once, used by the layer's
    three grouped matmuls and their backwards."""
    offsets: torch.Tensor              # (E+1,) expert e owns rows offsets[e] .. offsets[e+1]
    schedule: Optional[tuple] = None   # block_schedule(offsets, rows) when Triton runs


def expert_groups(offsets, x):
    """ExpertGroups for rows x sorted by expert (the Triton block list only where Triton will run)."""
    if use_triton(x):
        return ExpertGroups(offsets, block_schedule(offsets.to(device=x.device, dtype=torch.int32), x.shape[0]))
    return ExpertGroups(offsets)


def grouped_mm(x, w, groups):
    """y[rows of e] = x[rows of e] @ w[e]; x (rows, K) sorted by expert, w (E, K, N), groups: offsets (E+1,) or
    ExpertGroups. Rows past offsets[E] give zeros. Under autocast x and w are cast to its dtype first."""
    if not isinstance(groups, ExpertGroups):
        groups = expert_groups(groups, x)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, w = x.to(dtype), w.to(dtype)
    with torch.autocast(device, enabled=False):
        if groups.schedule is not None:
            return GroupedMM.apply(x, w, groups.offsets, groups.schedule)
        if backend() == "torch" or not _fits_torch_grouped_mm(x, w):
            return grouped_mm_reference(x, w, groups.offsets)
        return TorchGroupedMM.apply(x, w, groups.offsets)
