"""
Evaluate a checkpoint trained by train_lm.py (out_dir/ckpt_best.pt); one mode per call:

    python eval_lm.py --sample                                   # generate text
    python eval_lm.py --probe_router=all                         # UniPool's routing probe (a MoE checkpoint)
    python eval_lm.py --eval_mask=sepllm --n_init=3 --n_local=64 # training-free SepLLM: val loss, kept KV
    python eval_lm.py --stream=sepcache --stream_repeat=4        # one long stream through SepCache / SinkCache / full

Every flag is a field of EvalConfig below, written --key=value; a flag the chosen mode does not read is an error.
The data, the model and the evaluations come from lm_common.py, as in train_lm.py.
"""
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from common import (UserError, autocast_for, load_checkpoint, load_weights, parse_flags, pick_device, pick_dtype,
                    refuse_unused, run_main, write_json)
from gpt import KVCache
from lm_common import (Tokenizer, build_model, check_recall_sinks, check_sparse_windows, estimate_loss, get_batch,
                       layer_windows, moe_layers, prepare_data, recall_eval, recall_note, sparse_patterns)
from sepllm import STREAMING_SEPARATORS, SepCache, SinkCache, kept_fraction
from train_lm import TrainConfig
from unipool import random_routing


@dataclass
class EvalConfig:
    out_dir: str = "out-lm"             # the run folder holding ckpt_best.pt
    data_dir: str = ""                  # as in train_lm.py
    cache_dir: str = "~/.cache/nanopapers"
    device: str = "auto"
    dtype: str = "auto"                 # as in train_lm.py: auto = bfloat16 / float16 on a GPU, float32 on the CPU
    seed: int = 1337                    # --sample's draws, --probe_router's random routing
    eval_iters: int = 20                # batches per split for the loss-based modes
    # --sample
    sample: bool = False
    prompt: str = "\n"
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int = 200
    # --probe_router
    probe_router: str = ""              # all | a layer: val loss when that layer routes uniformly at random
    # --eval_mask (n_init, n_local, layer_windows as in train_lm.py)
    eval_mask: str = ""                 # full | sepllm | streaming | fixed
    n_init: int = 3
    n_local: int = 64
    layer_windows: str = ""
    # --stream (n_init = a, n_local = w). SepCache keeps w local entries and the new token sees them and itself, while
    # a training mask's w counts the token itself: --n_local=w-1 shows a model trained with --n_local=w its window
    stream: str = ""                    # sepcache | sink | full: the val split as one stream, a token a step
    stream_repeat: int = 1              # the stream is the val split repeated this many times ...
    stream_tokens: int = 0              # ... cut to this many tokens (0 = all)
    sep_size: int = 64                  # SepCache: separators kept, s
    cache_capacity: int = 800           # SepCache / SinkCache: capacity c
    cache_positions: str = "cache"      # SepCache / SinkCache RoPE positions: cache (0..S-1, the paper's) | stream
    out_json: str = ""                  # also write the result of --probe_router/--eval_mask/--stream to this file
    overwrite: bool = False             # replace an existing --out_json (without it, an existing file is refused)


def load_trained(cfg, with_data=True):
    """The model of out_dir/ckpt_best.pt, its tokenizer, its training config (with this run's data location,
    eval and attention flags) and, with_data, the data."""
    device = pick_device(cfg.device)
    path = os.path.join(cfg.out_dir, "ckpt_best.pt")
    ckpt = load_checkpoint(path, device)
    saved = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__})
    saved = replace(saved, **{k: getattr(cfg, k) for k in ("data_dir", "cache_dir", "eval_iters", "n_init",
                                                          "n_local", "layer_windows")})
    tok = Tokenizer(saved.dataset, ckpt["chars"])
    model = build_model(saved, tok.vocab_size).to(device)
    load_weights(model, ckpt["model"], path)
    return model.eval(), tok, saved, device, prepare_data(saved)[0] if with_data else None


