"""
SepLLM: let separators carry the segments they close.
Paper: "SepLLM: Accelerate Large Language Models by Compressing One Segment into One Separator", arXiv:2412.12094.

Attention maps show that seemingly meaningless separator tokens (". , ? ! ; : newline") receive a large share of
attention. SepLLM leans into it: a query attends only to the first few tokens (attention sinks), to every
separator before it, and to a local window of neighbours. Trained this way from scratch (or applied
training-free), each segment's information is condensed into the separator that closes it; the KV cache then
only has to keep sinks, separators and the recent window, which makes streaming over millions of tokens possible.

Query i may attend key j iff
    j ≤ i  and  ( j < a  or  tok(j) ∈ SEP  or  i − j < w )                                      (1)
a = initial (sink) tokens, w = local window (counting the current token). SEP empty gives StreamingLLM;
keeping every k-th token instead of separators gives the FixLLM ablation.

SepCache (streaming) physically evicts. Layout [ initial a | separators ≤ s | past window | local window w ],
capacity c > a + s + w. When the cache would exceed c: of the past window (tokens that left the local window
and were not yet compressed) only the separators stay; they join the separator cache, which keeps the newest s
(FIFO); the cache is rebuilt as initial + separators + local window. Keys are stored BEFORE RoPE and rotated
with their index inside the cache, the query taking the next index, so positions never outgrow training.

Choices: SEP holds . , ? ! ; : newline, space and tab, as the official training code does (SEPARATORS below
says what space and tab mean per tokenizer); separator ids are derived from the tokenizer at run time (a string
counts only if it encodes to one token); the caches hold batch size 1; a new chunk of several tokens (a prompt's
prefill) attends to the cache and, among its own tokens, by rule (1), so the prefill is sparse too; compression
happens before a new chunk is appended, so the size is ≤ c after every one-token step.

Train it:  python train_lm.py --dataset=shakespeare --attn_mask=sepllm --n_init=3 --n_local=64 --block_size=256
See it:    python sepllm.py "Separators, like these, close segments. A query keeps them!" [--rule=streaming|fixed]
           (the kept (query, key) pairs in the terminal; plot.py mask draws them)
"""
from typing import NamedTuple

import torch

# The official training set: punctuation, newline, and also space and tab. With GPT-2 BPE most words carry their
# leading space, so the bare space token is rare; in a character model space and tab are every word boundary, so
# there every word (not only every sentence or clause) is a segment. Streaming adds the space-prefixed punctuation.
SEPARATORS = (".", ",", "?", "!", ";", ":", "\n", " ", "\t")
STREAMING_SEPARATORS = SEPARATORS + (" .", " ,", " ?", " !", " ;", " :")


def separator_ids(tokenizer_or_vocab, strings=SEPARATORS):
    """Token ids of the separator strings: for a tokenizer with .encode (tiktoken), the strings that encode to
    exactly one token; for a character vocabulary (dict char -> id, or a list of chars), the chars it has."""
    if hasattr(tokenizer_or_vocab, "encode"):
        ids = [tokenizer_or_vocab.encode(s) for s in strings]
        return sorted({i[0] for i in ids if len(i) == 1})
    vocab = tokenizer_or_vocab if isinstance(tokenizer_or_vocab, dict) else {c: n for n, c in enumerate(tokenizer_or_vocab)}
    return sorted({vocab[s] for s in strings if s in vocab})


def is_separator(idx, sep_ids):
    """idx (B, T) -> bool (B, T)."""
    return torch.isin(idx, torch.as_tensor(list(sep_ids), dtype=idx.dtype, device=idx.device))


def keep_mask(kept, n_init, n_local):
    """Rule (1) given which keys are kept beyond sinks and window: kept (B, T) bool -> (B, T, T) bool."""
    T = kept.shape[-1]
    i = torch.arange(T, device=kept.device)[:, None]
    j = torch.arange(T, device=kept.device)[None, :]
    # j ≤ i  and  (j < a  or  kept(j)  or  i − j < w)
    return (j <= i) & ((j < n_init) | kept[:, None, :] | (i - j < n_local))


