"""
Train a graph recommender (lightgcn.py) with BPR and full-ranking evaluation, and plug in the recommender ideas.

    python train_rec.py                                          # LightGCN on MovieLens latest-small, a few minutes
    python train_rec.py --dataset=ml-1m --data_dir=DIR           # DIR/ml-1m/train.txt, test.txt
    python train_rec.py --out_dir=out-rec --resume               # continue an interrupted run, exactly, on its settings
    python train_rec.py --method=lightgnn ...                    # teacher -> intermediate -> pruned student
    python train_rec.py --method=unlearnrec --base=RUN/ckpt_best.pt --forget=0.01 ...   # unlearnrec.py

One loop trains everything: fit(cfg, stage, out_dir) runs a lightgcn.Stage (a model, the loss it minimises, how
it is selected), built here or by the paper files. Early stopping and the reported checkpoint are chosen on the
VALIDATION split (Recall@topk); the test split is evaluated once, at the end, with the selected checkpoint. Data
and flag checks live in rec_common.py. Every flag is a field of RecConfig below, written --key=value.
"""
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from common import (UserError, append_jsonl, drop_records_after, fmt_seconds, load_checkpoint, on_interrupt,
                    parse_flags, pick_device, prepare_out_dir, resume_from, resumed_config, run_main, save_atomic,
                    write_json)
from lightgcn import DataError, Graph, LightGCN, NegativeSampler, Stage, bpr_loss, evaluate
import lightgnn
from rec_common import (DATA_KEYS, check_flags, check_inputs_kept, check_requests, load_data, saved_base, saved_encoder,
                        saved_intermediate, saved_teacher)
from unlearnrec import timings, unlearn_pipeline

MODEL_KEYS = DATA_KEYS + ("dim", "n_layers", "combine", "self_loops", "graph_edges", "method")
# what --resume lets a command line change: where files are, the device, and how long it trains
RESUMABLE = ("out_dir", "data_dir", "cache_dir", "device", "epochs")


