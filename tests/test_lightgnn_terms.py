"""LightGNN's distillation loss term by term, the tutor's high-order target, the random-graph control and the
pipeline's wiring, each against its formula written out with plain loops or dense matrices (LightGNN,
arXiv:2501.03228; the module docstring of lightgnn.py):

    L = L_BPR + λ_pred L_pred + λ_emb L_emb + λ_uni L_uni + λ_sub L_sub + L2       (L_sub: student rounds 2..13)
    L_BPR  = mean_(u,i,j) softplus(ŷ_uj − ŷ_ui)            L2 = decay · ½(‖e_u⁰‖² + ‖e_i⁰‖² + ‖e_j⁰‖²) / B, e⁰ = E_0 ⊙ M_E
    L_pred = mean_(u,i1,i2) BCE(σ(s/τ), σ(t/τ)),  s = ŷ^s_ui1 − ŷ^s_ui2,  t the same for the tutor
    L_emb  = −mean_v log softmax_w(cos(h_v, e_w)/τ')_v  over the batch's users (w: all users) + the same for items
    L_uni  = mean_u lse_i(e_u·e_i) + mean_i lse_u(e_i·e_u) + mean_u lse_u'(e_u·e_u') + mean_i lse_i'(e_i·e_i'),
             lse_w(x_w) = log Σ_w exp(x_w/τ_u)
    L_sub  = Σ_4 pairings −mean_a Σ_b y_ab log softmax_b(e_a·e_b/τ_u),  y_ab = 1 when the kept entries of a and b
             overlap in all but `loosen` of a's and of b's kept places (loosen: the official per-round schedule)
    h      = Σ_{l=2..L} (tutor's adjacency)^l (tutor's E_0)   (the tutor's high-order embeddings, the anchor)

The KD nodes: with kd_nodes above the batch's distinct users / items, they are all of them (users of the batch,
items of its positives and negatives), so the written-out loss needs no random draw.

The calls into lightgnn.py / train_rec.py sit in the small adapters below, so a change of the API touches
only them."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2

import lightgnn
import train_rec
from lightgcn import Graph, Interactions, LightGCN
from lightgnn import KD, Batch, PrunableLightGCN, Tutor, augmented_graph, distill_loss, high_order
from train_rec import RecConfig, graph_edges, train_lightgcn

EDGES = np.array([[0, 0], [0, 1], [0, 4], [1, 1], [1, 2], [2, 0], [2, 1], [2, 3], [3, 3], [3, 4], [1, 4]])
NU, NI = 4, 5
# the subspace term's `loosen` per student pruning round in the official code (0 after round 8); off outside 2..13
OFFICIAL_LOOSEN = {2: 0, 3: 2, 4: 3, 5: 4, 6: 4, 7: 3, 8: 1}


# ----------------------------------------------------------------------------- adapters to today's API

def api_student(seed=0):
    """A 2-layer student with learnable edge weights and a random embedding-entry mask, in float64."""
    torch.manual_seed(seed)
    student = PrunableLightGCN(Graph(NU, NI, EDGES, self_loops=True), dim=6, n_layers=2).double()
    with torch.no_grad():
        student.W.uniform_(0.5, 1.5)
        student.entry_mask.copy_((torch.rand_like(student.E0) > 0.3).double())
        student.zero_pruned()
    return student


def api_loss(student, E_user, E_item, tutor, high, batch, triples, w, decay, rnd):
    return distill_loss(student, E_user, E_item, Tutor(*tutor, *high), Batch(*batch, triples), KD(**w, decay=decay),
                        rnd=rnd)


def api_layer0(student):
    """E^s_0 ⊙ M_E, split into users and items."""
    return (student.E0 * student.entry_mask).split([NU, NI])


def api_entry_mask(student):
    return student.entry_mask.split([NU, NI])


# ----------------------------------------------------------------------------- the formulas, written out

def written_out_terms(E_user, E_item, E0_user, E0_item, M_user, M_item, tutor, high, batch, triples, w, decay, rnd):
    """Each term of L with one loop per triple / node; differentiable (plain torch scalar ops)."""
    u, i, j = batch
    T_user, T_item = tutor
    H_user, H_item = high
    B = len(u)
    dot = lambda a, b: (a * b).sum()
    cos = lambda a, b: dot(a, b) / (a.norm() * b.norm())
    bpr = sum(F.softplus(dot(E_user[a], E_item[c]) - dot(E_user[a], E_item[b])) for a, b, c in zip(u, i, j)) / B
    l2 = decay * 0.5 * sum(dot(E0_user[a], E0_user[a]) + dot(E0_item[b], E0_item[b]) + dot(E0_item[c], E0_item[c])
                           for a, b, c in zip(u, i, j)) / B
    pred = 0
    for a, b, c in zip(*triples):
        s = (dot(E_user[a], E_item[b]) - dot(E_user[a], E_item[c])) / w["tau"]
        t = (dot(T_user[a], T_item[b]) - dot(T_user[a], T_item[c])) / w["tau"]
        p, q = torch.sigmoid(t), torch.sigmoid(s)
        pred = pred - (p * torch.log(q) + (1 - p) * torch.log(1 - q)) / len(triples[0])
    users, items = sorted(set(u.tolist())), sorted(set(i.tolist()) | set(j.tolist()))

    def info_nce(H, E, nodes):
        # anchor: the tutor's h_v; the model's e_w of every node of the type below
        total = 0
        for v in nodes:
            logits = [cos(H[v], E[x]) / w["emb_tau"] for x in range(len(E))]
            total = total - (logits[v] - torch.logsumexp(torch.stack(logits), 0)) / len(nodes)
        return total

    emb = info_nce(H_user, E_user, users) + info_nce(H_item, E_item, items)
    pairings = ((E_user, M_user, users, E_item, M_item), (E_item, M_item, items, E_user, M_user),
                (E_user, M_user, users, E_user, M_user), (E_item, M_item, items, E_item, M_item))
    uni = sum(sum(torch.logsumexp(torch.stack([dot(EA[a], EB[b]) / w["uni_tau"] for b in range(len(EB))]), 0)
                  for a in nodes) / len(nodes) for EA, _, nodes, EB, _ in pairings)
    loosen = OFFICIAL_LOOSEN.get(rnd, 0)
    sub = 0
    for EA, MA, nodes, EB, MB in pairings:
        for a in nodes:
            logits = torch.stack([dot(EA[a], EB[b]) / w["uni_tau"] for b in range(len(EB))])
            log_p = logits - torch.logsumexp(logits, 0)
            for b in range(len(EB)):
                overlap = dot(MA[a], MB[b])
                if overlap >= MA[a].sum() - loosen and overlap >= MB[b].sum() - loosen:
                    sub = sub - log_p[b] / len(nodes)
    return {"bpr": bpr, "l2": l2, "pred": pred, "emb": emb, "uni": uni, "sub": sub}


def written_out_total(terms, w, rnd):
    sub_on = 2 <= rnd <= 13
    return (terms["bpr"] + terms["l2"] + w["pred"] * terms["pred"] + w["emb"] * terms["emb"]
            + w["uni"] * terms["uni"] + (w["sub"] * terms["sub"] if sub_on else 0))


# ----------------------------------------------------------------------------- set-up

W_PAPER = {"pred": 0.7, "tau": 0.3, "emb": 0.4, "emb_tau": 0.1, "uni": 0.2, "uni_tau": 0.7, "sub": 0.3,
           "kd_nodes": 100}     # kd_nodes above the batch's distinct users / items: all of them enter (2) and (3)
DECAY = 0.5         # large, so that L2 is not lost in the tolerance
RND = 3             # a student round with the subspace term on and loosen = 2


def setup(seed=0):
    student = api_student(seed)
    g = torch.Generator().manual_seed(seed + 1)
    tutor = (torch.randn(NU, 6, generator=g, dtype=torch.float64), torch.randn(NI, 6, generator=g, dtype=torch.float64))
    high = (torch.randn(NU, 6, generator=g, dtype=torch.float64), torch.randn(NI, 6, generator=g, dtype=torch.float64))
    batch = (torch.tensor([0, 1, 2, 3, 1, 2]), torch.tensor([0, 2, 3, 4, 1, 0]), torch.tensor([3, 0, 4, 1, 3, 2]))
    triples = (torch.tensor([2, 0, 3, 1, 1]), torch.tensor([1, 4, 0, 2, 3]), torch.tensor([3, 2, 4, 0, 1]))
    return student, tutor, high, batch, triples


def terms_of(student, tutor, high, batch, triples, E_user, E_item, rnd=RND):
    return written_out_terms(E_user, E_item, *api_layer0(student), *api_entry_mask(student), tutor, high, batch,
                             triples, W_PAPER, DECAY, rnd)


def test_every_term_is_large_enough_to_be_missed():
    """Each written-out term is far above the tolerances below: a dropped term cannot hide in rounding."""
    student, tutor, high, batch, triples = setup()
    E_user, E_item = student()
    for name, value in terms_of(student, tutor, high, batch, triples, E_user, E_item).items():
        assert value.item() > 1e-2, (name, value.item())


def test_distill_loss_and_its_gradient_equal_the_sum_written_out():
    student, tutor, high, batch, triples = setup()
    E_user, E_item = student()
    got = api_loss(student, E_user, E_item, tutor, high, batch, triples, W_PAPER, DECAY, RND)
    expect = written_out_total(terms_of(student, tutor, high, batch, triples, E_user, E_item), W_PAPER, RND)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    # the gradient reaches the layer-0 embeddings and the edge weights as the formula says (nothing detached)
    params = [student.E0, student.W]
    g_got = torch.autograd.grad(got, params, retain_graph=True)
    g_expect = torch.autograd.grad(expect, params)
    for a, b in zip(g_got, g_expect):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        assert b.abs().max() > 1e-3


@pytest.mark.parametrize("term", ["pred", "emb", "uni", "sub"])
def test_each_kd_term_enters_with_its_weight(term):
    """L(only λ_term = 0.6) − L(all λ = 0) = 0.6 · term written out; L(all λ = 0) = L_BPR + L2."""
    student, tutor, high, batch, triples = setup(seed=3)
    E_user, E_item = student()
    zero = {**W_PAPER, "pred": 0.0, "emb": 0.0, "uni": 0.0, "sub": 0.0}
    for rnd in (RND, 8):                                # loosen 2, loosen 1
        terms = terms_of(student, tutor, high, batch, triples, E_user, E_item, rnd)
        base = api_loss(student, E_user, E_item, tutor, high, batch, triples, zero, DECAY, rnd)
        torch.testing.assert_close(base, terms["bpr"] + terms["l2"], rtol=1e-10, atol=1e-12)
        only = api_loss(student, E_user, E_item, tutor, high, batch, triples, {**zero, term: 0.6}, DECAY, rnd)
        torch.testing.assert_close(only - base, 0.6 * terms[term], rtol=1e-9, atol=1e-12)
    if term == "sub":       # the subspace term is on in student rounds 2..13 only (-1: the intermediate)
        for rnd in (-1, 0, 1, 14):
            off = api_loss(student, E_user, E_item, tutor, high, batch, triples, {**zero, term: 0.6}, DECAY, rnd)
            torch.testing.assert_close(off, base, rtol=1e-12, atol=0)


def test_pruned_entries_do_not_count_in_l2():
    """L2 is on E^s_0 ⊙ M_E: changing a pruned entry of E0 changes neither the loss nor anything else."""
    student, tutor, high, batch, triples = setup(seed=4)
    E_user, E_item = student()
    loss = api_loss(student, E_user, E_item, tutor, high, batch, triples, W_PAPER, DECAY, RND)
    with torch.no_grad():
        student.E0.add_(5.0 * (1 - student.entry_mask))          # only pruned entries move
    E_user2, E_item2 = student()
    torch.testing.assert_close(api_loss(student, E_user2, E_item2, tutor, high, batch, triples, W_PAPER, DECAY, RND),
                               loss)


# ----------------------------------------------------------------------------- high-order target

def dense_norm(A):
    d = A.sum(1).rsqrt()
    return d[:, None] * A * d[None, :]


def dense_adjacency(edges, n_users, n_items):
    A = torch.zeros(n_users + n_items, n_users + n_items, dtype=torch.float64)
    for u, i in edges:
        A[u, n_users + i] = A[n_users + i, u] = 1
    return A


def dense_norm_A_plus_I(edges, n_users, n_items):
    return dense_norm(torch.eye(n_users + n_items, dtype=torch.float64) + dense_adjacency(edges, n_users, n_items))


def dense_mid_adjacency(mid, edges, n_users, n_items):
    """norm(I + A + A²) (A² all path counts, its diagonal included) ⊙ W_m, W_m placed at each nonzero."""
    A = dense_adjacency(edges, n_users, n_items)
    n = n_users + n_items
    g = mid.graph
    W = torch.zeros(n, n, dtype=torch.float64).index_put((g.row, g.col), mid.W.detach().double())
    return dense_norm(torch.eye(n, dtype=torch.float64) + A + A @ A) * W


@pytest.mark.parametrize("n_layers", [3, 5])
def test_high_order_is_the_sum_of_layers_2_to_L(n_layers):
    """The teacher's layers 2..L on norm(A + I); the intermediate's on its learned-weight adjacency
    norm(I + A + A²) ⊙ W_m, as the pipeline calls it."""
    torch.manual_seed(0)
    teacher = LightGCN(NU, NI, dim=3, n_layers=n_layers, combine="sum").double()
    A_hat = Graph(NU, NI, EDGES, self_loops=True).normalized()
    A_hat = torch.sparse_csr_tensor(A_hat.crow_indices(), A_hat.col_indices(), A_hat.values().double(), A_hat.shape)
    A = dense_norm_A_plus_I(EDGES, NU, NI)
    # h = Σ_{l=2..L} Â^l E_0
    expect = sum(torch.linalg.matrix_power(A, l) @ teacher.E0.detach() for l in range(2, n_layers + 1))
    got = torch.cat(high_order(teacher, A_hat, teacher.E0))
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-8)          # Â's values are computed in float32
    mid = PrunableLightGCN(augmented_graph(EDGES, NU, NI, topk=0)[0], dim=3, n_layers=n_layers)
    with torch.no_grad():
        mid.W.uniform_(0.5, 1.5)
    A_m = dense_mid_adjacency(mid, EDGES, NU, NI)
    expect = sum(torch.linalg.matrix_power(A_m, l) @ mid.E0.detach().double() for l in range(2, n_layers + 1))
    got = torch.cat(high_order(mid, mid.adjacency(), mid.E0_masked())).double()
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the random-graph control

def toy_data():
    rng = np.random.default_rng(0)
    pairs = np.unique(np.stack([rng.integers(0, 12, 150), rng.integers(0, 20, 150)], 1), axis=0)
    return Interactions(12, 20, train=pairs, val=pairs[::10], test=pairs[1::10])


@pytest.mark.parametrize("share", [0.3, 0.75])
def test_graph_edges_keeps_the_asked_share_as_a_uniform_random_subset(share):
    data = toy_data()
    E = len(data.train)
    k = round(share * E)
    train_set = set(map(tuple, data.train.tolist()))
    S = 400
    kept_count = np.zeros(E)
    index = {p: n for n, p in enumerate(map(tuple, data.train.tolist()))}
    for seed in range(S):
        kept = graph_edges(RecConfig(graph_edges=share, seed=seed), data)
        pairs = list(map(tuple, kept.tolist()))
        assert len(pairs) == len(set(pairs)) == k and set(pairs) <= train_set
        for p in pairs:
            kept_count[index[p]] += 1
    # each edge is kept with probability k/E, whatever its position in the (user-sorted) list: chi-square
    p = k / E
    stat = ((kept_count - S * p) ** 2 / (S * p * (1 - p))).sum()
    assert chi2.sf(stat, E - 1) > 1e-3
    assert np.array_equal(graph_edges(RecConfig(graph_edges=1.0), data), data.train)


def test_lightgcn_propagates_on_the_kept_edges_only(tmp_path):
    """train_rec's LightGCN builds Â from the --graph_edges share: Â equals norm(A_kept) written out."""
    data = toy_data()
    cfg = RecConfig(graph_edges=0.4, seed=5, dim=4, n_layers=1, epochs=1, eval_every=1, batch_size=256)
    _, A_hat, _ = train_lightgcn(cfg, data, "cpu", str(tmp_path))
    kept = graph_edges(cfg, data)
    assert len(kept) == round(0.4 * len(data.train))
    A = torch.zeros(32, 32, dtype=torch.float64)
    for u, i in kept:
        A[u, 12 + i] = A[12 + i, u] = 1
    d = A.sum(1).clamp(min=1e-12).rsqrt()
    torch.testing.assert_close(A_hat.to_dense().double(), d[:, None] * A * d[None, :], rtol=1e-6, atol=1e-7)


