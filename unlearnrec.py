"""
UnlearnRec: Towards Efficient Recommendation Unlearning via Influence Encoder. SIGIR 2025 (arXiv:2505.22649).

A user asks a recommender to forget some interactions. Retraining without them is exact but costs a full
training; UnlearnRec instead learns an Influence Encoder that maps an unlearning request to a correction of
the base model's layer-0 embeddings. It sees the request edges only (their own normalised adjacency Â_Δ) and
the base model's final embeddings, and is pre-trained once on many random requests; a real request then
needs only a short fine-tuning. The corrected embeddings are propagated by the unchanged base model over
the graph WITHOUT the request edges.

    Â_Δ  = norm(A_Δ)            the request edges only;   Â_r = norm(A − A_Δ) (base's self-loop choice kept)
    (1) H    = Σ_{l=0..L} Â_Δ^l H0                         H0 ∈ R^{N×d}, init 0
    (2) W    = Â_Δ^L (E_L ⊙ η)                             η ∈ R^N, per-node withdraw rate
    (3) Δ    = MLP(−ω·W + H)                               MLP identity-initialised, ω ≈ 0.1
    (4) E0'  = E0 + Δ;   E' = Base_{Â_r}(E0')              the base's E0 is never changed
    (5) L_u     = −mean_{(u,v)∈E_Δ} log σ(−ŷ'_uv)                        push the forgotten pairs down
    (6) L_align = mean_b ‖log softmax_c(S'_bc / τ) − log softmax_c(S_bc / τ)‖²,  S_bc = e_{u_b} · e_{i_c}
                  over the batch's (user, positive) pairs; S from the original model  (keep everything else)
    (7) L_ssl   = InfoNCE between the codes −ω·W + H on Â_Δ and on Â_Δ with 95 % of its edges (optional)
    L = L_BPR + L2 (on the remaining edges, from E0') + λ_u L_u + λ_a L_align + λ_ssl L_ssl
    Pre-training: random requests (a share of the training edges) redrawn every few epochs; fine-tuning: the
    real request set for a few epochs. Baselines: retraining from scratch without the request edges, and
    FINE-TUNE-ONLY: the base E0 itself fine-tuned with the same loss and epochs, no encoder.
    Membership inference: AUC of telling a user's forgotten edges from their held-out test interactions by score
    (validation chose the checkpoints, so it is not used), averaged over users. Both are real interactions the user
    chose, so a model that never trained on the forgotten edges sits near 0.5; the base model above; unlearning
    aims at retraining's.

Choices: the MLP is one identity-initialised linear layer (so H0 = 0, η = 0 give E0' = E0 exactly). The l = 0
term of (1) puts H0 itself on EVERY node (the equation as written; h0_all=True): for a node the request does
not reach, H0's gradient is then exactly E0's, so outside the request the encoder is a plain fine-tuning of E0
(the fine-tune-only baseline measures what that buys). h0_all=False keeps l = 1..L only: H0 acts on the
request's neighbourhood (the MLP's bias still shifts every node). The paper's text does not settle which; the
README measures both. The encoder has its own depth L (enc_layers, 3 by default), so a base without propagation
(matrix factorisation) still gets a request-aware encoder. The SSL term's 95 % graph is drawn once per
fine-tuning call, not per step; L_align uses at most `align_pairs` pairs of a batch. Sequential requests each
start from the pre-trained encoder and add only what the request changes: the request-independent part
Δ(∅) = MLP(code of no request) (MLP(H0) with h0_all) is in the previous request's E0' already, so request k > 1
gives E0'_k = E0'_{k-1} + Δ(request k) − Δ(∅); two empty requests leave the embeddings as they are.
Fine-tuning budgets: the pipeline also scores each method after 0 steps, 1 step and every whole epoch (or 1/k of
one) before the last (snapshots of one fine-tuning; UnlearnRec and fine-tune-only get the same seed: the same
batches).

    python train_rec.py --method=unlearnrec --base=RUN/ckpt_best.pt --forget=0.01 --dataset=ml-1m --data_dir=DIR
"""
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightgcn import DataError, Graph, Stage, bpr_loss


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


