import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightgcn import Graph, WeightedSymmetricSpMM
from lightgnn import (PrunableLightGCN, distill_loss, edge_scores, embedding_kd, info_nce, prediction_kd,
                      prune_round, two_hop_pairs, uniformity)

EDGES = np.array([[0, 0], [0, 1], [1, 1], [1, 2], [2, 0], [2, 1], [2, 3], [3, 3]])  # 4 users, 4 items
NU, NI = 4, 4


def dense_A():
    A = torch.zeros(NU + NI, NU + NI, dtype=torch.float64)
    for u, i in EDGES:
        A[u, NU + i] = A[NU + i, u] = 1
    return A


def norm(X):
    d = X.sum(1).pow(-0.5)
    return d[:, None] * X * d[None, :]


def test_augmented_graph_equals_dense_formula():
    A = dense_A()
    # A² restricted to distinct nodes: the 2-hop user-user and item-item links, weight 1 (learned later)
    A2 = ((A @ A) > 0).double()
    A2.fill_diagonal_(0)
    expect = norm(torch.eye(NU + NI, dtype=torch.float64) + A + A2)
    extra = two_hop_pairs(EDGES, NU, NI, topk=100)
    got = Graph(NU, NI, EDGES, self_loops=True, extra=extra).normalized().to_dense().double()
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7)


def test_two_hop_topk_keeps_the_strongest_links():
    # co-interaction counts, users: (0,2)=2 (items 0,1), (1,2)=1, (0,1)=1, (2,3)=1, (1,3)=1
    extra = {tuple(p) for p in two_hop_pairs(EDGES, NU, NI, topk=1)}
    # each node's single strongest partner (ties to the lower id), then symmetrised
    R = np.zeros((NU, NI))
    R[EDGES[:, 0], EDGES[:, 1]] = 1
    expect = set()
    for C, off in ((R @ R.T, 0), (R.T @ R, NU)):
        np.fill_diagonal(C, -1)
        for v in range(len(C)):
            w = int(np.argmax(C[v]))                  # argmax returns the first (lowest id) maximum
            if C[v, w] > 0:
                expect.add((min(v, w) + off, max(v, w) + off))
    assert extra == expect and (0, 2) in extra


def test_learnable_edge_weights_gradcheck():
    g = Graph(NU, NI, EDGES, True, two_hop_pairs(EDGES, NU, NI, 2))
    w = torch.rand(g.n_edges, dtype=torch.float64) + 0.5
    E = torch.randn(NU + NI, 3, dtype=torch.float64)
    A = g.normalized(w.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, e: WeightedSymmetricSpMM.apply(v, e, A.A_hat.double()),
                                    (A.value.detach().requires_grad_(), E.requires_grad_()))
    assert torch.autograd.gradcheck(lambda w: (g.normalized(w) @ E).sum(0), (w,))


def test_one_round_prunes_exactly_the_lowest_scores():
    torch.manual_seed(0)
    student = PrunableLightGCN(Graph(NU, NI, EDGES, True), dim=5, n_layers=2)
    with torch.no_grad():
        student.W.uniform_(0, 2)
    mid_user, mid_item, mid_W = torch.randn(NU, 5), torch.randn(NI, 5), torch.rand(len(EDGES))
    beta1, beta2, rho, rho_emb = 0.5, 0.3, 0.3, 0.25
    W_before, E0_before = student.W.detach().clone(), student.E0.detach().clone()
    # φ(u,i) = [W_s + β1 σ(e^m_u·e^m_i) + β2 W_m] · M_A, written out per edge
    phi = [(W_before[e] + beta1 * torch.sigmoid(mid_user[u] @ mid_item[i]) + beta2 * mid_W[e]).item()
           for e, (u, i) in enumerate(EDGES)]
    scores = edge_scores(student, mid_user, mid_item, mid_W, EDGES, beta1, beta2)
    torch.testing.assert_close(scores, torch.tensor(phi))
    edges_kept, entries_kept = prune_round(student, scores, rho, rho_emb)
    n_drop = int(rho * len(EDGES))
    dropped = set(np.argsort(phi, kind="stable")[:n_drop].tolist())
    assert {e for e in range(len(EDGES)) if student.edge_mask[e] == 0} == dropped
    assert edges_kept == (len(EDGES) - n_drop) / len(EDGES)
    flat = E0_before.abs().flatten()
    n_drop_e = int(rho_emb * flat.numel())
    threshold = flat.sort().values[n_drop_e - 1]
    assert torch.equal(student.entry_mask.flatten() == 0, flat <= threshold)
    assert entries_kept == 1 - n_drop_e / flat.numel()
    # restart: surviving embeddings kept, edge weights back to 1
    assert torch.equal(student.E0, E0_before * student.entry_mask) and torch.all(student.W == 1)
    # a second round prunes ρ of what is LEFT, never an already-pruned edge again
    prune_round(student, edge_scores(student, mid_user, mid_item, mid_W, EDGES, beta1, beta2), rho, rho_emb)
    kept = len(EDGES) - n_drop
    assert int(student.edge_mask[:len(EDGES)].sum()) == kept - int(rho * kept)
    assert all(student.edge_mask[e] == 0 for e in dropped)


