import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lightgnn
from lightgcn import Graph, bpr_loss
from lightgnn import (KD, Batch, PrunableLightGCN, Tutor, augmented_graph, distill_loss, dot_logits, edge_scores, embedding_kd,
                      info_nce, prediction_kd, prune_round, sample_nodes, subspace_uniformity, uniformity)

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


def test_augmented_graph_is_I_plus_A_plus_path_counted_A2():
    A = dense_A()
    A2 = A @ A                                            # path counts, diagonal (degrees) included
    expect = norm(torch.eye(NU + NI, dtype=torch.float64) + A + A2)
    g, mass = augmented_graph(EDGES, NU, NI, topk=0)
    torch.testing.assert_close(g.normalized().to_dense().double(), expect, rtol=1e-6, atol=1e-7)
    assert mass == pytest.approx(1.0)


def test_augmented_graph_topk_keeps_the_largest_path_counts_and_reports_the_mass():
    A = dense_A()
    A2 = A @ A
    g, mass = augmented_graph(EDGES, NU, NI, topk=1)
    # each node's single largest off-diagonal count (ties to the lower id), then symmetrised
    off = A2.clone().fill_diagonal_(-1)
    keep = torch.zeros_like(A2, dtype=torch.bool)
    for v in range(NU + NI):
        w = int(torch.argmax(off[v]))                      # argmax returns the first (lowest id) maximum
        if off[v, w] > 0:
            keep[v, w] = keep[w, v] = True
    kept_A2 = torch.where(keep, A2, torch.zeros_like(A2)) + torch.diag(torch.diag(A2))
    expect = norm(torch.eye(NU + NI, dtype=torch.float64) + A + kept_A2)
    torch.testing.assert_close(g.normalized().to_dense().double(), expect, rtol=1e-6, atol=1e-7)
    assert mass == pytest.approx((kept_A2.sum() / A2.sum()).item())
    assert mass < 1


def test_pruning_an_edge_leaves_its_neighbours_entries_alone():
    # the fixed-Â parameterisation: Â = norm(A + I) of the unpruned graph, times weights and the mask
    student = PrunableLightGCN(Graph(NU, NI, EDGES, True), dim=3, n_layers=1)
    before = student.adjacency().to_dense()
    student.edge_mask[0] = 0                               # interaction (user 0, item 0)
    after = student.adjacency().to_dense()
    assert after[0, NU + 0] == 0 and after[NU + 0, 0] == 0
    expect = before.clone()
    expect[0, NU + 0] = expect[NU + 0, 0] = 0
    assert torch.equal(after, expect)                     # e.g. Â[u0, i1] unchanged
    torch.testing.assert_close(before.double(), norm(dense_A() + torch.eye(NU + NI, dtype=torch.float64)))


def test_student_edge_weights_get_the_dense_gradient():
    torch.manual_seed(0)
    student = PrunableLightGCN(Graph(NU, NI, EDGES, True), dim=3, n_layers=2).double()
    student.A_hat = student.A_hat.to(torch.float64)
    with torch.no_grad():
        student.W.uniform_(0.5, 1.5)                       # each direction its own weight
    student.edge_mask[3] = 0
    target = torch.randn(NU + NI, 3, dtype=torch.float64)
    (torch.cat(student()) * target).sum().backward()
    g = student.graph
    W = student.W.detach().clone().requires_grad_()
    mask = torch.ones(len(g.col), dtype=torch.float64)
    mask[g.edge == 3] = 0
    A = torch.zeros(NU + NI, NU + NI, dtype=torch.float64).index_put((g.row, g.col), W * mask)
    A = norm(dense_A() + torch.eye(NU + NI, dtype=torch.float64)) * A
    E0 = student.E0.detach()
    ((E0 + A @ E0 + A @ A @ E0) * target).sum().backward()
    torch.testing.assert_close(student.W.grad, W.grad)


