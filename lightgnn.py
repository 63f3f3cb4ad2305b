"""
LightGNN: Simple Graph Neural Network for Recommendation. Chen, Xia, Huang, WSDM 2025 (arXiv:2501.03228).

A deep GNN recommender is accurate but slow to serve: every layer touches every edge and every embedding entry.
LightGNN distils a deep teacher into a shallow student and, while it does, prunes the student's graph and
embeddings. Distillation is hierarchical: an intermediate model on an AUGMENTED graph (A plus 2-hop user-user
and item-item links) first absorbs the teacher's high-order knowledge, so the 2-layer student can learn it
through a few learnable, weighted edges instead of many hops. Each pruning round trains the student, scores
every kept edge by its own learned weight plus the intermediate's opinion of the pair, drops the lowest ρ of
edges and the lowest ρ' of embedding entries, and starts the next round from what survives.

    teacher       E^t = Σ_{l=0..8} Â_t^l E^t_0,                 Â_t = norm(A + I)
    intermediate  E^m = Σ_{l=0..6} Â_m^l E^m_0,                 Â_m = norm(W_m ⊙ (I + A + A²_top))
    student       E^s = Σ_{l=0..2} Â_s^l (E^s_0 ⊙ M_E),         Â_s = norm(W_s ⊙ M_A ⊙ (A + I))
                  norm(X) = D^{-1/2} X D^{-1/2}; A²_top keeps each node's `mid_topk` strongest 2-hop links
    (1) L_pred = mean_(u,i1,i2) BCE(σ(s/τ), σ(t/τ)),   s = ŷ^s_ui1 − ŷ^s_ui2, t the same for the tutor, τ = 0.03
    (2) L_emb  = −mean_v log softmax_w(cos(e^s_v, ē^t_w) / τ')_v,   ē^t = Σ_{l=2..8} Â_t^l E^t_0 (detached),
                 v over the batch's users (w over all users) and items (w over all items), τ' = 0.1
    (3) L_uni  = mean_u log Σ_i exp(ê_u · ê_i / τ_u) + mean_i log Σ_u exp(ê_i · ê_u / τ_u),  ê = e / ‖e‖
    L = L_BPR + λ_pred L_pred + λ_emb L_emb + λ_uni L_uni + decay · L2          (L_BPR and L2 from lightgcn.py)
    (4) φ(u,i) = [W_s(u,i) + β1 σ(e^m_u · e^m_i) + β2 W_m(u,i)] · M_A(u,i)
    (5) one round: M_A ← 0 on the ⌊ρ·|kept edges|⌋ lowest φ;  M_E ← 0 on the ⌊ρ'·|kept entries|⌋ lowest |E^s_0|
        (one global threshold); the next round restarts from E^s_0 ⊙ M_E with W_s = 1.

The tutor of the intermediate is the teacher; the tutor of the student (prediction KD) is the intermediate;
the embedding KD of both targets the teacher's high-order embeddings.

Choices (the notes are silent): A²_top's learnable weights start at 1 like A's; learned edge weights are
clamped at 0 inside Â so a degree can never go negative; the uniformity term uses cosine similarities
(raw dot products grow with the embedding scale and fight BPR); self-loops are never pruned; (2) and (3) use
at most `max_nodes` of a batch's users and items. The reported student of each round is its best-VALIDATION
epoch (the official code selects on test). The flags default to the paper's weights; on ml-1m at laptop budget
the student did better with λ_uni = 0 and λ_pred = 0.1 (README, LightGNN).

    python train_rec.py --method=lightgnn --dataset=ml-1m --data_dir=DIR --uni=0 --kd_pred=0.1
"""
import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightgcn import LightGCN, bpr_loss


# ----------------------------------------------------------------------------- graphs