@dataclass
class RecConfig:
    # data
    dataset: str = "ml-latest-small"    # ml-latest-small (downloaded) | ml-1m | yelp-lightgnn | gowalla | yelp2018 | amazon-book
    data_dir: str = ""                  # folder holding <dataset>/train.txt ... (or ml-latest-small/ml-latest-small.zip)
    cache_dir: str = "~/.cache/nanopapers"
    out_dir: str = "out-rec"
    overwrite: bool = False             # replace the run already in out_dir (without it, such a folder is refused)
    min_rating: float = 0.0             # MovieLens: ratings >= this are interactions (0 = every rating)
    val_frac: float = 0.1               # per-user validation share when the data set has no val.txt
    test_frac: float = 0.2              # per-user test share when the data set has no test.txt (MovieLens zip)
    # model
    method: str = "lightgcn"
    model: str = "lightgcn"             # lightgcn | mf (matrix factorisation + BPR: LightGCN with 0 layers)
    dim: int = 64
    n_layers: int = 3
    combine: str = "mean"               # mean (LightGCN) | sum (LightGNN, UnlearnRec)
    self_loops: bool = False
    graph_edges: float = 1.0            # share of training interactions in the propagation graph (random, seeded);
                                        # BPR still uses all of them. <1 is LightGNN's control: a random sparse graph
    # lightgnn (--method=lightgnn): teacher -> intermediate -> student rounds; --epochs is the teacher's
    teacher: str = ""                   # a saved teacher (train_rec checkpoint) to reuse instead of training one
    intermediate: str = ""              # a saved intermediate (out_dir/intermediate/ckpt_best.pt) to reuse
    teacher_layers: int = 8
    mid_layers: int = 6
    mid_topk: int = 10                  # A² links (largest path counts) kept per node in I + A + A²; 0 = all of A²
    mid_epochs: int = 30
    student_layers: int = 2
    rounds: int = 10                    # pruning rounds; (1-rho)^rounds of edges stay
    round_epochs: int = 10              # student epochs per round (the best-validation epoch is kept)
    rho: float = 0.15                   # share of kept edges pruned per round
    rho_emb: float = 0.2                # share of kept embedding entries pruned per round
    prune: str = "learned"              # learned (edge scores φ, |embedding entries|) | random (the control)
    beta1: float = 0.05                 # edge score weight of σ(intermediate's e_u · e_i)
    beta2: float = 1.0                  # edge score weight of the intermediate's learned edge weight
    kd_pred: float = 1.0                # prediction-level KD weight, temperature
    kd_tau: float = 0.03
    kd_emb: float = 0.01                # embedding-level KD (InfoNCE) weight, temperature
    kd_emb_tau: float = 0.1
    uni: float = 1.0                    # uniformity weight, temperature
    uni_tau: float = 1.0
    sub: float = 1e-4                   # subspace uniformity weight (student rounds 2..13)
    kd_nodes: int = 1024                # batch users / items in the embedding KD and uniformity (cost: × all nodes)
    kd_triples: int = 100000            # random (u, i1, i2) triples of the prediction-level KD per step
    # unlearnrec (--method=unlearnrec): forget edges of a trained LightGCN (or MF)
    base: str = ""                      # the trained model (a train_rec lightgcn / mf checkpoint)
    forget: str = ""                    # file of `user item` lines | a fraction of training edges | adversarial
    encoder: str = ""                   # a pre-trained influence encoder to reuse (out_dir/encoder_pretrained.pt)
    pre_epochs: int = 10                # encoder pre-training on random requests
    pre_frac: float = 0.1               # size of a random request, as a share of the training edges
    redraw_every: int = 2               # epochs between random requests
    finetune_epochs: int = 2            # on the real request (UnlearnRec and fine-tune-only alike)
    snapshots_per_epoch: int = 1        # also score both after every 1/k of an epoch (1: after each whole epoch)
    sequence: int = 1                   # --forget=<fraction>: this many requests, each from the last unlearned model
    retrain: bool = True                # also retrain from scratch without the request edges (the reference)
    pretrain_control: bool = False      # also fine-tune-only from an E0 pre-trained like the encoder (same requests)
    lambda_u: float = 1.0               # weight of L_u (push forgotten pairs down)
    lambda_a: float = 0.01              # weight of L_align (keep the rest)
    align_tau: float = 1.0
    align_pairs: int = 1024             # (user, positive) pairs of a batch in L_align
    eta0: float = 2e-3                  # initial withdraw rate η
    omega: float = 0.1                  # ω
    enc_layers: int = 3                 # L of the encoder's propagation over Â_Δ
    h0_all: bool = True                 # l = 0 term of Σ_l Â_Δ^l H0 on every node (false: request's neighbours)
    lambda_ssl: float = 0.0             # weight of the optional SSL term (paper: 1e-3)
    ssl_tau: float = 0.2
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
    resume: bool = False                # continue out_dir/ckpt_last.pt (--method=lightgcn) with its saved settings


# ----------------------------------------------------------------------------- the loop

