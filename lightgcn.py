"""
LightGCN: the recommender backbone that LightGNN and UnlearnRec plug into.
Paper: "LightGCN: Simplifying and Powering Graph Convolution Network for Recommendation", He et al., SIGIR 2020
(arXiv:2002.02126).

A graph convolution for collaborative filtering with nothing left but neighbourhood averaging: no feature
transforms, no non-linearities. Users and items are nodes of one bipartite graph; each layer replaces a node's
embedding by the normalised sum of its neighbours'; the final embedding combines every layer; a score is a
dot product, trained with BPR on (user, positive, sampled negative) triples.

    A      = [[0, R], [R^T, 0]]                 R_ui = 1 if user u interacted with item i (or an edge weight)
    Â      = D^{-1/2} A D^{-1/2}                 (optionally A + I)
    E^(k+1) = Â E^(k)
    E      = mean_k E^(k)  (LightGCN)   or   sum_k E^(k)  (LightGNN, UnlearnRec)
    ŷ_ui   = e_u · e_i
    L_BPR  = mean_(u,i,j) softplus(ŷ_uj − ŷ_ui) + λ · ½ (‖e_u^(0)‖² + ‖e_i^(0)‖² + ‖e_j^(0)‖²) / B

Evaluation ranks ALL items for each user (training items masked), Recall@K = hits / |test items| and
NDCG@K = DCG / IDCG with IDCG over min(|test items|, K), averaged over users that have test items.

Nodes are numbered users first (0..n_users-1), then items (n_users..n_users+n_items-1).
Choices: an epoch visits every training interaction once in a random order, each with one uniformly drawn
negative that is never a training positive of that user; MovieLens ratings count as interactions when
rating >= min_rating (default: every rating counts).

Train it:  python train_rec.py --dataset=ml-1m --data_dir=DIR
"""
import csv
import io
import os
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F


class DataError(ValueError):
    """Malformed or inconsistent input data; the message names the file and line."""


# ----------------------------------------------------------------------------- data

@dataclass
class Interactions:
    n_users: int
    n_items: int
    train: np.ndarray             # (E, 2) int64 (user, item), unique pairs
    val: np.ndarray               # (E_val, 2)
    test: np.ndarray              # (E_test, 2)


def read_lightgcn_file(path, known_users=None, train=None):
    """Read `user item item ...` lines into unique (user, item) pairs.

    known_users: a boolean array of users that have training items; a user outside it is an error.
    train: the training pairs; a pair of this file that is also one of them is an error (a held-out split must
    not overlap train.txt)."""
    pairs, lines = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                ids = [int(x) for x in fields]
            except ValueError:
                raise DataError(f"{path}:{n}: ids must be integers, got {line.strip()[:60]!r}") from None
            if min(ids) < 0:
                raise DataError(f"{path}:{n}: ids must be >= 0, got {min(ids)}")
            u = ids[0]
            if known_users is not None and len(ids) > 1 and (u >= len(known_users) or not known_users[u]):
                raise DataError(f"{path}:{n}: user {u} has no training interactions")
            pairs.extend((u, i) for i in ids[1:])
            lines.extend([n] * (len(ids) - 1))
    if not pairs:
        raise DataError(f"{path}: no interactions (empty file?)")
    pairs = np.array(pairs, dtype=np.int64)
    if train is not None:
        n_items = int(max(pairs[:, 1].max(), train[:, 1].max())) + 1
        clash = np.isin(pairs[:, 0] * n_items + pairs[:, 1], train[:, 0] * n_items + train[:, 1]).nonzero()[0]
        if len(clash):
            k = clash[0]
            raise DataError(f"{path}:{lines[k]}: user {pairs[k, 0]} item {pairs[k, 1]} is also in train.txt; "
                            f"the held-out splits must not overlap the training interactions")
    return np.unique(pairs, axis=0)


