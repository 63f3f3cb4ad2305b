"""Recommender evaluation and sampling: the test ranking excludes training AND validation items (against a
brute-force ranking loop), and the negatives BPR trains on are uniform over each user's non-positives
(chi-square with a fixed seed)."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from lightgcn import Interactions, LightGCN, NegativeSampler, Stage
from train_rec import RecConfig, fit, report


def brute_force_metrics(E_user, E_item, truth, exclude, k):
    """Recall@k and NDCG@k by sorting each user's items in Python: excluded items are not ranked at all."""
    truth_of, excluded = {}, set(map(tuple, np.concatenate(exclude).tolist()))
    for u, i in truth.tolist():
        truth_of.setdefault(u, set()).add(i)
    recalls, ndcgs = [], []
    for u, items in sorted(truth_of.items()):
        candidates = [i for i in range(len(E_item)) if (u, i) not in excluded]
        ranked = sorted(candidates, key=lambda i: -float(E_user[u] @ E_item[i]))[:k]
        hits = [i in items for i in ranked]
        recalls.append(sum(hits) / len(items))
        dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
        ndcgs.append(dcg / sum(1 / math.log2(r + 2) for r in range(min(len(items), k))))
    return sum(recalls) / len(recalls), sum(ndcgs) / len(ndcgs)


def test_test_ranking_excludes_train_and_val_items_hand_case():
    # one user who loves item 0 (train), then 1 (val), then 2 (test), then 3..5
    E_user = torch.tensor([[1.0]])
    E_item = torch.tensor([[6.0], [5.0], [4.0], [3.0], [2.0], [1.0]])
    data = Interactions(1, 6, train=np.array([[0, 0]]), val=np.array([[0, 1]]), test=np.array([[0, 2]]))
    val, test = report(RecConfig(topk=1), data, E_user, E_item)
    assert val["recall@1"] == 1.0          # val: the train item is out, the val item is first
    assert test["recall@1"] == 1.0         # test: train AND val items are out; with the val item left in it is 0


def test_report_equals_brute_force_ranking():
    rng = np.random.default_rng(0)
    n_users, n_items, k = 9, 30, 5
    pairs = np.unique(np.stack([rng.integers(0, n_users, 160), rng.integers(0, n_items, 160)], 1), axis=0)
    part = rng.integers(0, 3, len(pairs))                 # 0 train, 1 val, 2 test
    train, val, test = (pairs[part == p] for p in range(3))
    data = Interactions(n_users, n_items, train, val, test)
    g = torch.Generator().manual_seed(0)
    # embeddings that like the validation items: leaving them in the test ranking would change the test metrics
    E_user, E_item = torch.randn(n_users, 4, generator=g), torch.randn(n_items, 4, generator=g)
    for u, i in val:
        E_item[i] += 0.5 * E_user[u]
    got_val, got_test = report(RecConfig(topk=k, eval_batch=4), data, E_user, E_item)
    expect_val = brute_force_metrics(E_user, E_item, val, [train], k)
    expect_test = brute_force_metrics(E_user, E_item, test, [train, val], k)
    assert (got_val["recall@5"], got_val["ndcg@5"]) == pytest.approx(expect_val, rel=1e-5)
    assert (got_test["recall@5"], got_test["ndcg@5"]) == pytest.approx(expect_test, rel=1e-5)
    # the case discriminates: ranking the val items in the test split gives other numbers
    leaky = brute_force_metrics(E_user, E_item, test, [train], k)
    assert abs(leaky[0] - expect_test[0]) > 0.01


# ----------------------------------------------------------------------------- negatives

N_USERS, N_ITEMS = 6, 24


def positives():
    """Each user has 5..12 positives spread over all the items (so every user has non-positives in both halves)."""
    rng = np.random.default_rng(1)
    pairs = [(u, i) for u in range(N_USERS) for i in rng.choice(N_ITEMS, 5 + u, replace=False)]
    return np.array(sorted(pairs), dtype=np.int64)


def uniformity_pvalue(u, j, train):
    """Chi-square over every (user, non-positive item) cell: each user's negatives uniform over its non-positives.
    The per-user statistics and degrees of freedom add up; any draw of a positive fails outright."""
    counts = np.zeros((N_USERS, N_ITEMS))
    np.add.at(counts, (u.numpy(), j.numpy()), 1)
    is_pos = np.zeros((N_USERS, N_ITEMS), bool)
    is_pos[train[:, 0], train[:, 1]] = True
    assert counts[is_pos].sum() == 0, "a negative hit a training positive"
    stat, dof = 0.0, 0
    for user in range(N_USERS):
        c = counts[user, ~is_pos[user]]
        e = c.sum() / len(c)
        stat += ((c - e) ** 2 / e).sum()
        dof += len(c) - 1
    return chi2.sf(stat, dof)


def test_negative_sampler_is_uniform_over_the_non_positives():
    train = positives()
    sampler = NegativeSampler(train, N_ITEMS)
    u = torch.arange(N_USERS).repeat_interleave(3000)
    j = sampler(u, torch.Generator().manual_seed(0))
    assert uniformity_pvalue(u, j, train) > 1e-3
    # power: a sampler that leaves out one item per user (drawn among the first n_items - 1) is rejected
    cut = j.clone()
    for user in range(N_USERS):
        mine = u == user
        cut[mine] = NegativeSampler(train[train[:, 0] == user], N_ITEMS - 1)(u[mine], torch.Generator().manual_seed(1))
    assert uniformity_pvalue(u, cut, train) < 1e-6


def test_negatives_the_training_loop_uses_are_uniform(tmp_path):
    """fit() builds its own sampler: the j it hands to the loss, over 60 epochs, are uniform per user."""
    train = positives()
    data = Interactions(N_USERS, N_ITEMS, train, val=train[:N_USERS], test=train[:N_USERS])
    torch.manual_seed(0)
    model = LightGCN(N_USERS, N_ITEMS, dim=2, n_layers=0)
    seen_u, seen_j = [], []

    def loss_fn(u, i, j):
        seen_u.append(u)
        seen_j.append(j)
        return model.E0.sum() * 0                 # nothing to learn: only the draws matter

    cfg = RecConfig(batch_size=64, eval_every=60, lr=0.0, seed=3)
    fit(cfg, Stage("t", model, loss_fn, lambda: model.E0.split([N_USERS, N_ITEMS]), data, epochs=60), str(tmp_path))
    u, j = torch.cat(seen_u), torch.cat(seen_j)
    assert len(u) == 60 * len(train)
    assert uniformity_pvalue(u, j, train) > 1e-3
