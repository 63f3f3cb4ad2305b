"""
Train a graph recommender (lightgcn.py) with BPR and full-ranking evaluation.

    python train_rec.py                                          # LightGCN on MovieLens latest-small, a few minutes
    python train_rec.py --dataset=ml-1m --data_dir=DIR           # DIR/ml-1m/train.txt, test.txt

Early stopping and the reported checkpoint are chosen on the VALIDATION split (Recall@topk); the test split is
evaluated once, at the end, with the best-validation checkpoint. Data sets without a validation file get one
drawn per user from their training interactions.

Every flag is a field of RecConfig below, written --key=value.
"""
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from common import (UserError, append_jsonl, download, fmt_seconds, load_checkpoint, parse_flags, pick_device,
                    resume_from, run_main, save_atomic, write_json)
from lightgcn import DataError, Graph, LightGCN, NegativeSampler, bpr_loss, evaluate, load_lightgcn_dir, load_movielens_zip

ML_SMALL_URL = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
ML_SMALL_SHA256 = "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436"
TEXT_DATASETS = {  # LightGCN text format; where a copy can be found
    "ml-1m": "the ML-1M split of the RecEraser / LightGNN / UnlearnRec papers",
    "yelp-lightgnn": "HKUDS/LightGNN Datasets/sparse_yelp, converted to text",
    "gowalla": "gusye1234/LightGCN-PyTorch data/gowalla",
    "yelp2018": "gusye1234/LightGCN-PyTorch data/yelp2018",
    "amazon-book": "gusye1234/LightGCN-PyTorch data/amazon-book",
}
MODEL_KEYS = ("dataset", "min_rating", "val_frac", "test_frac", "seed", "dim", "n_layers", "combine", "self_loops",
              "method")


@dataclass
class RecConfig:
    # data
    dataset: str = "ml-latest-small"    # ml-latest-small (downloaded) | ml-1m | yelp-lightgnn | gowalla | yelp2018 | amazon-book
    data_dir: str = ""                  # folder holding <dataset>/train.txt ... (or ml-latest-small/ml-latest-small.zip)
    cache_dir: str = "~/.cache/nanopapers"
    out_dir: str = "out-rec"
    min_rating: float = 0.0             # MovieLens: ratings >= this are interactions (0 = every rating)
    val_frac: float = 0.1               # per-user validation share when the data set has no val.txt
    test_frac: float = 0.2              # per-user test share when the data set has no test.txt (MovieLens zip)
    # model
    method: str = "lightgcn"
    dim: int = 64
    n_layers: int = 3
    combine: str = "mean"               # mean (LightGCN) | sum (LightGNN, UnlearnRec)
    self_loops: bool = False
    # optimisation
    lr: float = 1e-3
    decay: float = 1e-4                 # L2 on the batch's layer-0 embeddings
    batch_size: int = 2048
    epochs: int = 200
    # evaluation
    topk: int = 20
    eval_every: int = 10                # epochs between validation evaluations
    patience: int = 5                   # evaluations without a better val Recall before stopping
    eval_batch: int = 1024              # users per full-ranking batch
    # system
    device: str = "auto"
    seed: int = 2020                    # data split, initialisation and sampling
    resume: bool = False                # continue from out_dir/ckpt_last.pt


