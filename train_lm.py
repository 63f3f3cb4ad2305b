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
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from common import (UserError, append_jsonl, download, fmt_seconds, parse_flags, pick_device, resume_from, run_main,
                    save_atomic, sha256_of, write_json)
from gpt import GPT, GPTConfig, ffn_hidden_size
from kernels import set_backend
from sepllm import SEPARATORS, SparsePattern, fixed_interval_keep, is_separator, separator_ids
from unipool import MoE, aux_losses, build_moe_layers, routing_stats

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
GPT_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "block_size", "rope_base", "tie_embeddings",
            "attn_score")
MOE_KEYS = ("ffn", "n_experts", "pool_size", "pool_groups", "top_k", "router", "expert_split", "n_shared")
MODEL_KEYS = ("dataset",) + GPT_KEYS + MOE_KEYS


@dataclass
class TrainConfig:
    # data
    dataset: str = "shakespeare_char"   # shakespeare_char (characters) | shakespeare (GPT-2 BPE, r50k_base)
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
    compile: bool = False
    seed: int = 1337
    resume: bool = False                # continue from out_dir/ckpt_last.pt
    # sparse attention (sepllm.py)
    attn_mask: str = "full"             # full | sepllm | streaming | fixed (FixLLM: every 5th token kept)
    n_init: int = 3                     # sink tokens a
    n_local: int = 64                   # local window w
    layer_windows: str = ""             # per-layer windows, e.g. 0,64,64,0 (0 = full); "" = n_local everywhere


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
    """Characters of the text (shakespeare_char) or GPT-2's BPE through tiktoken (shakespeare)."""

    def __init__(self, dataset, chars=None):
        self.dataset, self.chars = dataset, chars
        if dataset == "shakespeare_char":
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
            raise UserError(f"unknown --dataset={dataset}; use shakespeare_char or shakespeare")

    def encode(self, s):
        if self.dataset == "shakespeare_char":
            unknown = sorted(set(s) - set(self.stoi))
            if unknown:
                raise UserError(f"characters {unknown} are not in the vocabulary of this data set")
            return [self.stoi[c] for c in s]
        return self.enc.encode_ordinary(s)

    def separators(self, strings=SEPARATORS):
        return separator_ids(self.chars if self.dataset == "shakespeare_char" else self.enc, strings)

    def decode(self, ids):
        if self.dataset == "shakespeare_char":
            return "".join(self.chars[i] for i in ids)
        return self.enc.decode(ids)


def prepare_data(cfg):
    """Tokenize once into uint16 train.bin / val.bin (90/10 split by characters) in the writable cache.

    The folder is keyed by the text's sha256, so a different local copy never reuses stale tokens."""
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


def save_atomic_bytes(blob, path):
    with open(path + ".tmp", "wb") as f:
        f.write(blob)
    os.replace(path + ".tmp", path)


def get_batch(data, n_seq, block_size, gen):
    """n_seq random windows of block_size+1 tokens -> inputs x and next-token targets y, each (n_seq, T)."""
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
    optimizer = torch.optim.AdamW(model.optimizer_groups(cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), fused=device_type == "cuda")
    # every process draws the same global batch from one generator and takes its slice of it
    gen = torch.Generator().manual_seed(cfg.seed)
    start_iter, best_val = 0, float("inf")
    os.makedirs(cfg.out_dir, exist_ok=True)
    last_path, best_path = (os.path.join(cfg.out_dir, f"ckpt_{n}.pt") for n in ("last", "best"))
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if cfg.resume:
        ckpt = resume_from(last_path, asdict(cfg), MODEL_KEYS, model, optimizer, device)
        gen.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_iter, best_val = ckpt["iter"], ckpt["best_val"]
        if master:
            print(f"resuming from {last_path} at iter {start_iter}")
    elif master and os.path.exists(metrics_path):
        os.remove(metrics_path)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device_type == "cuda" else None)

    n_params = raw_model.num_params()
    layers = moe_layers(raw_model)
    aux_kind = cfg.aux_loss if cfg.aux_loss != "auto" else ("switch" if cfg.ffn == "moe" else "pool")
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    if master:
        print(f"{param_report(raw_model)} | {tokens_per_iter} tokens/iter | device {device} x{world} | "
              f"{torch.get_num_threads()} threads")

    def checkpoint(it, path):
        save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it,
                     "best_val": best_val, "config": asdict(cfg), "chars": tok.chars,
                     "data_rng": gen.get_state(), "torch_rng": torch.get_rng_state()}, path)

    t_start = t_log = time.time()
    losses = {}
    for it in range(start_iter, cfg.max_iters + 1):
        lr = get_lr(cfg, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            losses = estimate_loss(raw_model, data, cfg, device, autocast,
                                   lambda x: make_masks(cfg, cfg.attn_mask, x, sep_ids))
            if not all(map(math.isfinite, losses.values())):
                raise UserError(f"loss became {losses} at iter {it}; the last good checkpoint is kept. "
                                f"Lower --lr or raise --warmup_iters")
            if master:
                print(f"eval iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                append_jsonl(metrics_path, {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]})
                if it > start_iter or not cfg.resume:
                    if losses["val"] < best_val:
                        best_val = losses["val"]
                        checkpoint(it, best_path)
                    checkpoint(it, last_path)
        if it == cfg.max_iters:
            break
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
            loss_sum += out.loss.item() / cfg.grad_accum
            aux_sum += float(aux.detach() if torch.is_tensor(aux) else aux) / cfg.grad_accum
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
        if master and ((it + 1) % cfg.log_interval == 0 or it == start_iter):
            done = it + 1 - start_iter
            dt = (time.time() - t_log) / (cfg.log_interval if it > start_iter else 1)
            t_log = time.time()
            eta = (time.time() - t_start) / done * (cfg.max_iters - it - 1)
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
        wall = time.time() - t_start
        trained = cfg.max_iters - start_iter
        summary = {"final_val_loss": losses["val"], "final_train_loss": losses["train"], "best_val_loss": best_val,
                   "iters": cfg.max_iters, "wall_seconds": wall,
                   "tokens_per_second": trained * tokens_per_iter / wall if trained else None,
                   "params": n_params, "world_size": world, "device": device, "config": asdict(cfg)}
        write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        print(f"final val loss {losses['val']:.4f} (best {best_val:.4f}) | {fmt_seconds(wall)} wall")
    if ddp:
        dist.destroy_process_group()


def main():
    cfg = parse_flags(TrainConfig, sys.argv[1:])
    if cfg.dataset not in ("shakespeare_char", "shakespeare"):
        raise UserError(f"unknown --dataset={cfg.dataset}; use shakespeare_char or shakespeare")
    for key in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "block_size"):
        if getattr(cfg, key) < 1:
            raise UserError(f"--{key}={getattr(cfg, key)} must be >= 1")
    choices = {"ffn": ("dense", "moe", "unipool"), "router": ("auto", "softmax", "norm", "mixtral"),
               "aux_loss": ("auto", "switch", "pool", "none"), "attn_mask": ("full", "sepllm", "streaming", "fixed")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"--{key}={getattr(cfg, key)} must be one of {', '.join(allowed)}")
    layer_windows(cfg)
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
    if cfg.resume and not os.path.exists(os.path.join(cfg.out_dir, "ckpt_last.pt")):
        raise UserError(f"--resume but {cfg.out_dir}/ckpt_last.pt does not exist; drop --resume or fix --out_dir")
    train(cfg)


if __name__ == "__main__":
    run_main(main)
