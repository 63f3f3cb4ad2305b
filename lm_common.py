"""
What train_lm.py and eval_lm.py share, so that each script reads as flags -> data -> model -> loop:

- the data: Tiny Shakespeare (downloaded or a local copy), its tokenizer (characters or GPT-2's BPE), the
  tokenized train/val splits, random batches; or the generated recall task (recall.py);
- the model a config describes (gpt.py, with unipool.py's MoE layers as its FFNs);
- the attention pattern of each layer under --attn_mask (sepllm.py's rule);
- the evaluation: mean loss on fixed batches, and the recall task's answer accuracy;
- train_lm.py's bookkeeping, kept out of its loop: the clock behind ms/iter and the ETA, and its flag checks.

Every function takes the script's config (train_lm.TrainConfig) or the fields it names.
"""
import contextlib
import json
import os
import time

import numpy as np
import torch

from common import UserError, download, refuse_unused, save_atomic, sha256_of, write_json
from gpt import GPT, GPTConfig, ffn_hidden_size
from kernels import set_backend
from recall import RecallData, answer_accuracy, episode_length
from sepllm import SEPARATORS, SparsePattern, fixed_interval_keep, is_separator, separator_ids
from unipool import MoE, build_moe_layers

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
GPT_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "block_size", "rope_base", "tie_embeddings",
            "attn_score")
MOE_KEYS = ("ffn", "n_experts", "pool_size", "pool_groups", "top_k", "router", "expert_split", "n_shared")
MODEL_KEYS = ("dataset",) + GPT_KEYS + MOE_KEYS    # what a checkpoint's weights depend on
RECALL_KEYS = ("recall_pairs", "recall_queries", "recall_keys", "recall_values", "recall_filler")


# ----------------------------------------------------------------------------- data

def source_text(cfg):
    """Path of Tiny Shakespeare: <data_dir>/shakespeare/input.txt, or the cached download."""
    if cfg.data_dir:
        path = os.path.join(cfg.data_dir, "shakespeare", "input.txt")
        if os.path.exists(path):
            return path
        if os.path.exists(os.path.join(cfg.data_dir, "input.txt")):   # the subfolder itself was given
            raise UserError(f"--data_dir={cfg.data_dir} is the shakespeare folder itself; pass the folder that holds "
                            f"it: --data_dir={os.path.dirname(os.path.abspath(cfg.data_dir))}")
        raise UserError(f"looked for {path} and found no file: pass --data_dir=DIR where DIR/shakespeare/input.txt "
                        f"is Tiny Shakespeare, or no --data_dir to download it")
    path = os.path.join(os.path.expanduser(cfg.cache_dir), "shakespeare", "input.txt")
    if not os.path.exists(path):
        print(f"downloading Tiny Shakespeare to {path}")
        download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
    return path


class Tokenizer:
    """Characters of the text (shakespeare_char, recall) or GPT-2's BPE through tiktoken (shakespeare)."""

    def __init__(self, dataset, chars=None):
        self.dataset, self.chars = dataset, chars
        if dataset in ("shakespeare_char", "recall"):
            self.stoi = {c: i for i, c in enumerate(chars)}
            self.vocab_size = len(chars)
        elif dataset == "shakespeare":
            import tiktoken
            try:
                self.enc = tiktoken.get_encoding("r50k_base")
            except Exception as e:
                raise UserError(f"cannot load tiktoken's r50k_base ({e}); offline, set TIKTOKEN_CACHE_DIR to a "
                                f"folder holding its cached file") from None
            self.vocab_size = self.enc.n_vocab
        else:
            raise UserError(f"unknown --dataset={dataset}; use shakespeare_char, shakespeare or recall")

    def encode(self, s):
        if self.chars is not None:
            unknown = sorted(set(s) - set(self.stoi))
            if unknown:
                raise UserError(f"characters {unknown} are not in the vocabulary of this data set")
            return [self.stoi[c] for c in s]
        return self.enc.encode_ordinary(s)

    def separators(self, strings=SEPARATORS):
        return separator_ids(self.chars if self.chars is not None else self.enc, strings)

    def decode(self, ids):
        if self.chars is not None:
            return "".join(self.chars[i] for i in ids)
        return self.enc.decode(ids)


