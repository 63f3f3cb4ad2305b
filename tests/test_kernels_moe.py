import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import moe
from kernels.moe import GroupedMM, block_schedule, grouped_mm_reference
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
    offsets = offsets_of([0, 70, 1, 0, 32])
    block_expert, block_start = block_schedule(offsets, block_m=32)
    assert block_expert.tolist() == [1, 1, 1, 2, 4]
    assert block_start.tolist() == [0, 32, 64, 70, 71]


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
