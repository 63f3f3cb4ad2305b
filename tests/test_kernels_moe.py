"""kernels/moe.py against a row-by-row product in fp64 (each row times its expert's matrix, written here).

The Triton kernels run on every device present: the CPU in Triton's interpreter (fp32, fp16) and CUDA compiled
(fp32 as TF32, fp16, bf16), at every tile config the GPU autotuner may pick; routings with empty experts, one
expert taking every row, rows past offsets[E] (dropped pairs) and row counts that fill no tile."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import moe
from kernels.moe import GroupedMM, TorchGroupedMM, grouped_mm_reference
from unipool import build_moe_layers

triton_missing = pytest.mark.skipif(moe.triton is None, reason="triton is not installed")
CUDA = torch.cuda.is_available()
DTYPES = [("cpu", torch.float32, 1e-5), ("cpu", torch.float16, 2e-3)] + [
    pytest.param("cuda", dtype, tol, marks=pytest.mark.cuda)
    for dtype, tol in ((torch.float32, 2e-3), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)) if CUDA]


def offsets_of(counts):
    return F.pad(torch.tensor(counts).cumsum(0), (1, 0))


ROUTINGS = {
    "ragged with empty experts": [0, 37, 1, 0, 70, 5],
    "one expert takes every token": [0, 0, 45, 0],
    "all experts empty but one row": [1, 0, 0],
    "many small experts": [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5],
}


def per_row_reference(x, w, counts):
    """Row r of expert e: x[r] @ w[e], one row at a time in float64; rows past the experts: zero."""
    e_of_row = [e for e, c in enumerate(counts) for _ in range(c)]
    rows = [x[r].double() @ w[e].double() for r, e in enumerate(e_of_row)]
    rows += [torch.zeros(w.shape[2], dtype=torch.float64)] * (x.shape[0] - len(e_of_row))
    return torch.stack(rows)


def check(fn, counts, tail, dtype, tol, device="cpu", K=40, N=72, seed=0):
    """y, dx, dw of fn(x, w, offsets) in `dtype` against the row-by-row product of the same (rounded) inputs, relative
    to the largest reference value; rows past the experts exactly zero, empty experts' dw exactly zero."""
    g = torch.Generator().manual_seed(seed + len(counts) + tail)
    offsets = offsets_of(counts).to(device)
    x = torch.randn(sum(counts) + tail, K, generator=g).to(dtype)
    w = (torch.randn(len(counts), K, N, generator=g) / 6).to(dtype)
    dy = torch.randn(x.shape[0], N, generator=g).to(dtype)
    x64, w64 = (t.double().requires_grad_() for t in (x, w))
    per_row_reference(x64, w64, counts).backward(dy.double())
    xd, wd = (t.to(device).requires_grad_() for t in (x, w))
    y = fn(xd, wd, offsets)
    dx, dw = torch.autograd.grad(y, (xd, wd), dy.to(device).expand_as(y))   # any gradient layout is accepted
    assert y.dtype == dtype
    want = per_row_reference(x.double(), w.double(), counts)
    for name, got, ref in (("y", y, want), ("dx", dx, x64.grad), ("dw", dw, w64.grad)):
        scale = ref.abs().max().clamp_min(1.0)
        torch.testing.assert_close(got.double().cpu() / scale, ref / scale, rtol=tol, atol=tol, msg=name)
    n = sum(counts)
    assert torch.equal(y[n:], torch.zeros_like(y[n:])) and torch.equal(dx[n:], torch.zeros_like(dx[n:]))
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert torch.equal(dw[empty], torch.zeros_like(dw[empty]))


@triton_missing
@pytest.mark.parametrize("device, dtype, tol", DTYPES)
@pytest.mark.parametrize("name", ROUTINGS)
@pytest.mark.parametrize("tail", [0, 7])
def test_triton_forward_and_gradients(device, dtype, tol, name, tail, monkeypatch):
    monkeypatch.setattr(kernels, "autotune", False)
    check(GroupedMM.apply, ROUTINGS[name], tail, dtype, tol, device)


def tile_configs():
    if moe.triton is None:
        return []
    mm = sorted({tuple(c.kwargs.values()) for size in (2, 4) for c in moe.mm_configs(size)})
    dw = sorted({tuple(c.kwargs.values()) for size in (2, 4) for c in moe.dw_configs(size)})
    return [(a, b) for a, b in zip(mm + mm[:max(0, len(dw) - len(mm))], dw + dw[:max(0, len(mm) - len(dw))])]


