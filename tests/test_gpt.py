import math

import pytest
import torch

from gpt import GPT, GPTConfig, KVCache, RMSNorm, rope, rope_angles


def tiny(**kw):
    cfg = dict(vocab_size=37, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).eval()


def test_causal_future_tokens_do_not_change_past_logits():
    model = tiny()
    idx = torch.randint(0, 37, (2, 20), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(2))
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3  # the future did change, so the check above means something


def test_rope_dot_product_depends_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(m, n):
        return (rope(q, rope_angles(torch.tensor([m]), 16, 10000.0))
                * rope(k, rope_angles(torch.tensor([n]), 16, 10000.0))).sum().item()

    assert math.isclose(score(3, 1), score(103, 101), rel_tol=1e-4)
    assert math.isclose(score(7, 7), (q * k).sum().item(), rel_tol=1e-5)
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-3)


def test_rope_is_a_rotation_of_pairs():
    x = torch.randn(1, 1, 1, 4)
    base, p = 100.0, 5
    out = rope(x, rope_angles(torch.tensor([p]), 4, base))[0, 0, 0]
    x = x[0, 0, 0]
    for i in range(2):
        theta = p * base ** (-2 * i / 4)
        expect = (x[2 * i] * math.cos(theta) - x[2 * i + 1] * math.sin(theta),
                  x[2 * i] * math.sin(theta) + x[2 * i + 1] * math.cos(theta))
        assert math.isclose(out[2 * i].item(), expect[0], abs_tol=1e-5)
        assert math.isclose(out[2 * i + 1].item(), expect[1], abs_tol=1e-5)


def test_rmsnorm_formula():
    x = torch.randn(3, 8)
    norm = RMSNorm(8)
    torch.nn.init.uniform_(norm.weight)
    expect = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expect)


def test_kv_cache_generation_equals_full_recomputation():
    model = tiny()
    prompt = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = model.generate(prompt, 12, temperature=0)
    full = prompt
    for _ in range(12):
        nxt = model(full).logits[:, -1].argmax(-1, keepdim=True)
        full = torch.cat([full, nxt], dim=1)
    assert torch.equal(cached, full)
    # and the logits themselves agree, step by step, including a multi-token chunk after a cached prefix
    cache = KVCache(2)
    first = model(full[:, :7], cache=cache).logits
    rest = model(full[:, 7:], cache=cache).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), model(full).logits, rtol=1e-4, atol=1e-5)


def test_sampling_is_reproducible_with_a_generator():
    model = tiny()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_tiny_model_overfits_a_fixed_batch():
    model = tiny(n_kv_head=4).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 37, (4, 16), generator=g), torch.randint(0, 37, (4, 16), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(x, y).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.1


def test_tied_embeddings_and_weight_decay_groups():
    model = tiny()
    assert model.lm_head.weight is model.tok_emb.weight
    decay, no_decay = model.optimizer_groups(0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


@pytest.mark.parametrize("head_dim, base", [(8, 10000.0), (16, 500.0), (64, 10000.0)])
def test_rope_angles_equal_the_formula_at_many_positions_and_dims(head_dim, base):
    """Every pair j of a head at positions from 0 to past 4096 (odd ones too, which a low-precision position
    would round): (x_2j, x_2j+1) rotated by p * base^(-2j/D), written out in float64."""
    pos = torch.tensor([0, 1, 2, 7, 63, 100, 1001, 4097])
    x = torch.randn(1, 2, len(pos), head_dim, generator=torch.Generator().manual_seed(head_dim), dtype=torch.float64)
    got = rope(x.float(), rope_angles(pos, head_dim, base)).double()
    expect = torch.empty_like(x)
    for t, p in enumerate(pos.tolist()):
        for j in range(head_dim // 2):
            angle = p * base ** (-2 * j / head_dim)
            c, s = math.cos(angle), math.sin(angle)
            x0, x1 = x[..., t, 2 * j], x[..., t, 2 * j + 1]
            expect[..., t, 2 * j], expect[..., t, 2 * j + 1] = x0 * c - x1 * s, x0 * s + x1 * c
    # float32 angles of positions ~4000 are off by ~3e-4 rad at most
    torch.testing.assert_close(got, expect, rtol=0, atol=3e-3)
    torch.testing.assert_close(got[..., 0, :], x[..., 0, :], rtol=0, atol=1e-6)    # position 0: no rotation


def test_grouped_query_attention_equals_multi_head_with_copied_key_value_heads():
    """n_kv_head = 2 of n_head = 4: query heads 0, 1 share key/value head 0 and heads 2, 3 share head 1 (adjacent
    groups); the same model with 4 key/value heads whose weights are those copies gives the same logits."""
    gqa, mha = tiny(n_head=4, n_kv_head=2), tiny(n_head=4, n_kv_head=4)
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith("attn.wqkv.weight"):                                   # rows: q (4 x 8), k (2 x 8), v (2 x 8)
            q, k, v = w.split([32, 16, 16])
            copies = [t.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32) for t in (k, v)]  # kv head h // 2
            state[name] = torch.cat([q, *copies])
    mha.load_state_dict(state)
    idx = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(gqa(idx).logits, mha(idx).logits, rtol=1e-5, atol=1e-6)


def test_initial_weight_scales():
    """GPT-2's initialisation: every matrix N(0, init_std), the residual projections (attention output, FFN down)
    N(0, init_std / √(2 n_layer)); norm gains 1."""
    cfg = GPTConfig(vocab_size=512, block_size=16, n_layer=6, n_head=4, n_embd=256, init_std=0.02)
    torch.manual_seed(0)
    model = GPT(cfg)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            assert torch.all(p == 1), name
            continue
        expect = 0.02 / math.sqrt(12) if name.endswith(("attn.wo.weight", "ffn.w2.weight")) else 0.02
        assert abs(p.mean().item()) < 0.05 * expect, name
        assert p.std().item() == pytest.approx(expect, rel=0.03), name
