import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightgcn import DataError, Graph, Interactions, LightGCN, bpr_loss, evaluate
from unlearnrec import (FineTuneOnly, InfluenceEncoder, align_loss, auc, fine_tune, held_out_pairs, least_liked_items,
                        membership_auc, never_seen_pairs, random_requests, read_requests, remove_edges,
                        request_adjacency, score_report, snapshot_budgets, ssl_loss, unlearn_loss, unlearn_pipeline)

EDGES = np.array([[0, 0], [0, 1], [1, 1], [1, 2], [2, 0], [2, 1], [2, 3], [3, 3]])  # 4 users, 4 items
NU, NI = 4, 4


def write(tmp_path, text):
    p = tmp_path / "forget.txt"
    p.write_text(text)
    return str(p)


def test_request_adjacency_holds_only_request_edges():
    req = EDGES[[1, 6]]                                         # (0, 1), (2, 3)
    A = request_adjacency(req, NU, NI).to_dense()
    nz = {tuple(x) for x in A.nonzero().tolist()}
    assert nz == {(0, NU + 1), (NU + 1, 0), (2, NU + 3), (NU + 3, 2)}
    # each request edge is its nodes' only link: normalised weight 1
    assert torch.all(A[A != 0] == 1)


def test_remaining_graph_has_no_request_edge():
    req = EDGES[[0, 3, 7]]
    rest = remove_edges(EDGES, req)
    assert {tuple(e) for e in rest} == {tuple(e) for e in EDGES} - {tuple(e) for e in req}
    A_r = Graph(NU, NI, rest, self_loops=True).normalized().to_dense()
    for u, i in req:
        assert A_r[u, NU + i] == 0 and A_r[NU + i, u] == 0
    for u, i in rest:
        assert A_r[u, NU + i] > 0


def test_encoder_is_identity_with_zero_h0_and_eta():
    torch.manual_seed(0)
    enc = InfluenceEncoder(NU + NI, 5, n_layers=3, eta0=0.0)
    E0, E_L = torch.randn(NU + NI, 5), torch.randn(NU + NI, 5)
    A_delta = request_adjacency(EDGES[[1, 6]], NU, NI)
    assert torch.equal(enc(A_delta, E0, E_L), E0)
    # and it is not the identity once η moves: only the request edges' endpoints change
    with torch.no_grad():
        enc.eta.fill_(1.0)
    changed = (enc(A_delta, E0, E_L) != E0).any(1).nonzero().squeeze(1).tolist()
    assert changed == [0, 2, NU + 1, NU + 3]


def test_encoder_equals_its_equations():
    torch.manual_seed(1)
    L, omega = 2, 0.3
    enc = InfluenceEncoder(NU + NI, 4, n_layers=L, eta0=0.5, omega=omega)
    with torch.no_grad():
        enc.H0.normal_()
        enc.eta.uniform_()
        enc.mlp.weight.normal_()
        enc.mlp.bias.normal_()
    E0, E_L = torch.randn(NU + NI, 4), torch.randn(NU + NI, 4)
    A = request_adjacency(EDGES[[0, 4, 5]], NU, NI)
    Ad = A.to_dense()
    H = sum(torch.linalg.matrix_power(Ad, l) @ enc.H0 for l in range(L + 1))
    W = torch.linalg.matrix_power(Ad, L) @ (E_L * enc.eta)
    expect = E0 + enc.mlp(-omega * W + H)
    torch.testing.assert_close(enc(A, E0, E_L), expect, rtol=1e-5, atol=1e-6)