def test_edge_scores_follow_the_formula_per_direction_and_prune_the_lowest():
    torch.manual_seed(0)
    student = PrunableLightGCN(Graph(NU, NI, EDGES, True), dim=5, n_layers=2)
    mid = PrunableLightGCN(augmented_graph(EDGES, NU, NI, topk=2)[0], dim=5, n_layers=2)
    with torch.no_grad():
        student.W.uniform_(0, 2)
        mid.W.uniform_(0, 2)
    M_user, M_item = torch.randn(NU, 5), torch.randn(NI, 5)
    beta1, beta2, rho, rho_emb = 0.5, 0.3, 0.3, 0.25

    def weight(model, v, w):
        g = model.graph
        return model.W[(g.row == v) & (g.col == w)].item()

    # φ(e) = Σ over e's two directions (v,w) of [W_s(v,w) + β1 σ(e^m_v·e^m_w) + β2 W_m(v,w)]
    phi = []
    for u, i in EDGES:
        s = torch.sigmoid(M_user[u] @ M_item[i]).item()
        phi.append(sum(weight(student, v, w) + beta1 * s + beta2 * weight(mid, v, w)
                       for v, w in ((u, NU + i), (NU + i, u))))
    scores = edge_scores(student, mid, M_user, M_item, beta1, beta2)
    torch.testing.assert_close(scores, torch.tensor(phi))
    E0_before = student.E0.detach().clone()
    edges_kept, entries_kept = prune_round(student, scores, rho, rho_emb)
    n_drop = int(rho * len(EDGES))
    dropped = set(np.argsort(phi, kind="stable")[:n_drop].tolist())
    assert {e for e in range(len(EDGES)) if student.edge_mask[e] == 0} == dropped
    assert edges_kept == (len(EDGES) - n_drop) / len(EDGES)
    flat = E0_before.abs().flatten()
    n_drop_e = int(rho_emb * flat.numel())
    assert torch.equal(student.entry_mask.flatten() == 0, flat <= flat.sort().values[n_drop_e - 1])
    assert entries_kept == 1 - n_drop_e / flat.numel()
    assert torch.equal(student.E0, E0_before * student.entry_mask) and torch.all(student.W == 1)
    # a second round prunes ρ of what is LEFT, never an already-pruned edge again
    prune_round(student, edge_scores(student, mid, M_user, M_item, beta1, beta2), rho, rho_emb)
    kept = len(EDGES) - n_drop
    assert int(student.edge_mask.sum()) == kept - int(rho * kept)
    assert all(student.edge_mask[e] == 0 for e in dropped)
    # random pruning (the control) reaches the same budget
    other = PrunableLightGCN(Graph(NU, NI, EDGES, True), dim=5, n_layers=2)
    assert prune_round(other, None, rho, rho_emb, torch.Generator().manual_seed(0)) == (edges_kept, entries_kept)


