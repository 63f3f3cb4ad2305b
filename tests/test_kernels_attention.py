"""kernels/attention.py and kernels/attention_cpu.py against the dense definition of rule (1), written here from
sepllm.py's mask and sa_softmax.py's weights (not the kernels' own reference).

The Triton kernels run on every device present: the CPU in Triton's interpreter (fp32, fp16) and CUDA compiled
(fp32 as TF32, fp16, bf16). Windows are chosen against the tile sizes: w = 1 and 2, a window that ends a couple of
keys past a query tile or a key tile, one wider than a tile, one wider than the sequence; T is no multiple of any
tile; a = 0 and a > 0."""
import math

import pytest
import torch

import kernels
from gpt import GPT, GPTConfig
from kernels import attention
from kernels.attention import TritonSepAttention, pairs_computed, plan_for, reference_attention, sepllm_attention
from kernels.attention_cpu import fast_attention
from sa_softmax import sa_softmax
from sepllm import SparsePattern, keep_mask

triton_missing = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
CUDA = torch.cuda.is_available()
PATTERNS = ["none", "all", "random"]
SCORES = ["softmax", "sa", "sa_norm"]
# (device, dtype, tolerance): the interpreter is exact in fp32; a GPU runs fp32 dots in TF32
DTYPES = [("cpu", torch.float32, 3e-5), ("cpu", torch.float16, 3e-2)] + [
    pytest.param("cuda", dtype, tol, marks=pytest.mark.cuda)
    for dtype, tol in ((torch.float32, 1e-2), (torch.float16, 3e-2), (torch.bfloat16, 6e-2)) if CUDA]


def inputs(pattern, B=2, H=2, T=45, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    keep = {"none": torch.zeros(B, T, dtype=torch.bool), "all": torch.ones(B, T, dtype=torch.bool),
            "random": torch.rand(B, T, generator=g) < 0.15}[pattern]
    return q, k, v, keep


def definition(q, k, v, keep, n_init, n_local, score):
    """Dense attention under sepllm.keep_mask, weights from sa_softmax.py (softmax for score softmax)."""
    mask = keep_mask(keep, n_init, n_local)[:, None]
    x = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if score == "softmax":
        w = torch.softmax(x.masked_fill(~mask, float("-inf")), -1)
    else:
        w = sa_softmax(x, mask=mask, normalized=score == "sa_norm")
    return w @ v


def check(fn, pattern, score, n_init, n_local, dtype, tol, T=45, device="cpu", D=16, H=2, B=2):
    """Output and dQ, dK, dV of fn in `dtype` against the definition in fp64 on the same inputs (rounded to
    `dtype` first, so that a near tie of SA-2's min or max falls the same way; compared relative to the largest
    reference value, so that a tolerance means the same at any scale)."""
    q, k, v, keep = inputs(pattern, B=B, T=T, D=D, H=H)
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype).double()
    grads = []
    for f, dt, dev in ((fn, dtype, device), (definition, torch.float64, "cpu")):
        qkv = [t.to(dev, dt).requires_grad_() for t in (q, k, v)]
        out = f(*qkv, keep.to(dev), n_init, n_local, score)
        out.backward(dy.to(dev, dt))
        grads.append([out.double().cpu()] + [t.grad.double().cpu() for t in qkv])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *grads):
        assert torch.isfinite(a).all(), name
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def windows(bm, bn):
    """Window sizes that end a key or two before or past a tile boundary, from the tile sizes: a bound of the
    kernels that is off by a couple of keys shows at one of them (and at none of 7, 40 or 64)."""
    return sorted({1, 2, bm - 2, bm - 1, bm + 2, bn + 2})


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n_local", [1, 2, 3, 7, 17, 18, 19, 33, 35, 64])  # 1-3 past a 16-query block (or two); 64 >= T
def test_cpu_fast_path_equals_definition(score, pattern, n_local):
    check(lambda *a: fast_attention(*a, block=16), pattern, score, 3, n_local, torch.float64, 1e-10)


@triton_missing
@pytest.mark.parametrize("device, dtype, tol", DTYPES)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_triton_gradients_equal_definition(device, dtype, tol, score, pattern, monkeypatch):
    # 32 x 32 tiles, T = 45: two query blocks; w = 7 makes the second gather columns (all of them, two column
    # blocks, for the "all" pattern)
    monkeypatch.setattr(kernels, "autotune", False)
    check(TritonSepAttention.apply, pattern, score, 3, 7, dtype, tol, device=device)


