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
    c   = E_x[ 1 / ‖topk(relu(x / ‖x‖))‖₂ ],  x ~ N(0, I_M)    (Monte Carlo, 1e5 samples, seed 42)
    gates = s at the top-k experts, NOT renormalised

If all of a token's logits are negative its gates are all zero and the token skips the FFN (the residual
carries it). The softmax baseline (UniPool's vanilla MoE) and Mixtral's renormalised variant are here too,
with the router z-loss of ST-MoE.

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
    """c = E[1 / ‖topk(relu(x/‖x‖))‖₂], x ~ N(0, I_M). Samples whose entries are all negative (probability
    2^-M: relu gives 0 and 1/0 = inf, which the official estimator returns for small pools) are excluded."""
    g = torch.Generator().manual_seed(seed)
    inv_norms = []
    for start in range(0, n_samples, 10_000):  # chunks keep memory at 10k x M
        x = torch.randn(min(10_000, n_samples - start), n_experts, generator=g, dtype=torch.float64)
        # y = relu(x / ‖x‖)
        y = F.relu(x / x.norm(dim=1, keepdim=True))
        top_norm = y.topk(top_k, dim=1).values.norm(dim=1)
        inv_norms.append(1.0 / top_norm[top_norm > 0])
    # c = E[1 / ‖topk(y)‖₂]
    return torch.cat(inv_norms).mean().item()


class NormRouter(nn.Module):
    def __init__(self, dim, n_experts, top_k, eps=1e-8):
        super().__init__()
        self.top_k, self.eps = top_k, eps
        self.W = nn.Linear(dim, n_experts, bias=False)
        self.sigma = nn.Parameter(torch.ones(()))
        self.c = normrouter_scale(n_experts, top_k)

    def forward(self, h):
        # z = W h  (routing in fp32: the norm and the top-k are sensitive to rounding)
        z = F.linear(h.float(), self.W.weight.float())                               # (T, M)
        # s_i = σ · c · relu(z_i / (‖z‖₂ + ε))
        s = self.sigma * self.c * F.relu(z / (z.norm(dim=-1, keepdim=True) + self.eps))
        # gates = the raw scores of the top-k experts (no renormalisation)
        gates, indices = s.topk(self.top_k, dim=-1)
        return RouterOutput(gates, indices, s, z)


class SoftmaxRouter(nn.Module):
    """s = softmax(W h), then top-k; renormalize=True divides the k gates by their sum (Mixtral)."""

    def __init__(self, dim, n_experts, top_k, renormalize=False):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.W = nn.Linear(dim, n_experts, bias=False)

    def forward(self, h):
        z = F.linear(h.float(), self.W.weight.float())                               # (T, M)
        s = z.softmax(dim=-1)
        gates, indices = s.topk(self.top_k, dim=-1)
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return RouterOutput(gates, indices, s, z)


def router_z_loss(logits):
    """ST-MoE's z-loss (before its coefficient): mean_t (logsumexp_j z_tj)², keeps router logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