def sepllm_mask(idx, sep_ids, n_init, n_local):
    """(B, T) token ids -> (B, T, T) bool mask, True = may attend."""
    return keep_mask(is_separator(idx, sep_ids), n_init, n_local)


def streaming_mask(T, n_init, n_local, device=None):
    """StreamingLLM: sinks + window only, (1, T, T)."""
    return keep_mask(torch.zeros(1, T, dtype=torch.bool, device=device), n_init, n_local)


def fixed_interval_keep(T, every=5, device=None):
    """FixLLM keeps every `every`-th token instead of the separators: (T,) bool."""
    return torch.arange(T, device=device) % every == every - 1


def fixed_interval_mask(T, n_init, n_local, every=5, device=None):
    """FixLLM's mask, (1, T, T)."""
    return keep_mask(fixed_interval_keep(T, every, device)[None], n_init, n_local)


class SparsePattern(NamedTuple):
    """Rule (1) as data, for attention that never builds the (T, T) mask (kernels/attention.py)."""
    keep: torch.Tensor   # (B, T) bool: keys kept beyond sinks and window (separators; none for StreamingLLM)
    n_init: int          # a
    n_local: int         # w

    def dense(self):
        return keep_mask(self.keep, self.n_init, self.n_local)


def kept_fraction(masks):
    """Kept share of the causal (query, key) pairs, averaged over layers. Each entry: a (B, T, T) bool mask,
    a SparsePattern, or None (full attention).

    A SparsePattern is counted without its (B, T, T) mask (13 GB at B = 12, T = 16k). Query i keeps its window,
    min(i + 1, w) keys, plus every sink or separator left of it, j ≤ i − w. With c[j] = #{j' ≤ j : j' < a or
    keep[j']} (a prefix sum), query i keeps min(i + 1, w) + c[i − w] (the second term only where i ≥ w)."""
    masks = masks if isinstance(masks, list) else [masks]
    out = []
    for m in masks:
        if m is None:
            out.append(1.0)
            continue
        if isinstance(m, SparsePattern):
            B, T = m.keep.shape
            i = torch.arange(T, device=m.keep.device)
            c = (m.keep | (i < m.n_init)).long().cumsum(-1)                       # (B, T)
            window = torch.clamp(i + 1, max=m.n_local).sum() * B
            left = c[:, : max(T - m.n_local, 0)].sum()                            # c[i - w] for i = w .. T-1
            kept = (window + left).item()
        else:
            B, T = m.shape[0], m.shape[-1]
            kept = m.float().sum().item()
        out.append(kept / (B * T * (T + 1) / 2))
    return sum(out) / len(out)


