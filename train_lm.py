"""
Train a GPT (gpt.py) on Tiny Shakespeare, nanoGPT style. One process:

    python train_lm.py                                   # char-level, CPU-sized, about 2 minutes
    python train_lm.py --dataset=shakespeare --max_iters=5000 --block_size=256 --n_layer=6 --n_embd=384
    python train_lm.py --out_dir=out-lm --resume         # continue an interrupted run, exactly, on its settings
    python eval_lm.py --sample                           # text from out-lm's best checkpoint (and other evals)

Several GPUs or processes (DDP; gloo on CPU, nccl on CUDA); the global batch is batch_size * grad_accum *
world size, and the data each rank sees is a slice of the same global draw, so N processes equal one process
with N times the gradient accumulation:

    torchrun --standalone --nproc_per_node=2 train_lm.py

Data, the model a config describes, attention patterns and evaluation live in lm_common.py (eval_lm.py uses
them too); this file is the loop: get_lr, train_step, evaluate, log_progress, train. Every flag is a field of
TrainConfig below, written --key=value.
"""
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from common import (UserError, append_jsonl, autocast_for, check_same, fmt_seconds, load_checkpoint, load_weights,
                    on_interrupt, parse_flags, pick_device, pick_dtype, prepare_out_dir, resumed_config, run_main,
                    save_atomic, write_json)
from lm_common import (MODEL_KEYS, RECALL_KEYS, Clock, build_model, check_train_flags, estimate_loss, get_batch,
                       layer_windows, moe_layers, param_report, prepare_data, recall_eval, recall_note, sparse_patterns,
                       to_device)
from sepllm import kept_fraction
from unipool import aux_losses, routing_stats


@dataclass
class TrainConfig:
    # data
    dataset: str = "shakespeare_char"   # shakespeare_char (characters) | shakespeare (GPT-2 BPE, r50k_base) | recall
    data_dir: str = ""                  # DIR holding shakespeare/input.txt (a local copy); "" = download
    cache_dir: str = "~/.cache/nanopapers"  # downloads and tokenized .bin files
    out_dir: str = "out-lm"             # checkpoints, metrics.jsonl, summary.json
    overwrite: bool = False             # replace the run already in out_dir (without it, such a folder is refused)
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
    dtype: str = "auto"                 # auto = bfloat16 on a GPU that has it, float16 (+ gradient scaler) on one
    #                                     without, float32 on the CPU | bfloat16 | float16 | float32 (weights stay fp32)
    kernels: str = "auto"               # auto (Triton on CUDA) | triton | torch: kernels/ backends
    compile: bool = False               # torch.compile: fuses RMSNorm, RoPE, SwiGLU (CPU: needs a C++ compiler)
    seed: int = 1337
    resume: bool = False                # continue out_dir/ckpt_last.pt with its saved settings
    init_from: str = ""                 # a checkpoint whose weights start this run (fresh optimizer and schedule)
    # sparse attention (sepllm.py)
    attn_mask: str = "full"             # full | sepllm | streaming | fixed (FixLLM: every 5th token kept)
    n_init: int = 3                     # sink tokens a
    n_local: int = 64                   # local window w
    layer_windows: str = ""             # per-layer windows, e.g. 0,64,64,0 (0 = full); "" = n_local everywhere
    # --dataset=recall (recall.py): block_size must be recall_filler + 3 * recall_pairs + 4 * recall_queries - 1
    recall_pairs: int = 4               # key-value segments per episode (distinct keys)
    recall_queries: int = 4             # queries per episode, each about a segment drawn with replacement
    recall_keys: int = 8                # key alphabet
    recall_values: int = 8              # value alphabet
    recall_filler: int = 3              # filler tokens opening each episode (>= n_init: the sinks hold no segment)
    recall_far: int = 8                 # an answer is "far" when its value lies >= this many tokens back: one
    #                                     threshold for every run, set it beyond the largest window compared
    recall_targets: str = "all"         # all: loss on every next token | answers: on the answers only


# what --resume lets a command line change: where files are, how the run is executed and logged, and how long it
# trains (on the same schedule); everything else is the run's saved setting
RESUMABLE = ("out_dir", "data_dir", "cache_dir", "device", "kernels", "compile", "log_interval", "eval_interval",
             "max_iters", "lr_decay_iters")