def load_lightgcn_dir(folder, val_frac=0.1, seed=0):
    """train.txt, optional val.txt, test.txt. Without val.txt a validation split is drawn from train, per user:
    floor(val_frac * n_u) of a user's n_u interactions, so users with fewer than 1 / val_frac training items get
    no validation item (they still count in test). Items that appear only in val / test are kept (they get an
    untrained embedding; the ML-1M split has a few)."""
    train = read_lightgcn_file(os.path.join(folder, "train.txt"))
    known = np.zeros(train[:, 0].max() + 1, dtype=bool)
    known[train[:, 0]] = True
    test = read_lightgcn_file(os.path.join(folder, "test.txt"), known, train)
    val_path = os.path.join(folder, "val.txt")
    if os.path.exists(val_path):
        val = read_lightgcn_file(val_path, known, train)
    else:
        train, val = split_per_user(train, [val_frac], seed)
    n_users = int(max(p[:, 0].max() for p in (train, val, test) if len(p)) + 1)
    n_items = int(max(p[:, 1].max() for p in (train, val, test) if len(p)) + 1)
    return Interactions(n_users, n_items, train, val, test)


def load_movielens_zip(path, min_rating=0.0, val_frac=0.1, test_frac=0.2, seed=0):
    """ratings.csv inside a GroupLens zip; ratings >= min_rating are interactions; ids remapped to 0..n-1;
    a seeded per-user split into train / val / test."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("ratings.csv")), None)
            if name is None:
                raise DataError(f"{path}: no ratings.csv inside the zip")
            text = z.read(name).decode("utf-8")
    except zipfile.BadZipFile:
        raise DataError(f"{path}: not a valid zip file (corrupt download?); delete it and run again") from None
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or header[:3] != ["userId", "movieId", "rating"]:
        raise DataError(f"{path}:{name}:1: expected a header userId,movieId,rating,...")
    users, items = [], []
    for n, row in enumerate(rows, 2):
        try:
            u, i, r = int(row[0]), int(row[1]), float(row[2])
        except (ValueError, IndexError):
            raise DataError(f"{path}:{name}:{n}: malformed row {','.join(row)[:60]!r}") from None
        if r >= min_rating:
            users.append(u)
            items.append(i)
    if not users:
        raise DataError(f"{path}: no ratings >= {min_rating}")
    _, u = np.unique(np.array(users), return_inverse=True)
    _, i = np.unique(np.array(items), return_inverse=True)
    pairs = np.unique(np.stack([u, i], 1).astype(np.int64), axis=0)
    train, val, test = split_per_user(pairs, [val_frac, test_frac], seed)
    return Interactions(int(u.max() + 1), int(i.max() + 1), train, val, test)


def split_per_user(pairs, fractions, seed):
    """Split each user's pairs at random: the i-th held-out part gets floor(fractions[i] * n_u) of a user's
    n_u pairs, train the rest (so a user with few pairs keeps them all in train). Returns [train, part1, ...]."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(pairs)), pairs[:, 0]))     # grouped by user, shuffled within a user
    pairs = pairs[order]
    _, start, count = np.unique(pairs[:, 0], return_index=True, return_counts=True)
    n_u = np.repeat(count, count)                                 # (E,) the size of each pair's user
    rank = np.arange(len(pairs)) - np.repeat(start, count)        # (E,) position inside its user
    sizes = [np.floor(f * n_u).astype(np.int64) for f in fractions]
    end = n_u - sum(sizes)
    parts = [pairs[rank < end]]
    for size in sizes:
        parts.append(pairs[(rank >= end) & (rank < end + size)])
        end = end + size
    return [p[np.lexsort((p[:, 1], p[:, 0]))] for p in parts]


# ----------------------------------------------------------------------------- graph