def train_epoch(cfg, stage, optimizer, sampler, gen, device):
    """One pass over stage.data.train in a random order, each pair with a sampled negative. Returns the mean loss."""
    pairs = torch.from_numpy(stage.data.train)
    perm = torch.randperm(len(pairs), generator=gen)
    total = 0.0
    for s in range(0, len(perm), cfg.batch_size):
        u, i = pairs[perm[s:s + cfg.batch_size]].T
        j = sampler(u, gen)
        loss = stage.loss(u.to(device), i.to(device), j.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if stage.after_step is not None:
            stage.after_step()
        total += loss.item() * len(u)
    return total / len(perm)


def fit(cfg, stage, out_dir, resume=False):
    """Train a lightgcn.Stage: Adam, validation Recall of stage.embed() every eval_every epochs (select="last":
    once, at the end), atomic best / last checkpoints of stage.model in out_dir, early stopping. Leaves the model
    at its selected (best-validation) state and returns the run's state dict."""
    cfg = replace(cfg, seed=cfg.seed if stage.seed is None else stage.seed,
                  eval_every=stage.epochs if stage.select == "last" else cfg.eval_every)
    model, data, epochs = stage.model, stage.data, stage.epochs
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sampler, gen = NegativeSampler(data.train, data.n_items), torch.Generator().manual_seed(cfg.seed)
    os.makedirs(out_dir, exist_ok=True)
    last_path, best_path, metrics_path = (os.path.join(out_dir, n) for n in ("ckpt_last.pt", "ckpt_best.pt",
                                                                             "metrics.jsonl"))
    state = {"epoch": 0, "best_val": -1.0, "best_epoch": 0, "bad_evals": 0, "train_seconds": 0.0}
    if resume:
        ckpt = resume_from(last_path, asdict(cfg), MODEL_KEYS, model, optimizer, device)
        gen.set_state(ckpt["rng"])
        state = ckpt["state"]
        print(f"resuming from {last_path} after epoch {state['epoch']}")
        drop_records_after(metrics_path, "epoch", state["epoch"])     # the epochs after the checkpoint run again
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)
    key = f"recall@{cfg.topk}"
    while state["epoch"] < epochs and state["bad_evals"] < cfg.patience:
        t0 = time.time()
        loss = train_epoch(cfg, stage, optimizer, sampler, gen, device)
        state["epoch"] += 1
        dt = time.time() - t0
        state["train_seconds"] += dt
        if not np.isfinite(loss):
            raise UserError(f"loss became {loss} in epoch {state['epoch']}; the last checkpoint is kept; lower --lr")
        n = len(data.train)
        record = {"epoch": state["epoch"], "loss": loss, "epoch_seconds": dt, "triples_per_second": n / dt}
        line = f"epoch {state['epoch']} | loss {loss:.4f} | {dt:.2f} s | {n / dt:,.0f} triples/s"
        saves = []
        if state["epoch"] % cfg.eval_every == 0 or state["epoch"] == epochs:
            with torch.no_grad():
                val = evaluate(*stage.embed(), data.val, [data.train], cfg.topk, cfg.eval_batch)
            record.update({f"val_{k}": v for k, v in val.items()})
            line += " | val " + " ".join(f"{k} {v:.4f}" for k, v in val.items())
            if val[key] > state["best_val"]:
                state.update(best_val=val[key], best_epoch=state["epoch"], bad_evals=0)
                saves.append(best_path)
                line += " (best)"
            else:
                state["bad_evals"] += 1
            saves.append(last_path)
        print(line)
        append_jsonl(metrics_path, record)      # before the checkpoints: --resume drops what comes after its own
        for path in saves:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": gen.get_state(),
                         "state": state, "config": asdict(cfg)}, path)
    if not os.path.exists(best_path):
        raise UserError(f"no evaluation happened (epochs={epochs} < eval_every={cfg.eval_every}); "
                        f"lower --eval_every")
    model.load_state_dict(load_checkpoint(best_path, device)["model"])
    return state


def stage_fit(cfg):
    """The training loop a pipeline is given: fit, each stage in its own subfolder of out_dir."""
    return lambda stage: fit(cfg, stage, os.path.join(cfg.out_dir, stage.name))


@torch.no_grad()
def report(cfg, data, E_user, E_item):
    """Validation and test metrics of final embeddings (test excludes train and val items)."""
    val = evaluate(E_user, E_item, data.val, [data.train], cfg.topk, cfg.eval_batch)
    test = evaluate(E_user, E_item, data.test, [data.train, data.val], cfg.topk, cfg.eval_batch)
    return val, test


def metrics_line(val, test):
    return ("val " + " ".join(f"{k} {v:.4f}" for k, v in val.items()) + " | test "
            + " ".join(f"{k} {v:.4f}" for k, v in test.items()))


# ----------------------------------------------------------------------------- the methods

