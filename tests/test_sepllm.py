import os

import pytest
import torch

from gpt import GPT, GPTConfig, KVCache
from sepllm import (SepCache, SinkCache, SparsePattern, fixed_interval_mask, kept_fraction, separator_ids,
                    sepllm_mask, streaming_mask)

SEP = [1, 2]


def brute_force(idx, sep, a, w):
    B, T = idx.shape
    m = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                m[b, i, j] = j <= i and (j < a or int(idx[b, j]) in sep or i - j < w)
    return m


@pytest.mark.parametrize("a, w", [(0, 1), (3, 4), (2, 50)])
def test_mask_equals_brute_force(a, w):
    g = torch.Generator().manual_seed(a + w)
    idx = torch.randint(0, 8, (3, 23), generator=g)  # ids 1 and 2 are separators: about a quarter of tokens
    assert torch.equal(sepllm_mask(idx, SEP, a, w), brute_force(idx, SEP, a, w))
    assert torch.equal(streaming_mask(23, a, w), brute_force(idx, [], a, w)[:1])
    pos = torch.arange(23)[None]
    assert torch.equal(fixed_interval_mask(23, a, w, every=5), brute_force(pos, list(range(4, 23, 5)), a, w))


def test_kept_fraction():
    full = torch.ones(10, 10, dtype=torch.bool).tril()[None]
    assert kept_fraction(full) == 1.0
    assert kept_fraction(streaming_mask(10, 0, 1)) == pytest.approx(10 / 55)
    pattern = SparsePattern(torch.zeros(1, 10, dtype=torch.bool), 0, 1)
    assert torch.equal(pattern.dense(), streaming_mask(10, 0, 1))
    assert kept_fraction([None, pattern]) == pytest.approx((1 + 10 / 55) / 2)


@pytest.mark.parametrize("a, w", [(0, 1), (3, 4), (2, 50), (1, 23)])
def test_kept_fraction_of_a_pattern_counts_rule_one_without_a_mask(a, w, monkeypatch):
    """Batch > 1, each row its own separators: the count equals rule (1) walked pair by pair, and no (B, T, T)
    mask is built for it."""
    g = torch.Generator().manual_seed(7 * a + w)
    idx = torch.randint(0, 8, (3, 23), generator=g)
    pattern = SparsePattern(torch.isin(idx, torch.tensor(SEP)), a, w)
    expect = brute_force(idx, SEP, a, w).sum().item() / (3 * 23 * 24 / 2)
    monkeypatch.setattr(SparsePattern, "dense", lambda self: pytest.fail("kept_fraction built the dense mask"))
    assert kept_fraction(pattern) == pytest.approx(expect, rel=1e-12)
    assert kept_fraction([pattern, None]) == pytest.approx((expect + 1) / 2, rel=1e-12)


@pytest.mark.parametrize("a, w", [(0, 1), (2, 3)])
def test_kept_fraction_of_a_batch_equals_a_count_over_every_sequence(a, w):
    """B = 3 sequences with few, some and many separators: the kept share of all causal pairs of the batch, counted
    pair by pair over the brute-force mask, for a mask, a SparsePattern and a list of layers (None = full)."""
    T = 11
    idx = torch.stack([torch.full((T,), 5), torch.arange(T) % 4, torch.tensor([1, 2] * 5 + [3])])  # 0, 3, 10 seps
    m = brute_force(idx, SEP, a, w)
    kept = sum(int(m[b, i, j]) for b in range(3) for i in range(T) for j in range(i + 1))
    expect = kept / (3 * T * (T + 1) // 2)
    assert len({int(m[b].sum()) for b in range(3)}) == 3     # the sequences keep different counts
    assert kept_fraction(sepllm_mask(idx, SEP, a, w)) == pytest.approx(expect, rel=1e-12)
    assert kept_fraction(SparsePattern(torch.isin(idx, torch.tensor(SEP)), a, w)) == pytest.approx(expect, rel=1e-12)
    assert kept_fraction([None, SparsePattern(torch.isin(idx, torch.tensor(SEP)), a, w)]) == pytest.approx(
        (1 + expect) / 2, rel=1e-12)


def test_separator_ids_from_tokenizers():
    assert separator_ids(list("ab.,\n x")) == [2, 3, 4, 5]
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                                      "data", "tiktoken")
    if not os.path.isdir(cache_dir):
        pytest.skip("no tiktoken cache (set TIKTOKEN_CACHE_DIR)")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    import tiktoken
    enc = tiktoken.get_encoding("r50k_base")
    ids = separator_ids(enc, (".", ",", "\n", " .", "ab.cd"))
    assert ids == sorted({enc.encode(".")[0], enc.encode(",")[0], enc.encode("\n")[0], enc.encode(" .")[0]})


