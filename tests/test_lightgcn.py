import math
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightgcn import (DataError, Graph, LightGCN, NegativeSampler, bpr_loss, evaluate, load_lightgcn_dir,
                      load_movielens_zip, ranking_metrics, read_lightgcn_file, split_per_user)

EDGES = np.array([[0, 0], [0, 2], [1, 1], [2, 0], [2, 1], [2, 3]])  # 3 users, 4 items


def dense_adjacency(n_users, n_items, edges, weight=None, self_loops=False):
    N = n_users + n_items
    A = torch.zeros(N, N, dtype=torch.float64)
    w = torch.ones(len(edges), dtype=torch.float64) if weight is None else weight
    for e, (u, i) in enumerate(edges):
        A[u, n_users + i] = w[e]
        A[n_users + i, u] = w[e]
    if self_loops:
        A = A + torch.eye(N, dtype=torch.float64)
    d = A.sum(1)
    d_inv_sqrt = torch.where(d > 0, d.pow(-0.5), torch.zeros_like(d))
    return d_inv_sqrt[:, None] * A * d_inv_sqrt[None, :]


@pytest.mark.parametrize("self_loops", [False, True])
def test_normalized_adjacency_equals_dense_formula(self_loops):
    got = Graph(3, 4, EDGES, self_loops).normalized().to_dense().double()
    torch.testing.assert_close(got, dense_adjacency(3, 4, EDGES, self_loops=self_loops), rtol=1e-6, atol=1e-7)


def test_weighted_adjacency_is_the_fixed_normalised_one_times_the_weights():
    # 3 users, 4 items (+ self-loops): Â stays norm(A + I) computed once; a weight per nonzero (each direction
    # and each self-loop its own) multiplies its entry, so zeroing the weight of u0->i0 moves no other entry
    g = Graph(3, 4, EDGES, self_loops=True)
    A_hat = g.normalized()
    fixed = dense_adjacency(3, 4, EDGES, self_loops=True)
    w = torch.ones(len(g.col), dtype=torch.float64)
    w[(g.row == 0) & (g.col == 3 + 0)] = 0.0
    got = g.weighted(A_hat.to(torch.float64), w).to_dense()
    expect = fixed.clone()
    expect[0, 3] = 0.0
    torch.testing.assert_close(got, expect)            # i0->u0 and u0's other entries (u0->i2) unchanged
    # asymmetric weights: Â ⊙ W and its gradients (in W and in E) match the dense formula
    gen = torch.Generator().manual_seed(0)
    w = (torch.rand(len(g.col), generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    E = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    W_dense = torch.zeros(7, 7, dtype=torch.float64)
    W_dense[g.row, g.col] = w.detach()
    A64 = A_hat.to(torch.float64)
    torch.testing.assert_close(g.weighted(A64, w).to_dense(), fixed * W_dense)
    target = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    ((g.weighted(A64, w) @ E) * target).sum().backward()
    w2, E2 = w.detach().clone().requires_grad_(), E.detach().clone().requires_grad_()
    Wd = torch.zeros(7, 7, dtype=torch.float64).index_put((g.row, g.col), w2)
    (((fixed * Wd) @ E2) * target).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(E.grad, E2.grad)
    assert torch.autograd.gradcheck(lambda w, e: g.weighted(A64, w) @ e, (w.detach().requires_grad_(), E))


@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_propagation_equals_dense_matrix_powers(combine):
    torch.manual_seed(0)
    model = LightGCN(3, 4, dim=5, n_layers=3, combine=combine)
    A = dense_adjacency(3, 4, EDGES).float()
    layers = [torch.linalg.matrix_power(A, k) @ model.E0 for k in range(4)]
    expect = sum(layers) / (4 if combine == "mean" else 1)
    got = model.propagate(Graph(3, 4, EDGES).normalized())
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


def test_symmetric_spmm_gradient_matches_dense():
    A = Graph(3, 4, EDGES, self_loops=True).normalized()
    model = LightGCN(3, 4, dim=5, n_layers=2)
    target = torch.randn(7, 5)
    (model.propagate(A) * target).sum().backward()
    g_sparse = model.E0.grad.clone()
    model.E0.grad = None
    Ad = A.to_dense()
    (model.propagate(Ad) * target).sum().backward()
    torch.testing.assert_close(g_sparse, model.E0.grad, rtol=1e-5, atol=1e-6)
    E = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    A64 = torch.sparse_csr_tensor(A.crow_indices(), A.col_indices(), A.values().double(), A.shape)
    from lightgcn import SymmetricSpMM
    assert torch.autograd.gradcheck(lambda e: SymmetricSpMM.apply(A64, e), (E,))


def test_bpr_loss_equals_formula():
    g = torch.Generator().manual_seed(0)
    Eu, Ei, E0u, E0i = (torch.randn(n, 4, generator=g) for n in (3, 5, 3, 5))
    u, i, j = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 1, 2])
    bpr, l2 = bpr_loss(Eu, Ei, E0u, E0i, u, i, j, decay=1e-2)
    expect_bpr = sum(-math.log(1 / (1 + math.exp(-((Eu[a] @ Ei[b]) - (Eu[a] @ Ei[c])).item())))
                     for a, b, c in zip(u, i, j)) / 4
    expect_l2 = 1e-2 * 0.5 * sum((E0u[a] @ E0u[a] + E0i[b] @ E0i[b] + E0i[c] @ E0i[c]).item()
                                 for a, b, c in zip(u, i, j)) / 4
    assert math.isclose(bpr.item(), expect_bpr, rel_tol=1e-5)
    assert math.isclose(l2.item(), expect_l2, rel_tol=1e-5)