def test_pruned_entries_stay_zero_after_optimizer_steps():
    torch.manual_seed(0)
    student = PrunableLightGCN(Graph(NU, NI, EDGES, True), dim=6, n_layers=2)
    student.entry_mask.copy_((torch.rand_like(student.E0) > 0.5).float())
    student.zero_pruned()
    opt = torch.optim.Adam(student.parameters(), lr=0.1)
    T = (torch.randn(NU, 6), torch.randn(NI, 6))
    w = {"pred": 1.0, "tau": 0.03, "emb": 0.01, "emb_tau": 0.1, "uni": 1.0, "uni_tau": 1.0, "sub": 1e-2,
         "kd_nodes": 8}
    u, i, j = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]), torch.tensor([2, 3, 0])
    for _ in range(5):
        E_user, E_item = student()
        loss = distill_loss(student, E_user, E_item, Tutor(*T, *T), Batch(u, i, j, (u, j, i)), KD(**w, decay=1e-4), rnd=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        student.zero_pruned()
        assert torch.all(student.E0[student.entry_mask == 0] == 0)
    assert torch.any(student.E0[student.entry_mask == 1] != 0)


def test_kd_nodes_sample_both_positives_and_negatives():
    # a batch of 64 pairs: positives are items 0..63, negatives 64..127; 32 nodes may enter the KD terms
    i, j = torch.arange(64), torch.arange(64, 128)
    got = sample_nodes(torch.cat([i, j]), 32, torch.Generator().manual_seed(0))
    assert len(got) == 32 and len(set(got.tolist())) == 32
    assert (got < 64).any() and (got >= 64).any()
    assert sample_nodes(torch.tensor([3, 1, 3]), 32).tolist() == [1, 3]
    # and distill_loss draws its KD nodes that way, from the batch's users and from positives AND negatives
    torch.manual_seed(0)
    g = Graph(2, 128, np.stack([np.repeat([0, 1], 32), np.arange(64)], 1), True)
    model = PrunableLightGCN(g, dim=4, n_layers=1)
    H = (torch.randn(2, 4), torch.randn(128, 4))
    w = {"pred": 0.0, "tau": 1.0, "emb": 1.0, "emb_tau": 0.1, "uni": 1.0, "uni_tau": 1.0, "sub": 0.0, "kd_nodes": 32}
    E_user, E_item = model()
    u = torch.zeros(64, dtype=torch.long)
    got = distill_loss(model, E_user, E_item, Tutor(*H, *H), Batch(u, i, j, (u, i, j)), KD(**w, decay=0.0),
                       generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    users, items = sample_nodes(u, 32, gen), sample_nodes(torch.cat([i, j]), 32, gen)
    assert (items >= 64).any()
    bpr = bpr_loss(E_user, E_item, *model.E0.split([2, 128]), u, i, j, 0.0)[0]
    expect = (bpr + embedding_kd(E_user, E_item, *H, users, items, 0.1)
              + uniformity(dot_logits(E_user, E_item, users, items, 1.0)))
    torch.testing.assert_close(got, expect)


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
    S = Eu.clone().requires_grad_()
    prediction_kd(S, Ei, S.detach(), Ei, u, i1, i2, tau).backward()
    torch.testing.assert_close(S.grad, torch.zeros_like(S))


def test_embedding_kd_anchors_on_the_tutor_with_all_model_embeddings_below():
    g = torch.Generator().manual_seed(1)
    Eu, Ei, Hu, Hi = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (3, 5, 3, 5))
    users, items, tau = torch.tensor([0, 2]), torch.tensor([1, 3, 4]), 0.1

    def nce(H, E, idx):
        # −log exp(cos(h_v, e_v)/τ) / Σ_w exp(cos(h_v, e_w)/τ), w over the model's embeddings
        total = 0.0
        for v in idx:
            sims = [F.cosine_similarity(H[v], E[w], dim=0).item() / tau for w in range(len(E))]
            total -= sims[v] - math.log(sum(math.exp(x) for x in sims))
        return total / len(idx)

    got = embedding_kd(Eu, Ei, Hu, Hi, users, items, tau).item()
    assert got == pytest.approx(nce(Hu, Eu, users) + nce(Hi, Ei, items), rel=1e-9)
    assert got != pytest.approx(nce(Eu, Hu, users) + nce(Ei, Hi, items), rel=1e-3)     # the other direction
    eye = torch.eye(4, dtype=torch.float64)
    assert info_nce(eye, eye, torch.arange(4), tau=0.01).item() < 1e-30


def test_uniformity_is_the_four_official_terms_on_raw_dot_products():
    g = torch.Generator().manual_seed(2)
    Eu, Ei = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    users, items, tau = torch.tensor([0, 1]), torch.tensor([2, 4]), 0.7

    def term(A, idx, B):
        return sum(math.log(sum(math.exp(A[a] @ B[b] / tau) for b in range(len(B)))) for a in idx) / len(idx)

    expect = term(Eu, users, Ei) + term(Ei, items, Eu) + term(Eu, users, Eu) + term(Ei, items, Ei)
    assert uniformity(dot_logits(Eu, Ei, users, items, tau)).item() == pytest.approx(expect, rel=1e-9)


def test_subspace_uniformity_equals_formula():
    g = torch.Generator().manual_seed(3)
    Eu, Ei = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    Mu, Mi = (torch.rand(3, 4, generator=g) > 0.4).double(), (torch.rand(5, 4, generator=g) > 0.4).double()
    users, items, tau, loosen = torch.tensor([0, 2]), torch.tensor([1, 3]), 0.5, 1

    def term(EA, MA, idx, EB, MB):
        total = 0.0
        for a in idx:
            logits = [EA[a] @ EB[b] / tau for b in range(len(EB))]
            lse = math.log(sum(math.exp(x) for x in logits))
            for b in range(len(EB)):
                o = MA[a] @ MB[b]
                if o >= MA[a].sum() - loosen and o >= MB[b].sum() - loosen:
                    total -= float(logits[b]) - lse
        return total / len(idx)

    expect = (term(Eu, Mu, users, Ei, Mi) + term(Ei, Mi, items, Eu, Mu) + term(Eu, Mu, users, Eu, Mu)
              + term(Ei, Mi, items, Ei, Mi))
    got = subspace_uniformity(dot_logits(Eu, Ei, users, items, tau), Mu, Mi, users, items, loosen).item()
    assert got == pytest.approx(expect, rel=1e-9)


def test_pipeline_with_a_stub_fit():
    rng = np.random.default_rng(0)
    n_users, n_items = 12, 15
    train = np.unique(np.stack([rng.integers(0, n_users, 90), rng.integers(0, n_items, 90)], 1), axis=0)
    data = SimpleNamespace(n_users=n_users, n_items=n_items, train=train)
    hp = SimpleNamespace(seed=0, dim=8, decay=1e-4, epochs=1, teacher_layers=3, mid_layers=2, mid_topk=3,
                         student_layers=2, mid_epochs=1, round_epochs=1, rounds=2, rho=0.15, rho_emb=0.2,
                         prune="learned", beta1=0.05, beta2=1.0, kd_pred=1.0, kd_tau=0.03, kd_emb=0.01,
                         kd_emb_tau=0.1, uni=1.0, uni_tau=1.0, sub=1e-4, kd_nodes=16, kd_triples=50)
    stages, rows = [], []

    def fit(stage):
        """One epoch of Adam over the training pairs, one batch, a negative per pair (may hit a positive)."""
        opt = torch.optim.Adam(stage.model.parameters(), lr=1e-2)
        u, i = torch.from_numpy(stage.data.train).T
        loss = stage.loss(u, i, torch.randint(n_items, u.shape))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if stage.after_step is not None:
            stage.after_step()
        stages.append((stage.name, stage.epochs, loss.item()))
        return {"train_seconds": 1.0}

    def report(name, E_user, E_item, seconds, edges, entries, cost):
        assert E_user.shape == (n_users, 8) and E_item.shape == (n_items, 8)
        rows.append((name, edges, entries, cost))

    student = lightgnn.run(data, hp, fit, report)
    assert [s for s, _, _ in stages] == ["teacher", "intermediate", "student_round0", "student_round1",
                                         "student_round2"]
    assert all(math.isfinite(l) for _, _, l in stages)
    assert [r[0] for r in rows] == ["teacher", "intermediate", "student round 0", "student round 1", "student round 2"]
    E = len(train)
    kept1 = E - int(0.15 * E)
    assert rows[3][1] == pytest.approx(kept1 / E) and rows[4][1] == pytest.approx((kept1 - int(0.15 * kept1)) / E)
    assert rows[1][1] > 1 and rows[4][2] < rows[3][2] < 1 and rows[4][3] < rows[2][3] < 1
    assert int(student.edge_mask.sum()) == kept1 - int(0.15 * kept1)