class SepCache:
    """The SepLLM KV cache for streaming (batch size 1), implementing gpt.py's cache interface.

    T > 1 new tokens in one forward: by default a sparse prefill (rule (1) among them, as SepLLM's prompt). With
    chunked=True they see each other causally instead, which is what T forwards of one token each would compute
    as long as no compression falls between them: a stream fed in pieces of at most room() tokens gives the same
    numbers as a token a step, in far fewer forwards (eval_lm.stream_nll).

    The local window holds local_size cached entries and the new token comes on top: a token sees the last
    local_size tokens and itself, where rule (1)'s w counts itself, so local_size = w - 1 shows it its trained window.
    positions: "cache" (SepLLM's and StreamingLLM's choice) gives the entries RoPE positions 0..S-1 inside the
    cache, so they stay within what the model was trained on, but a kept separator then looks closer to the query
    than it is; "stream" keeps each entry's position in the whole stream, its true distance to the query."""

    def __init__(self, n_layer, sep_ids, n_init=4, sep_size=64, local_size=256, capacity=800, chunked=False,
                 positions="cache"):
        if n_init + sep_size + local_size >= capacity:
            raise ValueError(f"capacity={capacity} must exceed n_init + sep_size + local_size = "
                             f"{n_init + sep_size + local_size}")
        if positions not in ("cache", "stream"):
            raise ValueError(f"positions must be cache or stream, got {positions!r}")
        self.n_layer, self.sep_ids = n_layer, list(sep_ids)
        self.a, self.s, self.w, self.c = n_init, sep_size, local_size, capacity
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.ids = torch.zeros(0, dtype=torch.long)      # token id of each cached entry
        self.stream_pos = torch.zeros(0, dtype=torch.long)  # position of each entry in the whole stream
        self.seen = 0                                     # tokens of the stream so far
        self.chunked, self.positions = chunked, positions

    def __len__(self):
        return len(self.ids)

    def room(self):
        """How many new tokens fit before the next compression (0 when full: the next token's start compresses)."""
        return self.c - len(self)

    def keep_on_overflow(self, T):
        """Which entries survive a compression before T new tokens arrive: initial + the newest s separators that
        left the local window + the local window (the past window's other tokens are dropped). SepCache's parts
        have fixed sizes, so T is not needed here; SinkCache's window shrinks by T."""
        n = len(self)
        is_init = self.stream_pos < self.a
        in_window = torch.arange(n) >= n - self.w
        sep = (is_separator(self.ids[None], self.sep_ids)[0] & ~is_init & ~in_window).nonzero().flatten()
        keep = is_init | in_window
        # the newest s of them; max(…, 0): with fewer than s separators all stay (a negative start would drop some)
        keep[sep[max(len(sep) - self.s, 0):]] = True
        return keep

    def compress(self, T):
        """Evict what keep_on_overflow(T) drops, from the token bookkeeping and every layer's keys and values."""
        keep = self.keep_on_overflow(T).nonzero().flatten()
        self.ids, self.stream_pos = self.ids[keep], self.stream_pos[keep]
        for l in range(self.n_layer):
            if self.k[l] is not None:
                keep_l = keep.to(self.k[l].device)
                self.k[l], self.v[l] = self.k[l][:, :, keep_l], self.v[l][:, :, keep_l]

    def start(self, idx):
        """gpt.py's cache interface, before a forward of idx (1, T): compress if the T new tokens would overflow
        the capacity, append them, and return the query and key positions inside the cache and the mask."""
        if idx.shape[0] != 1:
            raise ValueError("SepCache and SinkCache hold batch size 1")
        T, device = idx.shape[1], idx.device
        if len(self) > 0 and len(self) + T > self.c:
            self.compress(T)
        old = len(self)
        new_pos = torch.arange(self.seen, self.seen + T)
        self.ids = torch.cat([self.ids, idx[0].cpu()])
        self.stream_pos = torch.cat([self.stream_pos, new_pos])
        self.seen += T
        S = len(self)
        # cached entries are all visible; among the new tokens rule (1) applies (a sparse prefill), or causality
        kept = is_separator(idx, self.sep_ids) | (new_pos < self.a).to(device)[None]
        among = (torch.ones(T, T, dtype=torch.bool, device=device).tril()[None] if self.chunked else
                 keep_mask(kept, 0, self.w))
        mask = torch.cat([torch.ones(1, T, old, dtype=torch.bool, device=device), among], 2)
        if self.positions == "stream":      # RoPE at the positions in the stream: true distances
            return new_pos.to(device), self.stream_pos.to(device), mask
        # RoPE with positions inside the cache: keys 0..S-1, the new queries the last T of them
        return torch.arange(old, S, device=device), torch.arange(S, device=device), mask

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class SinkCache(SepCache):
    """StreamingLLM: keep the first a tokens and the most recent c − a."""

    def __init__(self, n_layer, n_init=4, capacity=800, chunked=False, positions="cache"):
        super().__init__(n_layer, [], n_init, 0, capacity - n_init - 1, capacity, chunked, positions)

    def keep_on_overflow(self, T):
        n = len(self)
        # [0:a] and the last c − a − T, so that the new tokens fill the cache to c
        return (self.stream_pos < self.a) | (torch.arange(n) >= n - max(self.c - self.a - T, 0))


# ----------------------------------------------------------------------------- the pattern, to look at

