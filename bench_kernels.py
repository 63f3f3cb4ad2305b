"""
Benchmarks of the MoE dispatch and the sparse attention. Run on a quiet machine:

    python -m kernels.bench                 # everything
    python -m kernels.bench --part=moe      # 1, 2 and 4 (--part=attention: 3)

1. (any device) One MoE layer, forward + backward, at E = 16 and 64, top-1 and top-2: unipool.py's sorted
   dispatch with the default backend (torch._grouped_mm on CPU, Triton on CUDA) and with the per-expert
   reference (--kernels=torch), vs the naive loop that masks tokens per expert and scatter-adds them back (the
   Hugging Face Mixtral pattern, with per-expert weight views so it pays no extra gradient allocations) vs a
   dense SwiGLU whose hidden size is top_k times an expert's (the same active FLOPs). The variants run in turn,
   round after round, and each gets the median of its rounds, so load on a shared machine hits them alike.
2. (CUDA only) kernels/moe.py's grouped_mm, forward and forward + backward, at UniPool-like shapes: the Triton
   kernel vs the PyTorch per-expert loop vs one dense matmul of the same FLOPs, in TFLOP/s.
3. SepLLM attention (kernels/attention.py), ~10 % separators, a = 3, w = 64: the (query, key) pairs each Triton
   pass computes (forward, dQ, dK/dV) against the pairs rule (1) keeps; then the time, on the CPU the gathering
   fast path vs dense SDPA with a boolean mask, on CUDA the Triton kernel vs FlexAttention with the same mask vs
   dense SDPA.
4. (any device) A training iteration (forward, backward, clipping, AdamW) of the default train_lm.py model with
   dense FFNs vs UniPool (--ffn=unipool --pool_size=32), alternating blocks of iterations.
"""
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from common import UserError, parse_flags, run_main
from gpt import GPT, GPTConfig, ffn_hidden_size
from kernels.attention import TritonSepAttention, fast_attention, pairs_computed
from kernels.moe import GroupedMM, grouped_mm_reference
from sepllm import keep_mask
from unipool import aux_losses, build_moe_layers, sort_by_expert


@dataclass
class BenchConfig:
    tokens: int = 4096
    dim: int = 256
    hidden: int = 1024         # an expert's SwiGLU hidden size
    experts: str = "16,64"     # the MoE layer table's expert counts
    reps: int = 10
    iters: int = 200           # 4: training iterations of each model (blocks of 20, alternating)
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


def alternating_medians(fns, reps):
    """{name: median ms}: one warm-up each, then reps rounds that run every fn once, in turn."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: 1000 * statistics.median(v) for name, v in times.items()}


def median_ms(fn, reps):
    return alternating_medians({"fn": fn}, reps)["fn"]


def with_backend(name, fn):
    def run():
        kernels.set_backend(name)
        try:
            fn()
        finally:
            kernels.set_backend("auto")
    return run


def moe_layer_bench(cfg):
    fast = "Triton" if torch.cuda.is_available() else "torch._grouped_mm"
    print(f"MoE layer, T={cfg.tokens}, d={cfg.dim}, expert hidden {cfg.hidden}, forward+backward, median of "
          f"{cfg.reps} alternating rounds (ms), {torch.get_num_threads()} torch threads\n")
    print(f"| E | top_k | sorted, {fast} | sorted, per-expert loop | mask loop | dense SwiGLU, same active FLOPs | "
          f"mask loop / {fast} | {fast} / dense |\n|---|---|---|---|---|---|---|---|")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for E in (int(e) for e in cfg.experts.split(",")):
        for k in (1, 2):
            layer = build_moe_layers("moe", 1, cfg.dim, cfg.hidden, E, top_k=k, router="softmax")[0].to(device)
            shapes = [(cfg.dim, k * cfg.hidden), (cfg.dim, k * cfg.hidden), (k * cfg.hidden, cfg.dim)]
            dense = [(0.02 * torch.randn(s, device=device)).requires_grad_() for s in shapes]
            x = torch.randn(1, cfg.tokens, cfg.dim, device=device, requires_grad=True)
            y_sorted, _ = layer(x)
            torch.testing.assert_close(y_sorted[0], mask_loop(layer, x[0]), rtol=1e-4, atol=1e-5)
            sorted_step = lambda: layer(x)[0].sum().backward()
            t = alternating_medians({
                "fast": sorted_step, "reference": with_backend("torch", sorted_step),
                "mask": lambda: mask_loop(layer, x[0]).sum().backward(),
                "dense": lambda: ((F.silu(x @ dense[0]) * (x @ dense[1])) @ dense[2]).sum().backward()}, cfg.reps)
            print(f"| {E} | {k} | {t['fast']:.1f} | {t['reference']:.1f} | {t['mask']:.1f} | {t['dense']:.1f} | "
                  f"{t['mask'] / t['fast']:.2f}x | {t['fast'] / t['dense']:.2f}x |")


def train_step_bench(cfg, block=20):
    """ms per training iteration of train_lm.py's default model (batch 12 x 64 tokens), dense vs UniPool."""
    gcfg = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    gen = torch.Generator().manual_seed(cfg.seed)

    def trainer(ffns):
        model = GPT(gcfg, ffns)
        opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.99))

        def step():
            for _ in range(block):
                x, y = torch.randint(0, 65, (2, 12, 64), generator=gen)
                out = model(x, y)
                (out.loss + (aux_losses(ffns, out.aux, "pool", 0.01, 0.0) if ffns else 0.0)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return step

    pool = build_moe_layers("unipool", 4, 128, ffn_hidden_size(gcfg), 8, 32, 1, 1, "norm")
    t = alternating_medians({"dense": trainer(None), "unipool": trainer(pool)}, max(1, cfg.iters // block))
    print(f"\nTraining iteration, train_lm.py's default model (4 layers, width 128, 768 tokens), median of "
          f"{max(1, cfg.iters // block)} alternating blocks of {block}, {torch.get_num_threads()} torch threads\n\n"
          f"| dense | UniPool, M = 32, NormRouter, pool loss | UniPool / dense |\n|---|---|---|\n"
          f"| {t['dense'] / block:.1f} ms | {t['unipool'] / block:.1f} ms | {t['unipool'] / t['dense']:.2f}x |")


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
    if cfg.part not in ("all", "moe", "attention"):
        raise UserError(f"--part must be all, moe or attention, got {cfg.part!r}")
    torch.manual_seed(cfg.seed)
    print(f"{torch.get_num_threads()} torch threads")
    if cfg.part in ("all", "moe"):
        moe_layer_bench(cfg)
        train_step_bench(cfg)
        if torch.cuda.is_available():
            print(f"\n{torch.cuda.get_device_name()}: grouped_mm, bf16, median of {cfg.reps}")
            gpu_grouped_mm(cfg.reps)
    if cfg.part in ("all", "attention"):
        sepllm_attention_bench(cfg.reps, "cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    run_main(main)