def two_hop_pairs(train, n_users, n_items, topk, block=1024):
    """The user-user (R Rᵀ) and item-item (Rᵀ R) links of A², each node keeping its `topk` strongest (most
    co-interactions; ties to the lower id), symmetrised. Returns (M, 2) node pairs v < w, users first."""
    R = sp.csr_matrix((np.ones(len(train), dtype=np.float32), (train[:, 0], train[:, 1])), shape=(n_users, n_items))
    pairs = []
    for X, offset in ((R, 0), (R.T.tocsr(), n_users)):
        n = X.shape[0]
        k = min(topk, n - 1)
        if k <= 0:
            continue
        for s in range(0, n, block):
            C = torch.from_numpy((X[s:s + block] @ X.T).toarray())       # (b, n) co-interaction counts
            C[torch.arange(len(C)), torch.arange(s, s + len(C))] = -1     # no self-links
            # stable top-k: sort by count, larger first, ties by column id
            order = torch.sort(-C, dim=1, stable=True).indices[:, :k]    # (b, k)
            count = C.gather(1, order)
            v = torch.arange(s, s + len(C)).unsqueeze(1).expand_as(order)
            keep = count > 0
            pairs.append(torch.stack([v[keep], order[keep]], 1) + offset)
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    p = torch.cat(pairs).sort(1).values                                   # (v, w) with v < w
    return torch.unique(p, dim=0).numpy()


class PrunableLightGCN(LightGCN):
    """LightGCN (layer sum) on `graph` with a learnable weight per edge (W, init 1), a binary edge mask M_A and a
    binary embedding-entry mask M_E. The intermediate uses W only; the student all three."""

    def __init__(self, graph, dim=64, n_layers=2, init_std=0.1):
        super().__init__(graph.n_users, graph.n_items, dim, n_layers, "sum", init_std)
        self.graph = graph
        self.W = nn.Parameter(torch.ones(graph.n_edges))
        self.register_buffer("edge_mask", torch.ones(graph.n_edges))
        self.register_buffer("entry_mask", torch.ones_like(self.E0))

    def adjacency(self):
        # Â = norm(W ⊙ M_A ⊙ A) (+ self-loops of weight 1)
        return self.graph.normalized(self.W.clamp(min=0) * self.edge_mask)

    def forward(self):
        return self.propagate(self.adjacency(), self.E0 * self.entry_mask).split([self.n_users, self.n_items])

    def zero_pruned(self):
        """Keep pruned entries at exactly 0 after an optimizer step (Adam's moments could otherwise move them)."""
        with torch.no_grad():
            self.E0.mul_(self.entry_mask)

    def restart(self):
        """Start a round: surviving embeddings kept, kept edge weights back to 1."""
        with torch.no_grad():
            self.zero_pruned()
            self.W.fill_(1.0)


@torch.no_grad()
def high_order(model, A_hat, start=2):
    """ē = Σ_{l=start..L} Â^l E_0 of a trained LightGCN: the knowledge a shallow student cannot reach itself."""
    E = model.E0
    total = torch.zeros_like(E)
    for l in range(1, model.n_layers + 1):
        E = A_hat @ E
        if l >= start:
            total += E
    return total.split([model.n_users, model.n_items])


# ----------------------------------------------------------------------------- losses

def prediction_kd(E_user, E_item, T_user, T_item, u, i1, i2, tau):
    """(1) BCE(σ(s/τ), σ(t/τ)) on random triples: the student ranks i1 vs i2 as its tutor does."""
    # s = ŷ^s_ui1 − ŷ^s_ui2 ,  t = ŷ^t_ui1 − ŷ^t_ui2
    s = (E_user[u] * (E_item[i1] - E_item[i2])).sum(-1)
    t = (T_user[u] * (T_item[i1] - T_item[i2])).sum(-1)
    return F.binary_cross_entropy_with_logits(s / tau, torch.sigmoid(t / tau))


def info_nce(E, T, idx, tau):
    """−mean_v log softmax_w(cos(e_v, t_w) / τ)_v for v in idx, w over all rows of T."""
    logits = F.normalize(E[idx], dim=-1) @ F.normalize(T, dim=-1).T / tau     # (B, N)
    return F.cross_entropy(logits, idx)


