import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import moe
from kernels.moe import GroupedMM, TorchGroupedMM, block_schedule, grouped_mm_reference
from unipool import build_moe_layers

triton_missing = pytest.mark.skipif(moe.triton is None, reason="triton is not installed")


def offsets_of(counts):
    return F.pad(torch.tensor(counts).cumsum(0), (1, 0))


ROUTINGS = {
    "ragged with empty experts": [0, 37, 1, 0, 70, 5],
    "one expert takes every token": [0, 0, 45, 0],
    "all experts empty but one row": [1, 0, 0],
    "many small experts": [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5],
}


def test_block_schedule_covers_each_expert_with_its_own_blocks():
    # 103 rows for the experts, 5 dropped rows after them (group 5); the host-side bound is ceil(108/32) + 6 blocks
    offsets = offsets_of([0, 70, 1, 0, 32])
    block_expert, block_start, ext = block_schedule(offsets, 108, block_m=32)
    assert ext.tolist() == offsets.tolist() + [108]
    assert len(block_expert) == 4 + 6
    assert block_expert.tolist()[:6] == [1, 1, 1, 2, 4, 5]
    assert block_start.tolist()[:6] == [0, 32, 64, 70, 71, 103]
    # the blocks past the real ones start after the last row: fully masked
    assert all(s >= 108 for s in block_start.tolist()[6:])


@triton_missing
@pytest.mark.parametrize("name", ROUTINGS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_forward_and_gradients_equal_reference(name, dtype, tol):
    # bf16 is left out: the Triton interpreter corrupts bf16 loads on the CPU (it belongs to GPU runs)
    counts = ROUTINGS[name]
    g = torch.Generator().manual_seed(len(counts))
    offsets = offsets_of(counts)
    x = torch.randn(sum(counts), 40, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(len(counts), 40, 72, generator=g) / 6).to(dtype).requires_grad_()
    dy = torch.randn(sum(counts), 72, generator=g).to(dtype)
    y = GroupedMM.apply(x, w, offsets)
    y.backward(dy)
    x_ref, w_ref = (t.detach().float().requires_grad_() for t in (x, w))
    y_ref = grouped_mm_reference(x_ref, w_ref, offsets)
    y_ref.backward(dy.float())
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(w.grad.float(), w_ref.grad, rtol=tol, atol=tol * 10)
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert torch.equal(w.grad[empty], torch.zeros_like(w.grad[empty]))


def test_reference_gradcheck_float64():
    offsets = offsets_of([2, 0, 3])
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm_reference(a, b, offsets), (x, w))


@triton_missing
def test_moe_layer_same_with_either_backend():
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
def test_grouped_mm_follows_autocast_on_every_backend(backend):
    # under autocast every backend computes in the autocast dtype, as a plain x @ w would (fp16: the interpreter
    # cannot run bf16 Triton on the CPU)
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


def per_row_reference(x, w, counts):
    """Row r of expert e: x[r] @ w[e], one row at a time in float64; rows past the experts: zero."""
    e_of_row = [e for e, c in enumerate(counts) for _ in range(c)]
    rows = [x[r].double() @ w[e].double() for r, e in enumerate(e_of_row)]
    rows += [torch.zeros(w.shape[2], dtype=torch.float64)] * (x.shape[0] - len(e_of_row))
    return torch.stack(rows)


@pytest.mark.parametrize("name", ROUTINGS)
@pytest.mark.parametrize("tail", [0, 7])
def test_every_backend_equals_a_row_by_row_product_with_dropped_rows_zero(name, tail):
    counts = ROUTINGS[name]
    g = torch.Generator().manual_seed(len(counts) + tail)
    offsets = offsets_of(counts)
    x = torch.randn(sum(counts) + tail, 40, generator=g, requires_grad=True)
    w = torch.randn(len(counts), 40, 72, generator=g, requires_grad=True)
    dy = torch.randn(x.shape[0], 72, generator=g)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    y64 = per_row_reference(x64, w64, counts)
    y64.backward(dy.double())
    fns = {"reference": grouped_mm_reference, "torch._grouped_mm": TorchGroupedMM.apply}
    if moe.triton is not None:
        fns["triton"] = GroupedMM.apply
    for label, f in fns.items():
        y = f(x, w, offsets)
        dx, dw = torch.autograd.grad(y, (x, w), dy.expand_as(y))  # any gradient layout is accepted
        for got, want in ((y, y64), (dx, x64.grad), (dw, w64.grad)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4, msg=label)
        assert torch.equal(y[sum(counts):], torch.zeros_like(y[sum(counts):])), label
        assert torch.equal(dx[sum(counts):], torch.zeros_like(dx[sum(counts):])), label


def test_unaligned_shapes_fall_back_to_the_reference():
    # torch._grouped_mm needs 16-byte rows: K = 6 fp32 is not; the result must still be right
    offsets = offsets_of([2, 3])
    x, w = torch.randn(5, 6), torch.randn(2, 6, 3)
    torch.testing.assert_close(moe.grouped_mm(x, w, offsets), per_row_reference(x, w, [2, 3]).float())


@triton_missing
def test_a_moe_layer_builds_its_block_schedule_once(monkeypatch):
    calls = []
    real = moe.block_schedule
    monkeypatch.setattr(moe, "block_schedule", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = build_moe_layers("moe", 1, 16, 32, n_experts=4, top_k=2)[0]
    kernels.set_backend("triton")
    try:
        layer(torch.randn(1, 9, 16, requires_grad=True))[0].sum().backward()
    finally:
        kernels.set_backend("auto")
    assert len(calls) == 1
