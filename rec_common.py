"""
What train_rec.py keeps out of its loop, so that the script reads as flags -> data -> model -> loop:

- the data: MovieLens latest-small (downloaded, or a local copy of its zip) or a data set in LightGCN's text
  format (train.txt, test.txt, optional val.txt) in <data_dir>/<dataset>/;
- the flag checks: every impossible setting, and every flag that has no effect under the chosen --method /
  --model / --dataset, is one clear error naming the flag that would make it count, before any work;
- the saved models a pipeline reads (--teacher, --intermediate, --base, --encoder), checked against this run.

Every function takes the script's config (train_rec.RecConfig) or the fields it names.
"""
import dataclasses
import os
from dataclasses import asdict, replace

from common import UserError, check_same, download, load_checkpoint, refuse_unused
from lightgcn import DataError, Graph, LightGCN, load_lightgcn_dir, load_movielens_zip
from unlearnrec import forget_fraction, read_requests

ML_SMALL_URL = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
ML_SMALL_SHA256 = "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436"
TEXT_DATASETS = {  # LightGCN text format; where a copy can be found
    "ml-1m": "the ML-1M split of the RecEraser / LightGNN / UnlearnRec papers",
    "yelp-lightgnn": "HKUDS/LightGNN Datasets/sparse_yelp, converted to text",
    "gowalla": "gusye1234/LightGCN-PyTorch data/gowalla",
    "yelp2018": "gusye1234/LightGCN-PyTorch data/yelp2018",
    "amazon-book": "gusye1234/LightGCN-PyTorch data/amazon-book",
}
DATA_KEYS = ("dataset", "min_rating", "val_frac", "test_frac", "seed")
# what --method=unlearnrec takes from the --base run (its retraining copies them; the model is the base's)
BASE_KEYS = ("model", "dim", "n_layers", "combine", "self_loops", "graph_edges", "lr", "decay", "batch_size",
             "epochs", "eval_every", "patience")
# of those, the ones the unlearning itself does not use (it fine-tunes with this run's lr, decay, batch_size)
BASE_ONLY = ("model", "dim", "n_layers", "combine", "self_loops", "graph_edges", "epochs", "eval_every", "patience")


# ----------------------------------------------------------------------------- data

