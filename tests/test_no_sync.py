"""No host synchronisation in a training step: nothing on the way from a batch to the optimizer step reads a GPU
value on the host (which would stall the CPU until the GPU catches up, every layer)."""
import contextlib

import pytest
import torch

import kernels
from gpt import GPT, GPTConfig, ffn_hidden_size
from kernels import attention, moe
from sepllm import SparsePattern
from unipool import aux_losses, build_moe_layers


@contextlib.contextmanager
def host_reads_forbidden(monkeypatch):
    """Within the block, reading a tensor's value on the host (.item(), .tolist(), int(t), bool(t), float(t)) raises."""
    def forbidden(name):
        def f(*args, **kwargs):
            raise AssertionError(f"a host read: Tensor.{name}")
        return f
    for name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    yield
    monkeypatch.undo()


def test_attention_plan_reads_nothing_on_the_host(monkeypatch):
    keep = torch.rand(3, 70, generator=torch.Generator().manual_seed(0)) < 0.2
    with host_reads_forbidden(monkeypatch):
        plan = attention.make_plan(keep, 4)
    assert plan.kept_before[:, -1].tolist() == (keep | (torch.arange(70) < 4)).sum(1).tolist()


@pytest.mark.parametrize("op", ["triton", "torch_grouped_mm"])
def test_grouped_mm_wrappers_read_nothing_on_the_host(op, monkeypatch):
    # the host side of the dispatch: offsets stay on the device; the launch itself is stubbed
    monkeypatch.setattr(moe, "launch", lambda *a, **k: None)
    fn = {"triton": moe.GroupedMM.apply, "torch_grouped_mm": moe.TorchGroupedMM.apply}[op]
    x = torch.randn(20, 16, requires_grad=True)
    w = torch.randn(3, 16, 8, requires_grad=True)
    offsets = torch.tensor([0, 5, 5, 17])
    with host_reads_forbidden(monkeypatch):
        fn(x, w, offsets).sum().backward()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_step_runs_without_host_sync_on_cuda():
    # UniPool FFNs (Triton grouped matmul or torch._grouped_mm) and SepLLM attention (Triton), bf16 autocast, fused
    # AdamW and clipping: the second step must run with torch's sync debugger set to raise
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=128, n_layer=2, n_head=2, n_embd=64)
    ffns = build_moe_layers("unipool", 2, 64, ffn_hidden_size(cfg), 4, 8, 1, 2, "norm")
    model = GPT(cfg, ffns).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step():
        idx = torch.randint(0, 64, (4, 128), device="cuda")
        pattern = SparsePattern(idx < 8, 3, 16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(idx, idx, attn_mask=[pattern, pattern])
            loss = out.loss + aux_losses(ffns, out.aux, "pool", 0.01, 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()                                  # compiles (and autotunes, which synchronises) the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