def forget_fraction(forget):
    """--forget as a fraction of the training edges in (0, 1), or None for `adversarial` or a file of pairs."""
    try:
        fraction = float(forget)
    except ValueError:
        return None
    if not 0 < fraction < 1:
        raise DataError(f"--forget={forget}: a fraction of the training edges must be in (0, 1)")
    return fraction


def held_out_pairs(requests, held_out):
    """The held-out interactions (validation, test) of the users that appear in `requests`: the non-members."""
    pairs = np.concatenate(held_out)
    return pairs[np.isin(pairs[:, 0], requests[:, 0])]


# ----------------------------------------------------------------------------- encoder

class InfluenceEncoder(nn.Module):
    """Maps a request (Â_Δ) and the base model's final embeddings E_L to a correction Δ of its E0."""

    def __init__(self, n_nodes, dim, n_layers, eta0=2e-3, omega=0.1, h0_all=True):
        super().__init__()
        self.n_layers, self.omega, self.h0_all = n_layers, omega, h0_all
        self.chained = False    # True: E0 is an earlier request's E0', which holds Δ(∅) already
        self.H0 = nn.Parameter(torch.zeros(n_nodes, dim))
        self.eta = nn.Parameter(torch.full((n_nodes, 1), eta0))
        self.mlp = nn.Linear(dim, dim)
        with torch.no_grad():
            self.mlp.weight.copy_(torch.eye(dim))
            self.mlp.bias.zero_()

    def code(self, A_delta, E_L):
        """−ω·W + H, the MLP's input (N, d): what the SSL term compares across two views of Â_Δ."""
        P = self.H0
        # (1) H = Σ_{l=0..L} Â_Δ^l H0   (h0_all=False: l = 1..L, only the request's neighbourhood)
        H = P if self.h0_all else torch.zeros_like(P)
        for _ in range(self.n_layers):
            P = A_delta @ P
            H = H + P
        # (2) W = Â_Δ^L (E_L ⊙ η)
        W = E_L * self.eta
        for _ in range(self.n_layers):
            W = A_delta @ W
        return -self.omega * W + H

    def forward(self, A_delta, E0, E_L):
        # (3) Δ = MLP(−ω·W + H);   (4) E0' = E0 + Δ
        delta = self.mlp(self.code(A_delta, E_L))
        if self.chained:
            # E0 already holds the request-independent part, Δ(∅) = MLP(code of no request): add it only once
            delta = delta - self.mlp(self.code_of_no_request(E_L))
        return E0 + delta

    def code_of_no_request(self, E_L):
        """code() for an empty Â_Δ: Â_Δ^l = 0 for l >= 1, so H = H0 (h0_all) or 0, and W = 0 (or E_L ⊙ η at L = 0)."""
        H = self.H0 if self.h0_all else torch.zeros_like(self.H0)
        return H - self.omega * E_L * self.eta if self.n_layers == 0 else H


class FineTuneOnly(nn.Module):
    """The baseline without an encoder: E0' starts as a copy of the base's E0 and is itself fine-tuned with the
    same loss; the request enters only through the loss (L_u) and the graph Â_r."""

    def __init__(self, E0):
        super().__init__()
        self.E0p = nn.Parameter(E0.detach().clone())

    def forward(self, A_delta, E0, E_L):
        return self.E0p


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


def ssl_loss(Z1, Z2, tau):
    """(7) InfoNCE: row b of Z1 should be closer (cosine / τ) to row b of Z2 than to any other row of Z2."""
    Z1, Z2 = F.normalize(Z1, dim=1), F.normalize(Z2, dim=1)
    return F.cross_entropy(Z1 @ Z2.T / tau, torch.arange(len(Z1), device=Z1.device))


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


