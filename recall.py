"""
A generated associative-recall task where long-range information has to travel through separators (SepLLM's test).

Each sequence ("episode") opens with F filler tokens, then P short segments, each a key, its value and the
separator ".", then Q queries, each a query mark, a key of a segment and its value, closed by ".":

    _ _ _  K3 v7 .  K0 v2 .  K5 v7 .  ...   # K0 v2 .  # K5 v7 .  # K0 v2 .  ...
    filler `------ P segments ------'        `------- Q queries ---------'

The layout is written as templates (SEGMENT, QUERY below: "K" the key slot, "V" the value slot, any other
character a literal token), and every position and token id is derived from them, so a student can change it.
Keys are distinct within an episode (a key names one segment); values are drawn with replacement. Each query asks
about a segment drawn WITH replacement, so elimination (answering the one segment not yet asked about) is no help.
The query's key predicts its value: that prediction is the answer, scored by exact match. The filler keeps the
segments out of the first a tokens (SepLLM's and StreamingLLM's sinks), so no pattern sees a segment for free.

An answer's distance is from the token that predicts it back to the nearest earlier copy of its value (the
segment's, or an earlier query's about the same key). A pattern whose window w is at most that distance cannot
read the value directly: SepLLM can still read the separator that closed the segment (it saw the key and the value
in its window), StreamingLLM nothing of it (with L layers a window reaches L·(w − 1) back through intermediate
tokens). A model that copies some value of the context scores about 1/P; a random value, 1/n_values.

Tokens are characters, so the usual character machinery works: "." is the only separator, "#" the query mark,
"_" the filler, keys are upper-case letters and values lower-case ones.
"""
import torch

SEP, QUERY, FILL = ".", "#", "_"
SEGMENT = "KV."     # a segment: key, value, separator
QUERY_LAYOUT = "#KV."   # a query: mark, key, value (the answer), separator


def recall_chars(n_keys, n_values):
    """The vocabulary: separator, query mark, filler, n_keys keys (A, B, ...), n_values values (a, b, ...)."""
    if not (1 <= n_keys <= 26 and 1 <= n_values <= 26):
        raise ValueError(f"n_keys={n_keys} and n_values={n_values} must be in 1..26")
    return [SEP, QUERY, FILL] + [chr(65 + i) for i in range(n_keys)] + [chr(97 + i) for i in range(n_values)]


def episode_length(n_pairs, n_queries, n_filler):
    return n_filler + len(SEGMENT) * n_pairs + len(QUERY_LAYOUT) * n_queries


class RecallData:
    """Episodes of the recall task, as (n, episode_length) int64 token rows. With a fixed `n_fixed`, a fixed set
    of episodes (the validation set) from which batches are drawn; otherwise fresh episodes for every batch.
    answers_only: the targets are −1 (ignored by the loss) except at the answers."""

    def __init__(self, n_pairs, n_queries, n_keys, n_values, n_filler=3, seed=0, n_fixed=0, answers_only=False):
        if not 1 <= n_pairs <= n_keys:
            raise ValueError(f"need 1 <= recall_pairs ({n_pairs}) <= recall_keys ({n_keys}): keys are distinct")
        if n_queries < 1 or n_filler < 0:
            raise ValueError(f"need recall_queries >= 1 ({n_queries}) and recall_filler >= 0 ({n_filler})")
        self.P, self.Q, self.K, self.V, self.F = n_pairs, n_queries, n_keys, n_values, n_filler
        self.answers_only = answers_only
        self.chars = recall_chars(n_keys, n_values)
        self.key0, self.value0 = self.chars.index("A"), self.chars.index("a")        # token id of key 0, value 0
        # positions: segment i starts at seg_start[i], query j at qry_start[j]
        self.seg_start = n_filler + len(SEGMENT) * torch.arange(n_pairs)                                   # (P,)
        self.qry_start = n_filler + len(SEGMENT) * n_pairs + len(QUERY_LAYOUT) * torch.arange(n_queries)  # (Q,)
        self.fixed = self.episodes(n_fixed, torch.Generator().manual_seed(seed)) if n_fixed else None

    def fill(self, template, key_tok, val_tok):
        """(n, k) key and value tokens -> (n, k, len(template)) tokens, one template per (episode, item)."""
        slots = {"K": key_tok, "V": val_tok}
        return torch.stack([slots[c] if c in slots else torch.full_like(key_tok, self.chars.index(c))
                            for c in template], 2)

    def episodes(self, n, gen):
        """n fresh episodes (n, episode_length), drawn from the torch generator gen."""
        keys = torch.rand(n, self.K, generator=gen).argsort(1)[:, :self.P]           # (n, P) distinct keys
        values = torch.randint(self.V, (n, self.P), generator=gen)                     # (n, P)
        asked = torch.randint(self.P, (n, self.Q), generator=gen)                      # (n, Q) with replacement
        key_tok, val_tok = self.key0 + keys, self.value0 + values
        filler = torch.full((n, self.F), self.chars.index(FILL), dtype=torch.long)
        seg = self.fill(SEGMENT, key_tok, val_tok)                                     # (n, P, len(SEGMENT))
        qry = self.fill(QUERY_LAYOUT, key_tok.gather(1, asked), val_tok.gather(1, asked))   # (n, Q, len(QUERY))
        return torch.cat([filler, seg.flatten(1), qry.flatten(1)], 1)

    def batch(self, n_seq, gen):
        """Inputs x and next-token targets y, each (n_seq, episode_length − 1), like lm_common.get_batch."""
        if self.fixed is None:
            e = self.episodes(n_seq, gen)
        else:
            e = self.fixed[torch.randint(len(self.fixed), (n_seq,), generator=gen)]
        x, y = e[:, :-1].contiguous(), e[:, 1:].contiguous()
        if self.answers_only:
            y = torch.full_like(y, -1).index_copy_(1, self.answers(), y[:, self.answers()])
        return x, y

    def answers(self):
        """Input positions whose next token is an answer (the token before each query's value), (Q,)."""
        return self.qry_start + QUERY_LAYOUT.index("V") - 1

    def answer_distance(self, x):
        """x (B, T) inputs -> (B, Q) distance from the token predicting each answer back to the nearest earlier
        copy of its value: the queried segment's value, or the value of an earlier query about the same key."""
        seg_key = x[:, self.seg_start + SEGMENT.index("K")]                             # (B, P)
        q_key = x[:, self.qry_start + QUERY_LAYOUT.index("K")]                          # (B, Q)
        seg = (q_key[:, :, None] == seg_key[:, None, :]).float().argmax(-1)           # (B, Q) queried segment
        nearest = (self.seg_start + SEGMENT.index("V"))[seg]                           # (B, Q) its value's position
        q_val = self.qry_start + QUERY_LAYOUT.index("V")                                # (Q,)
        same = (q_key[:, :, None] == q_key[:, None, :]).tril(-1)                        # (B, Q, Q') j' < j, same key
        earlier = torch.where(same, q_val[None, None, :], -1).amax(-1)                 # (B, Q) -1 if none
        return self.answers()[None] - torch.maximum(nearest, earlier)


@torch.no_grad()
def answer_accuracy(logits, x, y, data):
    """Exact-match accuracy of the greedy answer per query: (B, Q) bool correct and (B, Q) distances."""
    pos = data.answers()
    correct = logits[:, pos].argmax(-1) == y[:, pos]
    return correct, data.answer_distance(x)
