"""
LightGNN: Simple Graph Neural Network for Recommendation. Chen, Xia, Huang, WSDM 2025 (arXiv:2501.03228).

A deep GNN recommender is accurate but slow to serve: every layer touches every edge and every embedding entry.
LightGNN distils a deep teacher into a shallow student and, while it does, prunes the student's graph and
embeddings. Distillation is hierarchical: an intermediate model on an AUGMENTED graph (A plus its 2-hop paths
A²) first absorbs the teacher's high-order knowledge, so the 2-layer student can learn it through a few
learnable, weighted edges instead of many hops. Each pruning round trains the student, scores every kept edge by
its own learned weight plus the intermediate's opinion of the pair, drops the lowest ρ of edges and the lowest ρ'
of embedding entries, and starts the next round from what survives.

    teacher       E^t = Σ_{l=0..8} Â_t^l E^t_0,                  Â_t = norm(A + I)
    intermediate  E^m = Σ_{l=0..6} (Â_m ⊙ W_m)^l E^m_0,          Â_m = norm(I + A + A²)   (A² = path counts)
    student       E^s = Σ_{l=0..2} (Â_s ⊙ W_s ⊙ M_A)^l (E^s_0 ⊙ M_E),   Â_s = norm(A + I)
                  norm(X) = D^{-1/2} X D^{-1/2}, computed ONCE from the unpruned graph; W one learned weight per
                  nonzero (each direction and each self-loop its own, init 1), M_A / M_E binary masks
    (1) L_pred = mean_(u,i1,i2) BCE(σ(s/τ), σ(t/τ)),   s = ŷ^s_ui1 − ŷ^s_ui2, t the same for the tutor, τ = 0.03
    (2) L_emb  = −mean_a log [exp(cos(h_a, e_a)/τ') / Σ_b exp(cos(h_a, e_b)/τ')],   τ' = 0.1
                 h = Σ_{l=2..L} layers of the tutor (detached) as the anchor, e the model's final embeddings,
                 a over the batch's users (b over all users) and items (b over all items)
    (3) L_uni  = mean_u lse_i(e_u·e_i) + mean_i lse_u(e_i·e_u) + mean_u lse_u'(e_u·e_u') + mean_i lse_i'(e_i·e_i')
                 lse_b(x_b) = log Σ_b exp(x_b / τ_u), raw dot products, τ_u = 1
    (3') L_sub = Σ_4 pairings −mean_a Σ_b y_ab log softmax_b(e_a · e_b / τ_u),   student rounds 2..13 only;
                 y_ab = 1 when a's and b's kept embedding entries (rows of M_E) overlap in all but `loosen` places
    L = L_BPR + λ_pred L_pred + λ_emb L_emb + λ_uni L_uni + λ_sub L_sub + decay · L2      (L_BPR, L2: lightgcn.py)
    (4) φ(a,b) = [W_s(a,b) + β1 σ(e^m_a · e^m_b) + β2 W_m(a,b)] · M_A(a,b),   β1 = 0.05, β2 = 1.0
    (5) one round: M_A ← 0 on the ⌊ρ·|kept edges|⌋ lowest φ;  M_E ← 0 on the ⌊ρ'·|kept entries|⌋ lowest |E^s_0|
        (one global threshold); the next round restarts from E^s_0 ⊙ M_E with W_s = 1.

The intermediate's tutor is the teacher (its final embeddings for (1), its layers 2..8 for (2)); the student's
tutor is the intermediate (final embeddings for (1), its layers 2..6 for (2)), as in the official code. Student
rounds r = 0..rounds: round 0 trains on the whole graph, round r ≥ 1 after the r-th (5); (3') and its `loosen`
schedule (LOOSEN) are indexed by r. Each stage is a lightgcn.Stage: the teacher trains on L_BPR + L2, the
intermediate and each student round on L; each keeps its best-validation epoch. In code: e^m, h^m = E_m, H_m
(the intermediate), E_t, H_t (the teacher); M_A, M_E = edge_mask, entry_mask.

Choices where the official code (HKUDS/LightGNN) is followed or departed from:
- A² on a large graph is nearly dense (ml-1m's user-user block), so `augmented_graph` keeps its diagonal and each
  node's `topk` largest off-diagonal path counts (symmetrised) and reports the share of A²'s mass kept; topk=0
  keeps all of A² as the official code does.
- An interaction is pruned as a whole: φ of its two directions summed (the official code prunes each direction
  and each self-loop on its own); self-loops are never pruned; so "edges kept" counts interactions.
- (2) and (3) use at most `kd_nodes` users and `kd_nodes` items of a batch, drawn at random from its users and
  from its positive AND negative items (the official code: all users and positives); their cost is nodes × N.
  (1) draws `kd_triples` random triples per step (official: 100,000). (3) uses a log-sum-exp (official: log(Σ+1e-5)).
- The reported student of each round is its best-VALIDATION epoch (the official code selects on test).
Speed (the same equations, at the end of the file): (3) and (3') share one set of (B, N) logits and log-sum-exps
(RowLogSumExp); (1) is a sampled product over distinct pairs (PairScores); Â ⊙ W ⊙ M_A skips pruned nonzeros.

    python train_rec.py --method=lightgnn --dataset=ml-1m --data_dir=DIR
"""
import warnings
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightgcn import Graph, LearnableAdjacency, LightGCN, Stage, bpr_loss