def feed(cache, tokens, n_layer=1, H=1, D=2):
    """Drive a cache the way the model does, with keys that record their stream position."""
    for t in tokens:
        idx = torch.tensor([[t]])
        q_pos, k_pos, mask = cache.start(idx)
        pos = torch.tensor(float(cache.stream_pos[-1]))
        for l in range(n_layer):
            k, v = cache.update(l, pos.expand(1, H, 1, D).clone(), pos.expand(1, H, 1, D).clone())
        yield q_pos, k_pos, mask, k


def simulate(tokens, sep, a, s, w, c):
    """The four-block rule written out, one token at a step: yields the kept stream positions after each step.
    Blocks: initial (positions < a) | separator cache (<= s) | past window | local window (the last w entries)."""
    initial, seps, recent = [], [], []                 # recent = past window followed by the local window
    for p in range(len(tokens)):
        if len(initial) + len(seps) + len(recent) + 1 > c:
            past, local = recent[:max(len(recent) - w, 0)], recent[max(len(recent) - w, 0):]
            seps = seps + [q for q in past if tokens[q] in sep]   # the past window's separators join, FIFO
            seps = seps[max(len(seps) - s, 0):]                   # ... and only the newest s stay
            recent = local
        (initial if p < a else recent).append(p)
        yield initial + seps + recent


def sink_simulate(n, a, c):
    """StreamingLLM written out: the first a tokens and the most recent c - a."""
    for p in range(n):
        yield [q for q in range(p + 1) if q < a or q > p - (c - a)]


@pytest.mark.parametrize("a, s, w, c, n_sep_ids", [
    (2, 3, 4, 14, 2),       # separators a quarter of the tokens: the separator cache fills and cycles
    (4, 64, 16, 100, 1),    # s larger than the separators ever present (the paper's a=4, s=64 at small scale)
    (3, 5, 3, 12, 1),       # s > separators per compression, so the FIFO fills over several compressions
    (0, 2, 5, 9, 4),        # no initial tokens, separators half of the tokens
    (1, 6, 2, 10, 0),       # no separator at all
])
def test_sepcache_contents_after_every_step_equal_the_simulator(a, s, w, c, n_sep_ids):
    sep = list(range(1, 1 + n_sep_ids))
    for seed in range(3):
        stream = torch.randint(0, 8, (400,), generator=torch.Generator().manual_seed(seed)).tolist()
        cache = SepCache(1, sep, a, s, w, c)
        compressions = 0
        for n, ((q_pos, k_pos, mask, k), expect) in enumerate(zip(feed(cache, stream), simulate(stream, sep, a, s,
                                                                                                  w, c))):
            pos = cache.stream_pos.tolist()
            assert pos == expect, (seed, n)
            assert k[0, 0, :, 0].tolist() == pos                              # keys follow their tokens
            assert cache.ids.tolist() == [stream[p] for p in pos]
            S = len(cache)
            assert S <= c and torch.equal(k_pos, torch.arange(S)) and q_pos.tolist() == [S - 1] and mask.all()
            compressions += n > 0 and S < prev
            prev = S
        assert compressions >= 5


def test_sinkcache_contents_after_every_step_equal_the_simulator():
    for a, c in ((2, 6), (4, 13), (0, 5)):
        cache = SinkCache(1, n_init=a, capacity=c)
        for n, (_, expect) in enumerate(zip(feed(cache, list(range(300))), sink_simulate(300, a, c))):
            assert cache.stream_pos.tolist() == expect, (a, c, n)


def test_sepcache_larger_than_sequence_equals_full_cache():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=10, block_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    full = model.generate(prompt, 20, temperature=0, cache=KVCache(2))
    sep = model.generate(prompt, 20, temperature=0, cache=SepCache(2, SEP, 2, 4, 100, 1000))
    sink = model.generate(prompt, 20, temperature=0, cache=SinkCache(2, 2, 1000))
    assert torch.equal(full, sep) and torch.equal(full, sink)


def test_prefill_uses_the_sparse_mask():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=10, block_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 10, (1, 30), generator=torch.Generator().manual_seed(1))
    with_cache = model(idx, cache=SepCache(2, SEP, 2, 4, 5, 1000)).logits
    with_mask = model(idx, attn_mask=sepllm_mask(idx, SEP, 2, 5)).logits
    torch.testing.assert_close(with_cache, with_mask, rtol=1e-5, atol=1e-6)


def test_streaming_10k_tokens_keeps_memory_bounded():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=10, block_size=32, n_layer=1, n_head=1, n_embd=8)).eval()
    cache = SepCache(1, SEP, 2, 8, 16, 40)
    stream = torch.randint(0, 10, (10_000,), generator=torch.Generator().manual_seed(0))
    largest = 0
    with torch.no_grad():
        for t in stream.tolist():
            model(torch.tensor([[t]]), cache=cache)
            largest = max(largest, len(cache), cache.k[0].shape[2])
    assert largest <= 40 and cache.seen == 10_000