def test_pruned_edges_vanish_from_the_propagation():
    torch.manual_seed(0)
    student = PrunableLightGCN(Graph(NU, NI, EDGES, True), dim=3, n_layers=1)
    student.edge_mask[0] = 0                       # edge (user 0, item 0)
    A = student.adjacency().to_dense()
    assert A[0, NU + 0] == 0 and A[NU + 0, 0] == 0 and A[0, NU + 1] > 0


def test_pruned_entries_stay_zero_after_optimizer_steps():
    torch.manual_seed(0)
    student = PrunableLightGCN(Graph(NU, NI, EDGES, True), dim=6, n_layers=2)
    student.entry_mask.copy_((torch.rand_like(student.E0) > 0.5).float())
    student.zero_pruned()
    opt = torch.optim.Adam(student.parameters(), lr=0.1)
    T = (torch.randn(NU, 6), torch.randn(NI, 6))
    w = {"pred": 1.0, "tau": 0.03, "emb": 0.01, "emb_tau": 0.1, "uni": 1.0, "uni_tau": 1.0}
    u, i, j = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]), torch.tensor([2, 3, 0])
    for _ in range(5):
        E_user, E_item = student()
        loss = distill_loss(student, E_user, E_item, T, T, u, i, j, (u, j, i), w, 1e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        student.zero_pruned()
        assert torch.all(student.E0[student.entry_mask == 0] == 0)
    assert torch.any(student.E0[student.entry_mask == 1] != 0)


def test_prediction_kd_equals_formula_and_is_minimal_at_the_tutor():
    g = torch.Generator().manual_seed(0)
    Eu, Ei, Tu, Ti = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (3, 5, 3, 5))
    u, i1, i2 = torch.tensor([0, 1, 2, 1]), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 1, 2])
    tau = 0.5
    expect = 0.0
    for a, b, c in zip(u, i1, i2):
        s = (Eu[a] @ Ei[b] - Eu[a] @ Ei[c]) / tau
        t = (Tu[a] @ Ti[b] - Tu[a] @ Ti[c]) / tau
        p, q = 1 / (1 + math.exp(-t)), 1 / (1 + math.exp(-s))
        expect -= (p * math.log(q) + (1 - p) * math.log(1 - q)) / 4
    torch.testing.assert_close(prediction_kd(Eu, Ei, Tu, Ti, u, i1, i2, tau).item(), expect)
    # a student equal to its tutor: BCE reduces to the target's entropy (KL = 0), gradient 0
    S = Eu.clone().requires_grad_()
    loss = prediction_kd(S, Ei, S.detach(), Ei, u, i1, i2, tau)
    p = torch.sigmoid((S.detach()[u] * (Ei[i1] - Ei[i2])).sum(-1) / tau)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    torch.testing.assert_close(loss, entropy)
    loss.backward()
    torch.testing.assert_close(S.grad, torch.zeros_like(S))


def test_embedding_kd_equals_infonce_formula():
    g = torch.Generator().manual_seed(1)
    Eu, Ei, Tu, Ti = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (3, 5, 3, 5))
    users, items, tau = torch.tensor([0, 2]), torch.tensor([1, 3, 4]), 0.1

    def nce(E, T, idx):
        total = 0.0
        for v in idx:
            sims = [F.cosine_similarity(E[v], T[w], dim=0).item() / tau for w in range(len(T))]
            total -= sims[v] - math.log(sum(math.exp(x) for x in sims))
        return total / len(idx)

    got = embedding_kd(Eu, Ei, Tu, Ti, users, items, tau).item()
    assert got == pytest.approx(nce(Eu, Tu, users) + nce(Ei, Ti, items), rel=1e-9)
    # aligned, well-separated embeddings give (near) zero loss
    eye = torch.eye(4, dtype=torch.float64)
    assert info_nce(eye, eye, torch.arange(4), tau=0.01).item() < 1e-30


def test_uniformity_equals_formula():
    g = torch.Generator().manual_seed(2)
    Eu, Ei = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    users, items, tau = torch.tensor([0, 1]), torch.tensor([2, 4]), 0.7
    U, I = F.normalize(Eu, dim=1), F.normalize(Ei, dim=1)
    expect = (sum(math.log(sum(math.exp(U[a] @ I[b] / tau) for b in range(5))) for a in users) / 2
              + sum(math.log(sum(math.exp(I[b] @ U[a] / tau) for a in range(3))) for b in items) / 2)
    assert uniformity(Eu, Ei, users, items, tau).item() == pytest.approx(expect, rel=1e-9)