# the official schedule of the subspace term's `loosen` (index = pruning round; 0 after the list)
LOOSEN = (0, 0, 0, 2, 3, 4, 4, 3, 1)


# ----------------------------------------------------------------------------- graphs and models

def augmented_graph(train, n_users, n_items, topk, block=1024):
    """I + A + A² as a Graph: A²'s diagonal (node degrees) added to the self-loops, its off-diagonal user-user
    (R Rᵀ) and item-item (Rᵀ R) path counts as extra links; topk > 0 keeps each node's topk largest (ties to the
    lower id), symmetrised. Returns (graph, share of A²'s total mass kept)."""
    R = sp.csr_matrix((np.ones(len(train), dtype=np.float32), (train[:, 0], train[:, 1])), shape=(n_users, n_items))
    pairs, counts = [], []
    for X, offset in ((R, 0), (R.T.tocsr(), n_users)):
        n = X.shape[0]
        k = n - 1 if topk <= 0 else min(topk, n - 1)
        for s in range(0, n, block):
            C = torch.from_numpy((X[s:s + block] @ X.T).toarray())       # (b, n) path counts v -> x -> w
            C[torch.arange(len(C)), torch.arange(s, s + len(C))] = 0     # the diagonal goes to the self-loops
            order = torch.sort(-C, dim=1, stable=True).indices[:, :k]    # (b, k) largest first, ties by id
            count = C.gather(1, order)
            v = torch.arange(s, s + len(C)).unsqueeze(1).expand_as(order)
            keep = count > 0
            pairs.append(torch.stack([v[keep], order[keep]], 1) + offset)
            counts.append(count[keep])
    p, c = torch.cat(pairs), torch.cat(counts)
    p = p.sort(1).values                                                  # (v, w) with v < w: symmetrise
    p, first = np.unique(p.numpy(), axis=0, return_index=True)
    c = c.numpy()[first]
    degree = np.concatenate([np.bincount(train[:, 0], minlength=n_users), np.bincount(train[:, 1], minlength=n_items)])
    # mass of A²: Σ_vw (A²)_vw = Σ_x deg(x)², its diagonal Σ_v deg(v)
    kept = (degree.sum() + 2 * c.sum()) / (degree.astype(np.float64) ** 2).sum()
    return Graph(n_users, n_items, train, True, p, c, 1.0 + degree), float(kept)


