"""
UnlearnRec: Towards Efficient Recommendation Unlearning via Influence Encoder. SIGIR 2025 (arXiv:2505.22649).

A user asks a recommender to forget some interactions. Retraining without them is exact but costs a full
training; UnlearnRec instead learns an Influence Encoder that maps an unlearning request to a correction of
the base model's layer-0 embeddings. It sees the request edges only (their own normalised adjacency Â_Δ) and
the base model's final embeddings, and is pre-trained once on many random requests; a real request then
needs only a short fine-tuning. The corrected embeddings are propagated by the unchanged base LightGCN over
the graph WITHOUT the request edges.

    Â_Δ  = norm(A_Δ)            the request edges only;   Â_r = norm(A − A_Δ) (base's self-loop choice kept)
    (1) H    = Σ_{l=0..L} Â_Δ^l H0                         H0 ∈ R^{N×d}, init 0
    (2) W    = Â_Δ^L (E_L ⊙ η)                             η ∈ R^N, per-node withdraw rate
    (3) Δ    = MLP(−ω·W + H)                               MLP identity-initialised, ω ≈ 0.1
    (4) E0'  = E0 + Δ;   E' = LightGCN_{Â_r}(E0')          the base's E0 is never changed
    (5) L_u     = −mean_{(u,v)∈E_Δ} log σ(−ŷ'_uv)                        push the forgotten pairs down
    (6) L_align = mean_b ‖log softmax_c(S'_bc / τ) − log softmax_c(S_bc / τ)‖²,  S_bc = e_{u_b} · e_{i_c}
                  over the batch's (user, positive) pairs; S from the original model  (keep everything else)
    L = L_BPR + L2 (on the remaining edges, from E0') + λ_u L_u + λ_a L_align
    Pre-training: random requests (a share of the training edges) redrawn every few epochs; fine-tuning: the
    real request set for a few epochs; evaluation: against retraining from scratch without the request edges.
    Membership inference: AUC of telling forgotten edges from never-seen pairs by their score (0.5 = forgotten).

Choices (the notes leave them open): the MLP is one identity-initialised linear layer (so H0 = 0, η = 0 give
E0' = E0 exactly); the optional SSL term is left out; L_align uses at most `max_pairs` pairs of a batch.

    python train_rec.py --method=unlearnrec --base=RUN/ckpt_best.pt --forget=0.01 --dataset=ml-1m --data_dir=DIR
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightgcn import DataError, Graph


# ----------------------------------------------------------------------------- requests

def read_requests(path, train, n_users, n_items):
    """`user item` lines (one pair per line; blank lines and #-comments skipped) -> unique (R, 2) pairs, each
    checked: a known user, a known item, an edge of the training data."""
    pairs = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"cannot read the unlearning requests {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        fields = line.split("#")[0].split()
        if not fields:
            continue
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise DataError(f"{path}:{n}: expected `user item` (two ids >= 0), got {line.strip()[:60]!r}")
        pairs.append((int(fields[0]), int(fields[1]), n))
    if not pairs:
        raise DataError(f"{path}: no unlearning requests in the file")
    known = {tuple(p) for p in train.tolist()}
    for u, i, n in pairs:
        if u >= n_users:
            raise DataError(f"{path}:{n}: unknown user {u} (the data has users 0..{n_users - 1})")
        if i >= n_items:
            raise DataError(f"{path}:{n}: unknown item {i} (the data has items 0..{n_items - 1})")
        if (u, i) not in known:
            raise DataError(f"{path}:{n}: ({u}, {i}) is not a training interaction; only those can be unlearned")
    return np.unique(np.array([p[:2] for p in pairs], dtype=np.int64), axis=0)


def random_requests(train, fraction, rng):
    """A random `fraction` of the training edges (at least one)."""
    n = max(1, int(round(fraction * len(train))))
    return train[np.sort(rng.choice(len(train), n, replace=False))]


def least_liked_items(E_user, E_item, users, seen_pairs):
    """The adversarial request: for each of `users` (sorted) the item a trained model scores lowest among the
    items in none of seen_pairs (train, val, test) for that user. Returns (len(users), 2) pairs."""
    scores = E_user[users] @ E_item.T                                     # (U, I)
    for p in seen_pairs:
        p = p[np.isin(p[:, 0], users)]
        scores[torch.from_numpy(np.searchsorted(users, p[:, 0])), torch.from_numpy(p[:, 1])] = float("inf")
    return np.stack([users, scores.argmin(1).cpu().numpy()], 1)


def remove_edges(train, requests):
    """The training edges that are not requested, in their original order."""
    n_items = int(max(train[:, 1].max(), requests[:, 1].max())) + 1
    return train[~np.isin(train[:, 0] * n_items + train[:, 1], requests[:, 0] * n_items + requests[:, 1])]


def request_adjacency(requests, n_users, n_items):
    """Â_Δ: the normalised adjacency of the request edges alone (no self-loops)."""
    return Graph(n_users, n_items, requests).normalized()


# ----------------------------------------------------------------------------- encoder

class InfluenceEncoder(nn.Module):
    """Maps a request (Â_Δ) and the base model's final embeddings E_L to a correction Δ of its E0."""

    def __init__(self, n_nodes, dim, n_layers, eta0=2e-3, omega=0.1):
        super().__init__()
        self.n_layers, self.omega = n_layers, omega
        self.H0 = nn.Parameter(torch.zeros(n_nodes, dim))
        self.eta = nn.Parameter(torch.full((n_nodes, 1), eta0))
        self.mlp = nn.Linear(dim, dim)
        with torch.no_grad():
            self.mlp.weight.copy_(torch.eye(dim))
            self.mlp.bias.zero_()

    def forward(self, A_delta, E0, E_L):
        H, P = self.H0, self.H0
        for _ in range(self.n_layers):
            P = A_delta @ P
            # (1) H = Σ_{l=0..L} Â_Δ^l H0
            H = H + P
        # (2) W = Â_Δ^L (E_L ⊙ η)
        W = E_L * self.eta
        for _ in range(self.n_layers):
            W = A_delta @ W
        # (3) Δ = MLP(−ω·W + H)
        delta = self.mlp(-self.omega * W + H)
        # (4) E0' = E0 + Δ
        return E0 + delta


# ----------------------------------------------------------------------------- losses

def unlearn_loss(E_user, E_item, requests):
    """(5) L_u = −mean log σ(−ŷ'_uv) over the request edges."""
    u, v = requests.T
    return -F.logsigmoid(-(E_user[u] * E_item[v]).sum(-1)).mean()


def align_loss(E_user, E_item, O_user, O_item, u, i, tau):
    """(6) squared L2 distance between the in-batch log-softmax score rows of the new (E) and original (O) model."""
    new = F.log_softmax(E_user[u] @ E_item[i].T / tau, dim=1)            # (B, B)
    old = F.log_softmax(O_user[u] @ O_item[i].T / tau, dim=1)
    return (new - old).pow(2).sum(1).mean()


# ----------------------------------------------------------------------------- evaluation

def auc(pos, neg):
    """P(score of a positive > score of a negative), ties count ½ (Mann-Whitney U / (n_pos·n_neg))."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    both = np.concatenate([pos, neg])
    order = np.argsort(both, kind="stable")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    # average ranks over ties
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, ranks) / counts)[inverse]
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def never_seen_pairs(n, known_pairs, n_users, n_items, rng):
    """n random (user, item) pairs that appear in none of known_pairs (train, val, test, requests)."""
    known = np.unique(np.concatenate([p[:, 0] * n_items + p[:, 1] for p in known_pairs]))
    out = np.zeros(0, dtype=np.int64)
    while len(out) < n:
        key = rng.integers(0, n_users, 2 * n) * n_items + rng.integers(0, n_items, 2 * n)
        out = np.unique(np.concatenate([out, key[~np.isin(key, known)]]))
    out = rng.permutation(out)[:n]
    return np.stack([out // n_items, out % n_items], 1)


@torch.no_grad()
def score_report(E_user, E_item, forgotten, positives, unseen):
    """Scores of forgotten edges, remaining training positives and never-seen pairs (mean, 10/50/90 %), and the
    membership-inference AUC of forgotten vs never-seen."""
    def scores(p):
        p = torch.as_tensor(p)
        return (E_user[p[:, 0]] * E_item[p[:, 1]]).sum(-1).cpu().numpy()
    out = {}
    for name, p in (("forgotten", forgotten), ("positives", positives), ("unseen", unseen)):
        s = scores(p)
        out[name] = {"mean": float(s.mean()), **{f"q{q}": float(np.quantile(s, q / 100)) for q in (10, 50, 90)}}
    out["mia_auc"] = auc(scores(forgotten), scores(unseen))
    return out
