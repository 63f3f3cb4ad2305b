import math

import pytest
import torch

from gpt import GPT, GPTConfig
from sa_softmax import sa_attention, sa_softmax


def formula_row(x, keep, normalized):
    """SA-1 / SA-2 for one row, written out entry by entry over the valid entries only."""
    valid = [float(v) for v, k in zip(x, keep) if k]
    out = [0.0] * len(x)
    if not valid:
        return out
    m = max(valid)
    Z = sum(math.exp(v - m) for v in valid)
    a, b = min(min(valid), 0.0), max(max(valid), 0.0)
    for n, (v, k) in enumerate(zip(x, keep)):
        if k:
            p = math.exp(float(v) - m) / Z
            out[n] = ((float(v) - a) / (b - a) if normalized else float(v)) * p
    return out


@pytest.mark.parametrize("normalized", [False, True])
def test_equals_formula_on_random_rows_with_random_masks(normalized):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(6, 9, generator=g) > 0.4
    mask[0] = False                      # a fully masked row
    mask[1] = True                       # a full row
    x[2] = x[2].abs() + 0.5              # all positive: a = 0
    x[3] = -x[3].abs() - 0.5             # all negative: b = 0
    got = sa_softmax(x, mask=mask, normalized=normalized)
    expect = torch.tensor([formula_row(x[r], mask[r], normalized) for r in range(6)], dtype=torch.float64)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    assert torch.equal(got[0], torch.zeros(9, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalized", [False, True])
def test_extreme_scores_stay_finite(dtype, normalized):
    x = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, -1e4], [1e4, 1e4, 1e4, 1e4]], dtype=dtype)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False], [False, False, False, False]])
    x.requires_grad_()
    out = sa_softmax(x, mask=mask, normalized=normalized)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(x.grad.float()).all()
    assert out.dtype == dtype
    assert out[2].float().abs().sum() == 0  # fully masked row


@pytest.mark.parametrize("normalized", [False, True])
def test_gradcheck_float64_with_mask(normalized):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 7, generator=g) > 0.3
    mask[:, 0] = True
    assert torch.autograd.gradcheck(lambda t: sa_softmax(t, mask=mask, normalized=normalized), (x,))


def test_sa1_gradient_stays_near_one_where_softmax_vanishes():
    x = torch.tensor([12.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    g_soft = torch.autograd.grad(torch.softmax(x, -1)[0], x)[0][0]
    g_sa = torch.autograd.grad(sa_softmax(x)[0], x)[0][0]
    assert g_soft < 1e-4
    # d(x_0 p_0)/dx_0 = p_0 + x_0 p_0 (1 - p_0)
    p0 = torch.softmax(x.detach(), -1)[0]
    assert math.isclose(g_sa.item(), (p0 + 12.0 * p0 * (1 - p0)).item(), rel_tol=1e-9)
    assert abs(g_sa.item() - 1.0) < 0.01


@pytest.mark.parametrize("normalized", [False, True])
def test_attention_with_causal_mask_matches_naive_loop(normalized):
    g = torch.Generator().manual_seed(2)
    B, H, T, D = 2, 3, 6, 4
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    got = sa_attention(q, k, v, normalized=normalized)
    expect = torch.zeros_like(got)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                x = [(q[b, h, i] @ k[b, h, j]).item() / math.sqrt(D) for j in range(T)]
                w = formula_row(x, [j <= i for j in range(T)], normalized)
                expect[b, h, i] = sum(w[j] * v[b, h, j] for j in range(T))
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("score", ["sa", "sa_norm"])
def test_gpt_with_sa_scores_is_causal_and_caches(score):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16, attn_score=score)).eval()
    idx = torch.randint(0, 20, (1, 10))
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 20
    torch.testing.assert_close(model(idx).logits[:, :6], model(changed).logits[:, :6])
    out = model.generate(idx[:, :3], 6, temperature=0)
    full = idx[:, :3]
    for _ in range(6):
        full = torch.cat([full, model(full).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, full)


@pytest.mark.parametrize("normalized", [False, True])
def test_additive_minus_inf_mask_equals_the_boolean_mask(normalized):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64) * 2
    keep = torch.rand(5, 8, generator=g) > 0.4
    keep[0] = False                                          # a fully masked row
    keep[1] = True
    x_add = x.masked_fill(~keep, float("-inf")).requires_grad_()
    got = sa_softmax(x_add, normalized=normalized)
    expect = torch.tensor([formula_row(x[r], keep[r], normalized) for r in range(5)], dtype=torch.float64)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    assert torch.equal(got[0], torch.zeros(8, dtype=torch.float64))
    # both ways of masking give the same gradient on the kept entries, and no NaN anywhere
    got.sum().backward()
    x_bool = x.clone().requires_grad_()
    sa_softmax(x_bool, mask=keep, normalized=normalized).sum().backward()
    assert torch.isfinite(x_add.grad).all()
    torch.testing.assert_close(x_add.grad[keep], x_bool.grad[keep])


@pytest.mark.parametrize("normalized", [False, True])
def test_scores_are_fp32_under_bf16_autocast(normalized):
    """Under CPU autocast (bf16) the eager SA path must form q·kᵀ in fp32: with scores of size ~20, bf16 scores
    are off by up to ~0.06 each, which doubles the output's error (fp32 scores: 0.19 % / 0.07 % mean relative
    error, all of it from bf16 in w @ v; bf16 scores: 0.44 % / 0.31 %)."""
    g = torch.Generator().manual_seed(4)
    B, H, T, D = 2, 4, 32, 16
    q, k, v = (torch.randn(B, H, T, D, generator=g) * s for s in (5.0, 5.0, 1.0))
    q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))        # inputs exactly representable in bf16
    expect = sa_attention(q.double(), k.double(), v.double(), normalized=normalized)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sa_attention(q, k, v, normalized=normalized)
    err = (got.double() - expect).abs().mean() / expect.abs().mean()
    assert err < 0.0025, err


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("how", ["no mask", "all-True mask"])
def test_rows_without_any_masked_entry_equal_formula(normalized, how):
    """Rows with no masked entry: all positive (a = 0 < x_min), all negative (b = 0 > x_max), mixed signs and a
    single entry. A masked entry counts as a 0 score, which hides how x_min and x_max are clamped at 0: only rows
    like these see a wrong clamp."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
    x[0] = x[0].abs() + 0.3              # all positive: x_min > 0, so a = 0, not x_min
    x[1] = -x[1].abs() - 0.3             # all negative: x_max < 0, so b = 0, not x_max
    x[3] = x[3].abs() + 5.0              # large and positive: a = 0 puts every weight near its probability
    keep = torch.ones(5, 7, dtype=torch.bool)
    got = sa_softmax(x, mask=None if how == "no mask" else keep, normalized=normalized)
    expect = torch.tensor([formula_row(x[r], keep[r], normalized) for r in range(5)], dtype=torch.float64)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    one = torch.tensor([[2.5], [-1.5]], dtype=torch.float64)      # one entry: SA-2 weight (x - a)/(b - a) = 1 or 0
    expect = torch.tensor([[1.0], [0.0]] if normalized else [[2.5], [-1.5]], dtype=torch.float64)
    torch.testing.assert_close(sa_softmax(one, normalized=normalized), expect, rtol=1e-12, atol=1e-12)