class PrunableLightGCN(LightGCN):
    """LightGCN (layer sum) on the fixed Â of `graph` times a learnable weight per nonzero (W, init 1), with a
    binary mask per interaction M_A and per embedding entry M_E. The intermediate uses W only; the student all."""

    def __init__(self, graph, dim=64, n_layers=2, init_std=0.1):
        super().__init__(graph.n_users, graph.n_items, dim, n_layers, "sum", init_std)
        self.graph, self.A_hat = graph, graph.normalized()
        self.W = nn.Parameter(torch.ones(len(graph.col)))
        self.register_buffer("edge_mask", torch.ones(graph.n_edges))
        self.register_buffer("entry_mask", torch.ones_like(self.E0))
        self._kept = None

    def to(self, device):
        self.graph.to(device)
        self.A_hat, self._kept = self.A_hat.to(device), None
        return super().to(device)

    def adjacency(self):
        # Â ⊙ W ⊙ M_A, on the nonzeros M_A keeps (kept_nonzeros, in the speed section; recomputed when M_A changes)
        if self._kept is None or not torch.equal(self._kept[0], self.edge_mask):
            self._kept = (self.edge_mask.clone(), *kept_nonzeros(self.graph, self.edge_mask))
        idx, crow, col, rev = self._kept[1:]
        value, n = self.A_hat.values()[idx] * self.W[idx], self.A_hat.shape
        return LearnableAdjacency(csr(crow, col, value.detach(), n), csr(crow, col, value.detach()[rev], n), value)

    def E0_masked(self):
        return self.E0 * self.entry_mask

    def forward(self):
        return self.propagate(self.adjacency(), self.E0_masked()).split([self.n_users, self.n_items])

    def zero_pruned(self):
        """Keep pruned entries at exactly 0 after an optimizer step (Adam's moments could otherwise move them)."""
        with torch.no_grad():
            self.E0.mul_(self.entry_mask)

    def restart(self):
        """Start a round: surviving embeddings kept, edge weights back to 1."""
        with torch.no_grad():
            self.zero_pruned()
            self.W.fill_(1.0)


@torch.no_grad()
def high_order(model, A_hat, E0, start=2):
    """h = Σ_{l=start..L} Â^l E_0 of a trained model: the knowledge a shallow student cannot reach itself."""
    E, total = E0, torch.zeros_like(E0)
    for l in range(1, model.n_layers + 1):
        E = A_hat @ E
        if l >= start:
            total += E
    return total.split([model.n_users, model.n_items])


# ----------------------------------------------------------------------------- losses

def prediction_kd(E_user, E_item, T_user, T_item, u, i1, i2, tau):
    """(1) BCE(σ(s/τ), σ(t/τ)) on random triples: the student ranks i1 vs i2 as its tutor does."""
    C, inverse = pair_csr(torch.cat([u, u]), torch.cat([i1, i2]), len(E_user), len(E_item), E_user.dtype)
    # s = ŷ^s_ui1 − ŷ^s_ui2
    s = PairScores.apply(E_user, E_item, C, inverse).view(2, -1)
    s = s[0] - s[1]
    with torch.no_grad():   # t = ŷ^t_ui1 − ŷ^t_ui2: the tutor is fixed
        t = torch.sparse.sampled_addmm(C.to(T_user.dtype), T_user, T_item.T, beta=0.0).values()[inverse].view(2, -1)
    t = t[0] - t[1]
    return F.binary_cross_entropy_with_logits(s / tau, torch.sigmoid(t / tau))


def info_nce(H, E, idx, tau):
    """−mean_a log softmax_b(cos(h_a, e_b) / τ)_a for a in idx: the tutor's h_a is the anchor, every row b of the
    model's E (the same node type) is in the denominator."""
    # cos(h_a, e_b) / τ, with 1/τ applied to the (B, d) anchors rather than to the (B, N) logits
    logits = (F.normalize(H[idx], dim=-1) / tau) @ F.normalize(E, dim=-1).T     # (B, N)
    return F.cross_entropy(logits, idx)


def embedding_kd(E_user, E_item, H_user, H_item, users, items, tau):
    """(2) InfoNCE from the tutor's high-order embeddings to the model's final ones, users and items."""
    return info_nce(H_user, E_user, users, tau) + info_nce(H_item, E_item, items, tau)