class Graph:
    """The symmetric graph A = [[0, R], [R^T, 0]] (+ I), stored as CSR. Each nonzero knows which interaction it
    came from (`edge`, -1 for self-loops and extra links) and where its transpose sits (`rev`), so a per-interaction
    mask and per-nonzero learned weights (LightGNN) can be applied.

    extra: optional (M, 2) node pairs (v, w), v != w, numbered users first then items, added in both directions
    with values extra_weight (default 1): LightGNN's user-user and item-item links of A².
    loop_weight: optional (n_nodes,) values of the self-loops (default 1; LightGNN's I + diag(A²))."""

    def __init__(self, n_users, n_items, edges, self_loops=False, extra=None, extra_weight=None, loop_weight=None):
        self.n_users, self.n_items, self.n_nodes = n_users, n_items, n_users + n_items
        N, E = self.n_nodes, len(edges)
        self.n_edges = E
        u, i = edges[:, 0], edges[:, 1] + n_users
        rows, cols, ids = [u, i], [i, u], [np.arange(E), np.arange(E)]
        vals = [np.ones(2 * E)]
        if extra is not None and len(extra):
            w = np.ones(len(extra)) if extra_weight is None else np.asarray(extra_weight, dtype=np.float64)
            rows += [extra[:, 0], extra[:, 1]]
            cols += [extra[:, 1], extra[:, 0]]
            ids += [np.full(2 * len(extra), -1)]
            vals += [w, w]
        if self_loops:
            rows.append(np.arange(N))
            cols.append(np.arange(N))
            ids.append(np.full(N, -1))
            vals.append(np.ones(N) if loop_weight is None else np.asarray(loop_weight, dtype=np.float64))
        row, col = np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)
        key = row * N + col
        order = np.argsort(key, kind="stable")                               # CSR order: by row, then column
        key = key[order]
        if len(key) > 1 and (np.diff(key) == 0).any():
            raise ValueError("extra pairs must be distinct, off the diagonal, and not user-item interactions")
        self.crow = torch.from_numpy(np.concatenate([[0], np.cumsum(np.bincount(row, minlength=N))]))
        self.row, self.col = torch.from_numpy(row[order]), torch.from_numpy(col[order])
        self.edge = torch.from_numpy(np.concatenate(ids)[order].astype(np.int64))       # (nnz,) interaction id
        self.value = torch.from_numpy(np.concatenate(vals)[order].astype(np.float32))   # (nnz,) entries of A
        # rev[k]: the nonzero (w, v) of nonzero k = (v, w); the structure is symmetric, so it exists
        self.rev = torch.from_numpy(np.searchsorted(key, self.col.numpy() * N + self.row.numpy()))

    def to(self, device):
        """Move the structure (for Â built on the fly from learnable weights on that device)."""
        for name in ("crow", "col", "row", "edge", "value", "rev"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def csr(self, value):
        with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR is still the fast CPU layout
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(self.crow, self.col, value, (self.n_nodes, self.n_nodes))

    def normalized(self):
        """Â = D^{-1/2} A D^{-1/2} as a sparse CSR tensor, D from A's (weighted) row sums."""
        # D_vv = Σ_w A_vw, computed per row from CSR offsets (a segment sum: deterministic)
        deg = torch.segment_reduce(self.value, "sum", offsets=self.crow)
        d_inv_sqrt = deg.clamp(min=1e-12).rsqrt()
        # Â_vw = d_v^{-1/2} A_vw d_w^{-1/2}
        return self.csr(d_inv_sqrt[self.row] * self.value * d_inv_sqrt[self.col])

    def weighted(self, A_hat, weight):
        """Â ⊙ W for a fixed Â of this graph and per-nonzero weights W (nnz,): no re-normalisation, so changing
        one weight changes one entry (LightGNN's parameterisation). Differentiable in W: a LearnableAdjacency."""
        value = A_hat.values() * weight
        return LearnableAdjacency(self.csr(value.detach()), self.csr(value.detach()[self.rev]), value)


# ----------------------------------------------------------------------------- model and loss

class SymmetricSpMM(torch.autograd.Function):
    """Â E for a symmetric sparse Â. The backward Â^T G equals Â G, so it reuses Â; torch's generic sparse
    backward transposes Â at every step, which made the propagation's forward + backward ~10x slower on ml-1m."""

    @staticmethod
    def forward(ctx, A_hat, E):
        ctx.A_hat = A_hat
        return A_hat @ E

    @staticmethod
    def backward(ctx, G):
        return None, ctx.A_hat @ G


class LearnableAdjacency:
    """Â whose values carry gradients to learnable edge weights: Â and Âᵀ (same structure, values permuted) plus the
    differentiable values. (Through a CSR tensor built from differentiable values, torch's backward spent ~0.8 s a
    step on ml-latest-small in dense-sized index work; here the values' gradient is one sampled product.)"""

    def __init__(self, A_hat, A_hat_T, value):
        self.A_hat, self.A_hat_T, self.value = A_hat, A_hat_T, value

    def __matmul__(self, E):
        return WeightedSpMM.apply(self.value, E, self.A_hat, self.A_hat_T)

    def to_dense(self):
        return self.A_hat.to_dense()


class WeightedSpMM(torch.autograd.Function):
    """Â E where Â's values are learnable (edge weights, one per direction: Â need not be symmetric). `value`
    is the autograd input that receives their gradient; A_hat holds the same numbers, detached, A_hat_T its
    transpose."""

    @staticmethod
    def forward(ctx, value, E, A_hat, A_hat_T):
        ctx.save_for_backward(E)
        ctx.A_hat, ctx.A_hat_T = A_hat, A_hat_T
        return A_hat @ E

    @staticmethod
    def backward(ctx, G):
        (E,) = ctx.saved_tensors
        # dL/dÂ_vw = G_v · E_w at Â's nonzeros (a sampled dense-dense product: 45x faster than gathering rows of
        # G and E per nonzero on ml-1m);  dL/dE = Âᵀ G
        dA = torch.sparse.sampled_addmm(ctx.A_hat, G.contiguous(), E.T, beta=0.0).values()
        return dA, ctx.A_hat_T @ G, None, None


def spmm(A_hat, E):
    """Â E; the backward reuses Â (symmetric), or, for a LearnableAdjacency, uses its Âᵀ and also gives the
    gradient of Â's values."""
    if isinstance(A_hat, LearnableAdjacency):
        return A_hat @ E
    return SymmetricSpMM.apply(A_hat, E)


class LightGCN(nn.Module):
    def __init__(self, n_users, n_items, dim=64, n_layers=3, combine="mean", init_std=0.1):
        super().__init__()
        if combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' or 'sum', got {combine!r}")
        self.n_users, self.n_items, self.n_layers, self.combine = n_users, n_items, n_layers, combine
        # E^(0): users then items, N(0, init_std) as in the official code
        self.E0 = nn.Parameter(torch.randn(n_users + n_items, dim) * init_std)

    def propagate(self, A_hat, E0=None):
        """E = combine_k E^(k), E^(k+1) = Â E^(k). E0 overrides the model's own layer-0 embeddings."""
        E = self.E0 if E0 is None else E0
        layers = [E]
        for _ in range(self.n_layers):
            # E^(k+1) = Â E^(k)
            E = spmm(A_hat, E)
            layers.append(E)
        out = torch.stack(layers).sum(0)
        return out / (self.n_layers + 1) if self.combine == "mean" else out

    def forward(self, A_hat):
        """Final (user, item) embeddings: (n_users, d), (n_items, d)."""
        return self.propagate(A_hat).split([self.n_users, self.n_items])


def bpr_loss(E_user, E_item, E0_user, E0_item, u, i, j, decay):
    """L = mean softplus(ŷ_uj − ŷ_ui) + decay · ½(‖e_u^(0)‖² + ‖e_i^(0)‖² + ‖e_j^(0)‖²) / B. Returns (bpr, l2)."""
    # ŷ_ui = e_u · e_i
    y_ui = (E_user[u] * E_item[i]).sum(-1)
    y_uj = (E_user[u] * E_item[j]).sum(-1)
    bpr = F.softplus(y_uj - y_ui).mean()
    l2 = 0.5 * (E0_user[u].pow(2).sum() + E0_item[i].pow(2).sum() + E0_item[j].pow(2).sum()) / len(u)
    return bpr, decay * l2


@dataclass
class Stage:
    """One training run of the recommender side, as the paper files hand it to a training loop `fit(stage)`
    (train_rec.fit): Adam on model's parameters, minimising loss(u, i, j) on batches of (user, positive, sampled
    negative) drawn from data.train, every pair once an epoch; after_step() after each step. The model is
    SELECTED by validation Recall of embed() -> (E_user, E_item): select="best" evaluates every few epochs, stops
    early and keeps the best-validation epoch; select="last" evaluates once, at the end, and keeps the last one.
    fit returns the run's state ({"epoch", "best_epoch", "train_seconds", ...}), the model left at its selection."""
    name: str                               # the run's label (train_rec: its folder in out_dir)
    model: nn.Module
    loss: object                            # loss(u, i, j) -> scalar
    embed: object                           # embed() -> (E_user, E_item), what validation ranks
    data: Interactions                      # train (the pairs of an epoch), val (the selection)
    epochs: int
    select: str = "best"                    # best | last
    after_step: object = None               # e.g. keep pruned entries at 0
    seed: int = None                        # the sampling seed; None = the script's --seed


class NegativeSampler:
    """Uniform negatives that are never a training positive of the user, drawn for a whole batch at once:
    draw, find the draws that hit a positive (binary search in the sorted keys u·n_items + i), redraw those."""

    def __init__(self, train, n_items):
        self.n_items = n_items
        self.keys = torch.from_numpy(np.sort(train[:, 0] * n_items + train[:, 1]))
        per_user = np.bincount(train[:, 0])
        if per_user.max() >= n_items:
            raise DataError(f"user {per_user.argmax()} has interacted with every item: no negative exists")

    def is_positive(self, u, j):
        key = u * self.n_items + j
        pos = torch.searchsorted(self.keys, key).clamp(max=len(self.keys) - 1)
        return self.keys[pos] == key

    def __call__(self, u, generator=None):
        j = torch.randint(self.n_items, u.shape, generator=generator)
        bad = self.is_positive(u, j)
        while bad.any():
            j[bad] = torch.randint(self.n_items, (int(bad.sum()),), generator=generator)
            bad = self.is_positive(u, j)
        return j


# ----------------------------------------------------------------------------- evaluation

def user_item_matrix(pairs, n_users, n_items):
    """(n_users, n_items) scipy CSR of 0/1, for fast per-user lookups."""
    return sp.csr_matrix((np.ones(len(pairs), dtype=np.float32), (pairs[:, 0], pairs[:, 1])),
                         shape=(n_users, n_items))


def ranking_metrics(scores, truth, k):
    """scores (B, I) with excluded items already at -inf; truth (B, I) bool. Returns per-user (recall, ndcg)."""
    top = scores.topk(k, dim=1).indices                                   # (B, K)
    hit = truth.gather(1, top).float()                                    # (B, K)
    n_true = truth.sum(1).float()                                         # (B,)
    # Recall@K = hits / |test items|
    recall = hit.sum(1) / n_true
    # DCG = Σ_r hit_r / log2(r + 2);  IDCG = Σ_{r < min(|test|, K)} 1 / log2(r + 2)
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float32) + 2)   # (K,)
    dcg = (hit * discount).sum(1)
    idcg = torch.cumsum(discount, 0)[n_true.clamp(max=k).long() - 1]
    return recall, dcg / idcg