def tile_cases():
    """Every tile shape the GPU autotuner may pick, each with windows against its tile boundaries."""
    shapes = sorted({tuple(c.kwargs.values()) for table in (attention.FWD_CONFIGS, attention.DQ_CONFIGS,
                                                              attention.DKDV_CONFIGS)
                     for c in attention.attention_configs(table)}) if kernels.triton is not None else []
    return [(bm, bn, w) for bm, bn in shapes for w in windows(bm, bn)]


@triton_missing
@pytest.mark.parametrize("bm, bn, n_local", tile_cases())
def test_triton_at_every_tile_size_and_window(bm, bn, n_local, monkeypatch):
    # the interpreter, fp32, T no multiple of any tile and > 2 tiles, random separators, sinks a = 2; SA-2
    # exercises every part (the arg-min / arg-max terms too)
    monkeypatch.setattr(kernels, "autotune", False)
    monkeypatch.setattr(attention, "FIXED_BLOCKS", dict(BLOCK_M=bm, BLOCK_N=bn))
    check(TritonSepAttention.apply, "random", "sa_norm", 2, n_local, torch.float32, 3e-5, T=2 * max(bm, bn) + 13,
          H=1)


@triton_missing
@pytest.mark.parametrize("bm, bn", [(16, 16), (32, 16), (16, 32)])
def test_triton_window_sweep_against_small_tiles(bm, bn, monkeypatch):
    # every window from two keys before to three keys past a multiple of either tile size, up to past two tiles: a
    # loop bound that is off by a few keys shows at one of them. One sink (a = 1), so the keys a wrong bound lets
    # through are no sinks. One sequence and one head: the batch and head offsets are tested above
    monkeypatch.setattr(kernels, "autotune", False)
    monkeypatch.setattr(attention, "FIXED_BLOCKS", dict(BLOCK_M=bm, BLOCK_N=bn))
    near = {k * t + d for t in (bm, bn) for k in range(3) for d in range(-2, 4)}
    for n_local in sorted(w for w in near if w >= 1):
        check(TritonSepAttention.apply, "random", "softmax", 1, n_local, torch.float32, 3e-5, T=2 * max(bm, bn) + 7,
              H=1, B=1)


@triton_missing
@pytest.mark.parametrize("bm, bn", [(16, 16), (32, 16), (16, 32)])
def test_triton_column_pass_with_full_column_blocks(bm, bn, monkeypatch):
    # the dK/dV column pass masks a column block for the query blocks that gather only part of it, and from the
    # first that gathers all of it (its last column + w <= q0) on needs no mask. That second loop runs only for a
    # FULL block of bn columns: a = bn sinks make one, ending at key bn - 1; windows with (bn - 1 + w) % bm in
    # 1..3 put that key 1-3 keys inside the window of the query block just before, where a bound off by a few keys
    # would count it twice (in both dK/dV passes). SA-2, so the arg-min / arg-max terms run in that loop too
    monkeypatch.setattr(kernels, "autotune", False)
    monkeypatch.setattr(attention, "FIXED_BLOCKS", dict(BLOCK_M=bm, BLOCK_N=bn))
    for n_local in [w for w in range(1, bm + 5) if (bn - 1 + w) % bm in (1, 2, 3)]:
        check(TritonSepAttention.apply, "random", "sa_norm", bn, n_local, torch.float32, 3e-5, T=bn + n_local + 2 * bm,
              H=1, B=1)


@triton_missing
@pytest.mark.parametrize("device, dtype, tol", DTYPES)
@pytest.mark.parametrize("n_init, n_local", [(0, 64), (0, 2), (4, 1)])   # w >= T and no sinks; w = 2; w = 1
def test_triton_edge_windows_and_no_sinks(device, dtype, tol, n_init, n_local, monkeypatch):
    monkeypatch.setattr(kernels, "autotune", False)
    check(TritonSepAttention.apply, "random", "softmax", n_init, n_local, dtype, tol, device=device)