def membership_auc(forgotten, s_forgotten, held_out, s_held_out, null_draws=0, rng=None):
    """Per user, the AUC of telling their forgotten edges (members once) from their held-out interactions (never
    members) by score; averaged over users, weighted by their forgotten edges (users without held-out items are
    left out). Per user, because users' score scales differ: pooled over users, a user with more forgotten
    edges than held-out ones would weigh on one side only. null_draws > 0: also the SD of the same average when
    each user's member / non-member labels are shuffled (the noise of a model whose scores carry no membership).
    Returns the AUC, or (AUC, null SD)."""
    user = np.concatenate([forgotten[:, 0], held_out[:, 0]])
    score = np.concatenate([s_forgotten, s_held_out]).astype(np.float64)
    member = np.concatenate([np.ones(len(forgotten), bool), np.zeros(len(held_out), bool)])
    both = np.isin(user, np.intersect1d(forgotten[:, 0], held_out[:, 0]))
    if not both.any():
        raise DataError("no user of the unlearning request has held-out (test) interactions, so membership AUC is "
                        "undefined: forget a larger fraction, or pairs of users with test interactions")
    user, score, member = user[both], score[both], member[both]
    order = np.lexsort((score, user))                                    # by user, then score
    user, score, member = user[order], score[order], member[order]
    # rank of each score within its user, ties averaged (ranks from 1)
    first = np.r_[0, np.flatnonzero(np.diff(user)) + 1]                  # where each user's block starts
    size = np.diff(np.r_[first, len(user)])
    pos = np.arange(len(user)) - np.repeat(first, size) + 1.0
    tie = np.r_[0, np.cumsum((np.diff(user) != 0) | (np.diff(score) != 0))]   # (user, score) groups
    rank = (np.bincount(tie, pos) / np.bincount(tie))[tie]
    block = np.repeat(np.arange(len(first)), size)

    def average(m):
        n_pos = np.bincount(block, m, len(first))
        n_neg = size - n_pos
        U = np.bincount(block, rank * m, len(first)) - n_pos * (n_pos + 1) / 2
        return float((U / n_neg).sum() / n_pos.sum())                   # Σ_u n_pos,u · AUC_u / Σ_u n_pos,u
    value = average(member)
    if not null_draws:
        return value
    rng = rng if rng is not None else np.random.default_rng(0)
    null = [average(member[np.lexsort((rng.random(len(user)), block))]) for _ in range(null_draws)]
    return value, float(np.std(null))


@torch.no_grad()
def score_report(E_user, E_item, forgotten, held_out, negatives, n_sample=2000):
    """Scores of the forgotten edges, the same users' held-out interactions and random never-seen pairs (mean,
    10/50/90 %), and the membership-inference AUC (forgotten vs held-out, per user). "scores": per kind at most
    n_sample of the scores themselves (evenly spaced over the pairs, which are sorted by user), for histograms."""
    def scores(p):
        p = torch.as_tensor(p)
        return (E_user[p[:, 0]] * E_item[p[:, 1]]).sum(-1).cpu().numpy()
    out = {"scores": {}}
    for name, p in (("forgotten", forgotten), ("held_out", held_out), ("negatives", negatives)):
        s = scores(p)
        out[name] = {"mean": float(s.mean()), **{f"q{q}": float(np.quantile(s, q / 100)) for q in (10, 50, 90)}}
        out["scores"][name] = s[np.linspace(0, len(s) - 1, min(len(s), n_sample)).astype(int)]
    out["mia_auc"], out["mia_null_sd"] = membership_auc(forgotten, scores(forgotten), held_out, scores(held_out),
                                                        null_draws=200, rng=np.random.default_rng(0))
    return out


# ----------------------------------------------------------------------------- pipeline (training loop passed in)