def load_data(cfg):
    root = cfg.data_dir or os.path.expanduser(cfg.cache_dir)
    folder = os.path.join(root, cfg.dataset)
    try:
        if cfg.dataset == "ml-latest-small":
            path = os.path.join(folder, "ml-latest-small.zip")
            if not os.path.exists(path):
                if cfg.data_dir:
                    raise UserError(f"--data_dir={cfg.data_dir} has no ml-latest-small/ml-latest-small.zip")
                print(f"downloading MovieLens latest-small to {path}")
                download(ML_SMALL_URL, path, ML_SMALL_SHA256)
            return load_movielens_zip(path, cfg.min_rating, cfg.val_frac, cfg.test_frac, cfg.seed)
        if not os.path.exists(os.path.join(folder, "train.txt")):
            raise UserError(f"no {folder}/train.txt: put the LightGCN-format files of {cfg.dataset} "
                            f"({TEXT_DATASETS[cfg.dataset]}) there, or pass --data_dir=DIR with DIR/{cfg.dataset}/")
        return load_lightgcn_dir(folder, cfg.val_frac, cfg.seed)
    except (DataError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


def train(cfg):
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg)
    print(f"{cfg.dataset}: {data.n_users} users, {data.n_items} items, "
          f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test interactions")
    A_hat = Graph(data.n_users, data.n_items, data.train, cfg.self_loops).normalized().to(device)
    model = LightGCN(data.n_users, data.n_items, cfg.dim, cfg.n_layers, cfg.combine).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sampler = NegativeSampler(data.train, data.n_items)
    train_pairs = torch.from_numpy(data.train)
    gen = torch.Generator().manual_seed(cfg.seed)

    os.makedirs(cfg.out_dir, exist_ok=True)
    last_path, best_path = (os.path.join(cfg.out_dir, f"ckpt_{n}.pt") for n in ("last", "best"))
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    state = {"epoch": 0, "best_val": -1.0, "best_epoch": 0, "bad_evals": 0}
    if cfg.resume:
        ckpt = resume_from(last_path, asdict(cfg), MODEL_KEYS, model, optimizer, device)
        gen.set_state(ckpt["rng"])
        state = ckpt["state"]
        print(f"resuming from {last_path} after epoch {state['epoch']}")
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    def checkpoint(path):
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": gen.get_state(),
                     "state": state, "config": asdict(cfg)}, path)

    key = f"recall@{cfg.topk}"
    t_start = time.time()
    while state["epoch"] < cfg.epochs and state["bad_evals"] < cfg.patience:
        t0 = time.time()
        perm = torch.randperm(len(train_pairs), generator=gen)
        total = 0.0
        for s in range(0, len(perm), cfg.batch_size):
            u, i = train_pairs[perm[s:s + cfg.batch_size]].T
            j = sampler(u, gen)
            u, i, j = u.to(device), i.to(device), j.to(device)
            E_user, E_item = model(A_hat)
            E0_user, E0_item = model.E0.split([data.n_users, data.n_items])
            bpr, l2 = bpr_loss(E_user, E_item, E0_user, E0_item, u, i, j, cfg.decay)
            loss = bpr + l2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(u)
        state["epoch"] += 1
        dt = time.time() - t0
        loss = total / len(perm)
        if not torch.isfinite(torch.tensor(loss)):
            raise UserError(f"loss became {loss} in epoch {state['epoch']}; the last good checkpoint is kept. "
                            f"Lower --lr")
        record = {"epoch": state["epoch"], "loss": loss, "epoch_seconds": dt, "triples_per_second": len(perm) / dt}
        line = f"epoch {state['epoch']} | loss {loss:.4f} | {dt:.2f} s | {len(perm) / dt:,.0f} triples/s"
        if state["epoch"] % cfg.eval_every == 0 or state["epoch"] == cfg.epochs:
            with torch.no_grad():
                E_user, E_item = model(A_hat)
            val = evaluate(E_user, E_item, data.val, [data.train], cfg.topk, cfg.eval_batch)
            record.update({f"val_{k}": v for k, v in val.items()})
            line += " | val " + " ".join(f"{k} {v:.4f}" for k, v in val.items())
            if val[key] > state["best_val"]:
                state.update(best_val=val[key], best_epoch=state["epoch"], bad_evals=0)
                checkpoint(best_path)
                line += " (best)"
            else:
                state["bad_evals"] += 1
            checkpoint(last_path)
        print(line)
        append_jsonl(metrics_path, record)

    if not os.path.exists(best_path):
        raise UserError(f"no evaluation happened (epochs={cfg.epochs} < eval_every={cfg.eval_every}); "
                        f"lower --eval_every")
    model.load_state_dict(load_checkpoint(best_path, device)["model"])
    with torch.no_grad():
        E_user, E_item = model(A_hat)
    val = evaluate(E_user, E_item, data.val, [data.train], cfg.topk, cfg.eval_batch)
    test = evaluate(E_user, E_item, data.test, [data.train, data.val], cfg.topk, cfg.eval_batch)
    wall = time.time() - t_start
    print(f"best epoch {state['best_epoch']} | val " + " ".join(f"{k} {v:.4f}" for k, v in val.items())
          + " | test " + " ".join(f"{k} {v:.4f}" for k, v in test.items()) + f" | {fmt_seconds(wall)} wall")
    write_json(os.path.join(cfg.out_dir, "summary.json"),
               {"best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "val": val, "test": test,
                "wall_seconds": wall, "device": device, "config": asdict(cfg)})


def main():
    cfg = parse_flags(RecConfig, sys.argv[1:])
    if cfg.dataset != "ml-latest-small" and cfg.dataset not in TEXT_DATASETS:
        raise UserError(f"unknown --dataset={cfg.dataset}; use ml-latest-small or one of {', '.join(TEXT_DATASETS)}")
    if cfg.method != "lightgcn":
        raise UserError(f"unknown --method={cfg.method}; use lightgcn")
    if cfg.combine not in ("mean", "sum"):
        raise UserError(f"--combine={cfg.combine} must be mean or sum")
    for k in ("dim", "batch_size", "epochs", "topk", "eval_every", "patience", "eval_batch"):
        if getattr(cfg, k) < 1:
            raise UserError(f"--{k}={getattr(cfg, k)} must be >= 1")
    if cfg.n_layers < 0 or not (0 <= cfg.val_frac < 1 and 0 <= cfg.test_frac < 1 and cfg.val_frac + cfg.test_frac < 1):
        raise UserError("--n_layers must be >= 0, and --val_frac, --test_frac >= 0 with val_frac + test_frac < 1")
    if cfg.resume and not os.path.exists(os.path.join(cfg.out_dir, "ckpt_last.pt")):
        raise UserError(f"--resume but {cfg.out_dir}/ckpt_last.pt does not exist; drop --resume or fix --out_dir")
    train(cfg)


if __name__ == "__main__":
    run_main(main)