@pytest.mark.skipif(not CUDA, reason="the autotuned configs run on a GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 6e-2), (torch.float16, 3e-2)])
def test_autotuned_kernels_on_gpu(D, dtype, tol):
    # the configs the benchmark picks, at a length that crosses many tiles; w = 130 ends 2 keys past a 128 tile
    check(TritonSepAttention.apply, "random", "softmax", 4, 130, dtype, tol, T=1000, device="cuda", D=D)


def simulate_passes(keep, n_init, n_local, bm, bn):
    """Brute force: walk every tile of every Triton pass as its loops do, from the dense mask and the kept
    positions alone; return, per pass, how often each (query, key) pair was counted and how many were computed."""
    B, T = keep.shape
    w = min(n_local, T)
    mask = keep_mask(keep, n_init, n_local)
    n_q = -(-T // bm)
    counts = {p: torch.zeros(B, T, T, dtype=torch.long) for p in ("forward", "dkdv")}
    computed = {"kept": int(mask.sum()), "forward": 0, "dkdv": 0}

    def visit(p, b, q0, keys, extra):
        rows = torch.arange(q0, min(q0 + bm, T))
        keys = torch.as_tensor(keys, dtype=torch.long)
        hit = mask[b][rows[:, None], keys[None, :]] & extra(rows[:, None], keys[None, :])
        counts[p][b][rows[:, None], keys[None, :]] += hit.long()
        computed[p] += bm * bn

    for b in range(B):
        kept_pos = [j for j in range(T) if j < n_init or keep[b, j]]
        for qb in range(n_q):  # forward (and dQ): gathered columns left of the window, then the window range
            q0 = qb * bm
            lo, q1 = max(q0 - w + 1, 0), min(q0 + bm, T)
            left = [j for j in kept_pos if j < lo]
            for c0 in range(0, len(left), bn):
                visit("forward", b, q0, left[c0:c0 + bn], lambda i, j: True)
            for n0 in range(lo, q1, bn):
                visit("forward", b, q0, list(range(n0, min(n0 + bn, q1))), lambda i, j: True)
        for c0 in range(0, len(kept_pos), bn):  # dK/dV, columns: the query blocks that gathered them
            cols = kept_pos[c0:c0 + bn]
            for qb in range(n_q):
                lo = max(qb * bm - w + 1, 0)
                if cols[0] < lo:
                    visit("dkdv", b, qb * bm, cols, lambda i, j, lo=lo: j < lo)
        for k0 in range(0, T, bn):  # dK/dV, window: the query blocks whose window range [lo, q1) holds a key
            keys = list(range(k0, min(k0 + bn, T)))
            for qb in range(n_q):
                lo, q1 = max(qb * bm - w + 1, 0), min(qb * bm + bm, T)
                if lo < keys[-1] + 1 and keys[0] < q1:
                    visit("dkdv", b, qb * bm, keys, lambda i, j, lo=lo: j >= lo)
    return mask, counts, computed


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("T, n_init, n_local, bm, bn", [(70, 3, 5, 32, 32), (130, 0, 40, 32, 32),
                                                         (45, 2, 200, 16, 32), (96, 4, 1, 32, 16),
                                                         (300, 3, 66, 64, 32)])
def test_pairs_computed_against_brute_force(pattern, T, n_init, n_local, bm, bn):
    keep = inputs(pattern, T=T, seed=T)[3]
    mask, counts, computed = simulate_passes(keep, n_init, n_local, bm, bn)
    for p in ("forward", "dkdv"):  # every kept pair exactly once in every pass: no separator counted twice
        assert torch.equal(counts[p], mask.long()), p
    got = pairs_computed(keep, n_init, n_local, bm, bn)
    assert got == {"kept": computed["kept"], "forward": computed["forward"], "dq": computed["forward"],
                   "dkdv": computed["dkdv"]}


def test_pairs_sparse_backward_at_scale():
    # the benchmark's setting: 10 % separators, w = 256, 128 x 64 tiles: the tiles visited stay close to the kept
    # pairs, and far below the causal ones
    keep = torch.rand(1, 16384, generator=torch.Generator().manual_seed(0)) < 0.1
    p = pairs_computed(keep, 4, 256)
    causal = 16384 * 16385 // 2
    assert p["forward"] <= 1.25 * p["kept"] and p["dkdv"] <= 1.25 * p["kept"] and p["kept"] < 0.15 * causal


def test_plan_is_built_once_per_keep_tensor_and_rebuilt_when_it_changes():
    keep = torch.rand(2, 50, generator=torch.Generator().manual_seed(1)) < 0.2
    plan = plan_for(keep, 3)
    assert plan_for(keep, 3) is plan                       # the next layer of the same forward: shared
    assert plan_for(keep, 2) is not plan                   # another n_init: another plan
    keep[0, 10] = ~keep[0, 10]                             # modified in place: rebuilt, and right
    fresh = plan_for(keep, 3)
    kept = (keep | (torch.arange(50) < 3))
    for b in range(2):
        pos = kept[b].nonzero().flatten()
        assert fresh.cols[b, :len(pos)].tolist() == pos.tolist()
        assert fresh.kept_before[b].tolist() == [int(kept[b, :j].sum()) for j in range(51)]


BAD_INPUTS = [  # (what to change, message fragment)
    (dict(k=(2, 1, 45, 16)), "same shape"),             # grouped-query k with fewer heads
    (dict(v=(2, 2, 40, 16)), "same shape"),             # a shorter v
    (dict(q=(2, 2, 45, 24), k=(2, 2, 45, 24), v=(2, 2, 45, 24)), "power of two"),
    (dict(q=(2, 2, 45, 8), k=(2, 2, 45, 8), v=(2, 2, 45, 8)), "power of two"),
    (dict(k_dtype=torch.float16), "dtype"),
    (dict(keep=(2, 44)), "keep must be"),
    (dict(dtype=torch.bfloat16), "bf16"),              # the CPU interpreter reads bf16 wrongly
]


@triton_missing
@pytest.mark.parametrize("change, message", BAD_INPUTS)
def test_triton_rejects_bad_inputs(change, message):
    shape = lambda name: change.get(name, (2, 2, 45, 16))
    q, k, v = (torch.randn(shape(n)).to(change.get("dtype", torch.float32)) for n in "qkv")
    k = k.to(change.get("k_dtype", k.dtype))
    keep = torch.zeros(change.get("keep", (2, 45)), dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        TritonSepAttention.apply(q, k, v, keep, 3, 7, "softmax")


@pytest.mark.parametrize("backend", ["torch", "auto"] + (["triton"] if kernels.triton is not None else []))
def test_gpt_sparse_pattern_equals_dense_mask(backend, monkeypatch):
    monkeypatch.setattr(kernels, "autotune", False)
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


def test_reference_is_the_definition():
    q, k, v, keep = inputs("random", T=30)
    for score in SCORES:
        torch.testing.assert_close(reference_attention(q, k, v, keep, 2, 5, score),
                                   definition(q, k, v, keep, 2, 5, score), rtol=1e-10, atol=1e-10)


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


def sa2_written_out(q, k, v):
    """Causal SA-2 attention of one head, row by row, written out from the formula (nothing masked inside a row:
    row i holds keys 0..i only): w = ((x - a)/(b - a)) p, a = min(x_min, 0), b = max(x_max, 0)."""
    out = []
    for i in range(q.shape[0]):
        x = k[:i + 1] @ q[i] / math.sqrt(q.shape[-1])
        p = torch.exp(x - x.max()) / torch.exp(x - x.max()).sum()
        a, b = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
        out.append(((x - a) / (b - a) * p) @ v[:i + 1])
    return torch.stack(out)


BACKENDS = ["cpu fast path"] + (["triton"] if kernels.triton is not None else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sa2_on_rows_of_one_sign_equals_formula(backend, sign, monkeypatch):
    """Full causal attention (w >= T), where no row has a masked entry, with every score of one sign (q, k >= 0,
    then q negated): a = 0 < x_min or b = 0 > x_max in every row, so a wrong clamp of x_min or x_max at 0 shows.
    Output and gradients against the formula written out, tiles of 16 crossed several times."""
    monkeypatch.setattr(kernels, "autotune", False)
    monkeypatch.setattr(attention, "FIXED_BLOCKS", dict(BLOCK_M=16, BLOCK_N=16))
    g = torch.Generator().manual_seed(11)
    T, D = 37, 16
    q, k = (torch.rand(1, 1, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    q, v = sign * q, torch.randn(1, 1, T, D, generator=g, dtype=torch.float64)
    dy = torch.randn(1, 1, T, D, generator=g, dtype=torch.float64)
    keep = torch.zeros(1, T, dtype=torch.bool)
    dtype, tol = (torch.float32, 3e-5) if backend == "triton" else (torch.float64, 1e-10)
    fn = TritonSepAttention.apply if backend == "triton" else lambda *a: fast_attention(*a, block=16)
    got, expect = [], []
    for f, dt, res in ((fn, dtype, got), (None, torch.float64, expect)):
        qkv = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out = f(*qkv, keep, 0, T, "sa_norm") if f else sa2_written_out(*(t[0, 0] for t in qkv))[None, None]
        out.backward(dy.to(dt))
        res += [out.double()] + [t.grad.double() for t in qkv]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expect):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
