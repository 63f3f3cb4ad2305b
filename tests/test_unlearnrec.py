import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightgcn import DataError, Graph, LightGCN
from unlearnrec import (InfluenceEncoder, align_loss, auc, least_liked_items, never_seen_pairs, random_requests,
                        read_requests, remove_edges, request_adjacency, unlearn_loss)

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
