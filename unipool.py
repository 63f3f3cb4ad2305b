"""
UniPool: one pool of experts shared by every layer, each layer with its own router.
Paper: "UniPool: A Globally Shared Expert Pool for Mixture-of-Experts", arXiv:2605.06665.

A vanilla MoE gives each layer its own E experts, so expert parameters grow linearly with depth. Yet replacing
a deep layer's learned router with uniform random routing barely hurts production MoE models: per-layer expert
sets are redundant. UniPool makes expert capacity one global budget: a single pool of M experts that every
layer's router draws from. An expert's gradient is then the sum of what every layer sent it. To keep the
shared pool balanced the per-layer Switch loss is replaced by one pool-level loss, and NormRouter
(normrouter.py) keeps routing sparse and scale-stable across layers.

    vanilla:  FFN_l(x) = Σ_{i ∈ TopK(r_l(x))} g_{l,i}(x) · e_{l,i}(x)      each layer owns e_{l,1..E}
    UniPool:  FFN_l(x) = Σ_{i ∈ TopK(r_l(x))} g_{l,i}(x) · e_i(x)          one pool e_1..e_M for all layers
    f_i^(l) = (#tokens of layer l routed to i) / (T·k),   P_i^(l) = (1/T) Σ_t s_{t,i}^(l)
    L_switch^(l) = α · E · Σ_i f_i^(l) · P_i^(l)                            (per layer, vanilla)
    L_pool       = α · M · Σ_i f̄_i · P̄_i,   f̄ = mean_l f^(l) (no gradient),  P̄ = mean_l P^(l)

Variants: grouped pools (every G adjacent layers share a pool), reduced pools (M < E·L), fine-grained experts
(each expert split m ways: hidden/m wide, top m·k).

Dispatch: the T·k (token, expert) assignments are sorted by expert so each expert multiplies one contiguous
block of rows (a grouped matmul: kernels/moe.py, Triton on GPU, torch._grouped_mm on CPU); pairs whose gate is
exactly zero (NormRouter: fewer than k positive scores) sort last, past every expert: they are not computed
(a speed choice), but the load counts f still count them, as the official code does (its routing map is every
top-k pick, whatever the score). Outputs are un-sorted with a gather and summed over k through a view, so the
forward has no scatter-add with repeated indices. (The gather's backward adds each token's k rows:
deterministic on the CPU, atomic adds on CUDA when k > 1.)

Shared experts (DeepSeekMoE, arXiv:2401.06066, --n_shared): n_s always-on experts beside the routed ones,
FFN_l(x) = Σ_{s ≤ n_s} e^shared_{l,s}(x) + Σ_{i ∈ TopK} g_{l,i}(x) · e_i(x), one set per layer (held as one
SwiGLU n_s times as wide, the same function).

Choices: the auxiliary losses are summed over layers (Switch) and over pools (pool loss, one term per
group of layers); f̄ comes from the current batch's detached counts; the routing probe keeps the learned
router's gate values and draws the experts uniformly at random.

Train it:  python train_lm.py --ffn=unipool --pool_size=32 --router=norm
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.moe import grouped_mm
from normrouter import NormRouter, RouterOutput, SoftmaxRouter, router_z_loss

ROUTERS = ("softmax", "norm", "mixtral")


class ExpertPool(nn.Module):
    """M SwiGLU experts with weights stacked as (M, in, out) tensors, so dispatch is a grouped matmul."""

    def __init__(self, n_experts, dim, hidden, init_std=0.02, out_std=0.02):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.randn(n_experts, dim, hidden) * init_std)
        self.w3 = nn.Parameter(torch.randn(n_experts, dim, hidden) * init_std)
        self.w2 = nn.Parameter(torch.randn(n_experts, hidden, dim) * out_std)


def sort_by_expert(indices, n_experts, keep=None):
    """(T, k) expert indices -> order (T·k,) that sorts assignments by expert, counts (M,), offsets (M+1,).
    keep (T, k) bool: pairs to dispatch; the others sort after expert M-1 (past offsets[M]) and are not counted."""
    flat = indices.reshape(-1)                                                    # (T·k,)
    if keep is not None:
        flat = torch.where(keep.reshape(-1), flat, n_experts)                     # n_experts: "dropped"
    order = torch.argsort(flat, stable=True)
    # counts by a scatter-add into n_experts + 1 bins: bincount would read max(flat) on the host (a GPU sync)
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))[:n_experts]
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
    return order, counts, offsets


class SharedExperts(nn.Module):
    """n_s always-on SwiGLU experts of one layer, as one SwiGLU n_s times as wide."""

    def __init__(self, dim, hidden, init_std, out_std):
        super().__init__()
        self.w1, self.w3 = (nn.Parameter(torch.randn(dim, hidden) * init_std) for _ in range(2))
        self.w2 = nn.Parameter(torch.randn(hidden, dim) * out_std)

    def forward(self, h):
        return (F.silu(h @ self.w1) * (h @ self.w3)) @ self.w2


class MoE(nn.Module):
    """One MoE layer: its own router, a reference to a pool that other layers may share, optional shared experts."""

    def __init__(self, router, pool, shared=None):
        super().__init__()
        self.router, self.pool, self.shared = router, pool, shared

    def forward(self, x):
        B, T, d = x.shape
        h = x.reshape(-1, d)                                                      # (N, d), N = B·T tokens
        r: RouterOutput = self.router(h)
        k = r.indices.shape[1]
        order, counts, offsets = sort_by_expert(r.indices, self.pool.n_experts, keep=r.gates > 0)
        # index_select, not h[idx]: its backward is an index_add, cheaper on the CPU than indexing's index_put
        xs = h.index_select(0, order // k)                                        # (N·k, d) rows sorted by expert
        # e_i(x) = W2 (silu(W1 x) * W3 x), one grouped matmul per weight (rows of dropped pairs: zero)
        a = F.silu(grouped_mm(xs, self.pool.w1, offsets)) * grouped_mm(xs, self.pool.w3, offsets)
        ys = grouped_mm(a, self.pool.w2, offsets)                                  # (N·k, d)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)            # un-sort with a gather
        y = ys.index_select(0, inverse).view(-1, k, d)                            # (N, k, d)
        # FFN(x) = Σ_{i ∈ TopK} g_i(x) · e_i(x)   (+ Σ_s e^shared_s(x))
        y = (r.gates.to(y.dtype).unsqueeze(-1) * y).sum(1)                        # (N, d)
        if self.shared is not None:
            y = y + self.shared(h).to(y.dtype)
        # f counts every top-k pick, zero-gate ones included (the official routing map); only dispatch skips them
        picks = torch.zeros_like(counts).scatter_add_(0, r.indices.reshape(-1), torch.ones_like(order))   # (M,)
        aux = {"scores": r.scores, "counts": picks, "logits": r.logits, "dropped": len(order) - offsets[-1]}
        return y.view(B, T, d), aux


def build_moe_layers(kind, n_layer, dim, hidden, n_experts=8, pool_size=0, pool_groups=1, top_k=1,
                     router="softmax", expert_split=1, init_std=0.02, n_shared=0):
    """The n_layer FFN modules of a MoE model. kind: "moe" (each layer owns n_experts) or "unipool" (pool_groups
    pools of pool_size experts in all, each shared by n_layer/pool_groups adjacent layers; pool_size 0 =
    n_experts·n_layer, the vanilla budget). expert_split m: m-times narrower experts, m times as many, top m·k.
    router: softmax | norm | mixtral (softmax, then the k gates renormalised). n_shared: always-on experts per
    layer (each as wide as a routed expert)."""
    m = expert_split
    if kind not in ("moe", "unipool"):
        raise ValueError(f"ffn kind must be moe or unipool, got {kind!r}")
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}")
    if min(n_experts, top_k, m, pool_groups) < 1 or pool_size < 0 or n_shared < 0:
        raise ValueError("n_experts, top_k, expert_split, pool_groups must be >= 1, pool_size and n_shared >= 0")
    if hidden % m:
        raise ValueError(f"expert hidden size {hidden} is not divisible by expert_split={m}")
    if kind == "moe":  # one pool per layer
        n_pools, per_pool = n_layer, n_experts * m
    else:
        if n_layer % pool_groups:
            raise ValueError(f"n_layer={n_layer} is not divisible by pool_groups={pool_groups}")
        total = (pool_size or n_experts * n_layer) * m
        if total % pool_groups:
            raise ValueError(f"pool_size={total // m} is not divisible by pool_groups={pool_groups}")
        n_pools, per_pool = pool_groups, total // pool_groups
    if top_k * m > per_pool:
        raise ValueError(f"top_k={top_k * m} (after expert_split) exceeds the {per_pool} experts a layer can reach")
    out_std = init_std / math.sqrt(2 * n_layer)
    pools = [ExpertPool(per_pool, dim, hidden // m, init_std, out_std) for _ in range(n_pools)]
    make_router = {"norm": NormRouter, "softmax": SoftmaxRouter,
                   "mixtral": lambda *a: SoftmaxRouter(*a, renormalize=True)}[router]
    layers = []
    for l in range(n_layer):
        r = make_router(dim, per_pool, top_k * m)
        nn.init.normal_(r.W.weight, std=init_std)
        shared = SharedExperts(dim, n_shared * hidden // m, init_std, out_std) if n_shared else None
        layers.append(MoE(r, pools[l * n_pools // n_layer], shared))  # adjacent layers share a pool
    return layers


# ----------------------------------------------------------------------------- losses (returned to the caller)

def load_stats(scores, counts, top_k):
    """One layer's routing statistics, in fp32. scores (T, M) router scores, counts (M,) assignments."""
    # f_i = (#tokens routed to i) / (T·k)   (a count: no gradient)
    f = counts.float() / (scores.shape[0] * top_k)
    # P_i = (1/T) Σ_t s_ti
    P = scores.float().mean(0)
    return f, P


