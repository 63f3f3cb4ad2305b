"""
Benchmarks of the MoE dispatch. Run on a quiet machine:

    python -m kernels.bench

1. (any device) One MoE layer, forward + backward: unipool.py's sorted dispatch (one grouped matmul per weight)
   vs the naive loop that masks tokens per expert and scatter-adds them back (the Hugging Face Mixtral pattern,
   with per-expert weight views so it pays no extra gradient allocations) vs a dense SwiGLU whose hidden size is
   top_k times an expert's (the same active FLOPs).
2. (CUDA only) kernels/moe.py's grouped_mm, forward and forward + backward, at UniPool-like shapes: the Triton
   kernel vs the PyTorch per-expert loop vs one dense matmul of the same FLOPs, in TFLOP/s.
3. SepLLM attention (kernels/attention.py), ~10 % separators, a = 3, w = 64: the (query, key) pairs each Triton
   pass computes (forward, dQ, dK/dV) against the pairs rule (1) keeps; then the time, on the CPU the gathering
   fast path vs dense SDPA with a boolean mask, on CUDA the Triton kernel vs FlexAttention with the same mask vs
   dense SDPA.

    python -m kernels.bench --part=attention      # only the attention part (moe: only the MoE parts)
"""
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import UserError, parse_flags, run_main
from kernels.attention import TritonSepAttention, fast_attention, pairs_computed
from kernels.moe import GroupedMM, grouped_mm_reference
from sepllm import keep_mask
from unipool import build_moe_layers, sort_by_expert


@dataclass
class BenchConfig:
    tokens: int = 4096
    dim: int = 256
    hidden: int = 704          # an expert's SwiGLU hidden size (8/3 d rounded up to 64)
    n_experts: int = 16
    reps: int = 10
    seed: int = 0
    part: str = "all"          # all | moe | attention


def mask_loop(layer, x):
    """For each expert: find its tokens, run them, scatter-add the gated outputs back."""
    r = layer.router(x)
    y = torch.zeros_like(x)
    w1, w3, w2 = (w.unbind(0) for w in (layer.pool.w1, layer.pool.w3, layer.pool.w2))
    for e in range(layer.pool.n_experts):
        tok, slot = torch.where(r.indices == e)
        if len(tok) == 0:
            continue
        h = x[tok]
        out = (F.silu(h @ w1[e]) * (h @ w3[e])) @ w2[e]
        y = y.index_add(0, tok, out * r.gates[tok, slot, None])
    return y