@triton_missing
@pytest.mark.parametrize("mm, dw", tile_configs())
def test_triton_at_every_tile_config(mm, dw, monkeypatch):
    # the interpreter, fp32: K = 72 and N = 136 (no multiple of any tile), experts of 0 .. 150 rows, 9 dropped rows
    monkeypatch.setattr(kernels, "autotune", False)
    monkeypatch.setattr(moe, "FIXED_MM", dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), mm)))
    monkeypatch.setattr(moe, "FIXED_DW", dict(zip(("BLOCK_M", "BLOCK_K", "BLOCK_N", "GROUP_K"), dw)))
    check(GroupedMM.apply, [70, 0, 1, 150, 0, 65], 9, torch.float32, 1e-5, K=72, N=136)


@pytest.mark.skipif(not CUDA, reason="the autotuned configs run on a GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 5e-3)])
def test_autotuned_kernels_on_gpu(dtype, tol):
    counts = torch.randint(0, 700, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    check(GroupedMM.apply, counts, 100, dtype, tol, "cuda", K=512, N=768)


@pytest.mark.parametrize("name", ROUTINGS)
@pytest.mark.parametrize("tail", [0, 7])
def test_reference_and_torch_grouped_mm_equal_a_row_by_row_product(name, tail):
    check(grouped_mm_reference, ROUTINGS[name], tail, torch.float64, 1e-10)
    check(TorchGroupedMM.apply, ROUTINGS[name], tail, torch.float32, 1e-5)


def test_reference_gradcheck_float64():
    offsets = offsets_of([2, 0, 3])
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm_reference(a, b, offsets), (x, w))


@triton_missing
def test_moe_layer_same_with_either_backend(monkeypatch):
    monkeypatch.setattr(kernels, "autotune", False)
    torch.manual_seed(0)
    layer = build_moe_layers("unipool", 1, 16, 32, n_experts=6, top_k=2, router="norm")[0]
    x = torch.randn(2, 19, 16)
    results = []
    for backend in ("torch", "triton"):
        kernels.set_backend(backend)
        try:
            xb = x.clone().requires_grad_()
            y, _ = layer(xb)
            y.pow(2).sum().backward()
            results.append((y.detach(), xb.grad, layer.pool.w1.grad.clone(), layer.router.W.weight.grad.clone()))
            layer.zero_grad()
        finally:
            kernels.set_backend("auto")
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="auto, triton or torch"):
        kernels.set_backend("cuda")


@pytest.mark.parametrize("backend", ["torch", "auto"] + (["triton"] if moe.triton is not None else []))
def test_grouped_mm_follows_autocast_on_every_backend(backend, monkeypatch):
    # under autocast every backend computes in the autocast dtype, as a plain x @ w would (fp16: the interpreter
    # cannot run bf16 Triton on the CPU)
    monkeypatch.setattr(kernels, "autotune", False)
    g = torch.Generator().manual_seed(0)
    offsets = offsets_of([5, 0, 11])
    x = torch.randn(16, 32, generator=g, requires_grad=True)
    w = torch.randn(3, 32, 16, generator=g, requires_grad=True)
    expect = grouped_mm_reference(x.detach().half(), w.detach().half(), offsets)
    kernels.set_backend(backend)
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            y = moe.grouped_mm(x, w, offsets)
        y.float().sum().backward()
    finally:
        kernels.set_backend("auto")
    assert y.dtype == torch.float16 and x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(y, expect, rtol=2e-3, atol=2e-3)


def test_auto_picks_torch_grouped_mm_where_it_fits_and_the_reference_elsewhere(monkeypatch):
    calls = []
    monkeypatch.setattr(TorchGroupedMM, "apply", lambda *a: calls.append("torch") or grouped_mm_reference(*a))
    monkeypatch.setattr(moe, "grouped_mm_reference", lambda *a: calls.append("reference") or per_row_reference(
        a[0], a[1], a[2].diff().tolist()).float())
    offsets = offsets_of([2, 3])
    moe.grouped_mm(torch.randn(5, 8), torch.randn(2, 8, 4), offsets)   # 16-byte rows: torch._grouped_mm
    moe.grouped_mm(torch.randn(5, 6), torch.randn(2, 6, 3), offsets)   # K = 6 fp32 is not 16-byte aligned
    assert calls == ["torch", "reference"]
