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


def test_sepcache_invariants_after_every_step():
    a, s, w, c = 2, 3, 4, 14
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 8, (200,), generator=g).tolist()
    cache = SepCache(1, SEP, a, s, w, c)
    for n, (q_pos, k_pos, mask, k) in enumerate(feed(cache, stream)):
        S = len(cache)
        assert S <= c
        assert torch.equal(k_pos, torch.arange(S)) and q_pos.tolist() == [S - 1]  # positions re-applied
        pos = cache.stream_pos.tolist()
        assert pos == sorted(pos) and k[0, 0, :, 0].tolist() == pos  # order preserved, keys follow their tokens
        assert pos[:a] == list(range(min(a, n + 1))) and pos[-1] == n
        assert mask.all()
    # right after a compression the contents are exactly: initial + newest <= s separators + last w tokens
    cache = SepCache(1, SEP, a, s, w, c)
    sizes = [len(cache) for _ in feed(cache, stream)]
    drops = [n for n in range(1, len(sizes)) if sizes[n] < sizes[n - 1]]
    assert drops, "the cache never compressed"
    n = drops[0]
    cache = SepCache(1, SEP, a, s, w, c)
    list(feed(cache, stream[:n]))
    before_tokens = stream[:n]
    cache.start(torch.tensor([[stream[n]]]))  # compresses, then appends token n
    kept = cache.stream_pos.tolist()[:-1]
    window = list(range(n - w, n))
    seps = [p for p in range(a, n - w) if before_tokens[p] in SEP][-s:]
    assert kept == list(range(a)) + seps + window


def test_sinkcache_keeps_initial_and_recent():
    cache = SinkCache(1, n_init=2, capacity=6)
    for n, _ in enumerate(feed(cache, list(range(20)))):
        assert len(cache) <= 6
    assert cache.stream_pos.tolist() == [0, 1, 16, 17, 18, 19]


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
