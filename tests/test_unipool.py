import math

import pytest
import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig
from normrouter import NormRouter, SoftmaxRouter, normrouter_scale, router_z_loss
from unipool import (MoE, ExpertPool, aux_losses, build_moe_layers, grouped_mm, pool_loss, random_routing,
                     sort_by_expert, switch_loss)


def test_normrouter_equals_formula():
    torch.manual_seed(0)
    router = NormRouter(6, 5, top_k=2)
    with torch.no_grad():
        router.sigma.fill_(1.7)
    h = torch.randn(4, 6)
    r = router(h)
    z = h @ router.W.weight.T
    c = normrouter_scale(5, 2)
    for t in range(4):
        norm = math.sqrt(sum(z[t, j].item() ** 2 for j in range(5)))
        s = [1.7 * c * max(z[t, j].item() / (norm + 1e-8), 0.0) for j in range(5)]
        # the gates are the two largest raw scores, and each gate is the score of the expert it names
        # (zero scores tie, so the index of a zero gate may be any expert with score 0)
        top = sorted(s, reverse=True)[:2]
        assert all(math.isclose(r.gates[t, n].item(), top[n], rel_tol=1e-5, abs_tol=1e-7) for n in range(2))
        assert all(math.isclose(s[j], r.gates[t, n].item(), rel_tol=1e-5, abs_tol=1e-7)
                   for n, j in enumerate(r.indices[t].tolist()))
        assert all(math.isclose(r.scores[t, j].item(), s[j], rel_tol=1e-5, abs_tol=1e-7) for j in range(5))


def test_all_negative_logits_give_zero_gates_and_no_nan():
    router = NormRouter(3, 4, top_k=2)
    with torch.no_grad():
        router.W.weight.copy_(-torch.ones(4, 3))
    h = torch.ones(2, 3, requires_grad=True)
    r = router(h)
    assert torch.equal(r.gates, torch.zeros(2, 2))
    pool = ExpertPool(4, 3, 8)
    y, _ = MoE(router, pool)(h.view(1, 2, 3))
    y.sum().backward()
    assert torch.equal(y, torch.zeros_like(y)) and torch.isfinite(h.grad).all()
    router.W.weight.data.zero_()  # z = 0 exactly: 0 / (0 + eps) is still finite
    assert torch.isfinite(router(h).scores).all()


def test_normrouter_scale_reference_values():
    assert abs(normrouter_scale(96, 1) - 4.016) < 0.02
    assert abs(normrouter_scale(16, 2) - 1.918) < 0.02
    c = normrouter_scale(8, 1)
    assert math.isfinite(c) and 2.0 < c < 4.0


def test_softmax_router_and_z_loss():
    torch.manual_seed(0)
    h = torch.randn(5, 4)
    plain, mixtral = SoftmaxRouter(4, 6, 2), SoftmaxRouter(4, 6, 2, renormalize=True)
    mixtral.W.weight.data.copy_(plain.W.weight.data)
    p = torch.softmax(h @ plain.W.weight.T, -1)
    top = p.topk(2, -1)
    torch.testing.assert_close(plain(h).gates, top.values)
    torch.testing.assert_close(mixtral(h).gates, top.values / top.values.sum(-1, keepdim=True))
    z = h @ plain.W.weight.T
    expect = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in z.tolist()) / 5
    assert math.isclose(router_z_loss(z).item(), expect, rel_tol=1e-5)


def test_pool_loss_hand_computed():
    # two layers, M = 2 experts, T = 2 tokens, top-1
    s1, c1 = torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([2, 0])   # f = (1, 0),   P = (0.75, 0.25)
    s2, c2 = torch.tensor([[0.2, 0.8], [0.4, 0.6]]), torch.tensor([1, 1])   # f = (.5, .5), P = (0.3, 0.7)
    # f̄ = (0.75, 0.25), P̄ = (0.525, 0.475); L = 2 (0.75·0.525 + 0.25·0.475) = 1.025
    assert math.isclose(pool_loss([s1, s2], [c1, c2], 1).item(), 1.025, rel_tol=1e-6)
    # Switch for layer 1 alone: 2 (1·0.75 + 0·0.25) = 1.5; uniform routing gives the minimum 1
    assert math.isclose(switch_loss(s1, c1, 1).item(), 1.5, rel_tol=1e-6)
    assert math.isclose(switch_loss(torch.full((4, 2), 0.5), torch.tensor([2, 2]), 1).item(), 1.0)


