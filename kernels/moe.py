"""
Grouped matmul for MoE dispatch, in Triton (forward and backward), beside a plain PyTorch reference.

After routing, the (token, expert) assignments are sorted by expert, so expert e owns the contiguous rows
offsets[e] .. offsets[e+1] of x. Each expert's FFN weight is one slice of a stacked tensor w (E, K, N):

    y[rows of e]  = x[rows of e] @ w[e]                          for every expert e        (forward)
    dx[rows of e] = dy[rows of e] @ w[e]^T                                                (backward, input)
    dw[e]         = x[rows of e]^T @ dy[rows of e]               zero for an expert without rows  (backward, weight)

Rows at or past offsets[E] belong to no expert (unipool.py puts the (token, expert) pairs with a zero gate there):
their output and input gradient are zero and they cost no matmul.

The reference runs one matmul per expert from Python: E launches, each too small to fill a GPU when E is large.
The kernel runs every expert in ONE launch. Its unit of work is a tile: BLOCK_M rows of ONE expert times BLOCK_N
output columns. An expert with n rows gets ceil(n / BLOCK_M) row-blocks, the last one masked: the block LIST is
padded, not the data (padding each expert's rows to BLOCK_M in memory would double the work when experts hold
few tokens). Each program finds its row-block itself from the offsets, so nothing is planned on the host and
nothing waits for the GPU: with the groups g = 0..E (group E = the rows past offsets[E]),

    blocks_g = ceil((offsets[g+1] - offsets[g]) / BLOCK_M)       ends = cumsum(blocks)      (one vector op)
    program (m, n):  g = #{ends <= m},  rows = offsets[g] + (m - ends[g] + blocks_g) * BLOCK_M + arange(BLOCK_M)
                     acc = sum over k-blocks of x[rows, k] @ w[g, k, n]          (fp32 accumulation, tensor cores)
                     y[rows, n] = acc        (group E: no k loop, zeros)

Worked example, BLOCK_M = 4, offsets = [0, 6, 6, 7] (E = 3) and 9 rows: blocks = [2, 0, 1, 1] (group 3 holds the
rows 7, 8), ends = [2, 2, 3, 4]; program m = 2 finds g = #{2, 2 <= 2} = 2 and rows 6..9 (kept while < 7).
The launch has ceil(rows / BLOCK_M) + E + 1 row-blocks (a bound known on the host); the ones past ends[E] stop.

Program order (the Triton matmul tutorial's GROUP_M): programs that run together share GROUP_M row-blocks and
sweep the column blocks, so a tile of x is read from memory about once and w[e] stays in L2. Loads of x are not
masked (rows past an expert's end are read, never stored), which keeps the software pipeline free of predicates.

dx is the same kernel on w viewed as (E, N, K) (transposed strides, no copy). dw has its own kernel: a program
owns one (BLOCK_K x BLOCK_N) tile of dw[e] and walks the expert's rows BLOCK_M at a time (experts slowest, so
the programs running together read the same rows). No atomics anywhere: results are deterministic.

Tile sizes are autotuned on the GPU (128 x 128 or 128 x 256 tiles, 64-deep k steps, 3-4 pipeline stages: the
shapes at which Hopper's wgmma runs), keyed on (N, K) and the rows per expert. Inputs may be fp32, fp16 or
bf16; accumulation is fp32, outputs take the input dtype; GPUs run fp32 dots in TF32 (as torch does with
allow_tf32). On the CPU the same kernels run in Triton's interpreter (kernels/__init__.py), fp32 and fp16 only.

Backends (kernels/__init__.py): auto = the Triton kernel on CUDA (on an H200 it beat torch._grouped_mm on this
file's weight layout at every shape of `python bench_kernels.py`), torch._grouped_mm on the CPU where the inputs
allow it (16-byte aligned rows; 7-11 % faster than the loop there), else the per-expert loop; triton = the kernel
here; torch = the per-expert reference. The benchmark measures them side by side.
"""
import torch

