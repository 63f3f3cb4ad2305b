"""
Train a GPT (gpt.py) on Tiny Shakespeare, nanoGPT style. One process:

    python train_lm.py                                   # char-level, CPU-sized, about 2 minutes
    python train_lm.py --dataset=shakespeare --max_iters=5000 --block_size=256 --n_layer=6 --n_embd=384
    python eval_lm.py --sample                           # text from out-lm's best checkpoint (and other evals)

Several GPUs or processes (DDP; gloo on CPU, nccl on CUDA); the global batch is batch_size * grad_accum *
world size, and the data each rank sees is a slice of the same global draw, so N processes equal one process
with N times the gradient accumulation:

    torchrun --standalone --nproc_per_node=2 train_lm.py

Every flag is a field of TrainConfig below, written --key=value.
"""
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from common import (UserError, append_jsonl, check_same, download, fmt_seconds, load_checkpoint, load_weights,
                    parse_flags, pick_device, resume_from, run_main, save_atomic, sha256_of, write_json)
from gpt import GPT, GPTConfig, ffn_hidden_size
from kernels import set_backend
from recall import RecallData, answer_accuracy, episode_length
from sepllm import SEPARATORS, SparsePattern, fixed_interval_keep, is_separator, kept_fraction, separator_ids
from unipool import MoE, aux_losses, build_moe_layers, routing_stats

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
GPT_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "block_size", "rope_base", "tie_embeddings",
            "attn_score")
MOE_KEYS = ("ffn", "n_experts", "pool_size", "pool_groups", "top_k", "router", "expert_split", "n_shared")
MODEL_KEYS = ("dataset",) + GPT_KEYS + MOE_KEYS
RECALL_KEYS = ("recall_pairs", "recall_queries", "recall_keys", "recall_values")


@dataclass
class TrainConfig:
    # data
    dataset: str = "shakespeare_char"   # shakespeare_char (characters) | shakespeare (GPT-2 BPE, r50k_base) | recall
    data_dir: str = ""                  # local copy laid out like shared/data (shakespeare/input.txt); "" = download
    cache_dir: str = "~/.cache/nanopapers"  # downloads and tokenized .bin files
    out_dir: str = "out-lm"             # checkpoints, metrics.jsonl, summary.json
    # model
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0                  # key/value heads (grouped-query attention); 0 = n_head
    n_embd: int = 128
    ffn_hidden: int = 0                 # 0 = 8/3 n_embd rounded up to 64
    block_size: int = 64
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    dropout: float = 0.0
    attn_score: str = "softmax"         # softmax | sa | sa_norm (Self-Adjust Softmax)
    # mixture of experts (unipool.py)
    ffn: str = "dense"                  # dense | moe (each layer owns n_experts) | unipool (a shared pool)
    n_experts: int = 8                  # experts per layer (moe), and the unit of unipool's default budget
    pool_size: int = 0                  # unipool: experts in all pools together; 0 = n_experts * n_layer
    pool_groups: int = 1                # unipool: pools, each shared by n_layer / pool_groups adjacent layers
    top_k: int = 1
    router: str = "auto"                # softmax | norm | mixtral; auto = softmax for moe, norm for unipool
    expert_split: int = 1               # fine-grained experts: m times narrower, m times as many, top m*k
    n_shared: int = 0                   # always-on experts per layer beside the routed ones (DeepSeekMoE)
    bias_rate: float = 0.0              # aux-loss-free balancing: bias step per iteration (DeepSeek-V3: 1e-3); 0 = off
    aux_loss: str = "auto"              # switch (per layer) | pool | none; auto = switch for moe, pool for unipool
    aux_coef: float = 0.01
    zloss_coef: float = 0.0
    # optimisation
    batch_size: int = 12                # sequences per micro-batch per process
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0             # end of the cosine; 0 = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0              # 0 = off
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 50
    # system
    device: str = "auto"                # auto = cuda -> mps -> cpu
    kernels: str = "auto"               # auto (Triton on CUDA) | triton | torch: kernels/ backends
    compile: bool = False               # torch.compile: fuses RMSNorm, RoPE, SwiGLU (CPU: needs a C++ compiler)
    seed: int = 1337
    resume: bool = False                # continue from out_dir/ckpt_last.pt
    init_from: str = ""                 # a checkpoint whose weights start this run (fresh optimizer and schedule)
    # sparse attention (sepllm.py)
    attn_mask: str = "full"             # full | sepllm | streaming | fixed (FixLLM: every 5th token kept)
    n_init: int = 3                     # sink tokens a
    n_local: int = 64                   # local window w
    layer_windows: str = ""             # per-layer windows, e.g. 0,64,64,0 (0 = full); "" = n_local everywhere
    # --dataset=recall (recall.py): block_size must be 3 * recall_pairs + 4 * recall_queries - 1
    recall_pairs: int = 4               # key-value segments per episode
    recall_queries: int = 4             # queries per episode, each about a different segment
    recall_keys: int = 8                # key alphabet
    recall_values: int = 8              # value alphabet
    recall_targets: str = "all"         # all: loss on every next token | answers: on the answers only