@pytest.mark.parametrize("kind, loss_kind, router", [("moe", "switch", "softmax"), ("unipool", "pool", "norm")])
def test_balance_losses_give_gradient_to_routers_only(kind, loss_kind, router):
    torch.manual_seed(0)
    layers = build_moe_layers(kind, 2, 8, 16, n_experts=3, top_k=1, router=router)
    x = torch.randn(1, 10, 8, requires_grad=True)
    aux = {"scores": [], "counts": [], "logits": []}
    for layer in layers:
        _, a = layer(x)
        for k in aux:
            aux[k].append(a[k])
    aux_losses(layers, aux, loss_kind, 0.01, 1e-3).backward()
    for layer in layers:
        assert layer.router.W.weight.grad is not None and layer.router.W.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in layer.pool.parameters())


def test_unipool_holds_one_pool_and_sums_expert_gradients():
    torch.manual_seed(0)
    layers = build_moe_layers("unipool", 3, 8, 16, n_experts=2, top_k=2, router="norm")
    assert all(l.pool is layers[0].pool for l in layers) and layers[0].pool.n_experts == 6
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=8), ffns=layers)
    dense = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=8))
    ffn_dense = sum(p.numel() for b in dense.blocks for p in b.ffn.parameters())
    pool = sum(p.numel() for p in layers[0].pool.parameters())
    routers = sum(p.numel() for l in layers for p in l.router.parameters())
    assert model.num_params() == dense.num_params() - ffn_dense + pool + routers
    # an expert's gradient is the sum of what each layer sent it
    xs = [torch.randn(1, 5, 8) for _ in layers]
    targets = [torch.randn(1, 5, 8) for _ in layers]

    def grad_w1(use):
        layers[0].pool.w1.grad = None
        sum((layers[l](xs[l])[0] * targets[l]).sum() for l in use).backward()
        return layers[0].pool.w1.grad.clone()

    together = grad_w1([0, 1, 2])
    torch.testing.assert_close(together, grad_w1([0]) + grad_w1([1]) + grad_w1([2]), rtol=1e-5, atol=1e-6)


def test_grouped_pools_and_fine_grained_experts():
    layers = build_moe_layers("unipool", 4, 8, 16, n_experts=2, pool_groups=2, top_k=1, expert_split=2)
    assert layers[0].pool is layers[1].pool and layers[2].pool is layers[3].pool
    assert layers[0].pool is not layers[2].pool
    assert layers[0].pool.n_experts == 8 and layers[0].pool.w1.shape == (8, 8, 8) and layers[0].router.top_k == 2
    with pytest.raises(ValueError, match="exceeds"):
        build_moe_layers("moe", 2, 8, 16, n_experts=2, top_k=3)


@pytest.mark.parametrize("router, k", [("softmax", 1), ("norm", 2), ("softmax", 3)])
def test_moe_output_equals_naive_per_token_loop(router, k):
    torch.manual_seed(0)
    layer = build_moe_layers("moe", 1, 6, 10, n_experts=5, top_k=k, router=router)[0]
    x = torch.randn(2, 7, 6)
    y, aux = layer(x)
    r = layer.router(x.reshape(-1, 6))
    p = layer.pool
    expect = torch.zeros(14, 6)
    for t, h in enumerate(x.reshape(-1, 6)):
        for g, e in zip(r.gates[t], r.indices[t]):
            expect[t] += g * ((F.silu(h @ p.w1[e]) * (h @ p.w3[e])) @ p.w2[e])
    torch.testing.assert_close(y.reshape(-1, 6), expect, rtol=1e-5, atol=1e-6)
    assert aux["counts"].tolist() == torch.bincount(r.indices[r.gates > 0], minlength=5).tolist()


def test_grouped_mm_and_sorting_with_empty_experts():
    indices = torch.tensor([[3, 0], [3, 1], [0, 3]])
    order, counts, offsets = sort_by_expert(indices, 5)
    assert counts.tolist() == [2, 1, 0, 3, 0] and offsets.tolist() == [0, 2, 3, 3, 6, 6]
    assert indices.flatten()[order].tolist() == [0, 0, 1, 3, 3, 3]
    x, w = torch.randn(6, 3), torch.randn(5, 3, 2)
    e_of_row = indices.flatten()[order]
    torch.testing.assert_close(grouped_mm(x, w, offsets), torch.stack([x[r] @ w[e] for r, e in enumerate(e_of_row)]))