def prepare_data(cfg):
    """Tokenize once into uint16 train.bin / val.bin (90/10 split by characters) in the writable cache.

    The folder is keyed by the text's sha256, so a different local copy never reuses stale tokens.
    --dataset=recall is generated instead (recall.py): fresh training episodes every batch, a fixed validation set."""
    if cfg.dataset == "recall":
        return recall_data(cfg)
    path = source_text(cfg)
    out = os.path.join(os.path.expanduser(cfg.cache_dir), f"{cfg.dataset}-{sha256_of(path)[:12]}")
    meta_path = os.path.join(out, "meta.json")
    # meta.json is written last, so a run killed while tokenizing redoes the work instead of reading half of it
    if not all(os.path.exists(os.path.join(out, f)) for f in ("meta.json", "train.bin", "val.bin")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text:
            raise UserError(f"{path} is empty")
        chars = sorted(set(text)) if cfg.dataset == "shakespeare_char" else None
        tok = Tokenizer(cfg.dataset, chars)
        n = int(0.9 * len(text))
        os.makedirs(out, exist_ok=True)
        for split, part in (("train", text[:n]), ("val", text[n:])):
            save_atomic(np.array(tok.encode(part), dtype=np.uint16).tobytes(), os.path.join(out, f"{split}.bin"),
                        save=lambda b, f: f.write(b))
        write_json(meta_path, {"dataset": cfg.dataset, "vocab_size": tok.vocab_size, "chars": chars, "source": path})
    with open(meta_path) as f:
        meta = json.load(f)
    tok = Tokenizer(cfg.dataset, meta["chars"])
    data = {s: np.fromfile(os.path.join(out, f"{s}.bin"), dtype=np.uint16) for s in ("train", "val")}
    for s, d in data.items():
        if len(d) <= cfg.block_size + 1:
            raise UserError(f"the {s} split has {len(d)} tokens, fewer than block_size+1={cfg.block_size + 1}")
    return data, tok


def recall_data(cfg):
    """The recall task's splits: training episodes drawn from the batch generator, 2048 fixed validation episodes
    (the same for every seed, so runs compare on one set)."""
    n = episode_length(cfg.recall_pairs, cfg.recall_queries, cfg.recall_filler)
    if cfg.block_size != n - 1:
        raise UserError(f"--dataset=recall with {cfg.recall_filler} filler, {cfg.recall_pairs} pairs and "
                        f"{cfg.recall_queries} queries makes episodes of {n} tokens: use --block_size={n - 1}")
    if not 1 <= cfg.recall_far < cfg.block_size:
        raise UserError(f"--recall_far={cfg.recall_far} must be in 1..{cfg.block_size - 1} (the episode has {n} "
                        f"tokens)")
    try:
        args = (cfg.recall_pairs, cfg.recall_queries, cfg.recall_keys, cfg.recall_values, cfg.recall_filler)
        train = RecallData(*args, answers_only=cfg.recall_targets == "answers")
        val = RecallData(*args, seed=0, n_fixed=2048, answers_only=cfg.recall_targets == "answers")
    except ValueError as e:
        raise UserError(str(e)) from None
    return {"train": train, "val": val}, Tokenizer("recall", train.chars)


def check_recall_sinks(filler, n_init, flag):
    """On the recall task the a sink tokens must be filler, or every pattern would see a segment for free."""
    if filler < n_init:
        raise UserError(f"--n_init={n_init} sinks with {flag} would hold a segment of the recall episode, which opens "
                        f"with only {filler} filler tokens: use --recall_filler={n_init} (train_lm.py) or a smaller "
                        f"--n_init")


def get_batch(data, n_seq, block_size, gen):
    """n_seq random windows of block_size+1 tokens -> inputs x and next-token targets y, each (n_seq, T), on the
    CPU (the caller moves them: to_device)."""
    if isinstance(data, RecallData):
        return data.batch(n_seq, gen)
    ix = torch.randint(len(data) - block_size - 1, (n_seq,), generator=gen)
    w = torch.from_numpy(np.stack([data[i:i + block_size + 1].astype(np.int64) for i in ix.tolist()]))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def to_device(t, device):
    """A CPU batch to the device; to a GPU through pinned memory, so the copy does not make the host wait."""
    return t.pin_memory().to(device, non_blocking=True) if str(device).startswith("cuda") else t.to(device)


# ----------------------------------------------------------------------------- model

def model_config(cfg, vocab_size):
    return GPTConfig(vocab_size=vocab_size, init_std=cfg.init_std, dropout=cfg.dropout,
                     **{k: getattr(cfg, k) for k in GPT_KEYS})


def build_model(cfg, vocab_size):
    """The GPT, with MoE layers as its FFNs when --ffn is moe or unipool."""
    gcfg = model_config(cfg, vocab_size)
    if cfg.ffn == "dense":
        return GPT(gcfg)
    router = cfg.router if cfg.router != "auto" else ("softmax" if cfg.ffn == "moe" else "norm")
    return GPT(gcfg, build_moe_layers(cfg.ffn, cfg.n_layer, cfg.n_embd, ffn_hidden_size(gcfg), cfg.n_experts,
                                      cfg.pool_size, cfg.pool_groups, cfg.top_k, router, cfg.expert_split,
                                      cfg.init_std, cfg.n_shared))


def moe_layers(model):
    return [b.ffn for b in model.blocks] if isinstance(model.blocks[0].ffn, MoE) else []


def param_report(model):
    """Total, expert and active-per-token parameter counts (a shared pool is counted once)."""
    total = model.num_params()
    layers = moe_layers(model)
    pools = {id(l.pool): l.pool for l in layers}.values()
    expert = sum(p.numel() for pool in pools for p in pool.parameters())
    active = total - expert + sum(l.router.top_k * sum(p[0].numel() for p in l.pool.parameters()) for l in layers)
    return f"{total / 1e6:.2f}M parameters ({expert / 1e6:.2f}M in experts, {active / 1e6:.2f}M active per token)"


# ----------------------------------------------------------------------------- attention patterns (sepllm.py)

def layer_windows(cfg):
    """--layer_windows as a list of n_layer ints (0 = full attention); n_local everywhere when empty."""
    if not cfg.layer_windows:
        return [cfg.n_local] * cfg.n_layer
    windows = cfg.layer_windows.split(",")
    if len(windows) != cfg.n_layer or not all(w.isdigit() for w in windows):
        raise UserError(f"--layer_windows={cfg.layer_windows} must list {cfg.n_layer} windows (0 = full), e.g. "
                        + ",".join(["0"] + ["64"] * (cfg.n_layer - 2) + ["0"]))
    return [int(w) for w in windows]


def sparse_patterns(cfg, kind, x, sep_ids):
    """The attention of each layer for a batch x (B, T) under --attn_mask kind: None (full attention in every
    layer), else a list of n_layer entries, None (full) or a sepllm.SparsePattern (sinks, the kept tokens beyond
    the window, the window). Layers with the same window get the same SparsePattern object, so whatever is
    derived from the batch's pattern (e.g. a kernel's plan) is computed once for all of them."""
    if kind == "full":
        return None
    keep = {"sepllm": lambda: is_separator(x, sep_ids),
            "streaming": lambda: torch.zeros_like(x, dtype=torch.bool),
            "fixed": lambda: fixed_interval_keep(x.shape[1], device=x.device).expand_as(x)}[kind]()
    windows = layer_windows(cfg)
    pattern = {w: SparsePattern(keep, cfg.n_init, w) for w in set(windows) if w}
    return [pattern.get(w) for w in windows]


def check_sparse_windows(cfg, mask_kind):
    """A sparse pattern needs windows >= 1 (w = 0 would keep no neighbour, not even the token itself) and below
    block_size (a window covering the whole context is full attention)."""
    if mask_kind in ("", "full"):
        return
    windows = layer_windows(cfg) if cfg.layer_windows else [cfg.n_local]
    if not cfg.layer_windows and cfg.n_local < 1:
        raise UserError(f"--n_local={cfg.n_local} with --attn_mask/--eval_mask={mask_kind}: the local window must be "
                        f">= 1 (it counts the token itself); for a full-attention layer use --layer_windows=...,0,...")
    if max(windows) == 0:
        raise UserError(f"--layer_windows={cfg.layer_windows} makes every layer full attention; use --attn_mask=full")
    if all(w == 0 or w >= cfg.block_size for w in windows):
        raise UserError(f"the window {max(windows)} covers the whole context block_size={cfg.block_size}, so "
                        f"--attn_mask/--eval_mask={mask_kind} would be full attention: " + (
                            "use a smaller --n_local, or longer recall episodes (more --recall_pairs or "
                            "--recall_queries, with the --block_size they make)" if cfg.dataset == "recall" else
                            f"use --block_size larger than the window (e.g. --block_size={4 * max(windows)}) or a "
                            f"smaller --n_local"))


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def estimate_loss(model, data, cfg, device, autocast, patterns=lambda x: None):
    """Mean loss over eval_iters fixed batches per split (the same batches at every evaluation)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(data[split], cfg.batch_size, cfg.block_size, gen)
            x = x.to(device)
            with autocast:
                losses.append(model(x, y.to(device), attn_mask=patterns(x)).loss.item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


@torch.no_grad()
def recall_eval(model, val, cfg, device, autocast, masks=lambda x: None):
    """Answer accuracy (exact match of the greedy answer) on the fixed validation episodes of --dataset=recall:
    overall, for "far" answers (the nearest earlier copy of the value lies >= recall_far tokens back: one threshold
    for every run, beyond the largest window compared, so a window-only pattern cannot read it directly), per query
    of the episode (1st, 2nd, ...) and by that distance (RecallData.answer_distance)."""
    model.eval()
    correct, dist = [], []
    for b in range(0, len(val.fixed), 256):
        e = val.fixed[b:b + 256]
        x, y = e[:, :-1], e[:, 1:]
        with autocast:
            logits = model(x.to(device), attn_mask=masks(x.to(device))).logits.float().cpu()
        c, d = answer_accuracy(logits, x, y, val)
        correct.append(c)
        dist.append(d)
    model.train()
    c, d = torch.cat(correct), torch.cat(dist)
    far = d >= cfg.recall_far
    return {"answer_acc": c.float().mean().item(),
            "answer_acc_far": c[far].float().mean().item() if far.any() else float("nan"),
            "answer_acc_by_query": c.float().mean(0).tolist(),
            "answer_acc_by_distance": {int(k): c[d == k].float().mean().item() for k in d.unique()}}


def recall_note(r):
    """recall_eval's result as the end of a console line: overall, far, and per query of the episode."""
    return (f", val answer accuracy {r['answer_acc']:.3f} (far {r['answer_acc_far']:.3f}; by query "
            + " ".join(f"{a:.3f}" for a in r["answer_acc_by_query"]) + ")")


# ----------------------------------------------------------------------------- train_lm.py's timing and flags

class Clock:
    """Training steps and evaluations timed apart: ms/iter and tok/s count training steps only, and the ETA adds
    (evaluations left) x (mean evaluation time), so the first progress line is already right."""

    def __init__(self, cfg, start_iter):
        self.cfg, self.start_iter, self.t0 = cfg, start_iter, time.perf_counter()
        self.train_s = self.eval_s = self.lap_s = 0.0
        self.n_evals = self.lap_iters = 0

    @contextlib.contextmanager
    def evaluation(self):
        t = time.perf_counter()
        yield
        self.eval_s, self.n_evals = self.eval_s + time.perf_counter() - t, self.n_evals + 1

    @contextlib.contextmanager
    def step(self):
        t = time.perf_counter()
        yield
        dt = time.perf_counter() - t
        self.train_s, self.lap_s, self.lap_iters = self.train_s + dt, self.lap_s + dt, self.lap_iters + 1

    def lap(self, it):
        """Seconds per training step since the last lap, and the estimated time left after iteration it."""
        cfg, dt = self.cfg, self.lap_s / self.lap_iters
        self.lap_s, self.lap_iters = 0.0, 0
        evals_left = (cfg.max_iters - 1) // cfg.eval_interval - it // cfg.eval_interval + 1  # + the final one
        steps_left = cfg.max_iters - it - 1
        return dt, (steps_left * self.train_s / (it + 1 - self.start_iter) +
                    evals_left * self.eval_s / max(self.n_evals, 1))


def check_train_flags(cfg):
    """train_lm.py's flags: every impossible configuration, and every flag that would have no effect, is one clear
    error before any work. A --warmup_iters as long as the schedule is capped (with a note)."""
    if cfg.dataset not in ("shakespeare_char", "shakespeare", "recall"):
        raise UserError(f"unknown --dataset={cfg.dataset}; use shakespeare_char, shakespeare or recall")
    for key in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "block_size"):
        if getattr(cfg, key) < 1:
            raise UserError(f"--{key}={getattr(cfg, key)} must be >= 1")
    choices = {"ffn": ("dense", "moe", "unipool"), "router": ("auto", "softmax", "norm", "mixtral"),
               "aux_loss": ("auto", "switch", "pool", "none"), "attn_mask": ("full", "sepllm", "streaming", "fixed"),
               "recall_targets": ("all", "answers"), "dtype": ("auto", "bfloat16", "float16", "float32")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"--{key}={getattr(cfg, key)} must be one of {', '.join(allowed)}")
    moe, sparse, recall = cfg.ffn != "dense", cfg.attn_mask != "full", cfg.dataset == "recall"
    refuse_unused(cfg, [
        (("n_experts",), cfg.ffn == "moe" or cfg.ffn == "unipool" and not cfg.pool_size,
         "--ffn=moe, or --ffn=unipool without --pool_size"),
        (("pool_size", "pool_groups"), cfg.ffn == "unipool", f"--ffn=unipool (not --ffn={cfg.ffn})"),
        (("top_k", "router", "expert_split", "n_shared", "bias_rate", "aux_loss", "zloss_coef"), moe,
         "--ffn=moe or --ffn=unipool (not --ffn=dense)"),
        (("aux_coef",), moe and cfg.aux_loss != "none", "--ffn=moe or unipool and an --aux_loss other than none"),
        (("n_init", "n_local"), sparse, "--attn_mask=sepllm, streaming or fixed (not --attn_mask=full)"),
        (("layer_windows",), sparse, "--attn_mask=sepllm, streaming or fixed (not --attn_mask=full)"),
        (RECALL_KEYS + ("recall_targets", "recall_far"), recall, f"--dataset=recall (not --dataset={cfg.dataset})"),
        (("data_dir", "cache_dir"), not recall, "--dataset=shakespeare_char or shakespeare (recall is generated)"),
        (("kernels",), sparse or moe, "a sparse --attn_mask or --ffn=moe / unipool (the ops kernels/ implements)"),
        (("init_std",), not cfg.init_from, "a fresh model (--init_from loads the weights)")])
    layer_windows(cfg)
    check_sparse_windows(cfg, cfg.attn_mask)
    if sparse and recall:
        check_recall_sinks(cfg.recall_filler, cfg.n_init, f"--attn_mask={cfg.attn_mask}")
    if cfg.bias_rate < 0:
        raise UserError(f"--bias_rate={cfg.bias_rate} must be >= 0 (0 = off)")
    if sparse and cfg.dropout > 0:
        raise UserError("--dropout must be 0 with a sparse --attn_mask (the sparse kernels have no attention dropout)")
    try:
        set_backend(cfg.kernels)
        build_model(cfg, vocab_size=1) if moe else model_config(cfg, vocab_size=1)
    except ValueError as e:
        raise UserError(str(e)) from None
    decay_end = cfg.lr_decay_iters or cfg.max_iters
    if cfg.warmup_iters >= decay_end:
        capped = decay_end // 10
        print(f"note: --warmup_iters={cfg.warmup_iters} is not shorter than the {decay_end}-iteration schedule, so the "
              f"learning rate would never reach --lr={cfg.lr:g}: warm-up capped at {capped} iterations (10 %)")
        cfg.warmup_iters = capped
