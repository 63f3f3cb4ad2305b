"""
NormRouter: route by the direction of the router logits, not their size.
Paper: the KERN router of "Understanding the Mixture-of-Experts with Nadaraya-Watson Kernel", arXiv:2509.25913,
adopted by "UniPool: A Globally Shared Expert Pool for Mixture-of-Experts", arXiv:2605.06665.

A softmax router's gates depend on the scale of its logits, which drifts during training and differs between
layers; when many layers route into one shared pool (UniPool), that drift makes the layers fight over experts.
NormRouter L2-normalises the logit vector, keeps its positive part (about half the experts get exactly zero: the
router is sparse before top-k) and multiplies by a calibration constant c, chosen so that the top-k gates of a
random direction have unit norm on average, and a learnable scalar σ.

    z   = W h                                                  (no normalisation of h or W)
    s_i = σ · c · relu( z_i / (‖z‖₂ + ε) )                     ε = 1e-8, σ init 1
    c   = E_x[ 1 / ‖topk(relu(x / ‖x‖))‖₂  |  at least min(3, M) entries of x > 0 ],  x ~ N(0, I_M)
    gates = s at the top-k experts, NOT renormalised

If all of a token's logits are negative its gates are all zero and the token skips the FFN (the residual
carries it); a gate that is zero because fewer than k scores are positive is dropped by the dispatch
(unipool.py). Routing runs in fp32 even under autocast: top-k on rounded logits would pick other experts.
The softmax baseline (UniPool's vanilla MoE) and Mixtral's renormalised variant are here too, with the router
z-loss of ST-MoE, and the auxiliary-loss-free balancing bias of DeepSeek-V3 (arXiv:2412.19437): a per-expert
bias b added to the scores for the top-k choice only (the gates stay the unbiased scores), moved after each
step by b_i += γ · sign(mean load − load_i).

Train with it:  python train_lm.py --ffn=unipool --router=norm
"""
import functools
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class RouterOutput(NamedTuple):
    gates: torch.Tensor      # (T, k) weight of each chosen expert
    indices: torch.Tensor    # (T, k) chosen experts
    scores: torch.Tensor     # (T, M) the full scores s (the balance losses use them)
    logits: torch.Tensor     # (T, M) z = W h (the z-loss uses them)


@functools.lru_cache(maxsize=None)
def normrouter_scale(n_experts, top_k, n_samples=100_000, seed=42):
    """c = E[1 / ‖topk(y)‖₂], y = relu(x/‖x‖), x ~ N(0, I_M), over the samples with at least min(3, M) positive
    entries (Monte Carlo, fp64, seed 42).

    Why the condition. The paper's plain expectation is infinite for every M: when exactly one entry of x is
    positive (probability M·2^-M) the largest entry of y has a non-zero density at 0, so 1/‖topk(y)‖ has density
    ~ 1/u² for large u and an infinite mean; a Monte Carlo estimate then drifts with the seed (M = 8: 2.67 - 2.96).
    With exactly two positive entries the mean is finite but the variance is not (density of the largest ~ u
    near 0). With three or more, P(‖topk(y)‖ < u) ~ u³ and mean and variance are finite, so the estimate is
    stable (±0.5 % over seeds for M = 2..8 with 1e5 samples); for M <= 3, "all entries positive" bounds
    ‖topk(y)‖ below by 1/√M. The excluded event has probability (1 + M + M(M-1)/2)·2^-M: 6e-25 at M = 96, so
    the paper's values are unchanged there (4.014 vs 4.016 at (96, 1), 1.770 vs 1.771 at (32, 4)); what
    changes is the small pools, where the paper's estimator is undefined."""
    g = torch.Generator().manual_seed(seed)
    need = min(3, n_experts)
    inv_norms = []
    for start in range(0, n_samples, 10_000):  # chunks keep memory at 10k x M
        x = torch.randn(min(10_000, n_samples - start), n_experts, generator=g, dtype=torch.float64)
        # y = relu(x / ‖x‖)
        y = F.relu(x / x.norm(dim=1, keepdim=True))
        top_norm = y.topk(top_k, dim=1).values.norm(dim=1)
        inv_norms.append(1.0 / top_norm[(x > 0).sum(1) >= need])
    # c = E[1 / ‖topk(y)‖₂ | at least min(3, M) positive]
    return torch.cat(inv_norms).mean().item()


def check_top_k(n_experts, top_k):
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the {n_experts} experts a router chooses from")


class Router(nn.Module):
    """What every router shares: the weight W, fp32 routing under autocast, the balancing bias b (zero and
    unused unless update_bias is called: then top-k is taken over s + b, the gates stay s)."""

    def __init__(self, dim, n_experts, top_k):
        super().__init__()
        check_top_k(n_experts, top_k)
        self.top_k = top_k
        self.W = nn.Linear(dim, n_experts, bias=False)
        self.register_buffer("bias", torch.zeros(n_experts))

    def scores(self, z):
        raise NotImplementedError

    def forward(self, h):
        # routing in fp32, autocast off: the norm, the softmax and top-k are sensitive to rounding
        with torch.autocast(h.device.type, enabled=False):
            # z = W h
            z = F.linear(h.float(), self.W.weight.float())                           # (T, M)
            s = self.scores(z)                                                       # (T, M)
            indices = (s + self.bias).topk(self.top_k, dim=-1).indices               # (T, k) b: choice only
            gates = s.gather(-1, indices)                                            # (T, k)
            return RouterOutput(self.gates(gates), indices, s, z)

    def gates(self, top_scores):
        return top_scores

    @torch.no_grad()
    def update_bias(self, counts, rate):
        """Auxiliary-loss-free balancing: b_i += γ · sign(mean load − load_i), counts (M,) this step's load."""
        load = counts.float()
        self.bias += rate * torch.sign(load.mean() - load)


class NormRouter(Router):
    def __init__(self, dim, n_experts, top_k, eps=1e-8):
        super().__init__(dim, n_experts, top_k)
        self.eps = eps
        self.sigma = nn.Parameter(torch.ones(()))
        self.c = normrouter_scale(n_experts, top_k)

    def scores(self, z):
        # s_i = σ · c · relu(z_i / (‖z‖₂ + ε))   (gates: the raw scores of the top-k experts, no renormalisation)
        return self.sigma.float() * self.c * F.relu(z / (z.norm(dim=-1, keepdim=True) + self.eps))


class SoftmaxRouter(Router):
    """s = softmax(W h), then top-k; renormalize=True divides the k gates by their sum (Mixtral)."""

    def __init__(self, dim, n_experts, top_k, renormalize=False):
        super().__init__(dim, n_experts, top_k)
        self.renormalize = renormalize

    def scores(self, z):
        return z.softmax(dim=-1)

    def gates(self, top_scores):
        return top_scores / top_scores.sum(-1, keepdim=True) if self.renormalize else top_scores


def router_z_loss(logits):
    """ST-MoE's z-loss (before its coefficient): mean_t (logsumexp_j z_tj)², keeps router logits small."""
    with torch.autocast(logits.device.type, enabled=False):
        return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
