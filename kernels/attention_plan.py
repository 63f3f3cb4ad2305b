"""
The schedule of the sparse attention kernels (kernels/attention.py: forward, kernels/attention_bwd.py: backward),
what both passes share: the plan, three small arrays per batch that say which keys each query block gathers (built
on the GPU, without reading anything on the host), and the Triton helpers that load a tile and mask it by what it
needs (the table of tiles and the worked example are in kernels/attention.py's docstring).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels import triton

if triton is not None:
    import triton.language as tl


# ----------------------------------------------------------------------------- the plan

class Plan(NamedTuple):
    """What the kernels read besides q, k, v: per sequence b,"""
    sep: torch.Tensor          # (B, T) uint8: keep[j]
    cols: torch.Tensor         # (B, T + 1) int32: the kept positions (j < a or keep[j]) in order (the first
                               #   kept_before[b, T] entries; the rest unused)
    kept_before: torch.Tensor  # (B, T + 1) int32: kept positions left of j (= a kept key's index in cols)
    n_init: int


def make_plan(keep, n_init):
    B, T = keep.shape
    kept = keep | (torch.arange(T, device=keep.device) < n_init)
    kept_before = F.pad(torch.cumsum(kept, 1, dtype=torch.int32), (1, 0))         # (B, T+1)
    # cols[kept_before[j]] = j for every kept j; the others all write to the spare entry T, which nothing reads
    slot = torch.where(kept, kept_before[:, :-1].long(), T)
    cols = torch.zeros(B, T + 1, dtype=torch.int32, device=keep.device)
    cols.scatter_(1, slot, torch.arange(T, dtype=torch.int32, device=keep.device).expand(B, T))
    return Plan(keep.to(torch.uint8), cols, kept_before, n_init)


_last_plan = None


def plan_for(keep, n_init):
    """The layers of a forward pass share one keep tensor: its plan is built once and reused while it is the
    same tensor, unmodified (its version counter unchanged), with the same n_init."""
    global _last_plan
    if _last_plan is None or _last_plan[0] is not keep or _last_plan[1] != (keep._version, n_init):
        _last_plan = (keep, (keep._version, n_init), make_plan(keep, n_init))
    return _last_plan[2]


def pairs_computed(keep, n_init, n_local, block_m=128, block_n=64):
    """(query, key) pairs per head, summed over the batch: `kept` by rule (1), and the pairs the forward (= dQ)
    and the two dK/dV passes evaluate (block_m x block_n per tile they visit, masked entries included)."""
    B, T = keep.shape
    w = min(n_local, T)
    s = make_plan(keep, n_init)
    i = torch.arange(T, device=keep.device)
    # row i keeps min(w, i + 1) window keys and the kept keys left of its window
    kept = (i + 1).clamp(max=w).sum() * B + s.kept_before[:, (i - w + 1).clamp(min=0)].sum()
    n_q = -(-T // block_m)
    q0 = torch.arange(n_q, device=keep.device) * block_m
    lo, q1 = (q0 - w + 1).clamp(min=0), (q0 + block_m).clamp(max=T)
    cdiv = lambda x, y: (x + y - 1) // y
    fwd = (cdiv(s.kept_before[:, lo], block_n).sum() + B * cdiv(q1 - lo, block_n).sum()) * block_m * block_n
    # dK/dV, columns: a block of block_n columns from the first query block with q0 ≥ its first column + w
    n_kept = s.kept_before[:, T]
    c0 = torch.arange(-(-T // block_n), device=keep.device) * block_n
    first = cdiv(s.cols[:, c0.clamp(max=T)].long() + w, block_m).clamp(max=n_q)
    cols = torch.where(c0 < n_kept[:, None], n_q - first, 0).sum()
    # dK/dV, window: key block k0 meets the query blocks from k0's to the last with lo < k0 + block_n
    k0 = torch.arange(-(-T // block_n), device=keep.device) * block_n
    window = ((k0 + block_n + w - 2) // block_m).clamp(max=n_q - 1) - k0 // block_m + 1
    return {"kept": int(kept), "forward": int(fwd), "dq": int(fwd),
            "dkdv": int((cols + B * window.sum()) * block_m * block_n)}


# ----------------------------------------------------------------------------- tiles

if triton is not None:
    # what a tile needs (the table in kernels/attention.py's docstring): no mask, the gathered columns' count,
    # causal, rule (1)
    FULL, PARTIAL, CAUSAL, RULE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)

    @triton.jit
    def _visible(kpos, kvalid, offs_m, sep_ptr, T, n_init, n_local, MODE: tl.constexpr):
        """Which (query, key) pairs of a tile rule (1) keeps, for the tiles that need a mask."""
        if MODE == PARTIAL:    # gathered columns: all visible, the ones past the block's count excepted
            ok = kvalid[None, :] & (offs_m[:, None] >= 0)
        elif MODE == CAUSAL:
            ok = kpos[None, :] <= offs_m[:, None]
        else:                  # RULE: j ≤ i and (j < a or keep[j] or i − j < w)
            sep = tl.load(sep_ptr + kpos, mask=kpos < T, other=0) != 0
            ok = (kpos[None, :] <= offs_m[:, None]) & ((kpos[None, :] < n_init) | sep[None, :]
                                                       | (offs_m[:, None] - kpos[None, :] < n_local))
        return ok

    @triton.jit
    def _load_rows(base, kpos, stride_t, T, D: tl.constexpr, MODE: tl.constexpr):
        """(BLOCK_N, D) rows kpos of one head; tiles that may reach past T mask the load."""
        d = tl.arange(0, D)
        if MODE >= CAUSAL:
            rows = tl.load(base + kpos[:, None] * stride_t + d[None, :], mask=kpos[:, None] < T, other=0.0)
        else:
            rows = tl.load(base + kpos[:, None] * stride_t + d[None, :])
        return rows

    @triton.jit
    def _window_tiles(q0, T, n_local, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The window range [lo, q1) of query block q0 in tiles of BLOCK_N from lo: the first t_edge need rule
        (1) (a row's window ends inside them), tiles t_edge..t_diag need no mask, the rest the causal one."""
        lo = tl.maximum(q0 - n_local + 1, 0)
        n_tiles = tl.cdiv(tl.minimum(q0 + BLOCK_M, T) - lo, BLOCK_N)
        t_edge = tl.minimum(tl.cdiv(tl.maximum(q0 + BLOCK_M - n_local - lo, 0), BLOCK_N), n_tiles)
        t_diag = tl.maximum(tl.minimum(tl.cdiv(tl.maximum(q0 - BLOCK_N + 2 - lo, 0), BLOCK_N), n_tiles), t_edge)
        return lo, n_tiles, t_edge, t_diag

    def attention_configs(table):
        """Tile configs the autotuner tries on a GPU, from rows ((BLOCK_M, BLOCK_N), num_warps, num_stages)."""
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for (m, n), w, st in table]

    def autotuned(kernel, table):
        # tuned per head dim, score, heads and length: the best tile changes with how many programs fill the GPU
        return triton.autotune(attention_configs(table), key=["D", "SCORE", "H", "T"])(kernel)
