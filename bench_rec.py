"""
Benchmark one LightGCN epoch on ml-1m (3 layers, dim 64, batch 2048): where the time goes, this code vs the
way the reference PyTorch implementation does it (triples sampled one by one in a Python loop, and torch's
generic sparse backward, which transposes Â at every step). Run it on a quiet machine:

    python bench_rec.py --data_dir=DIR          # DIR/ml-1m/train.txt and test.txt, LightGCN's text format
    python bench_rec.py --data_dir=DIR --share=0.1   # a tenth of an epoch: ten times quicker, the same comparison
"""
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import UserError, parse_flags, run_main
from lightgcn import Graph, LightGCN, NegativeSampler, bpr_loss, evaluate, load_lightgcn_dir


@dataclass
class BenchConfig:
    data_dir: str = ""                  # DIR holding <dataset>/train.txt and test.txt (LightGCN format)
    dataset: str = "ml-1m"
    dim: int = 64
    n_layers: int = 3
    batch_size: int = 2048
    seed: int = 0
    share: float = 1.0                  # time this share of an epoch's triples (the speed-up does not depend on it)


def python_loop_triples(train, n_users, n_items, n, rng):
    """The reference's sampler: per triple, a random user, one of its positives, a rejection-sampled negative."""
    pos = [[] for _ in range(n_users)]
    for u, i in train.tolist():
        pos[u].append(i)
    pos_set = [set(p) for p in pos]
    users = rng.integers(0, n_users, n)
    out = []
    for u in users:
        if not pos[u]:
            continue
        i = pos[u][rng.integers(0, len(pos[u]))]
        while True:
            j = int(rng.integers(0, n_items))
            if j not in pos_set[u]:
                break
        out.append((u, i, j))
    return np.array(out)


def epoch(model, A_hat, optimizer, data, triples, batch_size, generic_backward):
    for s in range(0, len(triples), batch_size):
        u, i, j = triples[s:s + batch_size].T
        E0_user, E0_item = model.E0.split([data.n_users, data.n_items])
        if generic_backward:  # a COO Â and torch's own sparse autograd, as in the reference
            layers = [model.E0]
            for _ in range(model.n_layers):
                layers.append(torch.sparse.mm(A_hat, layers[-1]))
            E_user, E_item = torch.stack(layers).mean(0).split([data.n_users, data.n_items])
        else:
            E_user, E_item = model(A_hat)
        bpr, l2 = bpr_loss(E_user, E_item, E0_user, E0_item, u, i, j, 1e-4)
        optimizer.zero_grad()
        (bpr + l2).backward()
        optimizer.step()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    cfg = parse_flags(BenchConfig, sys.argv[1:])
    if not os.path.exists(f"{cfg.data_dir}/{cfg.dataset}/train.txt"):
        raise UserError(f"no {cfg.dataset}/train.txt under --data_dir={cfg.data_dir!r}: pass --data_dir=DIR, where "
                        f"DIR/{cfg.dataset}/ holds train.txt and test.txt (LightGCN format)")
    if not 0 < cfg.share <= 1:
        raise UserError(f"--share={cfg.share} must be in (0, 1]")
    data = load_lightgcn_dir(f"{cfg.data_dir}/{cfg.dataset}", seed=cfg.seed)
    E = max(1, int(cfg.share * len(data.train)))
    epoch_ = "one epoch" if cfg.share == 1 else f"{cfg.share:g} of an epoch"
    A_hat = Graph(data.n_users, data.n_items, data.train).normalized()
    print(f"{cfg.dataset}: {E} training triples ({epoch_}), batch {cfg.batch_size}, {cfg.n_layers} layers, "
          f"dim {cfg.dim}, {torch.get_num_threads()} torch threads")

    rng = np.random.default_rng(cfg.seed)
    t_loop, loop_triples = timed(lambda: python_loop_triples(data.train, data.n_users, data.n_items, E, rng))
    sampler, gen = NegativeSampler(data.train, data.n_items), torch.Generator().manual_seed(cfg.seed)
    pairs = torch.from_numpy(data.train)

    def vectorised():
        u, i = pairs[torch.randperm(len(pairs), generator=gen)[:E]].T
        return torch.stack([u, i, sampler(u, gen)], 1)

    t_vec, triples = timed(vectorised)
    rows = [(f"sample {epoch_} of triples", t_loop, t_vec)]
    loop_triples = torch.from_numpy(loop_triples)
    step_times = {}
    for generic in (True, False):
        torch.manual_seed(cfg.seed)
        model = LightGCN(data.n_users, data.n_items, cfg.dim, cfg.n_layers)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        A = A_hat.to_sparse_coo().coalesce() if generic else A_hat
        step_times[generic], _ = timed(lambda: epoch(model, A, opt, data, loop_triples if generic else triples,
                                                     cfg.batch_size, generic))
    rows.append((f"train steps of {epoch_}", step_times[True], step_times[False]))
    rows.append(("whole epoch" if cfg.share == 1 else f"sampling + steps, {epoch_}", t_loop + step_times[True],
                 t_vec + step_times[False]))
    with torch.no_grad():
        E_user, E_item = model(A_hat)
    t_eval, _ = timed(lambda: evaluate(E_user, E_item, data.test, [data.train, data.val]))

    print(f"\n| part | reference-style (s) | nanopapers (s) | speed-up |\n|---|---|---|---|")
    for name, ref, ours in rows:
        print(f"| {name} | {ref:.2f} | {ours:.2f} | {ref / ours:.1f}x |")
    print(f"\nnanopapers epoch: {E / (t_vec + step_times[False]):,.0f} triples/s; "
          f"full-ranking test evaluation ({len(np.unique(data.test[:, 0]))} users x {data.n_items} items): "
          f"{t_eval:.2f} s")


if __name__ == "__main__":
    run_main(main)
