import pytest
import torch

import kernels
from gpt import GPT, GPTConfig
from kernels.attention import (BLOCK_M, BLOCK_N, TritonSepAttention, fast_attention, pairs_computed,
                               reference_attention, sepllm_attention)
from sepllm import SparsePattern, keep_mask

triton_missing = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
PATTERNS = ["none", "all", "random"]
SCORES = ["softmax", "sa", "sa_norm"]


def inputs(pattern, B=2, H=2, T=45, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    keep = {"none": torch.zeros(B, T, dtype=torch.bool), "all": torch.ones(B, T, dtype=torch.bool),
            "random": torch.rand(B, T, generator=g) < 0.15}[pattern]
    return q, k, v, keep


def check(fn, pattern, score, n_init, n_local, dtype, tol, T=45):
    """Output and dQ, dK, dV of fn in `dtype` against the dense masked reference in fp64 on the same inputs."""
    q, k, v, keep = inputs(pattern, T=T)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    grads = []
    for f, dt in ((fn, dtype), (reference_attention, torch.float64)):
        qkv = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out = f(*qkv, keep, n_init, n_local, score)
        out.backward(dy.to(dt))
        grads.append([out.double()] + [t.grad.double() for t in qkv])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n_local", [7, 64])  # 64 >= T: full causal attention
def test_cpu_fast_path_equals_reference(score, pattern, n_local):
    check(lambda *a: fast_attention(*a, block=16), pattern, score, 3, n_local, torch.float64, 1e-10)


@triton_missing
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_triton_gradients_equal_reference(score, pattern):
    # fp32 in the interpreter (it has no fp64 dot); T = 45 is not a multiple of the 32-wide blocks, and with
    # w = 7 the second query block gathers columns (all of them for the "all" pattern: two column blocks)
    check(TritonSepAttention.apply, pattern, score, 3, 7, torch.float32, 3e-5)


@triton_missing
@pytest.mark.parametrize("score", SCORES)
def test_triton_window_at_least_T_and_no_sinks(score):
    check(TritonSepAttention.apply, "random", score, 0, 64, torch.float32, 3e-5)


@triton_missing
@pytest.mark.parametrize("score", SCORES)
def test_triton_window_across_blocks(score):
    # w = 40 > BLOCK_M: a key block is in the window range of three query blocks; 4 query blocks, 100 % 32 != 0
    check(TritonSepAttention.apply, "random", score, 2, 40, torch.float32, 3e-5, T=100)


@triton_missing
@pytest.mark.parametrize("score", SCORES)
def test_triton_fp16(score):
    # bf16 is not tested here: Triton's CPU interpreter corrupts bf16 loads and stores (see the bf16 test below)
    check(TritonSepAttention.apply, "random", score, 3, 7, torch.float16, 3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU: the Triton interpreter corrupts bf16")
@pytest.mark.parametrize("score", SCORES)
def test_triton_bf16_on_gpu(score):
    q, k, v, keep = inputs("random", T=300)
    q, k, v, keep = (t.cuda() for t in (q, k, v, keep))
    out = TritonSepAttention.apply(q.bfloat16(), k.bfloat16(), v.bfloat16(), keep, 3, 64, score)
    ref = reference_attention(q.float(), k.float(), v.float(), keep, 3, 64, score)
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


def simulate_passes(keep, n_init, n_local):
    """Brute force: walk every tile of every Triton pass as its loops do, from the dense mask and the kept
    positions alone; return, per pass, how often each (query, key) pair was counted and how many were computed."""
    B, T = keep.shape
    w = min(n_local, T)
    mask = keep_mask(keep, n_init, n_local)
    n_q, n_c = -(-T // BLOCK_M), -(-T // BLOCK_N)
    counts = {p: torch.zeros(B, T, T, dtype=torch.long) for p in ("forward", "dkdv")}
    computed = {"kept": int(mask.sum()), "forward": 0, "dkdv": 0}

    def visit(p, b, q0, keys, extra):
        rows = torch.arange(q0, min(q0 + BLOCK_M, T))
        keys = torch.as_tensor(keys, dtype=torch.long)
        hit = mask[b][rows[:, None], keys[None, :]] & extra(rows[:, None], keys[None, :])
        counts[p][b][rows[:, None], keys[None, :]] += hit.long()
        computed[p] += BLOCK_M * BLOCK_N

    for b in range(B):
        kept_pos = [j for j in range(T) if j < n_init or keep[b, j]]
        for qb in range(n_q):  # forward (and dQ): gathered columns left of the window, then the window range
            q0 = qb * BLOCK_M
            lo, q1 = max(q0 - w + 1, 0), min(q0 + BLOCK_M, T)
            left = [j for j in kept_pos if j < lo]
            for c0 in range(0, len(left), BLOCK_N):
                visit("forward", b, q0, left[c0:c0 + BLOCK_N], lambda i, j: True)
            for n0 in range(lo, q1, BLOCK_N):
                visit("forward", b, q0, list(range(n0, min(n0 + BLOCK_N, q1))), lambda i, j: True)
        for c0 in range(0, len(kept_pos), BLOCK_N):  # dK/dV, columns: the query blocks that gathered them
            cols = kept_pos[c0:c0 + BLOCK_N]
            for qb in range(n_q):
                lo = max(qb * BLOCK_M - w + 1, 0)
                if cols[0] < lo:
                    visit("dkdv", b, qb * BLOCK_M, cols, lambda i, j, lo=lo: j < lo)
        for kb in range(n_c):  # dK/dV, window: the query blocks whose window range [lo, q1) holds a key
            keys = list(range(kb * BLOCK_N, min(kb * BLOCK_N + BLOCK_N, T)))
            for qb in range(n_q):
                lo, q1 = max(qb * BLOCK_M - w + 1, 0), min(qb * BLOCK_M + BLOCK_M, T)
                if lo < keys[-1] + 1 and keys[0] < q1:
                    visit("dkdv", b, qb * BLOCK_M, keys, lambda i, j, lo=lo: j >= lo)
    return mask, counts, computed


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("T, n_init, n_local", [(70, 3, 5), (130, 0, 40), (45, 2, 200), (96, 4, 1)])
def test_pairs_computed_against_brute_force(pattern, T, n_init, n_local):
    keep = inputs(pattern, T=T, seed=T)[3]
    mask, counts, computed = simulate_passes(keep, n_init, n_local)
    for p in ("forward", "dkdv"):  # every kept pair exactly once in every pass: no separator counted twice
        assert torch.equal(counts[p], mask.long()), p
    got = pairs_computed(keep, n_init, n_local)
    assert got == {"kept": computed["kept"], "forward": computed["forward"], "dq": computed["forward"],
                   "dkdv": computed["dkdv"]}


def test_pairs_sparse_backward_at_scale():
    # the benchmark's setting: dK/dV no longer visits every later query of a key block holding a separator
    keep = torch.rand(1, 4096, generator=torch.Generator().manual_seed(0)) < 0.1
    p = pairs_computed(keep, 3, 64)
    assert p["dkdv"] <= 1.3 * p["forward"] and p["forward"] <= 1.3 * p["kept"]


BAD_INPUTS = [  # (what to change, message fragment)
    (dict(k=(2, 1, 45, 16)), "same shape"),             # grouped-query k with fewer heads
    (dict(v=(2, 2, 40, 16)), "same shape"),             # a shorter v
    (dict(q=(2, 2, 45, 24), k=(2, 2, 45, 24), v=(2, 2, 45, 24)), "power of two"),
    (dict(q=(2, 2, 45, 8), k=(2, 2, 45, 8), v=(2, 2, 45, 8)), "power of two"),
    (dict(k_dtype=torch.float16), "dtype"),
    (dict(keep=(2, 44)), "keep must be"),
]


@triton_missing
@pytest.mark.parametrize("change, message", BAD_INPUTS)
def test_triton_rejects_bad_inputs(change, message):
    shape = lambda name: change.get(name, (2, 2, 45, 16))
    q, k, v = (torch.randn(shape(n)) for n in "qkv")
    k = k.to(change.get("k_dtype", torch.float32))
    keep = torch.zeros(change.get("keep", (2, 45)), dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        TritonSepAttention.apply(q, k, v, keep, 3, 7, "softmax")


@pytest.mark.parametrize("backend", ["torch", "auto"] + (["triton"] if kernels.triton is not None else []))
def test_gpt_sparse_pattern_equals_dense_mask(backend):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=12, block_size=40, n_layer=2, n_head=2, n_embd=32, attn_score="sa")).eval()
    idx = torch.randint(0, 12, (2, 40))
    pattern = SparsePattern(idx < 3, 2, 6)
    kernels.set_backend(backend)
    try:
        sparse = model(idx, attn_mask=pattern).logits
    finally:
        kernels.set_backend("auto")
    torch.testing.assert_close(sparse, model(idx, attn_mask=pattern.dense()).logits, rtol=1e-4, atol=1e-5)


def test_cpu_path_rejects_mismatched_heads():
    q, k, v, keep = inputs("none")
    with pytest.raises(ValueError, match="same shape"):
        sepllm_attention(q, k[:, :1], v[:, :1], keep, 3, 7, "softmax")


def test_bad_score_or_window_is_rejected():
    q, k, v, keep = inputs("none")
    with pytest.raises(ValueError, match="softmax, sa or sa_norm"):
        sepllm_attention(q, k, v, keep, 3, 7, "relu")
    with pytest.raises(ValueError, match="n_local >= 1"):
        sepllm_attention(q, k, v, keep, 3, 0, "softmax")