def median_ms(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def gpu_grouped_mm(reps):
    print("\n| T | d | M | top_k | pass | Triton TFLOP/s | per-expert loop TFLOP/s | dense TFLOP/s | Triton / loop |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for T, d, M, k in ((8192, 768, 64, 1), (8192, 768, 64, 2), (32768, 1024, 256, 1), (32768, 1024, 256, 2)):
        hidden = 4 * d
        indices = torch.randint(0, M, (T, k), device="cuda")
        _, _, offsets = sort_by_expert(indices, M)
        x = torch.randn(T * k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(M, d, hidden, device="cuda", dtype=torch.bfloat16) / d ** 0.5).requires_grad_()
        dense_w = (torch.randn(d, hidden, device="cuda", dtype=torch.bfloat16) / d ** 0.5).requires_grad_()
        flops = 2 * T * k * d * hidden
        for name, passes in (("forward", 1), ("forward+backward", 3)):
            def step(f):
                def run():
                    y = f()
                    if passes == 3:
                        y.backward(torch.ones_like(y))
                return run
            t_tri = median_ms(step(lambda: GroupedMM.apply(x, w, offsets)), reps)
            t_loop = median_ms(step(lambda: grouped_mm_reference(x, w, offsets)), reps)
            t_dense = median_ms(step(lambda: x @ dense_w), reps)
            tf = lambda ms: passes * flops / ms / 1e9
            print(f"| {T} | {d} | {M} | {k} | {name} | {tf(t_tri):.0f} | {tf(t_loop):.0f} | {tf(t_dense):.0f} | "
                  f"{t_loop / t_tri:.2f}x |")


def pairs_table(lengths, a, w):
    print(f"\n(query, key) pairs per head each Triton pass computes (whole tiles), a={a}, w={w}, 10 % separators\n")
    print("| T | causal | kept by rule (1) | forward | dQ | dK/dV | forward / kept | dK/dV / forward |\n"
          "|---|---|---|---|---|---|---|---|")
    for T in lengths:
        keep = torch.rand(1, T, generator=torch.Generator().manual_seed(T)) < 0.1
        p, causal = pairs_computed(keep, a, w), T * (T + 1) // 2
        pct = lambda n: f"{n:,} ({100 * n / causal:.1f} %)"
        print(f"| {T} | {causal:,} | {pct(p['kept'])} | {pct(p['forward'])} | {pct(p['dq'])} | {pct(p['dkdv'])} | "
              f"{p['forward'] / p['kept']:.2f} | {p['dkdv'] / p['forward']:.2f} |")


def sepllm_attention_bench(reps, device, lengths=(1024, 4096, 8192)):
    B, H, D, a, w = 1, 4, 32, 3, 64
    pairs_table(lengths, a, w)
    print(f"\nSepLLM attention on {device}: B={B}, H={H}, head dim {D}, a={a}, w={w}, 10 % separators, "
          f"median of {reps} (ms)\n")
    fast = TritonSepAttention.apply if device == "cuda" else fast_attention
    name = "Triton" if device == "cuda" else "gathering fast path"
    print(f"| T | pass | {name} | dense SDPA + bool mask | dense / {name} |" + (" FlexAttention |" if device == "cuda" else "")
          + "\n|---|---|---|---|---|" + ("---|" if device == "cuda" else ""))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        keep = (torch.rand(B, T, generator=torch.Generator().manual_seed(T)) < 0.1).to(device)
        mask = keep_mask(keep, a, w)[:, None]
        out_fast, out_dense = fast(q, k, v, keep, a, w, "softmax"), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(out_fast.float(), out_dense.float(), rtol=2e-2 if device == "cuda" else 1e-4,
                                   atol=2e-2 if device == "cuda" else 1e-5)
        flex = None
        if device == "cuda":
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            rule = lambda b, h, i, j: (j <= i) & ((j < a) | keep[b, j] | (i - j < w))
            block_mask = create_block_mask(rule, B, None, T, T, device=device)
            flex_c = torch.compile(flex_attention)
            flex = lambda: flex_c(q, k, v, block_mask=block_mask)
        for label, backward in (("forward", False), ("forward+backward", True)):
            def timed(f):
                def run():
                    y = f()
                    if backward:
                        y.backward(torch.ones_like(y))
                return median_ms(run, reps)
            t_fast = timed(lambda: fast(q, k, v, keep, a, w, "softmax"))
            t_dense = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
            row = f"| {T} | {label} | {t_fast:.1f} | {t_dense:.1f} | {t_dense / t_fast:.2f}x |"
            print(row + (f" {timed(flex):.1f} |" if flex else ""))


def main():
    cfg = parse_flags(BenchConfig, sys.argv[1:])
    torch.manual_seed(cfg.seed)
    if cfg.part not in ("all", "moe", "attention"):
        raise UserError(f"--part must be all, moe or attention, got {cfg.part!r}")
    print(f"{torch.get_num_threads()} torch threads")
    if cfg.part != "attention":
        moe_bench(cfg)
    if cfg.part != "moe":
        sepllm_attention_bench(cfg.reps, "cuda" if torch.cuda.is_available() else "cpu")


def moe_bench(cfg):
    print(f"\nT={cfg.tokens}, d={cfg.dim}, expert hidden {cfg.hidden}, E={cfg.n_experts}, forward+backward, "
          f"median of {cfg.reps}\n")
    print("| top_k | sorted dispatch (ms) | mask loop (ms) | dense SwiGLU, same active FLOPs (ms) | "
          "mask loop / sorted | sorted / dense |\n|---|---|---|---|---|---|")
    for k in (1, 2):
        layer = build_moe_layers("moe", 1, cfg.dim, cfg.hidden, cfg.n_experts, top_k=k, router="softmax")[0]
        shapes = [(cfg.dim, k * cfg.hidden), (cfg.dim, k * cfg.hidden), (k * cfg.hidden, cfg.dim)]
        dense = [(0.02 * torch.randn(s)).requires_grad_() for s in shapes]
        x = torch.randn(1, cfg.tokens, cfg.dim, requires_grad=True)
        y_sorted, _ = layer(x)
        torch.testing.assert_close(y_sorted[0], mask_loop(layer, x[0]), rtol=1e-4, atol=1e-5)

        def sorted_step():
            layer(x)[0].sum().backward()

        def loop_step():
            mask_loop(layer, x[0]).sum().backward()

        def dense_step():
            ((F.silu(x @ dense[0]) * (x @ dense[1])) @ dense[2]).sum().backward()

        t_sorted, t_loop, t_dense = (median_ms(f, cfg.reps) for f in (sorted_step, loop_step, dense_step))
        print(f"| {k} | {t_sorted:.1f} | {t_loop:.1f} | {t_dense:.1f} | {t_loop / t_sorted:.2f}x | "
              f"{t_sorted / t_dense:.2f}x |")
    if torch.cuda.is_available():
        print(f"\n{torch.cuda.get_device_name()}: grouped_mm, bf16, median of {cfg.reps}")
        gpu_grouped_mm(cfg.reps)


if __name__ == "__main__":
    run_main(main)