def test_a_few_steps_of_unlearn_loss_lower_the_forgotten_scores():
    torch.manual_seed(0)
    model = LightGCN(NU, NI, dim=8, n_layers=2).requires_grad_(False)
    E0_before = model.E0.clone()
    req = EDGES[[1, 6]]
    rest = remove_edges(EDGES, req)
    A_delta, A_r = request_adjacency(req, NU, NI), Graph(NU, NI, rest).normalized()
    with torch.no_grad():
        E_L = model.propagate(Graph(NU, NI, EDGES).normalized())
    enc = InfluenceEncoder(NU + NI, 8, n_layers=2)
    opt = torch.optim.Adam(enc.parameters(), lr=0.01)
    req_t = torch.from_numpy(req)

    def forgotten_scores():
        E_user, E_item = model.propagate(A_r, enc(A_delta, model.E0, E_L)).split([NU, NI])
        return (E_user[req_t[:, 0]] * E_item[req_t[:, 1]]).sum(-1), E_user, E_item

    before = forgotten_scores()[0].detach()
    for _ in range(10):
        _, E_user, E_item = forgotten_scores()
        loss = unlearn_loss(E_user, E_item, req_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = forgotten_scores()[0].detach()
    assert torch.all(after < before) and (before - after).mean() > 0.05, (before, after)
    assert torch.equal(model.E0, E0_before)                          # the base model is never changed


def test_losses_equal_their_formulas():
    g = torch.Generator().manual_seed(0)
    Eu, Ei, Ou, Oi = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (4, 4, 4, 4))
    req = torch.tensor([[0, 1], [2, 3]])
    expect = -np.mean([np.log(1 / (1 + np.exp((Eu[u] @ Ei[i]).item()))) for u, i in req.tolist()])
    assert unlearn_loss(Eu, Ei, req).item() == pytest.approx(expect, rel=1e-9)
    u, i, tau = torch.tensor([0, 1, 3]), torch.tensor([2, 0, 1]), 2.0
    expect = 0.0
    for b in range(3):
        new = [(Eu[u[b]] @ Ei[i[c]]).item() / tau for c in range(3)]
        old = [(Ou[u[b]] @ Oi[i[c]]).item() / tau for c in range(3)]
        ln = np.array(new) - np.log(np.exp(new).sum())
        lo = np.array(old) - np.log(np.exp(old).sum())
        expect += ((ln - lo) ** 2).sum() / 3
    assert align_loss(Eu, Ei, Ou, Oi, u, i, tau).item() == pytest.approx(expect, rel=1e-9)
    assert align_loss(Eu, Ei, Eu, Ei, u, i, tau).item() == 0


def test_bad_requests_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"forget.txt:2: unknown user 9"):
        read_requests(write(tmp_path, "0 0\n9 1\n"), EDGES, NU, NI)
    with pytest.raises(DataError, match=r"forget.txt:1: unknown item 7"):
        read_requests(write(tmp_path, "0 7\n"), EDGES, NU, NI)
    with pytest.raises(DataError, match=r"forget.txt:1: \(0, 3\) is not a training interaction"):
        read_requests(write(tmp_path, "0 3\n"), EDGES, NU, NI)
    with pytest.raises(DataError, match=r"forget.txt:1: expected `user item`"):
        read_requests(write(tmp_path, "0,1\n"), EDGES, NU, NI)
    with pytest.raises(DataError, match="no unlearning requests"):
        read_requests(write(tmp_path, "# nothing\n\n"), EDGES, NU, NI)
    with pytest.raises(DataError, match="cannot read"):
        read_requests(str(tmp_path / "missing.txt"), EDGES, NU, NI)
    got = read_requests(write(tmp_path, "2 3\n0 1  # a comment\n2 3\n\n"), EDGES, NU, NI)
    assert got.tolist() == [[0, 1], [2, 3]]                      # duplicates collapsed


def test_random_requests_and_never_seen_pairs():
    rng = np.random.default_rng(0)
    req = random_requests(EDGES, 0.25, rng)
    assert len(req) == 2 and all(tuple(r) in {tuple(e) for e in EDGES} for r in req)
    unseen = never_seen_pairs(5, [EDGES], NU, NI, rng)
    assert len(unseen) == 5 and len({tuple(p) for p in unseen}) == 5
    assert not {tuple(p) for p in unseen} & {tuple(e) for e in EDGES}


def test_auc_equals_a_hand_computed_example():
    # pairs (pos > neg): 3 vs {1, 2, 3}: 1 + 1 + ½;  2 vs {1, 2, 3}: 1 + ½ + 0;  0 vs all: 0  ->  4 / 9
    assert auc([3, 2, 0], [1, 2, 3]) == pytest.approx(4 / 9)
    assert auc([5, 6], [1, 2]) == 1.0 and auc([1], [1]) == 0.5


def test_least_liked_items_equal_a_naive_loop():
    g = torch.Generator().manual_seed(3)
    Eu, Ei = torch.randn(NU, 3, generator=g), torch.randn(NI, 3, generator=g)
    users, held_out = np.array([0, 2, 3]), np.array([[3, 0]])
    got = least_liked_items(Eu, Ei, users, [EDGES, held_out])
    seen = {tuple(e) for e in EDGES} | {(3, 0)}
    expect = [[u, min((i for i in range(NI) if (u, i) not in seen), key=lambda i: (Eu[u] @ Ei[i]).item())]
              for u in users]
    assert got.tolist() == expect


# ----------------------------------------------------------------------------- membership, baseline, pipeline