# ----------------------------------------------------------------------------- data

def source_text(cfg):
    """Path of Tiny Shakespeare: <data_dir>/shakespeare/input.txt, or the cached download."""
    if cfg.data_dir:
        path = os.path.join(cfg.data_dir, "shakespeare", "input.txt")
        if not os.path.exists(path):
            raise UserError(f"--data_dir={cfg.data_dir} has no shakespeare/input.txt; copy Tiny Shakespeare there")
        return path
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
    digest = sha256_of(path)
    out = os.path.join(os.path.expanduser(cfg.cache_dir), f"{cfg.dataset}-{digest[:12]}")
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
            save_atomic_bytes(np.array(tok.encode(part), dtype=np.uint16).tobytes(), os.path.join(out, f"{split}.bin"))
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
    n = episode_length(cfg.recall_pairs, cfg.recall_queries)
    if cfg.block_size != n - 1:
        raise UserError(f"--dataset=recall with {cfg.recall_pairs} pairs and {cfg.recall_queries} queries makes "
                        f"episodes of {n} tokens: use --block_size={n - 1}")
    try:
        args = (cfg.recall_pairs, cfg.recall_queries, cfg.recall_keys, cfg.recall_values)
        train = RecallData(*args, answers_only=cfg.recall_targets == "answers")
        val = RecallData(*args, seed=0, n_fixed=2048, answers_only=cfg.recall_targets == "answers")
    except ValueError as e:
        raise UserError(str(e)) from None
    return {"train": train, "val": val}, Tokenizer("recall", train.chars)


def save_atomic_bytes(blob, path):
    with open(path + ".tmp", "wb") as f:
        f.write(blob)
    os.replace(path + ".tmp", path)


def get_batch(data, n_seq, block_size, gen):
    """n_seq random windows of block_size+1 tokens -> inputs x and next-token targets y, each (n_seq, T)."""
    if isinstance(data, RecallData):
        return data.batch(n_seq, gen)
    ix = torch.randint(len(data) - block_size - 1, (n_seq,), generator=gen)
    w = torch.from_numpy(np.stack([data[i:i + block_size + 1].astype(np.int64) for i in ix.tolist()]))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


# ----------------------------------------------------------------------------- training