def test_negatives_never_hit_a_training_positive():
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 20
    pairs = np.unique(np.stack([rng.integers(0, n_users, 700), rng.integers(0, n_items, 700)], 1), axis=0)
    sampler = NegativeSampler(pairs, n_items)
    positives = {(int(u), int(i)) for u, i in pairs}
    u = torch.from_numpy(np.repeat(np.arange(n_users), 40))
    j = sampler(u, torch.Generator().manual_seed(0))
    assert not any((int(a), int(b)) in positives for a, b in zip(u, j))
    assert len(set(j.tolist())) > n_items // 2  # and they are spread over the items, not a constant
    with pytest.raises(DataError, match="every item"):
        NegativeSampler(np.array([[0, 0], [0, 1]]), 2)


def test_recall_ndcg_hand_computed():
    # user 0: test items {1, 3}; ranking by score: 3, 0, 1, 2 -> hits at ranks 0 and 2
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.9], [0.9, 0.8, 0.7, 0.1]])
    truth = torch.tensor([[False, True, False, True], [False, False, False, True]])
    recall, ndcg = ranking_metrics(scores, truth, k=3)
    assert recall.tolist() == [1.0, 0.0]
    dcg = 1 / math.log2(2) + 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert math.isclose(ndcg[0].item(), dcg / idcg, rel_tol=1e-6) and ndcg[1].item() == 0.0
    # IDCG uses min(|test|, K): a single test item ranked 2nd of K=3
    _, ndcg = ranking_metrics(torch.tensor([[0.9, 0.8, 0.1]]), torch.tensor([[False, True, False]]), k=3)
    assert math.isclose(ndcg.item(), 1 / math.log2(3), rel_tol=1e-6)


def test_training_items_are_masked_at_evaluation():
    # one user, items 0..3; the model loves item 0 and 1 (training items), then 2, then the test item 3
    E_user = torch.tensor([[1.0]])
    E_item = torch.tensor([[4.0], [3.0], [2.0], [1.0]])
    test, train = np.array([[0, 3]]), np.array([[0, 0], [0, 1]])
    assert evaluate(E_user, E_item, test, [train], k=2)["recall@2"] == 1.0
    assert evaluate(E_user, E_item, test, [], k=2)["recall@2"] == 0.0
    assert evaluate(E_user, E_item, test, [train, np.array([[0, 2]])], k=1)["recall@1"] == 1.0