def switch_loss(scores, counts, top_k):
    """One layer's Switch loss before α; its minimum, 1, is perfectly uniform routing."""
    f, P = load_stats(scores, counts, top_k)
    # L_switch^(l) = E · Σ_i f_i^(l) · P_i^(l)
    return scores.shape[1] * (f * P).sum()


def pool_loss(scores_per_layer, counts_per_layer, top_k):
    """The pool-level loss before α, over the layers that share one pool."""
    stats = [load_stats(s, c, top_k) for s, c in zip(scores_per_layer, counts_per_layer)]
    # f̄_i = mean_l f_i^(l),   P̄_i = mean_l P_i^(l)
    f_bar = torch.stack([f for f, _ in stats]).mean(0)
    P_bar = torch.stack([P for _, P in stats]).mean(0)
    # L_pool = M · Σ_i f̄_i · P̄_i
    return scores_per_layer[0].shape[1] * (f_bar * P_bar).sum()


def aux_losses(model_layers, aux, loss_kind, aux_coef, zloss_coef):
    """The auxiliary loss of one forward. model_layers: the MoE modules in layer order; aux: GPT.forward's dict.
    loss_kind: "switch" (per layer), "pool" (per pool, over the layers sharing it) or "none"."""
    total = torch.zeros((), device=aux["scores"][0].device)
    top_k = model_layers[0].router.top_k
    if loss_kind == "switch":
        total = total + aux_coef * sum(switch_loss(s, c, top_k) for s, c in zip(aux["scores"], aux["counts"]))
    elif loss_kind == "pool":
        groups = {}
        for l, layer in enumerate(model_layers):
            groups.setdefault(id(layer.pool), []).append(l)
        for ls in groups.values():
            total = total + aux_coef * pool_loss([aux["scores"][l] for l in ls], [aux["counts"][l] for l in ls], top_k)
    if zloss_coef:
        total = total + zloss_coef * sum(router_z_loss(z) for z in aux["logits"])
    return total