def graph_edges(cfg, data):
    """The interactions the propagation graph is built from: all, or a seeded random --graph_edges share."""
    if cfg.graph_edges >= 1:
        return data.train
    rng = np.random.default_rng(cfg.seed)
    keep = rng.permutation(len(data.train))[:int(round(cfg.graph_edges * len(data.train)))]
    return data.train[np.sort(keep)]


def train_lightgcn(cfg, data, device, out_dir, resume=False):
    """Plain LightGCN + BPR (L_BPR + L2), selected on validation. Returns (model, A_hat, fit state)."""
    torch.manual_seed(cfg.seed)
    A_hat = Graph(data.n_users, data.n_items, graph_edges(cfg, data), cfg.self_loops).normalized().to(device)
    model = LightGCN(data.n_users, data.n_items, cfg.dim, cfg.n_layers, cfg.combine).to(device)

    def loss(u, i, j):
        return sum(bpr_loss(*model(A_hat), *model.E0.split([data.n_users, data.n_items]), u, i, j, cfg.decay))

    state = fit(cfg, Stage("lightgcn", model, loss, lambda: model(A_hat), data, cfg.epochs), out_dir, resume)
    return model, A_hat, state


def train(cfg, data, device):
    t_start = time.time()
    prepare_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    last = os.path.join(cfg.out_dir, "ckpt_last.pt")       # Ctrl-C: say how to continue, once there is a checkpoint
    on_interrupt(lambda: f"continue with: python train_rec.py --out_dir={cfg.out_dir} --resume"
                 if os.path.exists(last) else "")
    model, A_hat, state = train_lightgcn(cfg, data, device, cfg.out_dir, cfg.resume)
    val, test = report(cfg, data, *model(A_hat))
    wall = time.time() - t_start
    print(f"best epoch {state['best_epoch']} | {metrics_line(val, test)} | {fmt_seconds(wall)} wall")
    write_json(os.path.join(cfg.out_dir, "summary.json"),
               {"best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "val": val, "test": test,
                "wall_seconds": wall, "device": device, "config": asdict(cfg)})


def train_lightgnn_pipeline(cfg, data, device):
    """LightGNN (lightgnn.run): teacher -> intermediate -> student pruning rounds, each stage a `fit` run in its
    own subfolder of out_dir; --teacher / --intermediate reuse saved stages (checked against this data set)."""
    t_start = time.time()
    rows, reuse = [], {"teacher": cfg.teacher, "intermediate": cfg.intermediate}

    def row(name, E_user, E_item, seconds, edges_kept, entries_kept, cost):
        val, test = report(cfg, data, E_user, E_item)
        rows.append({"model": name, "edges_kept": edges_kept, "entries_kept": entries_kept, "cost": cost,
                     "val": val, "test": test, "train_seconds": seconds})
        print(f"== {name} | edges {edges_kept:.3f} | entries {entries_kept:.3f} | cost {cost:.3f} "
              f"| {metrics_line(val, test)} | {fmt_seconds(seconds)}")
        write_json(os.path.join(cfg.out_dir, "summary.json"), {"rounds": rows, "config": asdict(cfg)})
        if name in reuse:               # Ctrl-C: a pipeline starts over, reusing its finished stages
            reuse[name] = reuse[name] or os.path.join(cfg.out_dir, name, "ckpt_best.pt")
            on_interrupt("start again in another --out_dir, reusing the finished stages: " + " ".join(
                f"--{k}={v}" for k, v in reuse.items() if v))

    teacher, mid_state = saved_teacher(cfg, data, device), saved_intermediate(cfg, device)
    prepare_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    lightgnn.run(data, cfg, stage_fit(cfg), row, device, teacher, mid_state)
    print(f"lightgnn pipeline done in {fmt_seconds(time.time() - t_start)}; table in {cfg.out_dir}/summary.json")