def get_lr(cfg, it):
    """Linear warmup to lr, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


# ----------------------------------------------------------------------------- set-up: processes, weights, compile

def setup_ddp(cfg):
    """(rank, world size, device). Under torchrun (RANK is set): one process per GPU, or gloo processes on the CPU."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(cfg.device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local}" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "cpu"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    return rank, world, device


def resume(cfg, model, optimizer, scaler, gen):
    """--resume: weights, optimizer, gradient scaler, data stream and RNG as the last checkpoint left them."""
    path = os.path.join(cfg.out_dir, "ckpt_last.pt")
    ckpt = load_checkpoint(path, next(model.parameters()).device)
    if ckpt["iter"] > cfg.max_iters:
        raise UserError(f"{path} is at iter {ckpt['iter']}, past --max_iters={cfg.max_iters}")
    load_weights(model, ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):          # an fp16 run's loss scale (empty when the run had no scaler)
        scaler.load_state_dict(ckpt["scaler"])
    gen.set_state(ckpt["data_rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    return ckpt["iter"], ckpt["best_val"]


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


def compile_model(model, device):
    """--compile: torch.compile fuses the element-wise ops (on the CPU it generates C++, so it needs a compiler)."""
    if device == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        raise UserError("--compile on the CPU needs a C++ compiler (c++, g++ or clang++ on PATH, or $CXX); "
                        "install one or run without --compile")
    return torch.compile(model)


# ----------------------------------------------------------------------------- one step, one evaluation, one line

def train_step(model, layers, optimizer, scaler, x, y, cfg, autocast, patterns):
    """One optimizer step on this process's rows x, y (grad_accum * batch_size, T): grad_accum micro-batches whose
    gradients add up (DDP averages them over processes on the last one), clipping, AdamW, then the balancing bias.
    Returns the mean loss and auxiliary loss as tensors (reading them on a GPU would wait for the whole step)
    and the last micro-batch's routing (GPT.forward's aux)."""
    kind = cfg.aux_loss if cfg.aux_loss != "auto" else ("switch" if cfg.ffn == "moe" else "pool")
    loss_sum = aux_sum = 0.0
    counts = [0] * len(layers)               # tokens per expert this step, per layer (the balancing bias reads it)
    for micro, (xb, yb) in enumerate(zip(x.split(cfg.batch_size), y.split(cfg.batch_size))):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.require_backward_grad_sync = micro == cfg.grad_accum - 1   # all-reduce once, on the last
        with autocast:
            out = model(xb, yb, attn_mask=patterns(xb))
            aux = aux_losses(layers, out.aux, kind, cfg.aux_coef, cfg.zloss_coef) if layers else 0.0
        scaler.scale((out.loss + aux) / cfg.grad_accum).backward()       # float16: a scaled loss keeps small grads
        loss_sum += out.loss.detach() / cfg.grad_accum
        aux_sum += (aux.detach() if torch.is_tensor(aux) else aux) / cfg.grad_accum
        counts = [a + c for a, c in zip(counts, out.aux.get("counts", []))]
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)                                        # clip the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)                                                # skipped if a float16 gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    for layer, c in zip(layers, counts) if cfg.bias_rate > 0 else ():
        if dist.is_initialized():
            dist.all_reduce(c)
        layer.router.update_bias(c, cfg.bias_rate)
    return loss_sum, aux_sum, out.aux


def evaluate(model, data, cfg, device, autocast, patterns):
    """Mean train and val loss on fixed batches; with --dataset=recall, the answers' accuracy too ({} else)."""
    losses = estimate_loss(model, data, cfg, device, autocast, patterns)
    if not all(map(math.isfinite, losses.values())):
        raise UserError(f"loss became {losses}; the last good checkpoint is kept. Lower --lr or raise --warmup_iters")
    recall = recall_eval(model, data["val"], cfg, device, autocast, patterns) if cfg.dataset == "recall" else {}
    return losses, recall


def log_progress(record, tokens_per_s, eta, metrics_path):
    """One progress line on the console from a metrics record, and the record into metrics.jsonl."""
    note = ""
    if "load_cv" in record:     # MoE: load balance per layer, dead experts, dropped pairs, pool coverage
        note = (f" (aux {record['aux_loss']:.4f}) | load cv {max(record['load_cv']):.2f} max, dead "
                f"{sum(record['dead_experts'])}, dropped {100 * max(record['dropped']):.1f}% max, coverage "
                f"{100 * min(record['pool_coverage']):.0f}%")
    print(f"iter {record['iter']} | loss {record['loss']:.4f}{note} | lr {record['lr']:.2e} | "
          f"{record['ms_per_iter']:.1f} ms/iter | {tokens_per_s:,.0f} tok/s | ETA {fmt_seconds(eta)}")
    append_jsonl(metrics_path, record)


# ----------------------------------------------------------------------------- the run

def train(cfg):
    rank, world, device = setup_ddp(cfg)
    master, device_type = rank == 0, device.split(":")[0]
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.kernels == "triton" and device_type != "cuda":
        raise UserError(f"--kernels=triton needs a CUDA device, and this run has {device} (on a CPU the Triton kernels "
                        f"run only in Triton's interpreter, for tests: hundreds of times slower); use --kernels=auto")
    if master:
        prepare_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    autocast = autocast_for(device, dtype)
    torch.manual_seed(cfg.seed + rank)

    data, tok = prepare_data(cfg)
    sep_ids = tok.separators()
    patterns = lambda x: sparse_patterns(cfg, cfg.attn_mask, x, sep_ids)  # noqa: E731
    raw_model = build_model(cfg, tok.vocab_size).to(device)
    if cfg.init_from and not cfg.resume:
        init_weights(raw_model, cfg, device)
    optimizer = torch.optim.AdamW(raw_model.optimizer_groups(cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), fused=device_type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    gen = torch.Generator().manual_seed(cfg.seed)   # every process draws the same global batch, takes its rows
    start_iter, best_val = resume(cfg, raw_model, optimizer, scaler, gen) if cfg.resume else (0, float("inf"))
    resume_hint = f"continue with: python train_lm.py --out_dir={cfg.out_dir} --resume"
    on_interrupt(resume_hint if cfg.resume else "")   # Ctrl-C: one line; what was saved stays as it was
    model = compile_model(raw_model, device) if cfg.compile else raw_model
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device_type == "cuda" else None)
    layers = moe_layers(raw_model)

    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    # the kept share of causal (query, key) pairs, on the first evaluation batch (1.0 for full attention)
    x_eval = get_batch(data["val"], cfg.batch_size, cfg.block_size, torch.Generator().manual_seed(cfg.seed + 1))[0]
    kept = kept_fraction(patterns(x_eval) or [None])
    precision = {torch.float32: "float32", torch.bfloat16: "bfloat16 autocast",
                 torch.float16: "float16 autocast + gradient scaler"}[dtype]
    if master:
        print(f"{param_report(raw_model)} | {tokens_per_iter} tokens/iter | device {device} x{world} | {precision} | "
              f"{torch.get_num_threads()} threads")
        print(f"attention {cfg.attn_mask}: kept fraction {kept:.3f} of the causal (query, key) pairs at T="
              f"{cfg.block_size}" + (f" (a={cfg.n_init}, windows {layer_windows(cfg)})" if cfg.attn_mask != "full"
                                     else ""))
        if cfg.resume:
            print(f"resuming from {cfg.out_dir}/ckpt_last.pt at iter {start_iter}")

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    clock, losses = Clock(cfg, start_iter), {}
    for it in range(start_iter, cfg.max_iters + 1):
        lr = get_lr(cfg, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            with clock.evaluation():
                losses, recall = evaluate(raw_model, data, cfg, device, autocast, patterns)
                if master:
                    print(f"eval iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                          + (recall_note(recall) if recall else ""))
                    append_jsonl(metrics_path, {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                                                **{f"val_{k}": v for k, v in recall.items()}})
                if master and (it > start_iter or not cfg.resume):   # a resumed run's first evaluation is saved
                    ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scaler": scaler.state_dict(), "iter": it, "best_val": min(best_val, losses["val"]),
                            "config": asdict(cfg), "chars": tok.chars, "data_rng": gen.get_state(),
                            "torch_rng": torch.get_rng_state()}
                    if losses["val"] < best_val:
                        best_val = losses["val"]
                        save_atomic(ckpt, os.path.join(cfg.out_dir, "ckpt_best.pt"))
                    save_atomic(ckpt, os.path.join(cfg.out_dir, "ckpt_last.pt"))
                    on_interrupt(resume_hint)
        if it == cfg.max_iters:
            break
        with clock.step():
            x, y = get_batch(data["train"], cfg.batch_size * cfg.grad_accum * world, cfg.block_size, gen)
            rows = slice(rank * cfg.batch_size * cfg.grad_accum, (rank + 1) * cfg.batch_size * cfg.grad_accum)
            loss, aux, routing = train_step(model, layers, optimizer, scaler, to_device(x[rows], device),
                                            to_device(y[rows], device), cfg, autocast, patterns)
        if master and ((it + 1) % cfg.log_interval == 0 or it == start_iter):
            dt, eta = clock.lap(it)
            record = {"iter": it + 1, "loss": float(loss), "aux_loss": float(aux), "lr": lr, "ms_per_iter": dt * 1000}
            if layers:  # tokens per expert in each layer (last micro-batch) and the load statistics, per layer
                record.update(expert_counts=[c.tolist() for c in routing["counts"]], **routing_stats(layers, routing))
            log_progress(record, tokens_per_iter / dt, eta, metrics_path)

    if master:
        wall, trained = time.perf_counter() - clock.t0, cfg.max_iters - start_iter
        write_json(os.path.join(cfg.out_dir, "summary.json"), {
            "final_val_loss": losses["val"], "final_train_loss": losses["train"], "best_val_loss": best_val,
            "iters": cfg.max_iters, "wall_seconds": wall, "train_seconds": clock.train_s, "eval_seconds": clock.eval_s,
            # the progress lines' definition: tokens of the training steps / their time (no evaluation)
            "tokens_per_second": trained * tokens_per_iter / clock.train_s if trained else None,
            "params": raw_model.num_params(), "world_size": world, "device": device, "dtype": str(dtype)[6:],
            "kept_fraction": kept, **{f"val_{k}": v for k, v in recall.items()}, "config": asdict(cfg)})
        print(f"final val loss {losses['val']:.4f} (best {best_val:.4f}) | {fmt_seconds(wall)} wall")
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- flags

def resumed(cfg, argv):
    """--resume: the run's saved settings, with the flags of RESUMABLE given on top; the schedule must stay the
    same, so a longer run keeps the cosine's end (lr_decay_iters; 0 = max_iters) and trains on past it at min_lr."""
    if cfg.init_from or cfg.overwrite:
        other = "init_from" if cfg.init_from else "overwrite"
        raise UserError(f"--resume continues the run in {cfg.out_dir}; --{other} starts a new one: pick one")
    path = os.path.join(cfg.out_dir, "ckpt_last.pt")
    if not os.path.exists(path):
        raise UserError(f"--resume but {path} does not exist; drop --resume or fix --out_dir")
    saved = load_checkpoint(path)["config"]
    new = resumed_config(TrainConfig, saved, argv, RESUMABLE)
    end, new_end = saved["lr_decay_iters"] or saved["max_iters"], new.lr_decay_iters or new.max_iters
    if new_end != end:
        raise UserError(f"the run's cosine ends at iter {end} and would end at {new_end}, so the resumed iterations "
                        f"would get other learning rates: finish the run with its --max_iters={saved['max_iters']} (or "
                        f"no --max_iters); train on past {end} at min_lr with --max_iters={new.max_iters} "
                        f"--lr_decay_iters={end}; or start a new run from its weights with --init_from={path}")
    return new


def main():
    argv = sys.argv[1:]
    cfg = parse_flags(TrainConfig, argv)
    if cfg.resume:
        cfg = resumed(cfg, argv)
    check_train_flags(cfg)
    train(cfg)


if __name__ == "__main__":
    run_main(main)