def get_lr(cfg, it):
    """Linear warmup to lr, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def schedule(cfg):
    """What fixes the learning rate of every iteration: get_lr depends on these alone."""
    return {"lr": cfg["lr"], "min_lr": cfg["min_lr"], "warmup_iters": cfg["warmup_iters"],
            "lr_decay_iters": cfg["lr_decay_iters"] or cfg["max_iters"]}


def check_same_schedule(saved, cfg, path):
    """--resume continues the interrupted run exactly, so no iteration may get another learning rate."""
    old, new = schedule(saved), schedule(asdict(cfg))
    diff = [f"{k} {old[k]} vs {new[k]}" for k in old if old[k] != new[k]]
    if diff:
        raise UserError(f"--resume continues {path} exactly, but its learning-rate schedule would change "
                        f"({', '.join(diff)}; lr_decay_iters 0 means max_iters). Train longer on the same schedule "
                        f"with --lr_decay_iters={old['lr_decay_iters']} (past it the rate stays at min_lr), or start "
                        f"a new run from its weights with --init_from={path} and another --out_dir")


def make_masks(cfg, kind, x, sep_ids):
    """The attention pattern of a batch x (B, T) under --attn_mask kind: None (full) or one per layer."""
    if kind == "full":
        return None
    keep = {"sepllm": lambda: is_separator(x, sep_ids),
            "streaming": lambda: torch.zeros_like(x, dtype=torch.bool),
            "fixed": lambda: fixed_interval_keep(x.shape[1], device=x.device).expand_as(x)}[kind]()
    return [None if w == 0 else SparsePattern(keep, cfg.n_init, w) for w in layer_windows(cfg)]


def layer_windows(cfg):
    """--layer_windows as a list of n_layer ints (0 = full attention); n_local everywhere when empty."""
    if not cfg.layer_windows:
        return [cfg.n_local] * cfg.n_layer
    windows = cfg.layer_windows.split(",")
    if len(windows) != cfg.n_layer or not all(w.isdigit() for w in windows):
        raise UserError(f"--layer_windows={cfg.layer_windows} must list {cfg.n_layer} windows (0 = full), e.g. "
                        + ",".join(["0"] + ["64"] * (cfg.n_layer - 2) + ["0"]))
    return [int(w) for w in windows]


@torch.no_grad()
def estimate_loss(model, data, cfg, device, autocast, masks=lambda x: None):
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
                losses.append(model(x, y.to(device), attn_mask=masks(x)).loss.item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


@torch.no_grad()
def recall_eval(model, val, cfg, device, autocast, masks=lambda x: None):
    """Answer accuracy (exact match of the greedy answer) on the fixed validation episodes of --dataset=recall:
    overall, for "far" queries (the queried value lies outside the local window n_local and outside the n_init
    sinks, so a window-only pattern cannot see it), per query of the episode (1st, 2nd, ...) and by distance from
    the query to the segment's separator."""
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
    value_pos = val.answers()[None] - d - 1
    far = (d + 1 >= cfg.n_local) & (value_pos >= cfg.n_init)
    return {"answer_acc": c.float().mean().item(),
            "answer_acc_far": c[far].float().mean().item() if far.any() else float("nan"),
            "answer_acc_by_query": c.float().mean(0).tolist(),
            "answer_acc_by_distance": {int(k): c[d == k].float().mean().item() for k in d.unique()}}


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