@pytest.mark.parametrize("kind", ["sepcache", "sink"])
@pytest.mark.parametrize("positions", ["cache", "stream"])
def test_stream_in_chunks_equals_a_token_a_forward_with_two_layers(kind, positions):
    """eval_lm feeds an evicting cache the tokens up to its next compression at once; with two layers (a cached
    key of layer 2 depends on what its token saw) that must equal decoding one token a forward, step by step."""
    from eval_lm import stream_nll
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    stream = torch.randint(0, 8, (150,), generator=torch.Generator().manual_seed(5))
    new = lambda: (SepCache(2, SEP, 2, 3, 4, 14, chunked=True, positions=positions) if kind == "sepcache"  # noqa
                   else SinkCache(2, 2, 14, chunked=True, positions=positions))
    nll, kv, pred = stream_nll(model, stream, new())
    cache, expect, lengths = new(), [], []
    with torch.no_grad():
        for t in range(len(stream) - 1):
            logits = model(stream[t:t + 1][None], cache=cache).logits[0, -1]
            expect.append(torch.nn.functional.cross_entropy(logits, stream[t + 1]).item())
            lengths.append(len(cache))
    torch.testing.assert_close(nll, torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert kv.tolist() == lengths and lengths.count(14) > 10


class AtPositions:
    """gpt.py's cache interface for one causal forward of a few tokens at the given RoPE positions (no storage)."""

    def __init__(self, pos):
        self.pos = torch.tensor(pos)

    def start(self, idx):
        return self.pos, self.pos, torch.ones(1, len(self.pos), len(self.pos), dtype=torch.bool).tril()

    def update(self, layer, k, v):
        return k, v


@pytest.mark.parametrize("kind", ["sepcache", "sink"])
@pytest.mark.parametrize("positions", ["cache", "stream"])
def test_stream_perplexity_equals_a_direct_computation(kind, positions):
    """eval_lm's streaming NLL against a forward of the kept tokens written out: with one layer a cached key
    depends on its token only, so each step's logits equal a plain causal forward over the tokens the rule keeps
    (the new token last), at positions 0..S-1 inside the cache or at their positions in the stream."""
    from eval_lm import stream_nll
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    stream = torch.randint(0, 8, (120,), generator=torch.Generator().manual_seed(5))
    a, s, w, c = 2, 3, 4, 14
    cache = (SepCache(1, SEP, a, s, w, c, chunked=True, positions=positions) if kind == "sepcache" else
             SinkCache(1, a, c, chunked=True, positions=positions))
    nll, kv, pred = stream_nll(model, stream, cache)
    kept = simulate(stream.tolist(), SEP, a, s, w, c) if kind == "sepcache" else sink_simulate(len(stream), a, c)
    expect = []
    with torch.no_grad():
        for t, pos in zip(range(len(stream) - 1), kept):
            at = AtPositions(pos if positions == "stream" else list(range(len(pos))))
            logits = model(stream[pos][None], cache=at).logits[0, -1]
            expect.append(torch.nn.functional.cross_entropy(logits, stream[t + 1]).item())
            assert kv[t] == len(pos) and pred[t] == logits.argmax()
    torch.testing.assert_close(nll, torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert (kv == c).sum() > 20   # full many times: it evicted


def test_sepcache_window_w_minus_1_shows_a_token_what_rule_1_with_w_shows():
    """The cache's local window counts cached entries and the new token comes on top, while the mask's w counts the
    token itself: SepCache(w - 1) at stream positions, once its separator cache is full and it compresses every
    step, gives a one-layer model exactly the logits of the masked forward with window w (eval_lm's --n_local=3
    for a model trained with --n_local=4)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    g = torch.Generator().manual_seed(3)
    head = torch.randint(3, 8, (20,), generator=g)
    head[[4, 7, 11, 15, 18]] = 1                           # exactly s = 5 separators, all in the first 20 tokens
    x = torch.cat([head, torch.randint(3, 8, (40,), generator=g)])[None]
    a, s, w = 2, 5, 4
    cache = SepCache(1, SEP, a, s, w - 1, a + s + w, positions="stream")
    with torch.no_grad():
        masked = model(x, attn_mask=sepllm_mask(x, SEP, a, w)).logits[0]
        streamed = torch.cat([model(x[:, t:t + 1], cache=cache).logits[0] for t in range(x.shape[1])])
    steady = slice(30, None)                               # every separator has left the window; compress each step
    torch.testing.assert_close(streamed[steady], masked[steady], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(streamed[:15], masked[:15])  # before the first compression it sees every token
