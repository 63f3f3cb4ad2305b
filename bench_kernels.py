"""
Benchmarks of the kernels in kernels/ against what torch ships, on this machine (CPU or CUDA). Run it quiet:

    python bench_kernels.py                   # every table for this device
    python bench_kernels.py --part=moe        # or attention, train; --quick: fewer shapes and rounds

1. MoE layer (any device), forward + backward, E = 16 and 64, top-1 and top-2: unipool.py's sorted dispatch with
   --kernels=auto (and =triton on CUDA) and with the per-expert reference (--kernels=torch), vs the mask loop (the
   Hugging Face Mixtral pattern) vs a dense SwiGLU of the same active FLOPs.
2. Grouped matmul (CUDA), bf16, at MoE shapes (rows = tokens x top_k, K, N, E): kernels/moe.py's Triton kernel vs
   torch._grouped_mm vs the per-expert loop vs one dense matmul of the same FLOPs, TFLOP/s.
3. SepLLM attention: the (query, key) pairs each pass visits against the kept ones; then the time. CUDA, bf16:
   the Triton kernels vs SDPA with is_causal=True (FlashAttention: the dense speed to beat) vs SDPA with the
   boolean mask vs FlexAttention with the 128 x 128 block mask (what the official SepLLM training code uses), with
   TFLOP/s on the kept pairs and the fixed cost at a tiny shape. CPU, fp32: the gathering fast path vs SDPA with
   the boolean mask vs SDPA is_causal.
4. A training iteration of train_lm.py's default model, dense FFN vs UniPool (any device).
Variants run in turn, round after round, and each gets the median of its rounds, so load on a shared machine hits
them alike. On CUDA every Triton config the autotuner may try is compiled first, on all cores at once.
"""
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from common import UserError, parse_flags, run_main
from gpt import GPT, GPTConfig, ffn_hidden_size
from kernels.attention import TritonSepAttention, pairs_computed, plan_for, rule_mask
from kernels.attention_cpu import fast_attention
from kernels.moe import GroupedMM, TorchGroupedMM, fits_torch_grouped_mm, grouped_mm_reference
from unipool import aux_losses, build_moe_layers, sort_by_expert


@dataclass
class BenchConfig:
    part: str = "all"          # all | moe | attention | train
    quick: bool = False        # fewer shapes and rounds (a smoke run)
    reps: int = 10             # timed rounds per variant
    tokens: int = 4096         # 1: the MoE layer's tokens, width, expert hidden size, expert counts
    dim: int = 256
    hidden: int = 1024
    experts: str = "16,64"
    iters: int = 200           # 4: training iterations of each model (blocks of 20, alternating)
    flex: bool = True          # 3 (CUDA): time FlexAttention too (it compiles for each shape: minutes)
    shapes: str = ""           # 2, 3 (CUDA): which rows of the shape lists to run, e.g. 0,3; "" = all
    seed: int = 0


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync():
    if CUDA:
        torch.cuda.synchronize()