def test_pipeline_distils_the_intermediate_from_the_teacher_and_the_student_from_the_intermediate(tmp_path,
                                                                                                  monkeypatch):
    """train_rec's LightGNN pipeline (lightgnn.run) hands distill_loss the weights of its flags; the intermediate's
    tutor is the trained teacher (read back from its checkpoint): its final embeddings Σ_{l=0..L_t} Â_t^l E^t_0
    and its layers 2..L_t; the student's tutor is the trained INTERMEDIATE: Σ_{l=0..L_m} (Â_m ⊙ W_m)^l E^m_0 and
    its layers 2..L_m, in every round (rnd = round; -1 for the intermediate)."""
    calls = []

    def recording(model, E_user, E_item, tutor, batch, kd, rnd=-1, generator=None):
        weights = {k: v for k, v in vars(kd).items() if k != "decay"}
        calls.append((model, [tutor.E_user.detach().clone(), tutor.E_item.detach().clone()],
                      [tutor.H_user.detach().clone(), tutor.H_item.detach().clone()], weights, len(batch.triples[0]),
                      rnd))
        return distill_loss(model, E_user, E_item, tutor, batch, kd, rnd, generator)

    monkeypatch.setattr(lightgnn, "distill_loss", recording)
    data = toy_data()
    cfg = RecConfig(out_dir=str(tmp_path), dim=4, epochs=1, eval_every=1, teacher_layers=4, mid_layers=3, mid_topk=0,
                    mid_epochs=1, rounds=1, round_epochs=1, batch_size=64, kd_pred=0.3, kd_tau=0.05, kd_emb=0.07,
                    kd_emb_tau=0.2, uni=0.11, uni_tau=0.9, sub=0.013, kd_nodes=7, kd_triples=33)
    train_rec.train_lightgnn_pipeline(cfg, data, "cpu")
    E0 = torch.load(tmp_path / "teacher" / "ckpt_best.pt", weights_only=True)["model"]["E0"].double()
    A = dense_norm_A_plus_I(data.train, 12, 20)
    teacher_high = sum(torch.linalg.matrix_power(A, l) @ E0 for l in range(2, 5))
    teacher_final = sum(torch.linalg.matrix_power(A, l) @ E0 for l in range(0, 5))
    mids = {id(c[0]): c[0] for c in calls if c[0].n_layers == 3}
    assert len(mids) == 1
    mid = next(iter(mids.values()))                              # left at the state the student learns from
    A_m = dense_mid_adjacency(mid, data.train, 12, 20)
    assert not torch.allclose(A_m, dense_mid_adjacency(PrunableLightGCN(mid.graph, 4, 3), data.train, 12, 20))
    E0_m = mid.E0_masked().detach().double()
    mid_high = sum(torch.linalg.matrix_power(A_m, l) @ E0_m for l in range(2, 4))
    mid_final = sum(torch.linalg.matrix_power(A_m, l) @ E0_m for l in range(0, 4))
    rounds = set()
    for model, tutor, tutor_high, w, n_triples, rnd in calls:
        assert w == {"pred": 0.3, "tau": 0.05, "emb": 0.07, "emb_tau": 0.2, "uni": 0.11, "uni_tau": 0.9, "sub": 0.013,
                     "kd_nodes": 7}
        assert n_triples == 33
        if model is mid:
            assert rnd == -1
            torch.testing.assert_close(torch.cat(tutor).double(), teacher_final, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(torch.cat(tutor_high).double(), teacher_high, rtol=1e-5, atol=1e-6)
        else:
            assert model.n_layers == 2
            rounds.add(rnd)
            torch.testing.assert_close(torch.cat(tutor).double(), mid_final, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(torch.cat(tutor_high).double(), mid_high, rtol=1e-5, atol=1e-6)
    assert rounds == {0, 1}