@torch.no_grad()
def evaluate(E_user, E_item, truth_pairs, exclude_pairs, k=20, batch_size=1024):
    """Full-ranking Recall@k and NDCG@k over users with at least one pair in truth_pairs.

    exclude_pairs: list of (E, 2) arrays of items never to rank for their user (train; for test also val)."""
    if len(truth_pairs) == 0:
        raise DataError("nothing to evaluate: the split has no (user, item) pairs")
    n_users, n_items = E_user.shape[0], E_item.shape[0]
    truth = user_item_matrix(truth_pairs, n_users, n_items)
    exclude = sum((user_item_matrix(p, n_users, n_items) for p in exclude_pairs), sp.csr_matrix((n_users, n_items)))
    users = np.unique(truth_pairs[:, 0])
    E_user, E_item = E_user.float().cpu(), E_item.float().cpu()
    recalls, ndcgs = [], []
    for s in range(0, len(users), batch_size):
        b = users[s:s + batch_size]
        scores = E_user[b] @ E_item.T                                     # (B, I)
        ex = exclude[b].tocoo()
        scores[torch.from_numpy(ex.row).long(), torch.from_numpy(ex.col).long()] = float("-inf")
        recall, ndcg = ranking_metrics(scores, torch.from_numpy(truth[b].toarray() > 0), k)
        recalls.append(recall)
        ndcgs.append(ndcg)
    return {f"recall@{k}": torch.cat(recalls).mean().item(), f"ndcg@{k}": torch.cat(ndcgs).mean().item()}