def train(cfg):
    ddp = "RANK" in os.environ
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "cpu"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, pick_device(cfg.device)
    master = rank == 0
    device_type = device.split(":")[0]
    if cfg.kernels == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("--kernels=triton needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels slowly "
                        "on the CPU); use --kernels=auto")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else contextlib.nullcontext())
    torch.manual_seed(cfg.seed + rank)

    data, tok = prepare_data(cfg)
    sep_ids = tok.separators()
    model = build_model(cfg, tok.vocab_size).to(device)
    if cfg.init_from:
        init_weights(model, cfg, device)
    optimizer = torch.optim.AdamW(model.optimizer_groups(cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), fused=device_type in ("cuda", "cpu"))
    # every process draws the same global batch from one generator and takes its slice of it
    gen = torch.Generator().manual_seed(cfg.seed)
    start_iter, best_val = 0, float("inf")
    os.makedirs(cfg.out_dir, exist_ok=True)
    last_path, best_path = (os.path.join(cfg.out_dir, f"ckpt_{n}.pt") for n in ("last", "best"))
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if cfg.resume:
        ckpt = resume_from(last_path, asdict(cfg), MODEL_KEYS + (RECALL_KEYS if cfg.dataset == "recall" else ()),
                           model, optimizer, device)
        check_same_schedule(ckpt["config"], cfg, last_path)
        gen.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_iter, best_val = ckpt["iter"], ckpt["best_val"]
        if master:
            print(f"resuming from {last_path} at iter {start_iter}")
    elif master and os.path.exists(metrics_path):
        os.remove(metrics_path)
    raw_model = model
    if cfg.compile:
        if device_type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
            raise UserError("--compile on the CPU needs a C++ compiler (c++, g++ or clang++ on PATH, or $CXX); "
                            "install one or run without --compile")
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device_type == "cuda" else None)

    n_params = raw_model.num_params()
    layers = moe_layers(raw_model)
    aux_kind = cfg.aux_loss if cfg.aux_loss != "auto" else ("switch" if cfg.ffn == "moe" else "pool")
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    # the kept share of causal (query, key) pairs, on the first evaluation batch (1.0 for full attention)
    x_eval = get_batch(data["val"], cfg.batch_size, cfg.block_size, torch.Generator().manual_seed(cfg.seed + 1))[0]
    kept = kept_fraction(make_masks(cfg, cfg.attn_mask, x_eval, sep_ids) or [None])
    if master:
        print(f"{param_report(raw_model)} | {tokens_per_iter} tokens/iter | device {device} x{world} | "
              f"{torch.get_num_threads()} threads")
        print(f"attention {cfg.attn_mask}: kept fraction {kept:.3f} of the causal (query, key) pairs at T="
              f"{cfg.block_size}" + (f" (a={cfg.n_init}, windows {layer_windows(cfg)})" if cfg.attn_mask != "full"
                                     else ""))

    def checkpoint(it, path):
        save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it,
                     "best_val": best_val, "config": asdict(cfg), "chars": tok.chars,
                     "data_rng": gen.get_state(), "torch_rng": torch.get_rng_state()}, path)

    # ms/iter, tok/s and the ETA count training steps only; evaluations and checkpoints are timed apart and
    # enter the ETA as (evaluations left) x (mean evaluation time), so the first progress line is already right
    t_start = time.perf_counter()
    train_s = eval_s = 0.0
    n_evals, log_iters, log_s = 0, 0, 0.0
    losses = {}
    for it in range(start_iter, cfg.max_iters + 1):
        lr = get_lr(cfg, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            t_eval = time.perf_counter()
            losses = estimate_loss(raw_model, data, cfg, device, autocast,
                                   lambda x: make_masks(cfg, cfg.attn_mask, x, sep_ids))
            if not all(map(math.isfinite, losses.values())):
                raise UserError(f"loss became {losses} at iter {it}; the last good checkpoint is kept. "
                                f"Lower --lr or raise --warmup_iters")
            if cfg.dataset == "recall":
                recall = recall_eval(raw_model, data["val"], cfg, device, autocast,
                                     lambda x: make_masks(cfg, cfg.attn_mask, x, sep_ids))
            if master:
                print(f"eval iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}" +
                      (f", val answer accuracy {recall['answer_acc']:.3f} (far {recall['answer_acc_far']:.3f})"
                       if cfg.dataset == "recall" else ""))
                append_jsonl(metrics_path, {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                                            **({f"val_{k}": v for k, v in recall.items()}
                                               if cfg.dataset == "recall" else {})})
                if it > start_iter or not cfg.resume:
                    if losses["val"] < best_val:
                        best_val = losses["val"]
                        checkpoint(it, best_path)
                    checkpoint(it, last_path)
            eval_s += time.perf_counter() - t_eval
            n_evals += 1
        if it == cfg.max_iters:
            break
        t_step = time.perf_counter()
        x, y = get_batch(data["train"], cfg.batch_size * cfg.grad_accum * world, cfg.block_size, gen)
        loss_sum = aux_sum = 0.0
        step_counts = [0] * len(layers)  # tokens per expert this step, per layer (the balancing bias reads it)
        for micro in range(cfg.grad_accum):
            first = (rank * cfg.grad_accum + micro) * cfg.batch_size
            rows = slice(first, first + cfg.batch_size)
            sync = not ddp or micro == cfg.grad_accum - 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                xb = x[rows].to(device)
                out = model(xb, y[rows].to(device), attn_mask=make_masks(cfg, cfg.attn_mask, xb, sep_ids))
                aux = aux_losses(layers, out.aux, aux_kind, cfg.aux_coef, cfg.zloss_coef) if layers else 0.0
            ((out.loss + aux) / cfg.grad_accum).backward()
            # summed as tensors and read once per log line: .item() on a GPU waits for the whole step
            loss_sum += out.loss.detach() / cfg.grad_accum
            aux_sum += (aux.detach() if torch.is_tensor(aux) else aux) / cfg.grad_accum
            step_counts = [a + c for a, c in zip(step_counts, out.aux.get("counts", []))]
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.bias_rate > 0:
            for layer, c in zip(layers, step_counts):
                if ddp:
                    dist.all_reduce(c)
                layer.router.update_bias(c, cfg.bias_rate)
        step_s = time.perf_counter() - t_step
        train_s, log_s, log_iters = train_s + step_s, log_s + step_s, log_iters + 1
        if master and ((it + 1) % cfg.log_interval == 0 or it == start_iter):
            dt = log_s / log_iters                                 # seconds per training step since the last line
            log_s, log_iters = 0.0, 0
            loss_sum, aux_sum = float(loss_sum), float(aux_sum)
            evals_left = (cfg.max_iters - 1) // cfg.eval_interval - it // cfg.eval_interval + 1  # + the final one
            eta = (cfg.max_iters - it - 1) * train_s / (it + 1 - start_iter) + evals_left * eval_s / max(n_evals, 1)
            aux_note = ""
            if layers:  # routing of the last micro-batch: load balance per layer, dead experts, dropped pairs
                load = routing_stats(layers, out.aux)
                aux_note = (f" (aux {aux_sum:.4f}) | load cv {max(load['load_cv']):.2f} max, dead "
                            f"{sum(load['dead_experts'])}, dropped {100 * max(load['dropped']):.1f}% max, coverage "
                            f"{100 * min(load['pool_coverage']):.0f}%")
            print(f"iter {it + 1} | loss {loss_sum:.4f}{aux_note} | lr {lr:.2e} | {dt * 1000:.1f} ms/iter | "
                  f"{tokens_per_iter / dt:,.0f} tok/s | ETA {fmt_seconds(eta)}")
            record = {"iter": it + 1, "loss": loss_sum, "aux_loss": aux_sum, "lr": lr, "ms_per_iter": dt * 1000}
            if layers:  # tokens per expert in each layer (last micro-batch) and the statistics above, per layer
                record["expert_counts"] = [c.tolist() for c in out.aux["counts"]]
                record.update(load)
            append_jsonl(metrics_path, record)

    if master:
        wall = time.perf_counter() - t_start
        trained = cfg.max_iters - start_iter
        summary = {"final_val_loss": losses["val"], "final_train_loss": losses["train"], "best_val_loss": best_val,
                   "iters": cfg.max_iters, "wall_seconds": wall, "train_seconds": train_s, "eval_seconds": eval_s,
                   # the progress lines' definition: tokens of the training steps / their time (no evaluation)
                   "tokens_per_second": trained * tokens_per_iter / train_s if trained else None,
                   "params": n_params, "world_size": world, "device": device, "kept_fraction": kept,
                   **({f"val_{k}": v for k, v in recall.items()} if cfg.dataset == "recall" else {}),
                   "config": asdict(cfg)}
        write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        print(f"final val loss {losses['val']:.4f} (best {best_val:.4f}) | {fmt_seconds(wall)} wall")
    if ddp:
        dist.destroy_process_group()


def init_weights(model, cfg, device):
    """--init_from: the weights of another run's checkpoint (e.g. full attention, to post-train with a sparse
    --attn_mask); the optimizer, schedule and data stream start fresh. The model must have the same shape."""
    ckpt = load_checkpoint(cfg.init_from, device)
    keys = [k for k in MODEL_KEYS if k != "block_size"] + (list(RECALL_KEYS) if cfg.dataset == "recall" else [])
    try:
        check_same(ckpt["config"], asdict(cfg), keys, cfg.init_from)
    except UserError as e:
        raise UserError(str(e).replace("or use another --out_dir", "to --init_from from it")) from None
    load_weights(model, ckpt["model"], cfg.init_from)
    print(f"initialised from {cfg.init_from} (its iter {ckpt['iter']}, attention {ckpt['config']['attn_mask']})")


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
                        f"--attn_mask/--eval_mask={mask_kind} would be full attention: use --block_size larger than "
                        f"the window (e.g. --block_size={4 * max(windows)}) or a smaller --n_local")


