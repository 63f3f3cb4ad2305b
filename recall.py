"""
A generated associative-recall task where long-range information has to travel through separators (SepLLM's test).

Each sequence ("episode") is P short segments, each a key, its value and the separator ".", then Q queries, each a
query mark, a key seen earlier and its value, closed by ".":

    K3 v7 .  K0 v2 .  K5 v7 .  ...   # K0 v2 .  # K5 v7 .  ...
    `------ P segments ------'        `--- Q queries ----'

Keys are drawn without replacement (each key occurs once among the segments and is asked at most once), values
with replacement. The query's key predicts its value: that prediction is the answer, scored by exact match. With
a local window shorter than the distance to the queried segment, an attention pattern can only answer through
what it keeps of the past: SepLLM keeps the separator that closed the segment (which saw the key and the value in
its window), StreamingLLM keeps nothing of it. A model that copies some value of the context scores about 1/P;
one that guesses a value at random, 1/n_values. With as many queries as segments, the last query can also be
answered by elimination (the one segment not yet asked about), without matching its key.

Tokens are characters, so the usual character machinery works: "." is the only separator, "#" the query mark,
keys are upper-case letters and values lower-case ones.
"""
import numpy as np
import torch

SEP, QUERY = ".", "#"


def recall_chars(n_keys, n_values):
    """The vocabulary: separator, query mark, n_keys keys (A, B, ...), n_values values (a, b, ...)."""
    if not (1 <= n_keys <= 26 and 1 <= n_values <= 26):
        raise ValueError(f"n_keys={n_keys} and n_values={n_values} must be in 1..26")
    return [SEP, QUERY] + [chr(65 + i) for i in range(n_keys)] + [chr(97 + i) for i in range(n_values)]


def episode_length(n_pairs, n_queries):
    return 3 * n_pairs + 4 * n_queries


class RecallData:
    """Episodes of the recall task, as (n, episode_length) int64 token rows. With a fixed `n_fixed`, a fixed set
    of episodes (the validation set) from which batches are drawn; otherwise fresh episodes for every batch.
    answers_only: the targets are −1 (ignored by the loss) except at the answers."""

    def __init__(self, n_pairs, n_queries, n_keys, n_values, seed=0, n_fixed=0, answers_only=False):
        if not 1 <= n_queries <= n_pairs <= n_keys:
            raise ValueError(f"need 1 <= recall_queries ({n_queries}) <= recall_pairs ({n_pairs}) <= "
                             f"recall_keys ({n_keys})")
        self.P, self.Q, self.K, self.V = n_pairs, n_queries, n_keys, n_values
        self.answers_only = answers_only
        self.chars = recall_chars(n_keys, n_values)
        self.fixed = self.episodes(n_fixed, torch.Generator().manual_seed(seed)) if n_fixed else None

    def episodes(self, n, gen):
        """n fresh episodes (n, 3P + 4Q), drawn from the torch generator gen."""
        P, Q = self.P, self.Q
        keys = torch.rand(n, self.K, generator=gen).argsort(1)[:, :P]                # distinct keys per episode
        values = torch.randint(self.V, (n, P), generator=gen)
        asked = torch.rand(n, P, generator=gen).argsort(1)[:, :Q]                    # which segments are queried
        key_tok, val_tok = 2 + keys, 2 + self.K + values                              # token ids
        seg = torch.stack([key_tok, val_tok, torch.zeros_like(key_tok)], 2)          # (n, P, 3): K v .
        q_key, q_val = key_tok.gather(1, asked), val_tok.gather(1, asked)
        qry = torch.stack([torch.ones_like(q_key), q_key, q_val, torch.zeros_like(q_key)], 2)  # (n, Q, 4): # K v .
        return torch.cat([seg.flatten(1), qry.flatten(1)], 1)

    def batch(self, n_seq, gen):
        """Inputs x and next-token targets y, each (n_seq, 3P + 4Q − 1), like train_lm.get_batch."""
        if self.fixed is None:
            e = self.episodes(n_seq, gen)
        else:
            e = self.fixed[torch.randint(len(self.fixed), (n_seq,), generator=gen)]
        x, y = e[:, :-1].contiguous(), e[:, 1:].contiguous()
        if self.answers_only:
            y = torch.full_like(y, -1).index_copy_(1, self.answers(), y[:, self.answers()])
        return x, y

    def answers(self):
        """Input positions whose next token is an answer (the query's key predicts its value), (Q,)."""
        return torch.tensor([3 * self.P + 4 * j + 1 for j in range(self.Q)])

    def answer_distance(self, x):
        """x (B, T) inputs -> (B, Q) distance from the query's key to the separator of the queried segment."""
        pos = self.answers()                                                           # (Q,)
        q_key = x[:, pos]                                                              # (B, Q)
        seg_keys = x[:, 0:3 * self.P:3]                                                # (B, P)
        seg = (seg_keys[:, None, :] == q_key[:, :, None]).float().argmax(-1)           # (B, Q) segment index
        return pos[None] - (3 * seg + 2)


@torch.no_grad()
def answer_accuracy(logits, x, y, data):
    """Exact-match accuracy of the greedy answer per query: (B, Q) bool correct and (B, Q) distances."""
    pos = data.answers()
    correct = logits[:, pos].argmax(-1) == y[:, pos]
    return correct, data.answer_distance(x)
