import math

import pytest
import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig
from normrouter import NormRouter, SoftmaxRouter, normrouter_scale, router_z_loss
from unipool import (MoE, ExpertPool, aux_losses, build_moe_layers, grouped_mm, pool_loss, random_routing,
                     routing_stats, sort_by_expert, switch_loss)


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
    assert aux["counts"].tolist() == torch.bincount(r.indices.flatten(), minlength=5).tolist()


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


def test_zero_gate_assignments_are_not_dispatched_but_counted_in_f():
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
    # counts (f of the auxiliary losses) hold every top-k pick, zero gates included, as the official routing map:
    # a loop over the tokens and their k picks
    expect_counts = [0] * 8
    for t in range(40):
        for e in r.indices[t].tolist():
            expect_counts[e] += 1
    assert aux["counts"].tolist() == expect_counts
    assert aux["dropped"] == (~positive).sum()
    # so the pool loss's f is the official one: f_i = picks of i / (T·k)
    f_bar = torch.tensor(expect_counts, dtype=torch.float) / (40 * 2)
    expect_loss = 8 * (f_bar * r.scores.float().mean(0)).sum()
    torch.testing.assert_close(pool_loss([r.scores], [aux["counts"]], 2), expect_loss)
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
    assert aux["dropped"] == 10 and aux["counts"].sum() == 10    # none dispatched, every pick counted in f


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


# ----------------------------------------------------------------------------- balance losses against closed forms

def leaf_scores(L, T, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(T, M, generator=g).softmax(-1).requires_grad_() for _ in range(L)]


@pytest.mark.parametrize("top_k", [1, 2])
def test_pool_loss_gradient_is_alpha_M_fbar(top_k):
    # L_pool = α M Σ_i f̄_i P̄_i with P̄_i = (1/L) Σ_l (1/T) Σ_t s_ti^(l)  =>  ∂L/∂s_ti^(l) = α M f̄_i / (L T)
    L, T, M, alpha = 3, 5, 4, 0.03
    layers = build_moe_layers("unipool", L, 8, 16, n_experts=1, pool_size=M, top_k=top_k, router="norm")
    scores = leaf_scores(L, T, M)
    counts = [torch.tensor(c) * top_k for c in ([2, 0, 0, 3], [1, 1, 2, 1], [5, 0, 0, 0])]  # each sums to T·k
    aux = {"scores": scores, "counts": counts, "logits": [torch.zeros(T, M)] * L}
    loss = aux_losses(layers, aux, "pool", alpha, 0.0)
    f_bar = torch.stack([c.float() / (T * top_k) for c in counts]).mean(0)
    P_bar = torch.stack([s.detach().mean(0) for s in scores]).mean(0)
    assert math.isclose(loss.item(), alpha * M * (f_bar * P_bar).sum().item(), rel_tol=1e-6)
    loss.backward()
    for s in scores:
        torch.testing.assert_close(s.grad, (alpha * M * f_bar / (L * T)).expand(T, M), rtol=1e-6, atol=1e-9)