def test_deterministic_for_a_fixed_seed():
    def run():
        torch.manual_seed(3)
        layers = build_moe_layers("unipool", 2, 8, 16, n_experts=4, top_k=2, router="norm")
        model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8), ffns=layers)
        idx = torch.randint(0, 11, (3, 8))
        out = model(idx, idx)
        out.loss.backward()
        return out.logits, layers[0].pool.w2.grad

    (a, ga), (b, gb) = run(), run()
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_random_routing_probe_changes_only_the_chosen_layer():
    torch.manual_seed(0)
    layers = build_moe_layers("moe", 2, 8, 16, n_experts=8, top_k=1)
    x = torch.randn(1, 50, 8)
    before = [l(x)[1]["counts"] for l in layers]
    with random_routing(layers, [1], seed=0):
        during = [l(x)[1]["counts"] for l in layers]
    after = [l(x)[1]["counts"] for l in layers]
    assert torch.equal(before[0], during[0]) and not torch.equal(before[1], during[1])
    assert torch.equal(before[1], after[1])  # restored


# ----------------------------------------------------------------------------- precision, dispatch, calibration

@pytest.mark.parametrize("make", [lambda: NormRouter(16, 8, 2), lambda: SoftmaxRouter(16, 8, 2)])
def test_routing_runs_in_fp32_under_autocast(make):
    torch.manual_seed(0)
    router = make()
    h = torch.randn(64, 16)
    expect = router(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(h)
    for a, b in zip(got, expect):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    z = (h.double() @ router.W.weight.double().T).float()
    torch.testing.assert_close(got.logits, z, rtol=1e-5, atol=1e-6)


def test_zero_gate_assignments_are_not_dispatched_nor_counted():
    torch.manual_seed(0)
    layer = build_moe_layers("unipool", 1, 6, 8, n_experts=8, top_k=2, router="norm")[0]
    x = torch.randn(1, 40, 6)
    with torch.no_grad():  # experts 0 and 1 see x_0 and x_1; experts 2..7 get negative logits for every token
        layer.router.W.weight.fill_(-1.0)
        layer.router.W.weight[:2] = torch.eye(6)[:2]
        x = x.abs()
        x[0, ::3, 0] *= -1  # every third token: one positive score only, so its second gate is zero
    r = layer.router(x.view(-1, 6))
    positive = r.gates > 0
    assert 0 < (~positive).sum() < positive.numel()
    y, aux = layer(x)
    # counts hold only the positive-gate pairs
    expect_counts = torch.bincount(r.indices[positive], minlength=8)
    assert aux["counts"].tolist() == expect_counts.tolist()
    # an expert that would return NaN is never run for a zero-gate pair (0 · NaN would poison the output)
    p = layer.pool
    with torch.no_grad():
        for e in range(2, 8):
            p.w2[e].fill_(float("nan"))
    y, _ = layer(x)
    expect = torch.zeros(40, 6)
    for t, h in enumerate(x.view(-1, 6)):
        for g, e in zip(r.gates[t], r.indices[t]):
            if g > 0:
                expect[t] += g * ((F.silu(h @ p.w1[e]) * (h @ p.w3[e])) @ p.w2[e])
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.view(-1, 6), expect, rtol=1e-5, atol=1e-6)


def test_all_negative_logits_dispatch_nothing():
    layer = build_moe_layers("unipool", 1, 3, 8, n_experts=8, top_k=2, router="norm")[0]
    with torch.no_grad():
        layer.router.W.weight.fill_(-1.0)
    _, aux = layer(torch.ones(1, 5, 3))
    assert aux["counts"].sum() == 0


@pytest.mark.parametrize("M, k, ref", [(96, 1, 4.016), (32, 4, 1.771), (16, 2, 1.918), (128, 1, 4.448)])
def test_normrouter_scale_matches_paper_values(M, k, ref):
    assert abs(normrouter_scale(M, k) / ref - 1) < 0.015


@pytest.mark.parametrize("M, k", [(2, 1), (2, 2), (3, 1), (4, 1), (4, 2), (8, 1), (8, 2), (8, 8)])
def test_normrouter_scale_finite_and_stable_across_seeds(M, k):
    values = [normrouter_scale(M, k, seed=s) for s in range(4)]
    assert all(math.isfinite(v) and v > 0 for v in values)
    mean = sum(values) / len(values)
    assert all(abs(v / mean - 1) < 0.01 for v in values), values


@pytest.mark.parametrize("make", [NormRouter, SoftmaxRouter])
def test_top_k_beyond_the_experts_is_a_clear_error(make):
    with pytest.raises(ValueError, match="top_k=5.*4 experts"):
        make(8, 4, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        make(8, 4, top_k=0)