def sample(cfg):
    model, tok, _, device, _ = load_trained(cfg, with_data=False)
    idx = torch.tensor([tok.encode(cfg.prompt)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator=gen)
    print(tok.decode(out[0].tolist()))


def probe_router(cfg):
    """UniPool's routing probe: Δ val loss when a layer's learned router is replaced by uniform random routing."""
    model, _, saved, device, data = load_trained(cfg)
    layers = moe_layers(model)
    if not layers:
        raise UserError(f"--probe_router needs a MoE checkpoint; {cfg.out_dir} was trained with --ffn=dense")
    which = range(len(layers)) if cfg.probe_router == "all" else [int(cfg.probe_router)]
    if max(which) >= len(layers):
        raise UserError(f"--probe_router={cfg.probe_router} but the model has layers 0..{len(layers) - 1}")
    base = estimate_loss(model, data, saved, device, contextlib.nullcontext())["val"]
    print(f"| layer routed at random | val loss | Δ val loss |\n|---|---|---|\n| none | {base:.4f} | |")
    result = {"val_loss": base, "random_layer_val_loss": {}}
    for l in which:
        with random_routing(layers, [l], seed=cfg.seed):
            val = estimate_loss(model, data, saved, device, contextlib.nullcontext())["val"]
        print(f"| {l} | {val:.4f} | {val - base:+.4f} |")
        result["random_layer_val_loss"][l] = val
    return result


def eval_mask(cfg):
    """Training-free sparse attention: the checkpoint's val loss under --eval_mask, and the kept KV fraction."""
    model, tok, saved, device, data = load_trained(cfg)
    layer_windows(saved)
    check_sparse_windows(saved, cfg.eval_mask)
    if saved.dataset == "recall":
        check_recall_sinks(saved.recall_filler, cfg.n_init, f"--eval_mask={cfg.eval_mask}")
    sep = tok.separators()
    masks = lambda x: sparse_patterns(saved, cfg.eval_mask, x, sep)  # noqa: E731
    loss = estimate_loss(model, data, saved, device, contextlib.nullcontext(), masks)["val"]
    x, _ = get_batch(data["val"], saved.batch_size, saved.block_size, torch.Generator().manual_seed(saved.seed + 1))
    note, r = "", {}
    if saved.dataset == "recall":
        r = recall_eval(model, data["val"], saved, device, contextlib.nullcontext(), masks)
        note = recall_note(r)
    kept = kept_fraction(masks(x.to(device)) or [None])
    print(f"{cfg.eval_mask} mask (a={saved.n_init}, w={saved.n_local}, layers {saved.layer_windows or 'all'}): "
          f"val loss {loss:.4f}, kept fraction {kept:.3f}{note}")
    return {"val_loss": loss, "kept_fraction": kept, **{f"val_{k}": v for k, v in r.items()}}


STREAM_WINDOW = 65536


@torch.no_grad()
def stream_nll(model, stream, cache, device="cpu"):
    """Decode stream (L,) through cache as a token a step would: per step, the negative log-likelihood of the next
    token, the cache length and the greedy prediction, each (L − 1,). A chunked cache (SepCache / SinkCache with
    chunked=True) takes the tokens up to its next compression in one forward, causal among them: the same numbers
    as one token a forward, in ~room() times fewer forwards. Any other cache goes a token at a time."""
    nll, kv, pred, t = [], [], [], 0
    chunks = getattr(cache, "chunked", False)
    while t < len(stream) - 1:
        n = min(max(cache.room(), 1) if chunks else 1, len(stream) - 1 - t)   # full: 1 (its start compresses)
        logits = model(stream[t:t + n].view(1, n).to(device), cache=cache).logits[0].float()      # (n, V)
        nll.append(F.cross_entropy(logits, stream[t + 1:t + 1 + n].to(device), reduction="none").double().cpu())
        kv.append(len(cache) - n + 1 + torch.arange(n))        # the cache length after each of the n tokens
        pred.append(logits.argmax(-1).cpu())
        t += n
    return torch.cat(nll), torch.cat(kv), torch.cat(pred)


@torch.no_grad()
def stream_eval(cfg):
    """Perplexity of one long token stream decoded a token at a step through a KV cache (SepCache, SinkCache or
    the full cache), with the KV it used and its speed. For --dataset=recall checkpoints, the validation episodes
    one after another are the stream, and the answers' accuracy is reported too."""
    model, tok, saved, device, data = load_trained(cfg)
    L = saved.n_layer
    new_cache = {"sepcache": lambda: SepCache(L, tok.separators(STREAMING_SEPARATORS), cfg.n_init, cfg.sep_size,
                                              cfg.n_local, cfg.cache_capacity, True, cfg.cache_positions),
                 "sink": lambda: SinkCache(L, cfg.n_init, cfg.cache_capacity, True, cfg.cache_positions),
                 "full": lambda: KVCache(L)}[cfg.stream]
    t0 = time.time()
    if saved.dataset == "recall":
        if cfg.stream != "full":
            check_recall_sinks(saved.recall_filler, cfg.n_init, f"--stream={cfg.stream}")
        val = data["val"]
        episodes = val.fixed[:max(1, cfg.stream_tokens // val.fixed.shape[1])] if cfg.stream_tokens else val.fixed
        # the episodes one after another as one stream through one cache, so after the first the cache works in
        # its steady state (evicting), as in a long stream; answer j of episode i is predicted at i·n + answers()[j]
        nll, kv, pred = stream_nll(model, episodes.flatten(), new_cache(), device)
        at = (torch.arange(len(episodes))[:, None] * episodes.shape[1] + val.answers()[None]).flatten()
        acc = (pred[at] == episodes.flatten()[at + 1]).float().mean().item()
        note = f", answer accuracy {acc:.3f} ({len(episodes)} episodes in one stream)"
    else:
        stream = torch.from_numpy(np.tile(data["val"], cfg.stream_repeat).astype(np.int64))
        nll, kv, _ = stream_nll(model, stream[:cfg.stream_tokens or len(stream)], new_cache(), device)
        note, acc = "", None
    n, seconds = len(nll), time.time() - t0
    # perplexity per window of STREAM_WINDOW tokens: flat when the cache keeps what the model needs
    windows = [math.exp(w.mean()) for w in nll.split(STREAM_WINDOW)]
    print(f"{cfg.stream}: {n} tokens, ppl {math.exp(nll.mean()):.2f}, average KV {kv.float().mean():.0f}, max KV "
          f"{kv.max()}, {n / seconds:.0f} tok/s, {seconds:.0f} s{note}")
    if len(windows) > 1:
        print(f"ppl per {STREAM_WINDOW} tokens: " + " ".join(f"{w:.2f}" for w in windows))
    return {"tokens": n, "ppl": math.exp(nll.mean()), "average_kv": kv.float().mean().item(), "max_kv": kv.max().item(),
            "tokens_per_second": n / seconds, "seconds": seconds, "answer_acc": acc, "stream": cfg.stream,
            "window_tokens": STREAM_WINDOW, "window_ppl": windows}



def check_flags(cfg):
    """One mode per call; every flag that mode does not read is one clear error naming the mode that reads it."""
    modes = [m for m in ("sample", "probe_router", "eval_mask", "stream") if getattr(cfg, m)]
    if len(modes) != 1:
        raise UserError("pick exactly one of --sample, --probe_router=..., --eval_mask=..., --stream=...")
    choices = {"eval_mask": ("", "full", "sepllm", "streaming", "fixed"), "stream": ("", "sepcache", "sink", "full"),
               "cache_positions": ("cache", "stream")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"--{key}={getattr(cfg, key)} must be one of {', '.join(a for a in allowed if a)}")
    if cfg.probe_router not in ("", "all") and not cfg.probe_router.isdigit():
        raise UserError(f"--probe_router={cfg.probe_router} must be all or a layer number")
    sparse_mask = cfg.eval_mask not in ("", "full")
    refuse_unused(cfg, [
        (("prompt", "max_new_tokens", "temperature", "top_k"), cfg.sample, "--sample"),
        (("seed",), cfg.sample or cfg.probe_router, "--sample or --probe_router"),
        (("eval_iters",), cfg.probe_router or cfg.eval_mask, "--probe_router or --eval_mask"),
        (("n_init",), sparse_mask or cfg.stream in ("sepcache", "sink"),
         "--eval_mask=sepllm, streaming or fixed, or --stream=sepcache or sink"),
        (("n_local",), sparse_mask or cfg.stream == "sepcache", "--eval_mask=sepllm, streaming or fixed, or "
                                                                "--stream=sepcache"),
        (("layer_windows",), sparse_mask, "--eval_mask=sepllm, streaming or fixed"),
        (("sep_size",), cfg.stream == "sepcache", "--stream=sepcache"),
        (("cache_capacity", "cache_positions"), cfg.stream in ("sepcache", "sink"), "--stream=sepcache or sink"),
        (("stream_repeat", "stream_tokens"), cfg.stream, "--stream"),
        (("data_dir", "cache_dir", "out_json"), not cfg.sample, "--probe_router, --eval_mask or --stream"),
        (("overwrite",), cfg.out_json, "--out_json")])
    if cfg.stream == "sepcache" and cfg.n_local < 1:
        raise UserError(f"--n_local={cfg.n_local}: the cache's local window must be >= 1")
    if cfg.stream == "sepcache" and cfg.n_init + cfg.sep_size + cfg.n_local >= cfg.cache_capacity:
        raise UserError(f"--cache_capacity={cfg.cache_capacity} must exceed n_init + sep_size + n_local")
    if cfg.out_json and os.path.exists(cfg.out_json) and not cfg.overwrite:
        raise UserError(f"--out_json={cfg.out_json} exists: replace it with --overwrite or pass another file")
    return modes[0]


def main():
    cfg = parse_flags(EvalConfig, sys.argv[1:])
    mode = check_flags(cfg)
    device = pick_device(cfg.device)
    with autocast_for(device, pick_dtype(cfg.dtype, device)):     # every mode computes in --dtype
        run = {"sample": sample, "probe_router": probe_router, "eval_mask": eval_mask, "stream": stream_eval}[mode]
        result = run(cfg)
    if cfg.out_json and result is not None:
        write_json(cfg.out_json, {**result, "config": vars(cfg)})


if __name__ == "__main__":
    run_main(main)
