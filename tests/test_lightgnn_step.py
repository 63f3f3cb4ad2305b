"""One distillation step of LightGNN (lightgnn.distill_loss) on a fixed-seed toy graph gives the same loss and
gradients as the implementation before the speed-ups (shared logits of (3) and (3'), 1/τ on the (B, d) side,
gathers by index_select): the numbers below were printed by that implementation, float64, this seed."""
import numpy as np
import pytest
import torch

from lightgcn import Graph
from lightgnn import KD, Batch, PairScores, PrunableLightGCN, RowLogSumExp, Tutor, distill_loss, pair_csr

W = {"pred": 0.7, "tau": 0.05, "emb": 0.4, "emb_tau": 0.1, "uni": 0.3, "uni_tau": 0.7, "sub": 0.2, "kd_nodes": 24}


def one_step(rnd):
    """Loss of one step and gradient summaries: ‖∂L/∂E0‖, ‖∂L/∂W‖ and their projections on fixed random directions."""
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 60
    train = np.unique(np.stack([rng.integers(0, n_users, 500), rng.integers(0, n_items, 500)], 1), axis=0)
    torch.manual_seed(0)
    student = PrunableLightGCN(Graph(n_users, n_items, train, True), dim=8, n_layers=2).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        student.W.copy_(torch.rand(len(student.W), generator=g, dtype=torch.float64) + 0.5)
        student.edge_mask.copy_((torch.rand(student.graph.n_edges, generator=g) > 0.2).double())
        student.entry_mask.copy_((torch.rand(student.E0.shape, generator=g) > 0.3).double())
        student.zero_pruned()
    tutor = [torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (n_users, n_items)]
    high = [torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (n_users, n_items)]
    batch = torch.from_numpy(train[torch.randperm(len(train), generator=g)[:128].numpy()])
    u, i = batch.T
    j = torch.randint(n_items, (128,), generator=g)
    triples = [torch.randint(n, (1000,), generator=g) for n in (n_users, n_items, n_items)]
    E_user, E_item = student()
    loss = distill_loss(student, E_user, E_item, Tutor(*tutor, *high), Batch(u, i, j, triples), KD(**W, decay=1e-2),
                        rnd, g)
    g_E0, g_W = torch.autograd.grad(loss, [student.E0, student.W])
    r = torch.Generator().manual_seed(2)
    R_E0, R_W = torch.randn(g_E0.shape, generator=r, dtype=torch.float64), torch.randn(g_W.shape, generator=r,
                                                                                        dtype=torch.float64)
    return {"loss": loss.item(), "norm_E0": g_E0.norm().item(), "proj_E0": (g_E0 * R_E0).sum().item(),
            "norm_W": g_W.norm().item(), "proj_W": (g_W * R_W).sum().item()}


# printed by one_step above with the implementation before the speed-ups (commit db42564), float64
OLD = {0: {"loss": 12.492559013546032, "norm_E0": 6.205924439647741, "proj_E0": -4.640468413138687,
           "norm_W": 0.16574900403584072, "proj_W": -0.09405684567043295},
       3: {"loss": 102.78964580410228, "norm_E0": 6.212829327112903, "proj_E0": -4.4715754585264795,
           "norm_W": 0.16602224477236466, "proj_W": -0.10053783218272207}}


@pytest.mark.parametrize("rnd", [0, 3])       # round 3: the subspace term (3') is on, loosen = 2
def test_one_step_equals_the_implementation_before_the_speedups(rnd):
    got = one_step(rnd)
    for name, value in OLD[rnd].items():
        assert got[name] == pytest.approx(value, rel=1e-10, abs=1e-12), name


def test_pair_scores_are_dot_products_with_the_gradient_of_gathered_rows():
    """PairScores (sampled product + sparse backward) against e_u · e_i per pair, pairs drawn twice included,
    and torch.autograd.gradcheck of its backward."""
    g = torch.Generator().manual_seed(0)
    E_user, E_item = (torch.randn(n, 3, generator=g, dtype=torch.float64, requires_grad=True) for n in (4, 6))
    u, i = torch.tensor([3, 0, 3, 1, 0, 3]), torch.tensor([5, 2, 5, 0, 4, 1])     # (3, 5) twice
    C, inverse = pair_csr(u, i, 4, 6, torch.float64)
    assert C.values().shape == (5,) and inverse[0] == inverse[2]
    got = PairScores.apply(E_user, E_item, C, inverse)
    expect = torch.stack([E_user[a] @ E_item[b] for a, b in zip(u, i)])
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    weight = torch.randn(len(u), generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * weight).sum(), [E_user, E_item]),
                    torch.autograd.grad((expect * weight).sum(), [E_user, E_item])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda A, B: PairScores.apply(A, B, C, inverse), (E_user, E_item))


def test_row_logsumexp_equals_torch_and_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    X = (10 * torch.randn(3, 7, generator=g, dtype=torch.float64)).requires_grad_()
    torch.testing.assert_close(RowLogSumExp.apply(X), torch.logsumexp(X, 1), rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(RowLogSumExp.apply, (X,))