def dot_logits(E_user, E_item, users, items, tau):
    """The four pairings (a, b) of (3) and (3'): batch users vs all items, batch items vs all users, batch users
    vs all users, batch items vs all items. Per pairing the logits X_ab = e_a · e_b / τ (B, N_b) and
    lse_a = log Σ_b exp(X_ab) (B,), computed once for both terms (the (B, N) products are most of a step)."""
    U, I = E_user[users] / tau, E_item[items] / tau                   # 1/τ on the (B, d) side
    # X_ab (B, N_b) per pairing, with lse_a
    return [(X, RowLogSumExp.apply(X)) for X in (U @ E_item.T, I @ E_user.T, U @ E_user.T, I @ E_item.T)]


def uniformity(logits):
    """(3) Σ over the four pairings of mean_a lse_a (logits: dot_logits(...))."""
    return sum(lse.mean() for _, lse in logits)


def subspace_uniformity(logits, ME_user, ME_item, users, items, loosen):
    """(3') each anchor's soft target: the nodes whose kept entries overlap its own (and theirs) in all but
    `loosen` places (rows ME_user, ME_item of M_E); cross-entropy of the dot-product softmax against that
    (unnormalised) target."""
    total = 0.0
    for (X, lse), (ME_a, idx, ME_b) in zip(logits, ((ME_user, users, ME_item), (ME_item, items, ME_user),
                                                    (ME_user, users, ME_user), (ME_item, items, ME_item))):
        overlap = ME_a[idx] @ ME_b.T                                                      # (B, N)
        y = ((overlap >= ME_a[idx].sum(1, keepdim=True) - loosen) & (overlap >= ME_b.sum(1) - loosen)).to(X.dtype)
        # −Σ_b y_ab log softmax_b(X_ab) = −Σ_b y_ab X_ab + lse_a Σ_b y_ab
        total = total - ((y * X).sum(1) - lse * y.sum(1)).mean()
    return total


def sample_nodes(idx, max_nodes, generator=None):
    """At most max_nodes distinct ids of idx, drawn uniformly (every kind of node in idx can enter)."""
    uniq = torch.unique(idx)
    if len(uniq) <= max_nodes:
        return uniq
    return uniq[torch.randperm(len(uniq), generator=generator)[:max_nodes].to(uniq.device)].sort().values


# what a model is distilled from (fixed): the tutor's final embeddings, for (1), and h = high_order(...), for (2)
Tutor = namedtuple("Tutor", "E_user E_item H_user H_item")
# one step's triples: (u, i, j) for L_BPR, and triples = (u', i1, i2), drawn at random, for (1)
Batch = namedtuple("Batch", "u i j triples")


@dataclass
class KD:
    """L's weights and temperatures, decay (of L2), kd_nodes: at most so many batch users / items enter (2), (3)."""
    pred: float                 # λ_pred, τ of (1)
    tau: float
    emb: float                  # λ_emb, τ' of (2)
    emb_tau: float
    uni: float                  # λ_uni, τ_u of (3) and (3')
    uni_tau: float
    sub: float                  # λ_sub of (3')
    kd_nodes: int
    decay: float