from kernels import backend, launch, triton

if triton is not None:
    import triton.language as tl


# ----------------------------------------------------------------------------- reference

def grouped_mm_reference(x, w, offsets):
    """y[rows of e] = x[rows of e] @ w[e], zero for rows past offsets[-1]. split/unbind, not x[a:b] and w[e]:
    their backwards are one cat and one stack, where slicing would allocate a full-size zero gradient of w for
    every expert. (It reads the offsets on the host: a sync, fine for a reference.)"""
    *x_e, x_rest = x.split(offsets.diff().tolist() + [x.shape[0] - int(offsets[-1])])
    return torch.cat([xe @ we for xe, we in zip(x_e, w.unbind(0))] + [x_rest.new_zeros(len(x_rest), w.shape[2])])


# ----------------------------------------------------------------------------- kernels

if triton is not None:
    @triton.jit
    def _row_block(offsets_ptr, n_rows, E, pid_m, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
        """Group g (0..E; E = rows past offsets[E]) of row-block pid_m and its rows [start, end); g > E: no block."""
        g = tl.arange(0, E_POW2)
        lo = tl.load(offsets_ptr + g, mask=g <= E, other=n_rows)                   # offsets[g]
        hi = tl.load(offsets_ptr + g + 1, mask=g < E, other=n_rows)                # offsets[g+1]; n_rows for g = E
        blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
        ends = tl.cumsum(blocks, 0)                                                # one past g's last block
        grp = tl.sum((ends <= pid_m).to(tl.int32), 0)
        start = tl.sum(tl.where(g == grp, lo + (pid_m - ends + blocks) * BLOCK_M, 0), 0)
        end = tl.sum(tl.where(g == grp, hi, 0), 0)
        return grp, start, end

    @triton.jit
    def _grouped_mm_kernel(x_ptr, w_ptr, y_ptr, offsets_ptr, n_rows, E, N, K,
                           stride_xm, stride_xk,                 # x (rows, K)
                           stride_we, stride_wk, stride_wn,      # w (E, K, N), any strides (a transposed view too)
                           stride_ym, stride_yn,                 # y (rows, N)
                           rows_per_expert,                      # autotuning key only (a power of two)
                           E_POW2: tl.constexpr,                 # a power of two > E + 1
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
        # program -> (row-block m, column block n), GROUP_M row-blocks at a time
        pid = tl.program_id(0)
        n_blocks_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * n_blocks_n
        first_m = (pid // in_group) * GROUP_M
        group_size = tl.minimum(tl.cdiv(n_rows, BLOCK_M) + E + 1 - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_size
        pid_n = (pid % in_group) // group_size
        e, start, end = _row_block(offsets_ptr, n_rows, E, pid_m, BLOCK_M, E_POW2)
        if e <= E:
            # pointer offsets in int64: rows * stride_xm and e * stride_we pass 2^31 on large layers
            rows = start.to(tl.int64) + tl.arange(0, BLOCK_M)
            cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
            ks = tl.arange(0, BLOCK_K)
            a_ptrs = x_ptr + tl.minimum(rows, n_rows - 1)[:, None] * stride_xm + ks[None, :] * stride_xk
            b_ptrs = w_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, tl.where(e < E, K, 0), BLOCK_K):                    # group E: no k loop, zeros
                a = tl.load(a_ptrs, mask=ks[None, :] < K - k0, other=0.0)          # rows past `end`: never stored
                b = tl.load(b_ptrs, mask=(ks[:, None] < K - k0) & (cols[None, :] < N), other=0.0)
                acc = tl.dot(a, b, acc)
                a_ptrs += BLOCK_K * stride_xk
                b_ptrs += BLOCK_K * stride_wk
            tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                     mask=(rows[:, None] < end) & (cols[None, :] < N))

    @triton.jit
    def _grouped_dw_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, K, N,
                           stride_xm, stride_xk, stride_dym, stride_dyn, stride_de, stride_dk, stride_dn,
                           rows_per_expert,                      # autotuning key only
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                           GROUP_K: tl.constexpr):
        # program -> (expert e, tile (k, n) of dw[e]); experts slowest, GROUP_K k-blocks at a time within one
        pid = tl.program_id(0)
        n_blocks_k, n_blocks_n = tl.cdiv(K, BLOCK_K), tl.cdiv(N, BLOCK_N)
        e = pid // (n_blocks_k * n_blocks_n)
        t = pid % (n_blocks_k * n_blocks_n)
        first_k = (t // (GROUP_K * n_blocks_n)) * GROUP_K
        group_size = tl.minimum(n_blocks_k - first_k, GROUP_K)
        pid_k = first_k + (t % (GROUP_K * n_blocks_n)) % group_size
        pid_n = (t % (GROUP_K * n_blocks_n)) // group_size
        start = tl.load(offsets_ptr + e).to(tl.int64)
        end = tl.load(offsets_ptr + e + 1).to(tl.int64)
        ks = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end                                                    # the next expert's rows: zeros
            a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)      # (BLOCK_M, BLOCK_K)
            g = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                        mask=row_ok[:, None] & (cols[None, :] < N), other=0.0)    # (BLOCK_M, BLOCK_N)
            acc = tl.dot(tl.trans(a), g, acc)
        tl.store(dw_ptr + e.to(tl.int64) * stride_de + ks[:, None] * stride_dk + cols[None, :] * stride_dn,
                 acc.to(dw_ptr.dtype.element_ty), mask=(ks[:, None] < K) & (cols[None, :] < N))

    # tile configs the autotuner tries on a GPU: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M), num_warps, num_stages for
    # 16-bit inputs; fp32 halves the reduction depth (BLOCK_K; BLOCK_M for dw) to fit the same shared memory
    MM_CONFIGS = [((128, 256, 64, 8), 8, 3), ((128, 256, 64, 8), 8, 4), ((128, 128, 64, 8), 8, 4),
                  ((128, 128, 64, 8), 4, 4), ((64, 128, 64, 8), 4, 4), ((64, 256, 64, 8), 8, 3)]
    DW_CONFIGS = [((64, 128, 128, 8), 8, 3), ((64, 128, 256, 8), 8, 3), ((64, 128, 128, 8), 4, 4),
                  ((32, 64, 128, 8), 4, 4)]

    def mm_configs(element_size):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k if element_size < 4 else k // 2,
                               "GROUP_M": g}, num_warps=w, num_stages=st) for (m, n, k, g), w, st in MM_CONFIGS]

    def dw_configs(element_size):
        return [triton.Config({"BLOCK_M": m if element_size < 4 else m // 2, "BLOCK_K": k, "BLOCK_N": n,
                               "GROUP_K": g}, num_warps=w, num_stages=st) for (m, k, n, g), w, st in DW_CONFIGS]

    def _autotuned(kernel, configs, key):
        prune = lambda _, named_args, **kwargs: configs(named_args["x_ptr"].element_size())
        return triton.autotune(configs(2), key=key, prune_configs_by={"early_config_prune": prune})(kernel)

    _mm_tuned = _autotuned(_grouped_mm_kernel, mm_configs, ["N", "K", "rows_per_expert"])
    _dw_tuned = _autotuned(_grouped_dw_kernel, dw_configs, ["K", "N", "rows_per_expert"])