def preference_graph(seed=0, nu=150, ni=60, per_user=20):
    """Each user picks per_user items with P ∝ exp(1.5 u·v) (latent factors), split at random per interaction:
    60 % train, 15 % to forget, 25 % held out. Forgotten and held-out pairs are exchangeable."""
    rng = np.random.default_rng(seed)
    U, V = rng.normal(size=(nu, 4)), rng.normal(size=(ni, 4))
    pairs = []
    for u in range(nu):
        p = np.exp(1.5 * U[u] @ V.T)
        pairs += [(u, i) for i in rng.choice(ni, per_user, replace=False, p=p / p.sum())]
    pairs = np.array(pairs)
    r = rng.random(len(pairs))
    return pairs[r < 0.6], pairs[(r >= 0.6) & (r < 0.75)], pairs[r >= 0.75]


def train_toy(edges, nu, ni, steps=100, seed=0):
    """Full-batch BPR on a 2-layer LightGCN, dim 16: enough to fit (and memorise) the toy graph."""
    torch.manual_seed(seed)
    A = Graph(nu, ni, edges).normalized()
    model = LightGCN(nu, ni, 16, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(seed)
    u, i = torch.from_numpy(edges).T
    for _ in range(steps):
        E_user, E_item = model(A)
        bpr, l2 = bpr_loss(E_user, E_item, *model.E0.split([nu, ni]), u, i, torch.randint(ni, u.shape, generator=gen),
                           1e-4)
        opt.zero_grad()
        (bpr + l2).backward()
        opt.step()
    return model


def test_membership_auc_is_half_for_a_model_that_never_saw_the_edges():
    train, forget, held = preference_graph()
    nu, ni = 150, 60
    negatives = never_seen_pairs(len(forget), [train, forget, held], nu, ni, np.random.default_rng(0))
    both = np.concatenate([train, forget])
    m_never, m_saw = train_toy(train, nu, ni), train_toy(both, nu, ni)
    with torch.no_grad():
        never = score_report(*m_never(Graph(nu, ni, train).normalized()), forget, held, negatives)
        saw = score_report(*m_saw(Graph(nu, ni, both).normalized()), forget, held, negatives)
    # ~460 forgotten vs ~760 held-out pairs: the AUC's standard error is ~0.017
    assert abs(never["mia_auc"] - 0.5) < 0.06, never["mia_auc"]
    assert saw["mia_auc"] > 0.75, saw["mia_auc"]
    # random never-seen pairs would have measured preference instead: the model that never saw the edges
    # still tells them apart (the old definition of the test)
    assert auc([never["forgotten"]["mean"]], [never["negatives"]["mean"]]) == 1.0
    assert never["held_out"]["mean"] > never["negatives"]["mean"] + 0.5


def test_score_report_keeps_a_bounded_evenly_spaced_sample_of_the_scores():
    g = torch.Generator().manual_seed(0)
    E_user, E_item = torch.randn(50, 4, generator=g), torch.randn(40, 4, generator=g)
    pairs = np.stack(np.meshgrid(np.arange(50), np.arange(40), indexing="ij"), -1).reshape(-1, 2)   # 2000 pairs
    r = score_report(E_user, E_item, pairs[:30], pairs[30:1021], pairs, n_sample=100)
    every = (E_user[pairs[:, 0]] * E_item[pairs[:, 1]]).sum(-1).numpy()
    assert np.array_equal(r["scores"]["forgotten"], every[:30])                     # fewer than 100: all of them
    assert np.array_equal(r["scores"]["held_out"], every[30:1021][::10])            # 991 pairs: every 10th
    negatives = r["scores"]["negatives"]
    assert len(negatives) == 100 and negatives[0] == every[0] and negatives[-1] == every[-1]
    assert r["negatives"]["mean"] == pytest.approx(every.mean(), rel=1e-5)          # the statistics use them all


def test_membership_auc_compares_within_users():
    # user 0 scores everything high, user 1 everything low; user 0 has most forgotten edges, user 1 most held-out
    # ones: pooled over users the AUC would be high, within each user the two sets are alike
    forgotten, s_f = np.array([[0, 1], [0, 2], [0, 3], [1, 1]]), np.array([9.0, 8.0, 7.0, 1.0])
    held, s_h = np.array([[0, 4], [1, 2], [1, 3], [1, 4]]), np.array([8.0, 0.0, 1.0, 2.0])
    assert auc(s_f, s_h) == 0.75
    # user 0: 9, 8, 7 vs 8 -> (1 + ½ + 0) / 3;  user 1: 1 vs 0, 1, 2 -> (1 + ½ + 0) / 3;  weights 3 and 1
    assert membership_auc(forgotten, s_f, held, s_h) == pytest.approx(0.5)
    # a user without held-out interactions is left out
    assert membership_auc(np.array([[0, 1], [2, 1]]), np.array([9.0, 0.0]), held[:1], s_h[:1]) == 1.0
    # no user with held-out interactions: one clear error, not a division by zero
    with pytest.raises(DataError, match="no user of the unlearning request has held-out"):
        membership_auc(np.array([[2, 1]]), np.array([9.0]), held, s_h)


def test_membership_auc_equals_the_per_user_loop_and_its_null_sd_the_mann_whitney_variance():
    rng = np.random.default_rng(0)
    forgotten = np.stack([rng.integers(0, 30, 400), rng.integers(0, 50, 400)], 1)
    held = np.stack([rng.integers(0, 35, 300), rng.integers(0, 50, 300)], 1)
    s_f, s_h = rng.integers(0, 6, 400).astype(float), rng.integers(0, 6, 300).astype(float)   # many ties
    total = weight = 0.0                                 # the definition, user by user
    for u in set(forgotten[:, 0]) & set(held[:, 0]):
        f = s_f[forgotten[:, 0] == u]
        total, weight = total + len(f) * auc(f, s_h[held[:, 0] == u]), weight + len(f)
    assert membership_auc(forgotten, s_f, held, s_h) == pytest.approx(total / weight, abs=1e-12)
    # one user, no ties: with shuffled labels AUC has variance (m + n + 1) / (12 m n) (Mann-Whitney)
    m, n = 40, 60
    value, sd = membership_auc(np.zeros((m, 2), int), rng.random(m), np.zeros((n, 2), int), rng.random(n),
                               null_draws=4000, rng=np.random.default_rng(1))
    assert sd == pytest.approx(((m + n + 1) / (12 * m * n)) ** 0.5, rel=0.05)


def test_chained_encoder_adds_no_request_independent_offset_again():
    """After a first request, E0 already holds Δ(∅); a chained encoder on an empty request returns E0 exactly, and
    code_of_no_request is code() on an empty Â_Δ, for both l = 0 choices and an encoder of depth 0."""
    g = torch.Generator().manual_seed(0)
    E0, E_L = torch.randn(NU + NI, 16, generator=g), torch.randn(NU + NI, 16, generator=g)
    empty = request_adjacency(EDGES[:0], NU, NI)
    for h0_all, layers in ((True, 2), (False, 2), (True, 0)):
        enc = InfluenceEncoder(NU + NI, 16, layers, h0_all=h0_all)
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))       # a trained-looking encoder: H0, η, MLP ≠ init
            torch.testing.assert_close(enc.code_of_no_request(E_L), enc.code(empty, E_L), rtol=0, atol=1e-6)
            assert (enc(empty, E0, E_L) - E0).abs().max() > 0.1           # the first request adds Δ(∅)
            enc.chained = True
            torch.testing.assert_close(enc(empty, E0, E_L), E0, rtol=0, atol=1e-5)
            A = request_adjacency(EDGES[[1, 6]], NU, NI)                   # a real request: Δ(A) − Δ(∅)
            enc.chained = False
            expect = enc(A, E0, E_L) - enc(empty, E0, E_L) + E0
            enc.chained = True
            torch.testing.assert_close(enc(A, E0, E_L), expect, rtol=0, atol=1e-5)


