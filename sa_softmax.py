"""
Self-Adjust Softmax: multiply the attention probabilities by the scores themselves.
Paper: "Self-Adjust Softmax", arXiv:2502.18277.

Softmax's gradient ∂p_i/∂x_i = p_i (1 − p_i) vanishes when a probability saturates at 0 or 1, so a head that has
become confident stops learning. SA-Softmax scales each probability by its own score: the derivative of x_i·p_i is
p_i + x_i·p_i(1 − p_i), which stays near 1 where p_i → 1. The normalised variant first maps the scores of the row
into [0, 1] (through min/max clamped at 0), so every weight stays between 0 and its softmax probability.

Equations, for one row x of scaled scores over its valid (unmasked) entries:
    p      = softmax(x)
    SA-1:  w = x ⊙ p                                                                          (1)
    SA-2:  w = ((x − a) / (b − a)) ⊙ p,   a = min(x_min, 0),   b = max(x_max, 0)               (2)
    attention(q, K, V) = w(q K^T / √d) V

Rows are not renormalised (SA-1 weights can be negative). Choices, as in the only public implementation:
x_min and x_max are NOT detached (gradient flows through them). Masked entries are zeroed before the product
(−inf · 0 would be NaN), and a fully masked row gives zeros; −inf already in x counts as masked, so an additive
mask means what the boolean one does. Scores are formed and adjusted in fp32 (also under autocast), then cast
back.

Train it:  python train_lm.py --attn_score=sa        (or --attn_score=sa_norm)
See the gradient argument:  python sa_softmax.py
"""
import math

import torch


def masked_softmax(x, mask, dim=-1):
    """softmax over the entries where mask is True; a row with no valid entry gives zeros (not NaN)."""
    m = x.masked_fill(~mask, float("-inf")).amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))   # fully masked row: any finite shift works
    e = torch.exp((x - m).masked_fill(~mask, float("-inf")))   # exp(-inf) = 0 also where x - m overflows
    return e / e.sum(dim, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def sa_softmax(x, dim=-1, mask=None, normalized=False):
    """SA-1 (x · softmax(x)) or, with normalized=True, SA-2. mask: bool like x (broadcastable), True = keep.
    An additive mask (−inf already in x) means the same as the boolean one: −inf entries are masked."""
    # −inf entries are masked too (else −inf · 0 = NaN, and SA-2's x_min would be −inf for the whole row)
    mask = x != float("-inf") if mask is None else mask.expand_as(x) & (x != float("-inf"))
    xf = x.to(torch.promote_types(x.dtype, torch.float32))   # fp32 at least: bf16 loses the row statistics
    p = masked_softmax(xf, mask, dim)
    x0 = xf.masked_fill(~mask, 0.0)   # masked entries have p = 0; a zero x keeps 0·p = 0 instead of NaN
    if not normalized:
        # (1)  w = x ⊙ softmax(x)
        return (x0 * p).to(x.dtype)
    # (2)  a = min(x_min, 0), b = max(x_max, 0) over the valid entries (a masked 0 cannot move the clamped values)
    a = x0.amin(dim, keepdim=True).clamp(max=0.0)
    b = x0.amax(dim, keepdim=True).clamp(min=0.0)
    # (2)  w = ((x − a) / (b − a)) ⊙ softmax(x); a row whose scores are all 0 has b = a and weights 0
    return ((x0 - a) / (b - a).clamp_min(1e-12) * p).to(x.dtype)


def sa_attention(q, k, v, mask=None, normalized=False, dropout_p=0.0):
    """Attention with SA-Softmax weights. q (B, H, T, D), k, v (B, H, S, D); mask None = causal (T == S),
    else bool (B or 1, T, S), True = may attend. Eager: it materialises the (B, H, T, S) weights."""
    T, S = q.shape[-2], k.shape[-2]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None]
    # x = q K^T / √d, in fp32 even under autocast (as the fused kernel does): bf16 scores of size ~10 are off by
    # ~0.05, which the product x · softmax(x) amplifies
    f32 = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        x = (q.to(f32) @ k.to(f32).transpose(-2, -1)) / math.sqrt(q.shape[-1])   # (B, H, T, S)
    w = sa_softmax(x, dim=-1, mask=mask[:, None], normalized=normalized)
    if dropout_p > 0:
        w = torch.nn.functional.dropout(w, dropout_p)
    return w.to(v.dtype) @ v                                                       # (B, H, T, D)


if __name__ == "__main__":
    # The gradient argument: grow one score x_0 of a row and watch ∂w_0/∂x_0.
    print(f"{'x_0':>6} | {'softmax p_0':>11} | {'d softmax_0/dx_0':>16} | {'d SA-1_0/dx_0':>13}")
    for x0 in (0.0, 2.0, 4.0, 8.0, 16.0):
        x = torch.tensor([x0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
        g_soft = torch.autograd.grad(torch.softmax(x, -1)[0], x)[0][0].item()
        g_sa = torch.autograd.grad(sa_softmax(x)[0], x)[0][0].item()
        print(f"{x0:6.1f} | {torch.softmax(x, -1)[0].item():11.6f} | {g_soft:16.2e} | {g_sa:13.4f}")