def train_unlearnrec(cfg, data, device):
    """UnlearnRec: forget --forget from the --base model with the pipeline of unlearnrec.py (pre-training, requests,
    fine-tuning, the fine-tune-only baseline) given this script's training loop, and compare with retraining
    from scratch (the base run's own settings and stopping rule) without the request edges."""
    base, base_cfg, base_seconds = saved_base(cfg, data, device)
    check_requests(cfg, data)
    # an encoder is pre-trained for one original model: the base, or the model poisoned from it
    pretrained_on = cfg.base + (" (poisoned)" if cfg.forget == "adversarial" else "")
    encoder_state = saved_encoder(cfg, device, pretrained_on)
    prepare_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    on_interrupt("a pipeline starts over: run it again with --overwrite")

    def train_base(data_i, name):
        model, _, state = train_lightgcn(base_cfg, data_i, device, os.path.join(cfg.out_dir, name))
        return model, state["train_seconds"]

    def report_rows(data_i, E_user, E_item):
        val, test = report(cfg, data_i, E_user, E_item)
        return {"val": val, "test": test}

    try:                                                        # (--forget was checked by check_requests)
        out = unlearn_pipeline(cfg, data, base, base_seconds, base_cfg.self_loops, stage_fit(cfg), train_base,
                               report_rows, encoder_state)
    except DataError as e:                                      # e.g. no user of the request has test items
        raise UserError(str(e)) from None
    if not cfg.encoder:
        save_atomic({"model": out["encoder_pretrained"], "pretrained_on": pretrained_on, "config": asdict(cfg)},
                    os.path.join(cfg.out_dir, "encoder_pretrained.pt"))
    U_user, U_item = out["unlearned"].split([data.n_users, data.n_items])
    save_atomic({"encoder": out["encoder"], "E_user": U_user, "E_item": U_item,
                 "requests": torch.from_numpy(out["requests"]), "config": asdict(cfg)},
                os.path.join(cfg.out_dir, "unlearned.pt"))
    times = timings(out, cfg.sequence, cfg.retrain)
    # the score samples of each step and model go to scores.npz (plot.py unlearning), the rest to summary.json
    samples = {f"{k + 1}/{r['model']}/{kind}": s for k, step in enumerate(out["steps"]) for r in step["rows"]
               for kind, s in r.pop("scores").items()}
    save_atomic(samples, os.path.join(cfg.out_dir, "scores.npz"), save=lambda a, f: np.savez(f, **a))
    write_json(os.path.join(cfg.out_dir, "summary.json"),
               {"steps": out["steps"], "times": times, "config": asdict(cfg)})


# ----------------------------------------------------------------------------- flags

def resumed(cfg, argv):
    """--resume: the run's saved settings, with the flags of RESUMABLE given on top (the run continues exactly)."""
    if cfg.overwrite:
        raise UserError(f"--resume continues the run in {cfg.out_dir}, --overwrite replaces it: pick one")
    path = os.path.join(cfg.out_dir, "ckpt_last.pt")
    if not os.path.exists(path):
        raise UserError(f"--resume but {path} does not exist (only a --method=lightgcn run has one); drop --resume "
                        f"or fix --out_dir")
    return resumed_config(RecConfig, load_checkpoint(path)["config"], argv, RESUMABLE)


def main():
    argv = sys.argv[1:]
    cfg = parse_flags(RecConfig, argv)
    check_flags(cfg)
    check_inputs_kept(cfg)
    if cfg.resume:
        cfg = resumed(cfg, argv)
    if cfg.model == "mf":
        cfg = replace(cfg, n_layers=0)              # matrix factorisation = LightGCN without propagation
    device = pick_device(cfg.device)
    data = load_data(cfg)
    if len(data.val) == 0:
        raise UserError(f"no validation interactions (--val_frac={cfg.val_frac}; a user gets floor(val_frac * "
                        f"its training items)): early stopping and checkpoints need them; raise --val_frac")
    print(f"{cfg.dataset}: {data.n_users} users, {data.n_items} items, "
          f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test interactions")
    run = {"lightgcn": train, "lightgnn": train_lightgnn_pipeline, "unlearnrec": train_unlearnrec}[cfg.method]
    run(cfg, data, device)


if __name__ == "__main__":
    run_main(main)