# the tile sizes when nothing is autotuned (the CPU interpreter; tests try others)
FIXED_MM = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=4)
FIXED_DW = dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=64, GROUP_K=4)


def _pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _launch_mm(x, w, offsets):
    """y = grouped x @ w for w of shape (E, K, N) with any strides; offsets (E+1,) int32 on x's device."""
    (E, K, N), rows = w.shape, x.shape[0]
    y = torch.empty(rows, N, device=x.device, dtype=x.dtype)
    if rows == 0:
        return y
    grid = lambda meta: ((triton.cdiv(rows, meta["BLOCK_M"]) + E + 1) * triton.cdiv(N, meta["BLOCK_N"]),)
    args = (x, w, y, offsets, rows, E, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
            y.stride(0), y.stride(1), _pow2(rows // max(E, 1)), _pow2(E + 2))
    launch(_grouped_mm_kernel, grid, args, x, FIXED_MM, _mm_tuned)
    return y


def _launch_dw(x, dy, offsets, E):
    K, N = x.shape[1], dy.shape[1]
    dw = torch.empty(E, K, N, device=x.device, dtype=x.dtype)
    grid = lambda meta: (E * triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    args = (x, dy, dw, offsets, K, N, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0),
            dw.stride(1), dw.stride(2), _pow2(x.shape[0] // max(E, 1)))
    launch(_grouped_dw_kernel, grid, args, x, FIXED_DW, _dw_tuned)
    return dw


class GroupedMM(torch.autograd.Function):
    """The Triton kernels under autograd: forward y, backward dx (same kernel on wᵀ) and dw."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        offsets = offsets.to(device=x.device, dtype=torch.int32)
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w, offsets)
        return _launch_mm(x, w, offsets)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _launch_mm(dy, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
        dw = _launch_dw(x, dy, offsets, w.shape[0]) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class TorchGroupedMM(torch.autograd.Function):
    """torch._grouped_mm with this file's conventions: rows past offsets[-1] zero (_grouped_mm leaves them
    unwritten), any incoming gradient layout. Nothing is read on the host."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        ends = offsets[1:].to(torch.int32)
        x, w = x.contiguous(), w.contiguous()
        routed = (torch.arange(x.shape[0], device=x.device) < offsets[-1])[:, None]          # (rows, 1)
        ctx.save_for_backward(x, w, ends, routed)
        return torch.where(routed, torch._grouped_mm(x, w, offs=ends), 0)

    @staticmethod
    def backward(ctx, dy):
        x, w, ends, routed = ctx.saved_tensors
        dy = torch.where(routed, dy, 0).contiguous()
        # dx[rows of e] = dy[rows of e] @ w[e]ᵀ;   dw[e] = x[rows of e]ᵀ @ dy[rows of e]  (rows past ends: no group)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.where(routed, torch._grouped_mm(dy, w.transpose(1, 2), offs=ends), 0)
        if ctx.needs_input_grad[1]:
            dw = torch._grouped_mm(x.t(), dy, offs=ends)
        return dx, dw, None


def fits_torch_grouped_mm(x, w):
    """torch._grouped_mm exists for these inputs: fp32/fp16/bf16 and 16-byte aligned rows of x, w and wᵀ."""
    align = 16 // x.element_size()
    return (hasattr(torch, "_grouped_mm") and x.dtype == w.dtype and x.dtype in (torch.float32, torch.float16,
            torch.bfloat16) and x.shape[1] % align == 0 and w.shape[2] % align == 0)


def grouped_mm(x, w, offsets):
    """y[rows of e] = x[rows of e] @ w[e]; x (rows, K) sorted by expert, w (E, K, N), offsets (E+1,) int with
    offsets[0] = 0. Rows past offsets[E] give zeros. Under autocast x and w are cast to its dtype first (as torch
    does for a plain x @ w), so every backend trains alike."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, w = x.to(dtype), w.to(dtype)
    with torch.autocast(device, enabled=False):
        if backend() == "triton" or (backend() == "auto" and x.is_cuda and triton is not None):
            return GroupedMM.apply(x, w, offsets)
        if backend() == "auto" and fits_torch_grouped_mm(x, w):
            return TorchGroupedMM.apply(x, w, offsets)
        return grouped_mm_reference(x, w, offsets)