def load_data(cfg):
    """The Interactions of --dataset in --data_dir (or the cache, where latest-small is downloaded)."""
    root = cfg.data_dir or os.path.expanduser(cfg.cache_dir)
    folder = os.path.join(root, cfg.dataset)
    wanted = os.path.join(cfg.dataset, "ml-latest-small.zip" if cfg.dataset == "ml-latest-small" else "train.txt")
    path = os.path.join(root, wanted)
    if not os.path.exists(path) and cfg.data_dir:
        if os.path.exists(os.path.join(cfg.data_dir, os.path.basename(wanted))):   # the data set's folder itself
            raise UserError(f"looked for {path} and found no file: --data_dir={cfg.data_dir} is the {cfg.dataset} "
                            f"folder itself; pass the folder that holds it: "
                            f"--data_dir={os.path.dirname(os.path.abspath(cfg.data_dir))}")
        what = ("the MovieLens latest-small zip" if cfg.dataset == "ml-latest-small" else
                f"the LightGCN-format files of {cfg.dataset} ({TEXT_DATASETS[cfg.dataset]})")
        raise UserError(f"looked for {path} and found no file: pass --data_dir=DIR where DIR/{wanted} is {what}"
                        + (", or no --data_dir to download it" if cfg.dataset == "ml-latest-small" else ""))
    try:
        if cfg.dataset == "ml-latest-small":
            if not os.path.exists(path):
                print(f"downloading MovieLens latest-small to {path}")
                download(ML_SMALL_URL, path, ML_SMALL_SHA256)
            return load_movielens_zip(path, cfg.min_rating, cfg.val_frac, cfg.test_frac, cfg.seed)
        if not os.path.exists(path):
            raise UserError(f"looked for {path} and found no file: put the LightGCN-format files of {cfg.dataset} "
                            f"({TEXT_DATASETS[cfg.dataset]}) there, or pass --data_dir=DIR with DIR/{wanted}")
        if os.path.exists(os.path.join(folder, "val.txt")) and cfg.val_frac != default(cfg, "val_frac"):
            raise UserError(f"--val_frac={cfg.val_frac} has no effect: {folder} has its own val.txt (it counts only "
                            f"for a data set without one)")
        return load_lightgcn_dir(folder, cfg.val_frac, cfg.seed)
    except (DataError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------- flags

def default(cfg, key):
    return next(f.default for f in dataclasses.fields(cfg) if f.name == key)


def check_flags(cfg):
    """train_rec.py's flags, as given on the command line: every impossible setting, and every flag that would
    have no effect, is one clear error before any work."""
    choices = {"dataset": ("ml-latest-small",) + tuple(TEXT_DATASETS), "method": ("lightgcn", "lightgnn", "unlearnrec"),
               "model": ("lightgcn", "mf"), "combine": ("mean", "sum"), "prune": ("learned", "random")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"unknown --{key}={getattr(cfg, key)}; use one of {', '.join(allowed)}")
    for k in ("dim", "batch_size", "epochs", "topk", "eval_every", "patience", "eval_batch", "teacher_layers",
              "mid_layers", "mid_epochs", "student_layers", "round_epochs", "kd_nodes", "kd_triples", "align_pairs",
              "redraw_every", "sequence", "snapshots_per_epoch"):
        if getattr(cfg, k) < 1:
            raise UserError(f"--{k}={getattr(cfg, k)} must be >= 1")
    for k in ("n_layers", "rounds", "mid_topk", "pre_epochs", "enc_layers", "finetune_epochs"):
        if getattr(cfg, k) < 0:
            raise UserError(f"--{k}={getattr(cfg, k)} must be >= 0")
    if not (0 <= cfg.rho < 1 and 0 <= cfg.rho_emb < 1 and 0 < cfg.pre_frac < 1 and 0 < cfg.graph_edges <= 1):
        raise UserError("--rho and --rho_emb must be in [0, 1), --pre_frac in (0, 1), --graph_edges in (0, 1]")
    if not (0 <= cfg.val_frac < 1 and 0 <= cfg.test_frac < 1 and cfg.val_frac + cfg.test_frac < 1):
        raise UserError("--val_frac, --test_frac must be >= 0 with val_frac + test_frac < 1")
    if cfg.method == "unlearnrec" and not (cfg.base and cfg.forget):
        raise UserError("--method=unlearnrec needs --base=<checkpoint of a trained lightgcn> and "
                        "--forget=<file of `user item` lines>|<fraction of training edges>|adversarial")
    if cfg.sequence > 1 and not cfg.forget.replace(".", "", 1).replace("e-", "", 1).isdigit():
        raise UserError(f"--sequence={cfg.sequence} needs --forget=<fraction>: a file or `adversarial` is one request")
    method, lightgnn, unlearn = f"(not --method={cfg.method})", cfg.method == "lightgnn", cfg.method == "unlearnrec"
    propagates = cfg.model == "lightgcn" and cfg.n_layers > 0
    refuse_unused(cfg, [
        (("min_rating", "test_frac"), cfg.dataset == "ml-latest-small",
         f"--dataset=ml-latest-small (--dataset={cfg.dataset} comes as interactions with a test split)"),
        (("cache_dir",), not cfg.data_dir, "no --data_dir (the data is read from --data_dir)"),
        # unlearnrec takes them from --base (checked against it there); lightgnn's models are its own
        (("model", "n_layers"), cfg.method in ("lightgcn", "unlearnrec"), f"--method=lightgcn {method}"),
        (("n_layers",), cfg.model == "lightgcn", "--model=lightgcn (mf has no propagation)"),
        (("combine", "self_loops", "graph_edges"), unlearn or cfg.method == "lightgcn" and propagates,
         "--method=lightgcn with propagation (--model=lightgcn, --n_layers >= 1)"),
        (("resume",), cfg.method == "lightgcn", f"--method=lightgcn {method}: a pipeline starts over; reuse its "
                                                f"finished stages in another --out_dir"),
        (("teacher", "intermediate", "mid_layers", "mid_topk", "mid_epochs", "student_layers", "rounds",
          "round_epochs", "kd_pred", "kd_emb", "uni", "kd_nodes", "kd_triples"), lightgnn,
         f"--method=lightgnn {method}"),
        (("kd_tau",), lightgnn and cfg.kd_pred > 0, "--method=lightgnn and --kd_pred > 0"),
        (("kd_emb_tau",), lightgnn and cfg.kd_emb > 0, "--method=lightgnn and --kd_emb > 0"),
        (("sub",), lightgnn and cfg.rounds >= 2, "--method=lightgnn and --rounds >= 2 (it is on in rounds 2..13)"),
        (("uni_tau",), lightgnn and (cfg.uni > 0 or cfg.sub > 0 and cfg.rounds >= 2),
         "--method=lightgnn and --uni > 0 (or --sub > 0 with --rounds >= 2)"),
        (("teacher_layers",), lightgnn and not cfg.teacher, "--method=lightgnn without --teacher (a saved teacher "
                                                            "has its own layers)"),
        (("rho", "rho_emb", "prune"), lightgnn and cfg.rounds > 0, "--method=lightgnn and --rounds >= 1"),
        (("beta1", "beta2"), lightgnn and cfg.rounds > 0 and cfg.prune == "learned",
         "--method=lightgnn, --rounds >= 1 and --prune=learned"),
        (("base", "forget", "encoder", "pre_epochs", "finetune_epochs", "sequence", "lambda_u", "lambda_a",
          "align_tau", "align_pairs", "eta0", "omega", "enc_layers", "h0_all", "lambda_ssl", "ssl_tau"), unlearn,
         f"--method=unlearnrec {method}"),
        (("snapshots_per_epoch",), unlearn and cfg.finetune_epochs > 0, "--method=unlearnrec and --finetune_epochs "
                                                                        ">= 1"),
        (("retrain",), unlearn and cfg.forget != "adversarial",
         "--method=unlearnrec with a --forget other than adversarial (its retrained model is the clean --base)"),
        (("pre_frac", "redraw_every"), unlearn and (not cfg.encoder or cfg.pretrain_control) and cfg.pre_epochs > 0,
         "--method=unlearnrec without --encoder and with --pre_epochs >= 1 (the encoder's pre-training)"),
        (("pretrain_control",), unlearn and cfg.pre_epochs > 0,
         "--method=unlearnrec and --pre_epochs >= 1 (the control is pre-trained as the encoder was)"),
    ])
    if lightgnn and cfg.teacher and cfg.epochs != default(cfg, "epochs"):
        raise UserError(f"--epochs={cfg.epochs} has no effect with these flags: it counts only without --teacher "
                        f"(the teacher's training; --mid_epochs and --round_epochs set the other stages')")


def check_base(cfg, base):
    """--method=unlearnrec: the model and its training are the --base run's (its config `base`); a flag set to
    another value would have no effect, so it is one clear error."""
    for k in BASE_ONLY:
        mine = getattr(cfg, k)
        if mine != default(cfg, k) and k in base and mine != base[k]:
            raise UserError(f"--{k}={mine} has no effect with --method=unlearnrec: the model and its retraining "
                            f"take the --base run's {k}={base[k]!r}; drop --{k} (or train another --base)")


def check_inputs_kept(cfg):
    """--overwrite empties --out_dir of its run files: a saved model this run reads must not be one of them."""
    out = os.path.join(os.path.abspath(cfg.out_dir), "")
    for k in ("teacher", "intermediate", "base", "encoder"):
        if cfg.overwrite and getattr(cfg, k) and os.path.abspath(getattr(cfg, k)).startswith(out):
            raise UserError(f"--overwrite would delete --{k}={getattr(cfg, k)}, which is inside "
                            f"--out_dir={cfg.out_dir}: pass another --out_dir")


def check_requests(cfg, data):
    """--forget: a fraction in (0, 1), adversarial, or a file of training edges (checked before out_dir is claimed)."""
    try:
        if forget_fraction(cfg.forget) is None and cfg.forget != "adversarial":
            read_requests(cfg.forget, data.train, data.n_users, data.n_items)
    except DataError as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------- saved stages

def saved_teacher(cfg, data, device):
    """--teacher: a plain train_rec run (its n_layers, self_loops) or the teacher stage of a lightgnn run, as
    (LightGCN, its Â, training seconds); None without --teacher."""
    if not cfg.teacher:
        return None
    ckpt = load_checkpoint(cfg.teacher, device)
    check_same(ckpt["config"], asdict(cfg), DATA_KEYS + ("dim",), cfg.teacher)
    c = ckpt["config"]
    layers, combine, loops = ((c["teacher_layers"], "sum", True) if c["method"] == "lightgnn"
                              else (c["n_layers"], c["combine"], c["self_loops"]))
    model = LightGCN(data.n_users, data.n_items, cfg.dim, layers, combine).to(device)
    model.load_state_dict(ckpt["model"])
    A_t = Graph(data.n_users, data.n_items, data.train, loops).normalized().to(device)
    return model, A_t, ckpt["state"].get("train_seconds", float("nan"))


def saved_intermediate(cfg, device):
    """--intermediate: (its state_dict, training seconds); None without it."""
    if not cfg.intermediate:
        return None
    ckpt = load_checkpoint(cfg.intermediate, device)
    check_same(ckpt["config"], asdict(cfg), DATA_KEYS + ("dim", "mid_layers", "mid_topk"), cfg.intermediate)
    return ckpt["model"], ckpt["state"].get("train_seconds", float("nan"))


def saved_base(cfg, data, device):
    """--base of --method=unlearnrec: (the LightGCN, the config its retraining uses: this run's with the base run's
    model and training settings, its training seconds). The flags it overrides must not say otherwise."""
    ckpt = load_checkpoint(cfg.base, device)
    check_same(ckpt["config"], asdict(cfg), DATA_KEYS, cfg.base)
    check_base(cfg, ckpt["config"])
    base_cfg = replace(cfg, method="lightgcn", **{k: ckpt["config"][k] for k in BASE_KEYS if k in ckpt["config"]})
    base = LightGCN(data.n_users, data.n_items, base_cfg.dim, base_cfg.n_layers, base_cfg.combine).to(device)
    base.load_state_dict(ckpt["model"])
    return base, base_cfg, ckpt["state"]["train_seconds"]


def saved_encoder(cfg, device, pretrained_on):
    """--encoder: a pre-trained influence encoder's state_dict, made for the same original model; None without it."""
    if not cfg.encoder:
        return None
    ckpt = load_checkpoint(cfg.encoder, device)
    check_same(ckpt, {"pretrained_on": pretrained_on}, ("pretrained_on",), cfg.encoder)
    return ckpt["model"]