def fine_tune(corrector, base, E0, E_L, requests, data, train_r, self_loops, fit, cfg, name, epochs, seed,
              snapshots=()):
    """Train `corrector` (InfluenceEncoder or FineTuneOnly) to forget `requests` from the model whose layer-0 /
    final embeddings are E0 / E_L, with batches from the remaining edges train_r, through the training loop
    fit(lightgcn.Stage) -> state. Returns (seconds, E0', E'), detached, after `epochs` epochs, and the same triple
    after each number of optimizer steps in `snapshots` (0 = before training) that is below the end:
    {steps: (seconds, E0', E')}. The same seed gives the same batches, so a snapshot is what that budget gives."""
    nu, ni, dev = data.n_users, data.n_items, E0.device
    A_delta = request_adjacency(requests, nu, ni).to(dev)
    A_r = Graph(nu, ni, train_r, self_loops).normalized().to(dev)
    O_user, O_item = E_L.split([nu, ni])
    req_t = torch.from_numpy(requests).to(dev)
    rng = np.random.default_rng(seed)
    use_ssl = cfg.lambda_ssl > 0 and isinstance(corrector, InfluenceEncoder)
    if use_ssl:
        A_kept = request_adjacency(requests[rng.random(len(requests)) < 0.95], nu, ni).to(dev)
        nodes = torch.from_numpy(np.unique(np.concatenate([requests[:, 0], nu + requests[:, 1]]))).to(dev)
        gen = torch.Generator().manual_seed(seed)

    def embed():
        return base.propagate(A_r, corrector(A_delta, E0, E_L)).split([nu, ni])

    def loss_fn(u, i, j):
        E0p = corrector(A_delta, E0, E_L)
        E_user, E_item = base.propagate(A_r, E0p).split([nu, ni])
        bpr, l2 = bpr_loss(E_user, E_item, *E0p.split([nu, ni]), u, i, j, cfg.decay)
        m = cfg.align_pairs
        loss = (bpr + l2 + cfg.lambda_u * unlearn_loss(E_user, E_item, req_t)
                + cfg.lambda_a * align_loss(E_user, E_item, O_user, O_item, u[:m], i[:m], cfg.align_tau))
        if use_ssl:
            b = nodes[torch.randperm(len(nodes), generator=gen)[:cfg.align_pairs].to(dev)]
            loss = loss + cfg.lambda_ssl * ssl_loss(corrector.code(A_delta, E_L)[b], corrector.code(A_kept, E_L)[b],
                                                    cfg.ssl_tau)
        return loss

    @torch.no_grad()
    def now(seconds):
        E0p = corrector(A_delta, E0, E_L)
        return seconds, E0p, base.propagate(A_r, E0p)

    taken, step, t0 = {}, 0, time.perf_counter()
    if 0 in snapshots:
        taken[0] = now(0.0)

    def after_step():
        nonlocal step
        step += 1
        if step in snapshots:
            taken[step] = now(time.perf_counter() - t0)

    # trained on L for `epochs` epochs; the last epoch is the model (no selection on validation)
    state = fit(Stage(name, corrector, loss_fn, embed, replace(data, train=train_r), epochs, "last",
                      after_step=after_step, seed=seed)) if epochs else {"train_seconds": 0.0}
    return (*now(state["train_seconds"]), {k: v for k, v in taken.items() if k < step})


def snapshot_budgets(per_epoch, epochs, k=1):
    """The smaller budgets, scored as snapshots of the same fine-tuning: {optimizer steps: label} for 0 steps, 1 step
    and every 1/k of an epoch before the end (k = 1: each whole epoch before the last)."""
    out = {0: "0 steps", 1: "1 step"}
    for q in range(1, k * epochs):
        out.setdefault(round(q * per_epoch / k), f"{q / k:g} epoch{'s' * (q > k)}")
    return out


def pretrain(corrector, base, E0, E_L, data, self_loops, fit, cfg, rng, name="pretrain"):
    """Pre-train the encoder (or, as a control, FineTuneOnly's E0) on random requests (pre_frac of the training
    edges, redrawn every redraw_every epochs). Returns the training seconds."""
    seconds = 0.0
    for period in range(0, cfg.pre_epochs, cfg.redraw_every):
        req = random_requests(data.train, cfg.pre_frac, rng)
        print(f"{name}: random request of {len(req)} edges, epochs {period + 1}..")
        seconds += fine_tune(corrector, base, E0, E_L, req, data, remove_edges(data.train, req), self_loops, fit,
                             cfg, name, min(cfg.redraw_every, cfg.pre_epochs - period), int(rng.integers(2 ** 31)))[0]
    return seconds