def test_pool_loss_with_pool_groups_uses_each_pools_own_layers():
    # 4 layers, 2 pools: layers 0-1 share pool A, 2-3 pool B; each pool's f̄ and P̄ average over its 2 layers only
    T, M, alpha = 4, 3, 0.1
    layers = build_moe_layers("unipool", 4, 8, 16, n_experts=1, pool_size=2 * M, pool_groups=2, router="norm")
    scores = leaf_scores(4, T, M, seed=1)
    counts = [torch.tensor(c) for c in ([4, 0, 0], [0, 4, 0], [1, 1, 2], [2, 2, 0])]
    aux = {"scores": scores, "counts": counts, "logits": [torch.zeros(T, M)] * 4}
    loss = aux_losses(layers, aux, "pool", alpha, 0.0)
    expect = 0.0
    for pool in ((0, 1), (2, 3)):
        f_bar = torch.stack([counts[l].float() / T for l in pool]).mean(0)
        P_bar = torch.stack([scores[l].detach().mean(0) for l in pool]).mean(0)
        expect += alpha * M * (f_bar * P_bar).sum().item()
        for l in pool:
            assert torch.autograd.grad(loss, scores[l], retain_graph=True)[0].allclose(
                (alpha * M * f_bar / (2 * T)).expand(T, M), rtol=1e-6, atol=1e-9)
    assert math.isclose(loss.item(), expect, rel_tol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_switch_loss_gradient_per_layer(top_k):
    # L = α Σ_l E Σ_i f_i^(l) P_i^(l)  =>  ∂L/∂s_ti^(l) = α E f_i^(l) / T, each layer with its own f
    T, E, alpha = 6, 3, 0.05
    layers = build_moe_layers("moe", 2, 8, 16, n_experts=E, top_k=top_k)
    scores = leaf_scores(2, T, E, seed=2)
    counts = [torch.tensor([6, 0, 0]) * top_k, torch.tensor([2, 2, 2]) * top_k]
    aux = {"scores": scores, "counts": counts, "logits": [torch.zeros(T, E)] * 2}
    loss = aux_losses(layers, aux, "switch", alpha, 0.0)
    loss.backward()
    expect = 0.0
    for s, c in zip(scores, counts):
        f = c.float() / (T * top_k)
        expect += alpha * E * (f * s.detach().mean(0)).sum().item()
        torch.testing.assert_close(s.grad, (alpha * E * f / T).expand(T, E), rtol=1e-6, atol=1e-9)
    assert math.isclose(loss.item(), expect, rel_tol=1e-6)


def test_z_loss_value_and_gradient_sign():
    # coeff · Σ_l mean_t (logsumexp_j z_tj)²; ∂/∂z_tj = coeff · 2 lse_t softmax(z_t)_j / T: pushes logits down when
    # lse > 0 and up when lse < 0, i.e. towards lse = 0
    layers = build_moe_layers("moe", 2, 8, 16, n_experts=3)
    z = [torch.tensor([[2.0, 1.0, 0.0], [-5.0, -6.0, -4.0]], requires_grad=True),
         torch.tensor([[0.5, 0.5, 0.5], [1.0, -1.0, 3.0]], requires_grad=True)]
    aux = {"scores": [torch.zeros(2, 3)] * 2, "counts": [torch.zeros(3, dtype=torch.long)] * 2, "logits": z}
    loss = aux_losses(layers, aux, "none", 0.0, 1e-2)
    lse = [[math.log(sum(math.exp(v) for v in row)) for row in zl.tolist()] for zl in z]
    assert math.isclose(loss.item(), 1e-2 * sum(sum(v * v for v in l) / 2 for l in lse), rel_tol=1e-6)
    loss.backward()
    for zl, l in zip(z, lse):
        expect = 1e-2 * 2 * torch.tensor(l)[:, None] * zl.detach().softmax(-1) / 2
        torch.testing.assert_close(zl.grad, expect, rtol=1e-5, atol=1e-8)
    assert (z[0].grad[0] > 0).all() and (z[0].grad[1] < 0).all()


@pytest.mark.parametrize("flag", ["aux_coef", "zloss_coef"])
def test_every_auxiliary_loss_reaches_the_optimizer_in_a_training_step(tmp_path, flag):
    # one training step with the loss on and off, nothing else different (no clipping): every router must move
    # differently
    import train_lm
    (tmp_path / "data" / "shakespeare").mkdir(parents=True)
    (tmp_path / "data" / "shakespeare" / "input.txt").write_text("To be, or not to be: that is the question.\n" * 40)
    states = []
    for coef in (0.0, 10.0):
        cfg = train_lm.TrainConfig(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
                                   out_dir=str(tmp_path / f"{flag}{coef}"), n_layer=2, n_head=2, n_embd=16,
                                   block_size=8, batch_size=4, max_iters=1, eval_iters=1, warmup_iters=0,
                                   grad_clip=0.0, ffn="unipool", n_experts=2, top_k=2, aux_coef=0.0, zloss_coef=0.0)
        setattr(cfg, flag, coef)
        train_lm.train(cfg)
        states.append(torch.load(tmp_path / f"{flag}{coef}" / "ckpt_last.pt", weights_only=True)["model"])
    off, on = states
    routers = [k for k in off if "router.W" in k]
    assert len(routers) == 2
    assert all(not torch.equal(off[k], on[k]) for k in routers), [(off[k] - on[k]).abs().max() for k in routers]


# ----------------------------------------------------------------------------- what MoE users expect

def test_mixtral_router_gates_sum_to_one_over_the_top_k():
    torch.manual_seed(0)
    layer = build_moe_layers("moe", 1, 8, 16, n_experts=6, top_k=2, router="mixtral")[0]
    h = torch.randn(10, 8)
    r = layer.router(h)
    p = (h @ layer.router.W.weight.T).softmax(-1).topk(2, -1)
    torch.testing.assert_close(r.gates, p.values / p.values.sum(-1, keepdim=True))
    assert torch.equal(r.indices, p.indices)
    with pytest.raises(ValueError, match="softmax, norm, mixtral"):
        build_moe_layers("moe", 1, 8, 16, router="switch")


def test_shared_experts_are_always_on_beside_the_routed_ones():
    torch.manual_seed(0)
    layer = build_moe_layers("unipool", 2, 8, 16, n_experts=2, top_k=1, router="norm", n_shared=2)[1]
    x = torch.randn(1, 7, 8)
    y, _ = layer(x)
    h, p, s = x.view(-1, 8), layer.pool, layer.shared
    r = layer.router(h)
    assert s.w1.shape == (8, 32)  # two experts as wide as a routed one (16), held as one SwiGLU
    expect = (F.silu(h @ s.w1) * (h @ s.w3)) @ s.w2
    for t in range(7):
        g, e = r.gates[t, 0], r.indices[t, 0]
        expect[t] += g * ((F.silu(h[t] @ p.w1[e]) * (h[t] @ p.w3[e])) @ p.w2[e])
    torch.testing.assert_close(y.view(-1, 8), expect, rtol=1e-5, atol=1e-6)
    assert build_moe_layers("moe", 1, 8, 16, n_shared=0)[0].shared is None


@pytest.mark.parametrize("router", ["norm", "softmax"])
def test_balancing_bias_moves_the_choice_not_the_gates(router):
    torch.manual_seed(0)
    layer = build_moe_layers("moe", 1, 8, 16, n_experts=4, top_k=1, router=router)[0]
    h = torch.randn(20, 8)
    before = layer.router(h)
    layer.router.bias[3] = 100.0  # every token now chooses expert 3, its gate is its unbiased score
    r = layer.router(h)
    assert (r.indices == 3).all()
    torch.testing.assert_close(r.gates[:, 0], before.scores[:, 3])
    torch.testing.assert_close(r.scores, before.scores)


def test_balancing_bias_update_rule_and_that_it_balances():
    # b_i += γ sign(mean load − load_i)
    router = NormRouter(8, 4, top_k=1)
    router.update_bias(torch.tensor([3, 1, 0, 4]), 0.01)
    torch.testing.assert_close(router.bias, torch.tensor([-0.01, 0.01, 0.01, -0.01]))
    # on a fixed batch that the learned router sends mostly to one expert, the updates spread the load
    for make in (NormRouter, SoftmaxRouter):
        torch.manual_seed(0)
        router = make(8, 4, top_k=1)
        with torch.no_grad():
            router.W.weight[0] = 1.0
        h = torch.randn(400, 8) + 0.5
        load = lambda: torch.bincount(router(h).indices.flatten(), minlength=4).float()
        cv = lambda c: (c.std(unbiased=False) / c.mean()).item()
        start = load()
        for _ in range(500):
            router.update_bias(load(), 0.002)
        assert cv(start) > 1.0 and cv(load()) < 0.25, (make, start, load())


def test_routing_stats_by_hand():
    layers = build_moe_layers("unipool", 4, 8, 16, n_experts=1, pool_size=8, pool_groups=2, top_k=1)
    counts = [torch.tensor(c) for c in ([4, 0, 0, 0], [0, 4, 0, 0], [1, 1, 1, 1], [2, 2, 0, 0])]
    stats = routing_stats(layers, {"counts": counts, "dropped": [torch.tensor(0), torch.tensor(2), 0, 0]})
    # cv = std/mean: [4,0,0,0] -> sqrt(3); [1,1,1,1] -> 0; [2,2,0,0] -> 1
    assert [round(v, 6) for v in stats["load_cv"]] == [round(math.sqrt(3), 6)] * 2 + [0.0, 1.0]
    assert stats["dead_experts"] == [3, 3, 0, 2]
    assert stats["dropped"] == [0.0, 0.5, 0.0, 0.0]    # 2 of the 4 picks of layer 1 (counts include them)
    assert stats["pool_coverage"] == [0.5, 1.0]  # pool A: experts 0 and 1 used; pool B: all four


# ----------------------------------------------------------------------------- the routing probe

@pytest.mark.parametrize("k", [1, 3])
def test_probe_routes_uniformly_to_distinct_experts_with_the_learned_gates(k):
    from scipy.stats import chisquare
    torch.manual_seed(0)
    layers = build_moe_layers("moe", 3, 8, 16, n_experts=8, top_k=k)
    x = torch.randn(1, 1, 8).expand(1, 4000, 8).contiguous()  # one token repeated: a learned router picks one expert
    learned = layers[1].router(x.view(-1, 8))
    assert len(set(learned.indices.flatten().tolist())) == k
    before = [l(x)[0] for l in layers]
    with random_routing(layers, [1], seed=0):
        r = layers[1].router(x.view(-1, 8))
        during = [l(x)[0] for l in layers]
        again = layers[1].router(x.view(-1, 8))
    with random_routing(layers, [1], seed=1):
        other_seed = layers[1].router(x.view(-1, 8))
    # uniform over experts (a fixed seed, so the p-value is fixed), k distinct experts per token
    counts = torch.bincount(r.indices.flatten(), minlength=8)
    assert chisquare(counts.numpy()).pvalue > 1e-3, counts
    assert all(len(set(row)) == k for row in r.indices.tolist())
    assert not torch.equal(r.indices, again.indices) and not torch.equal(r.indices, other_seed.indices)
    # the learned gates are kept (the values, slot by slot); the other layers are untouched, and restored after
    torch.testing.assert_close(r.gates, learned.gates)
    assert torch.equal(during[0], before[0]) and torch.equal(during[2], before[2])
    assert not torch.equal(during[1], before[1])
    assert all(torch.equal(l(x)[0], b) for l, b in zip(layers, before))


@pytest.mark.parametrize("kind", ["moe", "unipool"])
def test_initial_weight_scales_of_experts_and_routers(kind):
    """Experts initialise as the dense FFN does: W1, W3 (and the router) N(0, init_std), the down projection W2
    N(0, init_std / √(2 n_layer)) like every residual projection of gpt.py; the shared experts too."""
    torch.manual_seed(0)
    layers = build_moe_layers(kind, n_layer=8, dim=64, hidden=128, n_experts=8, router="norm", init_std=0.02,
                              n_shared=2)
    out = 0.02 / 4.0                                                              # √(2 · 8) = 4
    weights = {"router W": lambda l: l.router.W.weight, "w1": lambda l: l.pool.w1, "w3": lambda l: l.pool.w3,
               "w2": lambda l: l.pool.w2, "shared w1": lambda l: l.shared.w1, "shared w2": lambda l: l.shared.w2}
    for name, get in weights.items():
        every = {id(get(l)): get(l) for l in layers}.values()                    # a shared pool once
        std = torch.cat([p.detach().flatten() for p in every]).std().item()
        assert std == pytest.approx(out if name.endswith("w2") else 0.02, rel=0.03), name
