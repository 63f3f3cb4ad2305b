import pytest
import torch

import kernels
from gpt import GPT, GPTConfig
from kernels.attention import TritonSepAttention, fast_attention, reference_attention, sepllm_attention
from sepllm import SparsePattern

triton_missing = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
PATTERNS = ["none", "all", "random"]


def inputs(pattern, B=2, H=2, T=45, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    keep = {"none": torch.zeros(B, T, dtype=torch.bool), "all": torch.ones(B, T, dtype=torch.bool),
            "random": torch.rand(B, T, generator=g) < 0.15}[pattern]
    return q, k, v, keep


def check(fn, pattern, score, n_init, n_local, dtype, tol):
    q, k, v, keep = inputs(pattern)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    grads = []
    for f in (fn, reference_attention):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out = f(*qkv, keep, n_init, n_local, score)
        out.backward(dy)
        grads.append([out] + [t.grad for t in qkv])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("score", ["softmax", "sa", "sa_norm"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n_local", [7, 64])  # 64 >= T: full causal attention
def test_cpu_fast_path_equals_reference(score, pattern, n_local):
    check(lambda *a: fast_attention(*a, block=16), pattern, score, 3, n_local, torch.float64, 1e-10)


@triton_missing
@pytest.mark.parametrize("score", ["softmax", "sa", "sa_norm"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_triton_equals_reference(score, pattern):
    # fp32 in the interpreter (it has no fp64 dot); T = 45 is not a multiple of the 32-wide blocks
    check(TritonSepAttention.apply, pattern, score, 3, 7, torch.float32, 2e-5)


@triton_missing
def test_triton_full_window_and_no_sinks():
    check(TritonSepAttention.apply, "random", "softmax", 0, 64, torch.float32, 2e-5)


@triton_missing
def test_triton_fp16_forward():
    q, k, v, keep = inputs("random")
    q, k, v = (t.half() for t in (q, k, v))
    out = TritonSepAttention.apply(q, k, v, keep, 3, 7, "softmax")
    ref = reference_attention(q.float(), k.float(), v.float(), keep, 3, 7, "softmax")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)


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


def test_bad_score_is_rejected():
    q, k, v, keep = inputs("none")
    with pytest.raises(ValueError, match="softmax, sa or sa_norm"):
        sepllm_attention(q, k, v, keep, 3, 7, "relu")