def alternating_medians(fns, reps):
    """{name: median ms}: one warm-up each, then reps rounds that run every fn once, in turn."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: 1000 * statistics.median(v) for name, v in times.items()}


def close(a, b, dtype):
    """Agreement at the tolerance of the dtype the device computes in (fp32 on a GPU: TF32), relative to the
    largest value of b; raises with the numbers, never silently passes a wrong kernel."""
    tol = {torch.float32: 2e-2 if CUDA else 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
    if not err <= tol:
        raise AssertionError(f"results differ by {err:.2e} (relative to the largest value), more than {tol:.0e}")


def with_backend(name, fn):
    def run():
        kernels.set_backend(name)
        try:
            return fn()
        finally:
            kernels.set_backend("auto")
    return run


def precompile(fn):
    """Run fn once with every Triton launch only compiling, all cores at once (CUDA)."""
    if not CUDA or kernels.triton is None:
        return
    t = time.perf_counter()
    with kernels.precompiling(os.cpu_count() or 4):
        fn()
    sync()
    print(f"(compiled the Triton configs in {time.perf_counter() - t:.0f} s)")


# ----------------------------------------------------------------------------- 1. MoE layer

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


def moe_layer_bench(cfg):
    print(f"\n1. MoE layer on {DEVICE}, T={cfg.tokens}, d={cfg.dim}, expert hidden {cfg.hidden}, fp32, forward+backward, "
          f"median of {cfg.reps} alternating rounds (ms), {torch.get_num_threads()} torch threads\n")
    variants = ["auto", "triton", "torch"] if CUDA else ["auto", "torch"]
    print("| E | top_k | " + " | ".join(f"sorted, --kernels={v}" for v in variants) +
          " | mask loop | dense SwiGLU, same active FLOPs | auto / dense |\n|" + "---|" * (len(variants) + 5))
    for E in (int(e) for e in cfg.experts.split(",")):
        for k in (1, 2):
            layer = build_moe_layers("moe", 1, cfg.dim, cfg.hidden, E, top_k=k, router="softmax")[0].to(DEVICE)
            shapes = [(cfg.dim, k * cfg.hidden), (cfg.dim, k * cfg.hidden), (k * cfg.hidden, cfg.dim)]
            dense = [(0.02 * torch.randn(s, device=DEVICE)).requires_grad_() for s in shapes]
            x = torch.randn(1, cfg.tokens, cfg.dim, device=DEVICE, requires_grad=True)
            step = lambda: layer(x)[0].sum().backward()
            fns = {v: with_backend(v, step) for v in variants}
            precompile(fns.get("triton", lambda: None))
            for v in variants:
                close(with_backend(v, lambda: layer(x)[0])()[0], mask_loop(layer, x[0]), torch.float32)
            t = alternating_medians({**fns, "mask": lambda: mask_loop(layer, x[0]).sum().backward(),
                                     "dense": lambda: ((F.silu(x @ dense[0]) * (x @ dense[1])) @ dense[2]).sum()
                                     .backward()}, cfg.reps)
            print(f"| {E} | {k} | " + " | ".join(f"{t[v]:.2f}" for v in variants) +
                  f" | {t['mask']:.2f} | {t['dense']:.2f} | {t['auto'] / t['dense']:.2f}x |")


# ----------------------------------------------------------------------------- 2. grouped matmul (CUDA)

MOE_SHAPES = [(32768, 1024, 2816, 8), (32768, 2048, 1408, 64), (262144, 2048, 768, 128), (8192, 768, 3072, 64)]


def pick(cfg, shapes):
    if cfg.shapes:
        return [shapes[int(i)] for i in cfg.shapes.split(",")]
    return shapes[:1] + shapes[3:4] if cfg.quick else shapes


def grouped_mm_bench(cfg):
    shapes = pick(cfg, MOE_SHAPES)
    print(f"\n2. Grouped matmul on {torch.cuda.get_device_name()}, bf16, rows routed uniformly at random, TFLOP/s "
          f"(median of {cfg.reps}); forward+backward counts 3x the forward's FLOPs\n")
    print("torch._grouped_mm runs twice: on this project's weight layout (E, K, N) row-major with rows past the experts "
          "zeroed (TorchGroupedMM, what --kernels=auto would call), and bare on the layout CUTLASS prefers (w stored "
          "(E, N, K), passed transposed)\n")
    print("| rows | K | N | E | pass | kernels/moe.py (Triton) | torch._grouped_mm, (E, K, N) | torch._grouped_mm, "
          "(E, N, K)ᵀ | per-expert loop | dense x @ w | Triton / best _grouped_mm | Triton / loop |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rows, K, N, E in shapes:
        g = torch.Generator(device="cuda").manual_seed(cfg.seed)
        expert = torch.randint(0, E, (rows,), device="cuda", generator=g)
        offsets = sort_by_expert(expert[:, None], E)[2]
        x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        w = (torch.randn(E, K, N, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5).requires_grad_()
        w_nk = w.detach().transpose(1, 2).contiguous().requires_grad_()                    # (E, N, K)
        ends = offsets[1:].to(torch.int32)
        dense_w = (torch.randn(K, N, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5).requires_grad_()
        dy = torch.randn(rows, N, device="cuda", dtype=torch.bfloat16, generator=g)
        fns = {"triton": lambda: GroupedMM.apply(x, w, offsets), "grouped": lambda: TorchGroupedMM.apply(x, w, offsets),
               "bare": lambda: torch._grouped_mm(x, w_nk.transpose(1, 2), offs=ends),
               "loop": lambda: grouped_mm_reference(x, w, offsets), "dense": lambda: x @ dense_w}
        precompile(lambda: fns["triton"]().backward(dy))
        for other in ("grouped", "bare", "loop"):
            close(fns["triton"](), fns[other](), torch.bfloat16)
        flops = 2 * rows * K * N
        for name, backward in (("fwd", False), ("fwd+bwd", True)):
            run = {n: (lambda f=f: f().backward(dy)) if backward else f for n, f in fns.items()}
            t = alternating_medians(run, cfg.reps)
            tf = {n: (3 if backward else 1) * flops / ms / 1e9 for n, ms in t.items()}
            best = max(tf["grouped"], tf["bare"])
            print(f"| {rows} | {K} | {N} | {E} | {name} | {tf['triton']:.0f} | {tf['grouped']:.0f} | {tf['bare']:.0f} | "
                  f"{tf['loop']:.0f} | {tf['dense']:.0f} | {tf['triton'] / best:.2f} | {tf['triton'] / tf['loop']:.2f} |")
        del x, w, w_nk, dense_w, dy
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- 3. attention

ATTENTION_SHAPES = [(4, 16, 4096, 64, 0.10), (4, 16, 4096, 128, 0.10), (2, 16, 16384, 64, 0.10),
                    (1, 16, 32768, 128, 0.10), (2, 16, 16384, 128, 0.25)]


def pairs_table(lengths, a, w):
    print(f"\n(query, key) pairs per head the Triton passes visit (whole 128 x 64 tiles), a={a}, w={w}, 10 % "
          "separators\n\n| T | causal | kept by rule (1) | forward = dQ | dK/dV | forward / kept |\n|---|---|---|---|---|---|")
    for T in lengths:
        keep = torch.rand(1, T, generator=torch.Generator().manual_seed(T)) < 0.1
        p, causal = pairs_computed(keep, a, w), T * (T + 1) // 2
        pct = lambda n: f"{n:,} ({100 * n / causal:.1f} %)"
        print(f"| {T} | {causal:,} | {pct(p['kept'])} | {pct(p['forward'])} | {pct(p['dkdv'])} | "
              f"{p['forward'] / p['kept']:.2f} |")


def attention_inputs(B, H, T, D, sep, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    keep = torch.rand(B, T, device=DEVICE, generator=g) < sep
    return q, k, v, keep


def attention_bench_cuda(cfg, a=4, w=256):
    shapes = pick(cfg, ATTENTION_SHAPES)
    pairs_table([4096, 16384, 32768], a, w)
    print(f"\n3. SepLLM attention on {torch.cuda.get_device_name()}, bf16, a={a}, w={w}, separators at random, ms "
          f"(median of {cfg.reps}) forward / forward+backward; TFLOP/s on the kept pairs (4·D FLOPs a pair "
          f"forward, 14·D forward+backward, as FlashAttention counts)\n")
    print("| B,H,T,D | sep | kept / causal | Triton | SDPA is_causal | SDPA bool mask | FlexAttention | Triton TFLOP/s "
          "| SDPA causal / Triton | Flex / Triton |\n|---|---|---|---|---|---|---|---|---|---|")
    for B, H, T, D, sep in shapes:
        q, k, v, keep = attention_inputs(B, H, T, D, sep, torch.bfloat16)
        do = torch.randn_like(q)
        mask = rule_mask(keep, a, w)[:, None]
        kept = mask.sum().item() * H
        fns = {"triton": lambda: TritonSepAttention.apply(q, k, v, keep, a, w, "softmax"),
               "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               "mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
        if cfg.flex:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            rule = lambda b, h, i, j: (j <= i) & ((j < a) | keep[b, j] | (i - j < w))
            block_mask = create_block_mask(rule, B, None, T, T, device="cuda", BLOCK_SIZE=128)
            flex = torch.compile(flex_attention, dynamic=False)
            fns["flex"] = lambda: flex(q, k, v, block_mask=block_mask)
        precompile(lambda: fns["triton"]().backward(do))
        close(fns["triton"](), fns["mask"](), torch.bfloat16)
        t = {}
        for name, backward in (("fwd", False), ("bwd", True)):
            run = {n: (lambda f=f: f().backward(do)) if backward else f for n, f in fns.items()}
            t[name] = alternating_medians(run, cfg.reps)
        ms = lambda n: f"{t['fwd'][n]:.2f} / {t['bwd'][n]:.2f}" if n in t["fwd"] else "-"
        tflops = f"{4 * D * kept / t['fwd']['triton'] / 1e9:.0f} / {14 * D * kept / t['bwd']['triton'] / 1e9:.0f}"
        ratio = lambda n: (f"{t['fwd'][n] / t['fwd']['triton']:.2f} / {t['bwd'][n] / t['bwd']['triton']:.2f}"
                           if n in t["fwd"] else "-")
        print(f"| {B},{H},{T},{D} | {sep:.2f} | {kept / (B * H * T * (T + 1) / 2):.3f} | {ms('triton')} | "
              f"{ms('causal')} | {ms('mask')} | {ms('flex')} | {tflops} | {ratio('causal')} | {ratio('flex')} |")
        del q, k, v, do, mask, fns
        torch.cuda.empty_cache()
    fixed_cost(a)


def fixed_cost(a, calls=200):
    """The host work of a call at a tiny shape: mean ms of `calls` calls in a row (one sync at the end), with the
    plan built in every call (a new keep tensor) or shared (the layers of one forward pass), and where it goes."""
    q, k, v, keep = attention_inputs(1, 4, 128, 32, 0.1, torch.bfloat16)
    keeps = [keep.clone() for _ in range(calls)]
    variants = {"forward, plan built": lambda i: TritonSepAttention.apply(q, k, v, keeps[i], a, 32, "softmax"),
                "forward, plan shared": lambda i: TritonSepAttention.apply(q, k, v, keep, a, 32, "softmax")}
    variants["forward+backward, plan shared"] = lambda i: variants["forward, plan shared"](i).sum().backward()
    print("\nFixed cost of a call at B=1, H=4, T=128, D=32 (host work; ms per call, 200 calls in a row):")
    for name, f in variants.items():
        f(0)
        sync()
        t = time.perf_counter()
        for i in range(calls):
            f(i)
        sync()
        print(f"  {name}: {1000 * (time.perf_counter() - t) / calls:.3f}")
    import cProfile
    import pstats
    profile = cProfile.Profile()
    profile.runcall(lambda: [variants["forward, plan shared"](i) for i in range(calls)])
    print("  where the shared-plan forward's host time goes (cProfile, top 8 by own time):")
    pstats.Stats(profile).sort_stats("tottime").print_stats(8)


def attention_bench_cpu(cfg, a=3, w=64):
    lengths = (1024, 4096) if cfg.quick else (1024, 4096, 8192)
    pairs_table(lengths, a, w)
    B, H, D = 1, 4, 32
    print(f"\n3. SepLLM attention on the CPU, fp32, B={B}, H={H}, D={D}, a={a}, w={w}, 10 % separators, ms (median of "
          f"{cfg.reps}), {torch.get_num_threads()} torch threads\n")
    print("| T | pass | gathering fast path | SDPA bool mask | SDPA is_causal (dense anchor) | mask / fast | "
          "causal / fast |\n|---|---|---|---|---|---|---|")
    for T in lengths:
        q, k, v, keep = attention_inputs(B, H, T, D, 0.1, torch.float32, seed=T)
        mask = rule_mask(keep, a, w)[:, None]
        fns = {"fast": lambda: fast_attention(q, k, v, keep, a, w), "mask": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask), "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        close(fns["fast"](), fns["mask"](), torch.float32)
        for name, backward in (("forward", False), ("forward+backward", True)):
            run = {n: (lambda f=f: f().sum().backward()) if backward else f for n, f in fns.items()}
            t = alternating_medians(run, cfg.reps)
            print(f"| {T} | {name} | {t['fast']:.1f} | {t['mask']:.1f} | {t['causal']:.1f} | "
                  f"{t['mask'] / t['fast']:.2f}x | {t['causal'] / t['fast']:.2f}x |")


# ----------------------------------------------------------------------------- 4. training iteration

def train_step_bench(cfg, block=20):
    """ms per training iteration of train_lm.py's default model (batch 12 x 64 tokens), dense vs UniPool."""
    gcfg = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    gen = torch.Generator().manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA)

    def trainer(ffns):
        model = GPT(gcfg, ffns).to(DEVICE)
        opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.99))

        def step():
            for _ in range(block):
                x, y = torch.randint(0, 65, (2, 12, 64), generator=gen).to(DEVICE)
                with autocast:
                    out = model(x, y)
                    aux = aux_losses(ffns, out.aux, "pool", 0.01, 0.0) if ffns else 0.0
                (out.loss + aux).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return step

    pool = build_moe_layers("unipool", 4, 128, ffn_hidden_size(gcfg), 8, 32, 1, 1, "norm")
    rounds = max(1, (cfg.iters // 4 if cfg.quick else cfg.iters) // block)
    t = alternating_medians({"dense": trainer(None), "unipool": trainer(pool)}, rounds)
    print(f"\n4. Training iteration on {DEVICE}{' (bf16 autocast)' if CUDA else ''}, train_lm.py's default model "
          f"(4 layers, width 128, 768 tokens), median of {rounds} alternating blocks of {block}, "
          f"{torch.get_num_threads()} torch threads\n\n| dense | UniPool, M = 32, NormRouter, pool loss | "
          f"UniPool / dense |\n|---|---|---|\n| {t['dense'] / block:.1f} ms | {t['unipool'] / block:.1f} ms | "
          f"{t['unipool'] / t['dense']:.2f}x |")


def main():
    cfg = parse_flags(BenchConfig, sys.argv[1:])
    if cfg.part not in ("all", "moe", "attention", "train"):
        raise UserError(f"--part must be all, moe, attention or train, got {cfg.part!r}")
    if cfg.reps < 1:
        raise UserError(f"--reps={cfg.reps} must be >= 1")
    torch.manual_seed(cfg.seed)
    name = torch.cuda.get_device_name() if CUDA else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"bench_kernels on {name}, torch {torch.__version__}, triton "
          f"{kernels.triton.__version__ if kernels.triton else '-'}")
    tables = {"moe": [moe_layer_bench] + ([grouped_mm_bench] if CUDA else []),
              "attention": [attention_bench_cuda if CUDA else attention_bench_cpu], "train": [train_step_bench]}
    failed = []
    for part, benches in tables.items():
        for bench in benches if cfg.part in ("all", part) else []:
            try:           # one table's failure (e.g. an op this torch build lacks) does not stop the others
                bench(cfg)
            except Exception as e:
                failed.append(bench.__name__)
                print(f"\n{bench.__name__} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if failed:
        raise UserError(f"tables that failed: {', '.join(failed)} (see above)")


if __name__ == "__main__":
    run_main(main)