def main():
    cfg = parse_flags(TrainConfig, sys.argv[1:])
    if cfg.dataset not in ("shakespeare_char", "shakespeare", "recall"):
        raise UserError(f"unknown --dataset={cfg.dataset}; use shakespeare_char, shakespeare or recall")
    for key in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "block_size"):
        if getattr(cfg, key) < 1:
            raise UserError(f"--{key}={getattr(cfg, key)} must be >= 1")
    choices = {"ffn": ("dense", "moe", "unipool"), "router": ("auto", "softmax", "norm", "mixtral"),
               "aux_loss": ("auto", "switch", "pool", "none"), "attn_mask": ("full", "sepllm", "streaming", "fixed"),
               "recall_targets": ("all", "answers")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"--{key}={getattr(cfg, key)} must be one of {', '.join(allowed)}")
    layer_windows(cfg)
    check_sparse_windows(cfg, cfg.attn_mask)
    if cfg.resume and cfg.init_from:
        raise UserError("--resume continues this run; --init_from starts a new one from another's weights: pick one")
    if cfg.ffn == "dense" and (cfg.n_shared or cfg.bias_rate):
        raise UserError("--n_shared and --bias_rate act on experts: use them with --ffn=moe or --ffn=unipool")
    if cfg.bias_rate < 0:
        raise UserError(f"--bias_rate={cfg.bias_rate} must be >= 0 (0 = off)")
    if cfg.attn_mask != "full" and cfg.dropout > 0:
        raise UserError("--dropout must be 0 with a sparse --attn_mask (the sparse kernels have no attention dropout)")
    try:
        set_backend(cfg.kernels)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        build_model(cfg, vocab_size=1) if cfg.ffn != "dense" else model_config(cfg, vocab_size=1)
    except ValueError as e:
        raise UserError(str(e)) from None
    decay_end = cfg.lr_decay_iters or cfg.max_iters
    if cfg.warmup_iters >= decay_end:
        capped = decay_end // 10
        print(f"note: --warmup_iters={cfg.warmup_iters} is not shorter than the {decay_end}-iteration schedule, so the "
              f"learning rate would never reach --lr={cfg.lr:g}: warm-up capped at {capped} iterations (10 %)")
        cfg.warmup_iters = capped
    if cfg.resume and not os.path.exists(os.path.join(cfg.out_dir, "ckpt_last.pt")):
        raise UserError(f"--resume but {cfg.out_dir}/ckpt_last.pt does not exist; drop --resume or fix --out_dir")
    train(cfg)


if __name__ == "__main__":
    run_main(main)