def distill_loss(model, E_user, E_item, tutor, batch, kd, rnd=-1, generator=None):
    """L = L_BPR + λ_pred L_pred + λ_emb L_emb + λ_uni L_uni + λ_sub L_sub + decay · L2 of a model (a
    PrunableLightGCN whose final embeddings are E_user, E_item), distilled from `tutor`, on `batch`. rnd: the
    student's pruning round (the subspace term is on in rounds 2..13; -1 = never)."""
    E0_user, E0_item = model.E0_masked().split([model.n_users, model.n_items])
    bpr, l2 = bpr_loss(E_user, E_item, E0_user, E0_item, batch.u, batch.i, batch.j, kd.decay)
    users = sample_nodes(batch.u, kd.kd_nodes, generator)
    items = sample_nodes(torch.cat([batch.i, batch.j]), kd.kd_nodes, generator)
    loss = bpr + l2
    if kd.pred > 0:
        loss = loss + kd.pred * prediction_kd(E_user, E_item, tutor.E_user, tutor.E_item, *batch.triples, kd.tau)
    if kd.emb > 0:
        loss = loss + kd.emb * embedding_kd(E_user, E_item, tutor.H_user, tutor.H_item, users, items, kd.emb_tau)
    sub_on = kd.sub > 0 and 2 <= rnd <= 13
    if kd.uni > 0 or sub_on:
        logits = dot_logits(E_user, E_item, users, items, kd.uni_tau)
    if kd.uni > 0:
        loss = loss + kd.uni * uniformity(logits)
    if sub_on:
        ME_user, ME_item = model.entry_mask.split([model.n_users, model.n_items])
        loosen = LOOSEN[rnd] if rnd < len(LOOSEN) else 0
        loss = loss + kd.sub * subspace_uniformity(logits, ME_user, ME_item, users, items, loosen)
    return loss


# ----------------------------------------------------------------------------- pruning

@torch.no_grad()
def edge_scores(student, mid, Em_user, Em_item, beta1, beta2):
    """(4) φ per interaction of the student: the sum over its two directions (a,b) and (b,a). Em_user, Em_item:
    the intermediate's final embeddings e^m."""
    g, gm = student.graph, mid.graph
    real = g.edge >= 0
    a, b = g.row[real], g.col[real]
    E_m = torch.cat([Em_user, Em_item])
    # W_m at the same (a, b): look the pair up in the intermediate's CSR (its keys are sorted)
    keys = gm.row * gm.n_nodes + gm.col
    W_m = mid.W[torch.searchsorted(keys, a * gm.n_nodes + b)]
    # φ(a,b) = [W_s(a,b) + β1 σ(e^m_a · e^m_b) + β2 W_m(a,b)] · M_A(a,b)
    phi = student.W[real] + beta1 * torch.sigmoid((E_m[a] * E_m[b]).sum(-1)) + beta2 * W_m
    return torch.zeros(g.n_edges, device=phi.device).index_add_(0, g.edge[real], phi) * student.edge_mask


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
def prune_round(student, scores, rho, rho_emb, generator=None):
    """One round of (5) on the student, in place, then restart: returns (edges kept, entries kept) fractions.
    scores=None prunes at random (the control), edges and entries alike."""
    if scores is None:
        scores = torch.rand(student.graph.n_edges, generator=generator).to(student.E0.device)
        entry_scores = torch.rand(student.E0.shape, generator=generator).to(student.E0.device)
    else:
        entry_scores = student.E0.abs()
    student.edge_mask.copy_(prune_lowest(scores, student.edge_mask, rho))
    student.entry_mask.copy_(prune_lowest(entry_scores, student.entry_mask, rho_emb))
    student.restart()
    return student.edge_mask.mean().item(), student.entry_mask.mean().item()


def propagation_cost(n_layers, graph, edge_mask=None):
    """Nonzeros of Â (both directions of each kept interaction, A² links, self-loops) × layers; × dim gives the
    multiply-adds of a forward pass."""
    n_other = int((graph.edge < 0).sum().item())
    kept = graph.n_edges if edge_mask is None else int(edge_mask.sum().item())
    return n_layers * (2 * kept + n_other)


# ----------------------------------------------------------------------------- the pipeline