def embedding_kd(E_user, E_item, T_user, T_item, users, items, tau):
    """(2) InfoNCE between the student's final and the teacher's high-order embeddings, users and items."""
    return info_nce(E_user, T_user, users, tau) + info_nce(E_item, T_item, items, tau)


def uniformity(E_user, E_item, users, items, tau):
    """(3) mean_u log Σ_i exp(ê_u·ê_i/τ) + mean_i log Σ_u exp(ê_i·ê_u/τ): spreads users away from items at large."""
    U, I = F.normalize(E_user, dim=-1), F.normalize(E_item, dim=-1)
    return (torch.logsumexp(U[users] @ I.T / tau, 1).mean()
            + torch.logsumexp(I[items] @ U.T / tau, 1).mean())


# ----------------------------------------------------------------------------- pruning

@torch.no_grad()
def edge_scores(student, mid_user, mid_item, mid_W, edges, beta1, beta2):
    """(4) φ for the user-item edges (ids 0..E-1 in both graphs; the intermediate's A² links come after)."""
    u, i = torch.as_tensor(edges, device=mid_user.device).T
    E = len(u)
    # φ(u,i) = [W_s(u,i) + β1 σ(e^m_u · e^m_i) + β2 W_m(u,i)] · M_A(u,i)
    return (student.W[:E] + beta1 * torch.sigmoid((mid_user[u] * mid_item[i]).sum(-1))
            + beta2 * mid_W[:E]) * student.edge_mask[:E]


@torch.no_grad()
def prune_lowest(score, mask, rho):
    """(5) mask with the ⌊ρ·kept⌋ lowest-scored kept entries set to 0 (ties: lower index first)."""
    flat = mask.flatten().clone()
    kept = flat.nonzero().squeeze(1)
    n_drop = int(rho * len(kept))
    order = torch.sort(score.flatten()[kept], stable=True).indices[:n_drop]
    flat[kept[order]] = 0
    return flat.view_as(mask)


@torch.no_grad()
def prune_round(student, scores, rho, rho_emb):
    """One round of (5) on the student, in place, then restart: returns (edges kept, entries kept) fractions."""
    E = len(scores)
    student.edge_mask[:E] = prune_lowest(scores, student.edge_mask[:E], rho)
    student.entry_mask.copy_(prune_lowest(student.E0.abs(), student.entry_mask, rho_emb))
    student.restart()
    return student.edge_mask[:E].mean().item(), student.entry_mask.mean().item()


def propagation_cost(n_layers, graph, edge_mask=None):
    """Nonzeros of Â (both directions of each kept edge, self-loops) × layers; × dim gives multiply-adds."""
    kept = graph.n_edges if edge_mask is None else int(edge_mask.sum().item())
    loops = int((graph.edge < 0).sum().item())
    return n_layers * (2 * kept + loops)


def distill_loss(model, E_user, E_item, tutor, teacher_high, u, i, j, triples, w, decay, max_nodes=1024):
    """L = L_BPR + λ_pred L_pred + λ_emb L_emb + λ_uni L_uni + L2 for BPR triples (u, i, j) and random KD
    triples (u', i1, i2); w holds the weights and temperatures. (2) and (3) use at most max_nodes of the batch's
    users and items (their cost is nodes × all nodes)."""
    E0_user, E0_item = (model.E0 * model.entry_mask).split([model.n_users, model.n_items])
    bpr, l2 = bpr_loss(E_user, E_item, E0_user, E0_item, u, i, j, decay)
    users, items = torch.unique(u[:max_nodes]), torch.unique(torch.cat([i, j])[:max_nodes])
    return (bpr + l2
            + w["pred"] * prediction_kd(E_user, E_item, *tutor, *triples, w["tau"])
            + w["emb"] * embedding_kd(E_user, E_item, *teacher_high, users, items, w["emb_tau"])
            + w["uni"] * uniformity(E_user, E_item, users, items, w["uni_tau"]))