def pattern_codes(kept, n_init, n_local):
    """Rule (1) for one sequence, per (query i, key j), as a code for pictures: kept (T,) bool -> (T, T) long,
    3 = kept as a sink or separator (FixLLM: every k-th token), 2 = kept by the local window, 1 = dropped,
    0 = a future key (j > i). codes >= 2 is keep_mask."""
    T = kept.shape[0]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    return torch.where(j > i, 0, torch.where((j < n_init) | kept[None, :], 3, torch.where(i - j < n_local, 2, 1)))


def pattern_text(tokens, codes):
    """The codes as characters, one row per query labelled by its token, keys in the same order left to right:
    '#' sink or separator, 'o' local window, '.' dropped, blank for the future."""
    labels = [f"{i:3d} {t!r:>12.12}" for i, t in enumerate(tokens)]
    header = " " * 17 + "".join(str(j % 10) for j in range(len(tokens)))          # key index, last digit
    return "\n".join([header] + [(lab + " " + "".join(" .o#"[c] for c in row)).rstrip()
                                 for lab, row in zip(labels, codes.tolist())])


def demo_tokens(text, tokenizer="gpt2"):
    """A sentence -> (token strings, is-separator (T,) bool), for the pictures (this file's terminal print and
    plot.py mask). gpt2: GPT-2 BPE (tiktoken r50k_base; imported here so the file itself needs torch only),
    separators as in training (strings that encode to one token); char: characters; words: a regex split into
    words (with their leading space, as GPT-2 does), punctuation and whitespace."""
    import re
    if tokenizer == "gpt2":
        try:
            import tiktoken
            enc = tiktoken.get_encoding("r50k_base")
        except Exception as e:  # not installed, or offline without its cached file
            import sys
            print(f"note: tiktoken's r50k_base is not available ({type(e).__name__}); split into words instead",
                  file=sys.stderr)
            tokenizer = "words"
        else:
            ids = torch.tensor(enc.encode_ordinary(text), dtype=torch.long)
            return [enc.decode([i]) for i in ids.tolist()], is_separator(ids[None], separator_ids(enc))[0]
    if tokenizer not in ("char", "words"):
        raise ValueError(f"tokenizer must be gpt2, char or words, got {tokenizer!r}")
    tokens = list(text) if tokenizer == "char" else re.findall(r" ?\w+|[^\w\s]|\s", text)
    return tokens, torch.tensor([t in SEPARATORS for t in tokens], dtype=torch.bool)


def rule_keep(rule, is_sep, every=5):
    """The keys kept beyond sinks and window: sepllm the separators, streaming none, fixed every k-th token."""
    keep = {"sepllm": lambda: is_sep, "streaming": lambda: torch.zeros_like(is_sep),
            "fixed": lambda: fixed_interval_keep(len(is_sep), every)}
    if rule not in keep:
        raise ValueError(f"rule must be sepllm, streaming or fixed, got {rule!r}")
    return keep[rule]()


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Print the (query, key) pairs rule (1) keeps for a sentence.")
    p.add_argument("text", nargs="?", default="Separators, like these, close segments. A query keeps them!")
    p.add_argument("--rule", choices=("sepllm", "streaming", "fixed"), default="sepllm")
    p.add_argument("--n_init", type=int, default=3, help="sink tokens a")
    p.add_argument("--n_local", type=int, default=4, help="local window w (counting the query itself)")
    p.add_argument("--tokenizer", choices=("gpt2", "char", "words"), default="gpt2")
    args = p.parse_args()
    if args.n_init < 0 or args.n_local < 1:
        p.error("--n_init must be >= 0 and --n_local >= 1")
    tokens, is_sep = demo_tokens(args.text, args.tokenizer)
    print(f"{args.rule}, a={args.n_init}, w={args.n_local}: rows are queries, columns keys; "
          f"'#' sink or separator, 'o' local window, '.' dropped")
    print(pattern_text(tokens, pattern_codes(rule_keep(args.rule, is_sep), args.n_init, args.n_local)))