def test_the_pipeline_chains_the_encoder_from_the_second_request_on(monkeypatch):
    """With the test above: request 1 adds Δ(request) including Δ(∅), requests 2 and 3 only Δ(request) − Δ(∅)."""
    import unlearnrec
    chained, real = [], unlearnrec.fine_tune

    def recording(corrector, *args):
        if isinstance(corrector, InfluenceEncoder):
            chained.append((args[9], corrector.chained))
        return real(corrector, *args)
    monkeypatch.setattr(unlearnrec, "fine_tune", recording)
    toy_pipeline(sequence=3, retrain=False, finetune_epochs=0)
    assert chained == [("pretrain", False)] * 2 + [("unlearnrec1", False), ("unlearnrec2", True), ("unlearnrec3", True)]


def test_budget_snapshots_are_what_that_budget_trains_and_both_methods_see_the_same_batches(monkeypatch):
    """The 0-step row is the encoder applied untrained; the 1-epoch snapshot of a 2-epoch fine-tuning equals a
    1-epoch fine-tuning with the same seed. UnlearnRec and fine-tune-only get the same seed in the pipeline."""
    model = train_toy(EDGES, NU, NI, steps=50).requires_grad_(False)
    req = EDGES[[1, 6]]
    train_r = remove_edges(EDGES, req)
    with torch.no_grad():
        E_L = model.propagate(Graph(NU, NI, EDGES).normalized())
    monkeypatch.setattr(Cfg, "batch_size", 4)              # simple_fit's batches too
    data, cfg = Interactions(NU, NI, EDGES, EDGES[:0], EDGES[:0]), Cfg()
    per_epoch = -(-len(train_r) // 4)
    args = (model, model.E0, E_L, req, data, train_r, False, simple_fit, cfg, "t")
    torch.manual_seed(0)
    enc = InfluenceEncoder(NU + NI, 16, 2)
    start = {k: v.clone() for k, v in enc.state_dict().items()}
    _, _, _, taken = fine_tune(enc, *args, 2, 7, (0, 1, per_epoch))
    assert sorted(taken) == [0, 1, per_epoch]
    with torch.no_grad():
        untrained = InfluenceEncoder(NU + NI, 16, 2)
        untrained.load_state_dict(start)
        expect0 = model.propagate(Graph(NU, NI, train_r).normalized(), untrained(
            request_adjacency(req, NU, NI), model.E0, E_L))
    torch.testing.assert_close(taken[0][2], expect0, rtol=0, atol=0)
    one = InfluenceEncoder(NU + NI, 16, 2)
    one.load_state_dict(start)
    _, _, E1, none = fine_tune(one, *args, 1, 7, (0, 1, per_epoch))
    torch.testing.assert_close(taken[per_epoch][2], E1, rtol=0, atol=0)
    assert sorted(none) == [0, 1]                          # the end itself is returned, not as a snapshot
    import unlearnrec
    seeds, real = [], unlearnrec.fine_tune
    monkeypatch.setattr(unlearnrec, "fine_tune", lambda *a: (seeds.append((a[10], a[12])), real(*a))[1])
    toy_pipeline(sequence=1, retrain=False, pre_epochs=0)
    assert [n for n, _ in seeds] == ["unlearnrec1", "fine-tune-only1"] and seeds[0][1] == seeds[1][1]


def test_snapshots_every_fraction_of_an_epoch(monkeypatch):
    assert snapshot_budgets(80, 2) == {0: "0 steps", 1: "1 step", 80: "1 epoch"}
    assert snapshot_budgets(80, 2, 4) == {0: "0 steps", 1: "1 step", 20: "0.25 epoch", 40: "0.5 epoch",
                                          60: "0.75 epoch", 80: "1 epoch", 100: "1.25 epochs", 120: "1.5 epochs",
                                          140: "1.75 epochs"}
    assert snapshot_budgets(3, 1, 4) == {0: "0 steps", 1: "1 step", 2: "0.5 epoch"}  # 0.25 epoch = 1 step
    monkeypatch.setattr(Cfg, "snapshots_per_epoch", 2)
    _, _, out, _ = toy_pipeline(sequence=1, retrain=False, pre_epochs=0)
    rows = {r["model"]: r.get("steps") for r in out["steps"][0]["rows"]}
    n = rows["unlearnrec"] // 2                            # finetune_epochs = 2: steps of one epoch
    for method in ("unlearnrec", "fine-tune-only"):
        assert [(m, k) for m, k in rows.items() if m.startswith(method + " @")] == [
            (f"{method} @ 0 steps", 0), (f"{method} @ 1 step", 1), (f"{method} @ 0.5 epoch", round(n / 2)),
            (f"{method} @ 1 epoch", n), (f"{method} @ 1.5 epochs", round(3 * n / 2))]


def test_pretrained_control_sees_the_encoders_random_requests_and_starts_from_its_own_pretraining(monkeypatch):
    import unlearnrec
    calls, real = [], unlearnrec.fine_tune

    def recording(corrector, base, E0, E_L, requests, *rest):
        start = corrector.E0p.detach().clone() if isinstance(corrector, FineTuneOnly) else None
        calls.append((rest[5], requests, start, E_L))
        return real(corrector, base, E0, E_L, requests, *rest)
    monkeypatch.setattr(unlearnrec, "fine_tune", recording)
    data, base, out, _ = toy_pipeline(sequence=1, retrain=False, pretrain_control=True)
    by_name = {}
    for name, req, start, E_L in calls:
        by_name.setdefault(name, []).append((req, start, E_L))
    assert [len(by_name[n]) for n in ("pretrain", "pretrain-control")] == [2, 2]   # Cfg: 2 epochs, redrawn every 1
    for (r1, _, _), (r2, _, _) in zip(by_name["pretrain"], by_name["pretrain-control"]):
        assert np.array_equal(r1, r2)
    # the reference: FineTuneOnly pre-trained on its own with the same generator
    monkeypatch.setattr(unlearnrec, "fine_tune", real)
    with torch.no_grad():
        E_L = base.propagate(Graph(40, 30, data.train).normalized())
    control = FineTuneOnly(base.E0)
    cfg = Cfg()
    unlearnrec.pretrain(control, base, base.E0, E_L, data, False, simple_fit, cfg, np.random.default_rng([0, 1]))
    (_, start, E_L_used), = by_name["fine-tune-only, pre-trained1"]
    torch.testing.assert_close(start, control.E0p.detach(), rtol=0, atol=0)
    torch.testing.assert_close(E_L_used, E_L)                  # L_align still against the original model
    assert not torch.equal(start, base.E0)
    names = [r["model"] for r in out["steps"][0]["rows"]]
    assert names[-4:] == [f"fine-tune-only, pre-trained @ {b}" for b in ("0 steps", "1 step", "1 epoch")] + [
        "fine-tune-only, pre-trained"]


def test_held_out_pairs_are_the_request_users_val_and_test_items():
    val, test = np.array([[0, 2], [1, 3], [3, 0]]), np.array([[0, 3], [2, 2]])
    got = held_out_pairs(np.array([[0, 1], [3, 3], [0, 0]]), [val, test])
    assert sorted(map(tuple, got.tolist())) == [(0, 2), (0, 3), (3, 0)]


def toy_request():
    torch.manual_seed(0)
    model = LightGCN(NU, NI, dim=6, n_layers=2).requires_grad_(False)
    req = EDGES[[1, 6]]                                          # (0, 1), (2, 3): nodes 0, 2, NU+1, NU+3
    A_full, A_r = Graph(NU, NI, EDGES).normalized(), Graph(NU, NI, remove_edges(EDGES, req)).normalized()
    with torch.no_grad():
        E_L = model.propagate(A_full)
    return model, req, request_adjacency(req, NU, NI), A_r, E_L


def loss_of(corrector, model, req, A_delta, A_r, E_L):
    E0p = corrector(A_delta, model.E0, E_L)
    E_user, E_item = model.propagate(A_r, E0p).split([NU, NI])
    return (unlearn_loss(E_user, E_item, torch.from_numpy(req)) + (E_user.pow(2).sum() + E_item.sum()) * 1e-2
            + E0p.pow(2).sum() * 1e-3)


def test_h0_outside_the_request_is_fine_tune_only():
    """At the start (H0 = 0, MLP = I), H0's gradient on every node the request does not touch equals the gradient
    of fine-tuning E0 directly (h0_all=True, the l = 0 term); with h0_all=False it is zero there."""
    model, req, A_delta, A_r, E_L = toy_request()
    ft = FineTuneOnly(model.E0)
    torch.testing.assert_close(ft(A_delta, None, None), model.E0)    # starts at E0, ignores the request
    loss_of(ft, model, req, A_delta, A_r, E_L).backward()
    outside = [1, 3, NU + 0, NU + 2]
    inside = [0, 2, NU + 1, NU + 3]
    for h0_all in (True, False):
        enc = InfluenceEncoder(NU + NI, 6, n_layers=2, h0_all=h0_all)
        loss_of(enc, model, req, A_delta, A_r, E_L).backward()
        if h0_all:
            torch.testing.assert_close(enc.H0.grad[outside], ft.E0p.grad[outside])
        else:
            assert torch.all(enc.H0.grad[outside] == 0)
        assert not torch.allclose(enc.H0.grad[inside], ft.E0p.grad[inside])


def simple_fit(stage):
    """A minimal training loop with fit's contract: every epoch each training pair once, uniform negatives."""
    gen = torch.Generator().manual_seed(stage.seed)
    opt = torch.optim.Adam(stage.model.parameters(), lr=0.02)
    pairs = torch.from_numpy(stage.data.train)
    for _ in range(stage.epochs):
        for b in torch.randperm(len(pairs), generator=gen).split(Cfg.batch_size):
            u, i = pairs[b].T
            loss = stage.loss(u, i, torch.randint(stage.data.n_items, u.shape, generator=gen))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if stage.after_step is not None:
                stage.after_step()
    return {"train_seconds": 1.0}


class Cfg:
    forget, sequence, retrain, seed, batch_size, pretrain_control = "0.1", 2, True, 0, 64, False
    pre_epochs, pre_frac, redraw_every, finetune_epochs, snapshots_per_epoch = 2, 0.1, 1, 2, 1
    lambda_u, lambda_a, align_tau, align_pairs, lambda_ssl, ssl_tau = 1.0, 0.01, 1.0, 64, 0.0, 0.2
    decay, eta0, omega, enc_layers, h0_all = 1e-4, 2e-3, 0.1, 2, True


def toy_pipeline(**changes):
    train, val, test = preference_graph(nu=40, ni=30, per_user=12)
    data = Interactions(40, 30, train, val, test)
    trained = []

    def train_base(d, name):
        trained.append((name, d.train))
        return train_toy(d.train, 40, 30, steps=30), 5.0

    def report(d, E_user, E_item):
        return {"val": evaluate(E_user, E_item, d.val, [d.train], 5), "test": {}}

    base, _ = train_base(data, "base")
    cfg = Cfg()
    for k, v in changes.items():
        setattr(cfg, k, v)
    out = unlearn_pipeline(cfg, data, base, 5.0, False, simple_fit, train_base, report)
    return data, base, out, trained[1:]


def test_pipeline_sequence_baseline_and_retraining():
    data, base, out, trained = toy_pipeline()
    s1, s2 = out["steps"]
    budgets = lambda m: [f"{m} @ {b}" for b in ("0 steps", "1 step", "1 epoch")]  # noqa: E731
    assert [r["model"] for r in s1["rows"]] == ["base", *budgets("unlearnrec"), "unlearnrec",
                                                *budgets("fine-tune-only"), "fine-tune-only", "retrained"]
    assert [r["model"] for r in s2["rows"]] == [*budgets("unlearnrec"), "unlearnrec", *budgets("fine-tune-only"),
                                                "fine-tune-only", "retrained"]
    # each retraining sees the edges left after every request so far; request 2 comes from what request 1 left
    (n1, t1), (n2, t2) = trained
    assert (n1, n2) == ("retrained1", "retrained2")
    assert len(t1) == len(data.train) - s1["requests"] and len(t2) == len(t1) - s2["requests"]
    assert set(map(tuple, out["requests"].tolist())) <= set(map(tuple, t1.tolist()))
    assert not set(map(tuple, out["requests"].tolist())) & set(map(tuple, t2.tolist()))
    for step in (s1, s2):
        rows = {r["model"]: r for r in step["rows"]}
        # both unlearning methods push the forgotten pairs below where the base model put them
        for name in ("unlearnrec", "fine-tune-only"):
            assert rows[name]["forgotten"]["mean"] < s1["rows"][0]["forgotten"]["mean"]


def test_pipeline_rngs_are_separate_and_reported_scores_are_the_encoders():
    data, base, out, _ = toy_pipeline(sequence=1)
    _, _, other, _ = toy_pipeline(sequence=1, pre_epochs=0, retrain=False)
    # one generator per purpose: no pre-training draws nothing from the request or evaluation generators
    assert np.array_equal(out["requests"], other["requests"])
    assert out["steps"][0]["rows"][0]["negatives"] == other["steps"][0]["rows"][0]["negatives"]
    # the reported unlearned model is the encoder's output, propagated over the remaining graph
    req = out["requests"]
    A_delta = request_adjacency(req, 40, 30)
    A_r = Graph(40, 30, remove_edges(data.train, req)).normalized()
    with torch.no_grad():
        E_L = base.propagate(Graph(40, 30, data.train).normalized())
        enc = InfluenceEncoder(70, 16, 2)
        enc.load_state_dict(out["encoder"])
        E = base.propagate(A_r, enc(A_delta, base.E0, E_L))
        torch.testing.assert_close(out["unlearned"], E)
        row = next(r for r in out["steps"][0]["rows"] if r["model"] == "unlearnrec")
        s = (E[req[:, 0]] * E[40 + req[:, 1]]).sum(-1)
        assert row["forgotten"]["mean"] == pytest.approx(s.mean().item(), rel=1e-5)
        # and it depends on the encoder: an encoder reset to zero (E0' = E0) gives other embeddings and scores
        zero = base.propagate(A_r, InfluenceEncoder(70, 16, 2, eta0=0.0)(A_delta, base.E0, E_L))
        assert (zero[req[:, 0]] * zero[40 + req[:, 1]]).sum(-1).mean() > s.mean() + 0.1


def test_ssl_loss_equals_infonce_written_out():
    g = torch.Generator().manual_seed(0)
    Z1, Z2 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    tau, expect = 0.5, 0.0
    for b in range(5):
        sims = [(Z1[b] @ Z2[c] / Z1[b].norm() / Z2[c].norm()).item() / tau for c in range(5)]
        expect += -(sims[b] - np.log(np.exp(sims).sum())) / 5
    assert ssl_loss(Z1, Z2, tau).item() == pytest.approx(expect, rel=1e-9)


def test_fine_tune_with_ssl_lowers_forgotten_scores_and_trains_only_the_corrector():
    model = train_toy(EDGES, NU, NI, steps=50).requires_grad_(False)
    req = EDGES[[1, 6]]
    train_r = remove_edges(EDGES, req)
    with torch.no_grad():
        E_L = model.propagate(Graph(NU, NI, EDGES).normalized())
    data = Interactions(NU, NI, EDGES, EDGES[:0], EDGES[:0])
    cfg = Cfg()
    cfg.lambda_ssl, cfg.align_pairs = 1.0, 8
    E0 = model.E0.clone()
    before = (E_L[req[:, 0]] * E_L[NU + req[:, 1]]).sum(-1)
    out = []
    for corrector in (InfluenceEncoder(NU + NI, 16, 2), FineTuneOnly(model.E0)):
        _, E0p, E, _ = fine_tune(corrector, model, model.E0, E_L, req, data, train_r, False, simple_fit, cfg, "t", 30, 0)
        assert torch.all((E[req[:, 0]] * E[NU + req[:, 1]]).sum(-1) < before - 0.5)
        assert torch.equal(model.E0, E0)
        out.append(E0p)
    # the SSL term reaches the encoder's optimiser: without it the encoder ends elsewhere
    cfg.lambda_ssl = 0.0
    _, E0p, _, _ = fine_tune(InfluenceEncoder(NU + NI, 16, 2), model, model.E0, E_L, req, data, train_r, False,
                             simple_fit, cfg, "t", 30, 0)
    assert (E0p - out[0]).abs().max() > 1e-3


def test_each_request_of_a_sequence_starts_from_the_previous_unlearned_model(monkeypatch):
    """--sequence=3: request k + 1 of each chain starts from what request k of the same chain returned (E0' and the
    final embeddings), request 1 from the base; the fine-tune-only corrector starts as that E0', the encoder as
    the pre-trained one. Restarting every request from the base would still push each request's scores down, so
    only the starting points themselves tell the two apart."""
    import unlearnrec
    calls, real = [], unlearnrec.fine_tune

    def recording(corrector, base, E0, E_L, requests, data, train_r, *rest):
        start = {k: v.clone() for k, v in corrector.state_dict().items()}
        out = real(corrector, base, E0, E_L, requests, data, train_r, *rest)
        calls.append({"name": rest[3], "E0": E0.clone(), "E_L": E_L.clone(), "start": start, "train_r": train_r,
                      "requests": requests, "E0p": out[1], "E": out[2]})
        return out

    monkeypatch.setattr(unlearnrec, "fine_tune", recording)
    data, base, out, _ = toy_pipeline(sequence=3, retrain=False)
    calls = [c for c in calls if c["name"] != "pretrain"]
    assert [c["name"] for c in calls] == [f"{m}{k}" for k in (1, 2, 3) for m in ("unlearnrec", "fine-tune-only")]
    with torch.no_grad():
        E_L = base.propagate(Graph(40, 30, data.train).normalized())
    previous = {"unlearnrec": (base.E0, E_L, data.train), "fine-tune-only": (base.E0, E_L, data.train)}
    for c in calls:
        chain = c["name"][:-1]
        E0, E_L, train = previous[chain]
        torch.testing.assert_close(c["E0"], E0, rtol=0, atol=0)
        torch.testing.assert_close(c["E_L"], E_L, rtol=0, atol=0)
        assert np.array_equal(c["train_r"], remove_edges(train, c["requests"]))
        if chain == "fine-tune-only":
            torch.testing.assert_close(c["start"]["E0p"], E0, rtol=0, atol=0)
        else:
            for k, v in out["encoder_pretrained"].items():
                torch.testing.assert_close(c["start"][k], v, rtol=0, atol=0)
        assert (c["E0p"] - base.E0).abs().max() > 1e-3    # unlearning moved it: starting from the base is different
        previous[chain] = (c["E0p"], c["E"], c["train_r"])
    torch.testing.assert_close(out["unlearned"], previous["unlearnrec"][1], rtol=0, atol=0)