def run(data, hp, fit, report, device="cpu", teacher=None, mid_state=None):
    """Teacher -> intermediate -> student pruning rounds.

    data: n_users, n_items, train (E, 2). hp: the settings (train_rec's RecConfig: teacher_layers, mid_layers,
    mid_topk, student_layers, rounds, rho, rho_emb, prune, beta1, beta2, kd_*, uni*, sub, dim, decay, epochs,
    mid_epochs, round_epochs, seed). fit(lightgcn.Stage) -> state: the training loop, which leaves the stage's
    model at its best-validation epoch. report(stage, E_user, E_item, seconds, edges_kept, entries_kept, cost)
    records a row. teacher: an optional trained (LightGCN, its Â, seconds); mid_state: an optional saved
    intermediate (state_dict, seconds)."""
    n_users, n_items = data.n_users, data.n_items
    gen = torch.Generator().manual_seed(hp.seed + 1)
    kd = KD(pred=hp.kd_pred, tau=hp.kd_tau, emb=hp.kd_emb, emb_tau=hp.kd_emb_tau, uni=hp.uni, uni_tau=hp.uni_tau,
            sub=hp.sub, kd_nodes=hp.kd_nodes, decay=hp.decay)

    # teacher: deep LightGCN (layer sum) on norm(A + I), BPR + L2
    if teacher is None:
        torch.manual_seed(hp.seed)
        A_t = Graph(n_users, n_items, data.train, True).normalized().to(device)
        model = LightGCN(n_users, n_items, hp.dim, hp.teacher_layers, "sum").to(device)

        def bpr(u, i, j):
            return sum(bpr_loss(*model(A_t), *model.E0.split([n_users, n_items]), u, i, j, hp.decay))

        # trained on L_BPR + L2, the best-validation epoch kept
        state = fit(Stage("teacher", model, bpr, lambda: model(A_t), data, hp.epochs))
        teacher = (model, A_t, state["train_seconds"])
    model_t, A_t, t_seconds = teacher
    model_t.requires_grad_(False)
    E_t = model_t(A_t)
    H_t = high_order(model_t, A_t, model_t.E0)
    teacher_cost = model_t.n_layers * len(A_t.col_indices())
    report("teacher", *E_t, t_seconds, 1.0, 1.0, 1.0)

    def distill(stage, model, tutor, epochs, rnd=-1):
        def loss_fn(u, i, j):
            E_user, E_item = model()
            # random triples (u', i1, i2) for the prediction-level KD
            triples = [torch.randint(n, (hp.kd_triples,), generator=gen).to(device)
                       for n in (n_users, n_items, n_items)]
            return distill_loss(model, E_user, E_item, tutor, Batch(u, i, j, triples), kd, rnd, gen)
        # trained on L (distill_loss), pruned entries kept at 0 after each step, the best-validation epoch kept
        state = fit(Stage(stage, model, loss_fn, model, data, epochs, after_step=model.zero_pruned))
        return state["train_seconds"]

    # intermediate: learnable weights on norm(I + A + A²), distilled from the teacher
    torch.manual_seed(hp.seed)
    g_mid, mass = augmented_graph(data.train, n_users, n_items, hp.mid_topk)
    mid = PrunableLightGCN(g_mid, hp.dim, hp.mid_layers).to(device)
    n_links = (len(g_mid.col) - 2 * len(data.train) - g_mid.n_nodes) // 2
    print(f"intermediate graph: {n_links} A² links, {mass:.1%} of A²'s mass")
    if mid_state is not None:
        mid.load_state_dict(mid_state[0])
        m_seconds = mid_state[1]
    else:
        m_seconds = distill("intermediate", mid, Tutor(*E_t, *H_t), hp.mid_epochs)
    mid.requires_grad_(False)
    E_m = mid()
    H_m = high_order(mid, mid.adjacency(), mid.E0_masked())
    report("intermediate", *E_m, m_seconds, 1.0 + n_links / len(data.train), 1.0,
           propagation_cost(hp.mid_layers, g_mid) / teacher_cost)

    # student: 2 layers, edge weights + masks, distilled from the intermediate, pruned after every round
    student = PrunableLightGCN(Graph(n_users, n_items, data.train, True), hp.dim, hp.student_layers).to(device)
    edges_kept = entries_kept = 1.0
    for r in range(hp.rounds + 1):
        if r > 0:
            scores = None if hp.prune == "random" else edge_scores(student, mid, *E_m, hp.beta1, hp.beta2)
            edges_kept, entries_kept = prune_round(student, scores, hp.rho, hp.rho_emb, gen)
        seconds = distill(f"student_round{r}", student, Tutor(*E_m, *H_m), hp.round_epochs, r)
        with torch.no_grad():
            report(f"student round {r}", *student(), seconds, edges_kept, entries_kept,
                   propagation_cost(hp.student_layers, student.graph, student.edge_mask) / teacher_cost)
    return student