def test_held_out_splits_must_not_overlap_train_and_an_empty_split_is_a_clear_error(tmp_path):
    (tmp_path / "train.txt").write_text("0 1 2 3\n1 0 2\n")
    (tmp_path / "test.txt").write_text("0 4\n1 3 2\n")
    with pytest.raises(DataError, match=r"test.txt:2: user 1 item 2 is also in train.txt"):
        load_lightgcn_dir(str(tmp_path))
    (tmp_path / "test.txt").write_text("0 4\n1 3\n")
    (tmp_path / "val.txt").write_text("1 1\n0 1\n")
    with pytest.raises(DataError, match=r"val.txt:2: user 0 item 1 is also in train.txt"):
        load_lightgcn_dir(str(tmp_path))
    (tmp_path / "val.txt").unlink()
    data = load_lightgcn_dir(str(tmp_path), val_frac=0.0)        # no validation split: empty, no crash
    assert len(data.val) == 0 and len(data.train) == 5 and data.n_items == 5
    with pytest.raises(DataError, match="nothing to evaluate"):
        evaluate(torch.ones(2, 3), torch.ones(5, 3), data.val, [data.train])


@pytest.mark.parametrize("content, message", [
    ("0 1 2\n1 x 3\n", "train.txt:2: ids must be integers"),
    ("0 1 2\n1 -3\n", "train.txt:2: ids must be >= 0"),
    ("", "train.txt: no interactions"),
])
def test_malformed_lightgcn_files(tmp_path, content, message):
    (tmp_path / "train.txt").write_text(content)
    (tmp_path / "test.txt").write_text("0 3\n")
    with pytest.raises(DataError, match=message):
        load_lightgcn_dir(tmp_path)


def test_test_user_unknown_to_train(tmp_path):
    (tmp_path / "train.txt").write_text("0 1 2\n1 2 3\n")
    (tmp_path / "test.txt").write_text("0 3\n1 1\n5 2\n")
    with pytest.raises(DataError, match="test.txt:3: user 5 has no training interactions"):
        load_lightgcn_dir(tmp_path)


def test_read_collapses_duplicates(tmp_path):
    (tmp_path / "f.txt").write_text("0 1 1 2\n\n0 2\n")
    assert read_lightgcn_file(tmp_path / "f.txt").tolist() == [[0, 1], [0, 2]]


def test_movielens_zip_and_its_errors(tmp_path):
    path = tmp_path / "ml.zip"
    rows = ["userId,movieId,rating,timestamp"] + [f"{10 + u},{100 + i},{1 + (u + i) % 5}.0,0"
                                                   for u in range(6) for i in range(u, u + 12)]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ml/ratings.csv", "\n".join(rows) + "\n")
    data = load_movielens_zip(path, min_rating=0.0, seed=1)
    assert data.n_users == 6 and data.n_items == 17
    assert len(data.train) + len(data.val) + len(data.test) == 72
    only_high = load_movielens_zip(path, min_rating=4.0, seed=1)
    assert len(only_high.train) + len(only_high.val) + len(only_high.test) == sum(
        1 for u in range(6) for i in range(u, u + 12) if 1 + (u + i) % 5 >= 4)
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as z:
        z.writestr("ratings.csv", "userId,movieId,rating\n1,2,3.0\n1,abc,4\n")
    with pytest.raises(DataError, match="ratings.csv:3: malformed row"):
        load_movielens_zip(tmp_path / "bad.zip")
    (tmp_path / "corrupt.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a valid zip"):
        load_movielens_zip(tmp_path / "corrupt.zip")


def test_split_per_user_is_a_seeded_partition():
    rng = np.random.default_rng(0)
    pairs = np.unique(np.stack([rng.integers(0, 30, 900), rng.integers(0, 100, 900)], 1), axis=0)
    train, val, test = split_per_user(pairs, [0.1, 0.2], seed=3)
    key = lambda p: set(map(tuple, p.tolist()))
    assert key(train) | key(val) | key(test) == key(pairs)
    assert len(train) + len(val) + len(test) == len(pairs)
    for u in range(30):
        n = (pairs[:, 0] == u).sum()
        assert (test[:, 0] == u).sum() == int(0.2 * n) and (val[:, 0] == u).sum() == int(0.1 * n)
    again = split_per_user(pairs, [0.1, 0.2], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    assert not np.array_equal(test, split_per_user(pairs, [0.1, 0.2], seed=4)[2])