def routing_stats(model_layers, aux):
    """Load statistics of one forward, per layer: coefficient of variation of the expert load (std / mean of
    the counts of top-k picks, 0 = perfectly balanced), dead experts (never picked), the share of the picks dropped
    from the dispatch for a zero gate; per pool: its coverage, the share of its experts that at least one of its layers used."""
    cv, dead, dropped, used = [], [], [], {}
    for layer, c, n_drop in zip(model_layers, aux["counts"], aux["dropped"]):
        c = c.float()
        cv.append((c.std(unbiased=False) / c.mean().clamp_min(1e-9)).item())
        dead.append(int((c == 0).sum()))
        dropped.append(float(n_drop) / max(1.0, c.sum().item()))         # c counts the dropped picks too
        used[id(layer.pool)] = used.get(id(layer.pool), torch.zeros_like(c, dtype=torch.bool)) | (c > 0)
    return {"load_cv": cv, "dead_experts": dead, "dropped": dropped,
            "pool_coverage": [u.float().mean().item() for u in used.values()]}


# ----------------------------------------------------------------------------- analysis

class UniformRouter(nn.Module):
    """The routing probe: the learned router's top-k gate values, but experts drawn uniformly at random."""

    def __init__(self, learned, n_experts, generator=None):
        super().__init__()
        self.learned, self.n_experts, self.generator, self.top_k = learned, n_experts, generator, learned.top_k

    def forward(self, h):
        r = self.learned(h)
        # k distinct experts per token, uniformly: the first k of a random permutation
        noise = torch.rand(h.shape[0], self.n_experts, generator=self.generator).to(h.device)
        indices = noise.topk(self.top_k, dim=-1).indices
        return RouterOutput(r.gates, indices, r.scores, r.logits)


@contextlib.contextmanager
def random_routing(moe_layers, layers, seed=0):
    """Within the block, the given layers route uniformly at random (see UniformRouter)."""
    g = torch.Generator().manual_seed(seed)
    saved = {l: moe_layers[l].router for l in layers}
    try:
        for l in layers:
            moe_layers[l].router = UniformRouter(saved[l], moe_layers[l].pool.n_experts, g)
        yield
    finally:
        for l, r in saved.items():
            moe_layers[l].router = r