# ----------------------------------------------------------------------------- speed: the same equations, faster

def kept_nonzeros(graph, edge_mask):
    """The nonzeros of Â that M_A keeps (an interaction's mask on both directions; self-loops and A² links are
    always kept): their ids, CSR offsets and columns, and the position of each one's transpose among them. A pruned
    entry of Â ⊙ W ⊙ M_A is 0, so leaving it out gives the same product (and a zero gradient for its W) at the
    cost of the kept ones only."""
    g = graph
    idx = ((g.edge < 0) | (edge_mask[g.edge.clamp(min=0)] > 0)).nonzero().squeeze(1)   # CSR order
    crow = torch.zeros_like(g.crow)
    crow[1:] = torch.cumsum(torch.bincount(g.row[idx], minlength=g.n_nodes), 0)
    position = torch.full_like(g.col, -1)
    position[idx] = torch.arange(len(idx), device=idx.device)
    return idx, crow, g.col[idx], position[g.rev[idx]]


def pair_csr(u, i, n_users, n_items, dtype=torch.float32):
    """The distinct pairs among (u, i) as a 0/1 sparse CSR (n_users, n_items) and, per pair, its position there."""
    key, inverse = torch.unique(u * n_items + i, return_inverse=True)            # sorted: CSR order
    crow = torch.zeros(n_users + 1, dtype=torch.long, device=u.device)
    crow[1:] = torch.cumsum(torch.bincount(key // n_items, minlength=n_users), 0)
    return csr(crow, key % n_items, torch.ones(len(key), dtype=dtype, device=u.device), (n_users, n_items)), inverse


def csr(crow, col, value, shape):
    with warnings.catch_warnings():     # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, value, shape)


class PairScores(torch.autograd.Function):
    """ŷ_ui = e_u · e_i for many (u, i) pairs: E_user E_itemᵀ sampled at the nonzeros of C = pair_csr(u, i), read
    back per pair. Backward: ∂L/∂E_user = G E_item, ∂L/∂E_item = Gᵀ E_user, G = C holding the pairs' gradients
    (summed over repeats). For 200,000 pairs ~3x faster than gathering rows and scattering their gradients back."""

    @staticmethod
    def forward(ctx, E_user, E_item, C, inverse):
        ctx.save_for_backward(E_user, E_item, inverse)
        ctx.C = C
        return torch.sparse.sampled_addmm(C, E_user, E_item.T, beta=0.0).values()[inverse]

    @staticmethod
    def backward(ctx, grad):
        E_user, E_item, inverse = ctx.saved_tensors
        C = ctx.C
        value = torch.zeros(len(C.col_indices()), dtype=grad.dtype, device=grad.device).index_add_(0, inverse, grad)
        G = csr(C.crow_indices(), C.col_indices(), value, C.shape)
        return G @ E_item, G.t() @ E_user, None, None


class RowLogSumExp(torch.autograd.Function):
    """lse_a = log Σ_b exp(X_ab) per row, as torch.logsumexp, but the backward reuses the forward's exp(X − max)
    instead of recomputing exp(X − lse): one (B, N) pass instead of three, ~10% of a distillation step."""

    @staticmethod
    def forward(ctx, X):
        m = X.amax(1, keepdim=True)
        P = (X - m).exp_()                                            # (B, N)
        s = P.sum(1, keepdim=True)
        ctx.save_for_backward(P, s)
        return (m + s.log()).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        P, s = ctx.saved_tensors
        # ∂lse_a / ∂X_ab = softmax_b(X_a)_b = P_ab / s_a
        return P * (grad.unsqueeze(1) / s)