def unlearn_pipeline(cfg, data, base, base_seconds, self_loops, fit, train_base, report, encoder_state=None):
    """Forget cfg.forget (a fraction, `adversarial`, or a file of pairs; cfg.sequence fractions one after the
    other, each from the previously unlearned model) from the trained `base` (a LightGCN, any depth), with
    UnlearnRec, with fine-tune-only, and (cfg.retrain) by retraining.
    fit: the training loop (see fine_tune); train_base(data, name) -> (model, seconds) trains a base model with
    the base's settings; report(data, E_user, E_item) -> metrics; encoder_state: a pre-trained encoder to reuse.
    Returns a dict: per-step rows, times, the pre-trained encoder and the last unlearned embeddings."""
    rng_req, rng_pre, rng_eval = (np.random.default_rng([cfg.seed, k]) for k in range(3))   # one per purpose
    nu, ni = data.n_users, data.n_items
    base.requires_grad_(False)
    dev = base.E0.device

    def final(E0, train):
        with torch.no_grad():
            return base.propagate(Graph(nu, ni, train, self_loops).normalized().to(dev), E0)

    clean, data_o, fraction = None, data, forget_fraction(cfg.forget)
    if cfg.forget == "adversarial":
        # poison: for half the users, an edge to the item the clean model likes least, then train on it
        users = np.sort(rng_req.choice(nu, nu // 2, replace=False))
        fixed = least_liked_items(*final(base.E0, data.train).split([nu, ni]), users, [data.train, data.val, data.test])
        poisoned = np.concatenate([data.train, fixed])
        data_o = replace(data, train=poisoned[np.lexsort((poisoned[:, 1], poisoned[:, 0]))])
        print(f"adversarial: {len(fixed)} injected edges; training the poisoned model")
        clean = (base, base_seconds)
        base, base_seconds = train_base(data_o, "poisoned")
        base.requires_grad_(False)
    elif fraction is None:
        fixed = read_requests(cfg.forget, data.train, nu, ni)
    E0, E_L = base.E0.detach(), final(base.E0, data_o.train)
    encoder = InfluenceEncoder(nu + ni, E0.shape[1], cfg.enc_layers, cfg.eta0, cfg.omega, cfg.h0_all).to(dev)
    if encoder_state is not None:
        encoder.load_state_dict(encoder_state)
        pre_seconds = 0.0
    else:
        pre_seconds = pretrain(encoder, base, E0, E_L, data_o, self_loops, fit, cfg, rng_pre)
    pretrained = {k: v.clone() for k, v in encoder.state_dict().items()}
    chains = {"unlearnrec": (E0, E_L), "fine-tune-only": (E0, E_L)}
    if cfg.pretrain_control:
        # the control gets the encoder's extra training too: E0 itself pre-trained on the same random requests
        control = FineTuneOnly(E0).to(dev)
        pre_control = pretrain(control, base, E0, E_L, data_o, self_loops, fit, cfg,
                               np.random.default_rng([cfg.seed, 1]), "pretrain-control")   # rng_pre's draws again
        chains["fine-tune-only, pre-trained"] = (control.E0p.detach(), E_L)

    def row(name, data_r, E_all, seconds, requests):
        E_user, E_item = E_all.split([nu, ni])
        held = held_out_pairs(requests, [data.test])     # validation selected the base and retraining: not used
        negatives = never_seen_pairs(len(requests), [data_o.train, data.val, data.test], nu, ni, rng_eval)
        r = {"model": name, **report(data_r, E_user, E_item), "seconds": seconds,
             **score_report(E_user, E_item, requests, held, negatives)}
        print(f"== {name:14s} | test " + " ".join(f"{k} {v:.4f}" for k, v in r["test"].items())
              + f" | forgotten {r['forgotten']['mean']:.3f} held-out {r['held_out']['mean']:.3f} "
              f"negatives {r['negatives']['mean']:.3f} "
              f"| MIA AUC {r['mia_auc']:.3f} | {seconds:.1f} s")
        return r

    train, steps = data_o.train, []
    for k in range(cfg.sequence):
        requests = fixed if fraction is None else random_requests(train, fraction, rng_req)
        train_r = remove_edges(train, requests)
        data_r = replace(data, train=train_r)
        print(f"request {k + 1}/{cfg.sequence}: unlearning {len(requests)} of {len(train)} training edges")
        rows = [row("base", data_r, E_L, base_seconds, requests)] if k == 0 else []
        per_epoch = -(-len(train_r) // cfg.batch_size)
        budgets = snapshot_budgets(per_epoch, cfg.finetune_epochs, cfg.snapshots_per_epoch)
        seed = int(rng_pre.integers(2 ** 31))       # paired: both methods see the same batches and negatives
        for name, (E0_k, E_L_k) in chains.items():
            if name == "unlearnrec":
                encoder.load_state_dict(pretrained)
                encoder.chained = k > 0
                corrector = encoder
            else:
                corrector = FineTuneOnly(E0_k)
            seconds, E0p, E, taken = fine_tune(corrector, base, E0_k, E_L_k, requests, data, train_r, self_loops,
                                               fit, cfg, f"{name}{k + 1}", cfg.finetune_epochs, seed, tuple(budgets))
            chains[name] = (E0p, E)
            for n_steps, (seconds_b, _, E_b) in taken.items():
                rows.append({**row(f"{name} @ {budgets[n_steps]}", data_r, E_b, seconds_b, requests),
                             "method": name, "steps": n_steps})
            rows.append({**row(name, data_r, E, seconds, requests), "method": name,
                         "steps": cfg.finetune_epochs * per_epoch})
        if clean is not None and np.array_equal(train_r, data.train):
            # the retrained model IS the clean base: same data, settings and seed
            rows.append(row("retrained", data_r, final(clean[0].E0, data.train), clean[1], requests))
        elif cfg.retrain:
            model, seconds = train_base(data_r, f"retrained{k + 1}")
            rows.append(row("retrained", data_r, final(model.E0, train_r), seconds, requests))
        steps.append({"requests": len(requests), "rows": rows})
        train = train_r
    return {"pretrain_seconds": pre_seconds, "steps": steps, "encoder_pretrained": pretrained,
            **({"pretrain_control_seconds": pre_control} if cfg.pretrain_control else {}),
            "encoder": encoder.state_dict(), "unlearned": chains["unlearnrec"][1], "requests": requests}


def timings(out, K, retrain):
    """unlearn_pipeline's times: per request, fine-tuning alone and with the pre-training shared by the K requests,
    and (retrain) the speed-up over retraining."""
    pre = out["pretrain_seconds"]
    total = {name: sum(r["seconds"] for s in out["steps"] for r in s["rows"] if r["model"] == name)
             for name in ("unlearnrec", "fine-tune-only", "retrained")}
    times = {"pretrain_seconds": pre, "per_request": {n: t / K for n, t in total.items()},
             "unlearnrec_amortised": (pre + total["unlearnrec"]) / K,
             **{k: out[k] for k in ("pretrain_control_seconds",) if k in out}}
    if retrain and total["unlearnrec"] > 0:           # (--finetune_epochs=0: no fine-tuning time to compare)
        times["speedup_finetune"] = total["retrained"] / total["unlearnrec"]
        times["speedup_amortised"] = total["retrained"] / (pre + total["unlearnrec"])
        print(f"{K} request(s): retraining {total['retrained']:.1f} s vs UnlearnRec {total['unlearnrec']:.1f} s "
              f"fine-tuning ({times['speedup_finetune']:.1f}x), {pre + total['unlearnrec']:.1f} s with pre-training "
              f"({times['speedup_amortised']:.1f}x)")
    return times
