"""Training set-up: the learning-rate schedule in closed form, --layer_windows on the right layers, and
eval_lm --eval_mask against a masked forward written out (rule (1) of sepllm.py, one loop per query and key)."""
import contextlib
import io
import math
import os
import re
from dataclasses import asdict

import pytest
import torch

import eval_lm
from lm_common import build_model, get_batch, prepare_data, sparse_patterns
import train_lm
from train_lm import TrainConfig, get_lr

TEXT = "".join(f"Line {i}: to be, or not to be; that is the question. Whether 'tis nobler!\n" for i in range(200))
SEPARATOR_CHARS = ".,?!;:\n \t"         # SepLLM's separators; in a character vocabulary each is one token


# ----------------------------------------------------------------------------- learning rate

LR, MIN_LR, W, D = 1e-3, 1e-4, 10, 110          # peak, floor, warm-up iters, end of the cosine


def cfg_lr(**kw):
    return TrainConfig(**{"lr": LR, "min_lr": MIN_LR, "warmup_iters": W, "max_iters": 500, "lr_decay_iters": D, **kw})


def test_warmup_is_linear_from_lr_over_w_plus_1_to_the_peak():
    cfg = cfg_lr()
    lrs = [get_lr(cfg, it) for it in range(W + 1)]
    # lr_it = lr · (it + 1) / (W + 1): equal steps of lr / (W + 1), the peak lr reached at it = W
    for it, value in enumerate(lrs):
        assert value == pytest.approx(LR * (it + 1) / (W + 1), rel=1e-12)
    assert lrs[0] == pytest.approx(LR / (W + 1)) and lrs[0] > 0
    assert lrs[W] == pytest.approx(LR, rel=1e-12)


def test_cosine_at_peak_quarter_middle_and_end():
    cfg = cfg_lr()
    # lr_it = min_lr + ½ (1 + cos(π (it − W) / (D − W))) (lr − min_lr) for W ≤ it ≤ D, min_lr after
    assert get_lr(cfg, W) == pytest.approx(LR, rel=1e-12)
    quarter = W + (D - W) // 4
    assert get_lr(cfg, quarter) == pytest.approx(MIN_LR + 0.5 * (1 + math.cos(math.pi / 4)) * (LR - MIN_LR), rel=1e-12)
    assert get_lr(cfg, (W + D) // 2) == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)
    assert get_lr(cfg, D - 1) == pytest.approx(
        MIN_LR + 0.5 * (1 + math.cos(math.pi * (D - 1 - W) / (D - W))) * (LR - MIN_LR), rel=1e-12)
    assert get_lr(cfg, D - 1) > MIN_LR
    for it in (D, D + 1, 499):
        assert get_lr(cfg, it) == MIN_LR
    decay = [get_lr(cfg, it) for it in range(W, D + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_cosine_ends_at_max_iters_when_lr_decay_iters_is_0():
    cfg = cfg_lr(lr_decay_iters=0, max_iters=210)
    assert get_lr(cfg, (W + 210) // 2) == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)
    assert get_lr(cfg, 210) == MIN_LR


# ----------------------------------------------------------------------------- attention masks

def rule_1_mask(x, sep, n_init, window, kept=None):
    """Rule (1) written out: query i may attend key j iff j ≤ i and (j < a or x_j kept or i − j < w).
    kept(j) is "x_j is a separator" unless `kept` (a set of positions) is given. x (B, T) -> (B, T, T) bool."""
    B, T = x.shape
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(i + 1):
                keep = (j in kept) if kept is not None else int(x[b, j]) in sep
                mask[b, i, j] = j < n_init or keep or i - j < window
    return mask


@pytest.fixture
def lm_setup(tmp_path):
    d = tmp_path / "data" / "shakespeare"
    d.mkdir(parents=True)
    (d / "input.txt").write_text(TEXT)
    # init_std 0.3 (not 0.02): an untrained model whose attention is far from uniform, so masks change the loss
    cfg = TrainConfig(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"),
                      n_layer=3, n_head=2, n_embd=32, block_size=24, batch_size=4, eval_iters=3, init_std=0.3)
    data, tok = prepare_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size).eval()
    sep = {tok.stoi[c] for c in SEPARATOR_CHARS if c in tok.stoi}
    return cfg, data, tok, model, sep


def test_layer_windows_reach_the_layers_they_name(lm_setup):
    cfg, data, tok, model, sep = lm_setup
    cfg.n_init, cfg.n_local, cfg.layer_windows = 2, 16, "4,0,2"
    x, y = get_batch(data["train"], 4, cfg.block_size, torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x, y, attn_mask=sparse_patterns(cfg, "sepllm", x, tok.separators())).loss
        # layer 0: window 4, layer 1: full causal attention, layer 2: window 2
        expect = model(x, y, attn_mask=[rule_1_mask(x, sep, 2, 4), None, rule_1_mask(x, sep, 2, 2)]).loss
        reversed_ = model(x, y, attn_mask=[rule_1_mask(x, sep, 2, 2), None, rule_1_mask(x, sep, 2, 4)]).loss
        n_local = model(x, y, attn_mask=[rule_1_mask(x, sep, 2, 16)] * 3).loss
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    # the check can fail: the windows in the other order, or n_local everywhere, give other losses
    assert abs(reversed_ - expect) > 1e-3 and abs(n_local - expect) > 1e-3


def eval_mask_loss(cfg_train, tok, model, kind, **flags):
    """Save `model` as a run's best checkpoint, run eval_lm --eval_mask=kind with flags, parse its val loss."""
    os.makedirs(cfg_train.out_dir, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": asdict(cfg_train), "chars": tok.chars},
               os.path.join(cfg_train.out_dir, "ckpt_best.pt"))
    ecfg = eval_lm.EvalConfig(out_dir=cfg_train.out_dir, data_dir=cfg_train.data_dir, cache_dir=cfg_train.cache_dir,
                              device="cpu", eval_iters=cfg_train.eval_iters, eval_mask=kind, **flags)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        eval_lm.eval_mask(ecfg)
    return float(re.search(r"val loss (\d+\.\d+)", buf.getvalue()).group(1))


@pytest.mark.parametrize("kind, layer_windows", [("sepllm", ""), ("sepllm", "0,4,4"), ("streaming", ""),
                                                  ("fixed", "4,4,0")])
def test_eval_mask_loss_equals_a_masked_forward_written_out(lm_setup, kind, layer_windows):
    """The checkpoint was trained with full attention (its config says attn_mask=full, n_local=64 > block_size):
    --eval_mask must apply ITS OWN mask and window, not the checkpoint's."""
    cfg, data, tok, model, sep = lm_setup
    n_init, n_local = 2, 4
    loss = eval_mask_loss(cfg, tok, model, kind, n_init=n_init, n_local=n_local, layer_windows=layer_windows)
    windows = [int(w) for w in layer_windows.split(",")] if layer_windows else [n_local] * cfg.n_layer
    gen = torch.Generator().manual_seed(cfg.seed + 1)      # the fixed evaluation batches of the val split
    masked, full = [], []
    with torch.no_grad():
        for _ in range(cfg.eval_iters):
            x, y = get_batch(data["val"], cfg.batch_size, cfg.block_size, gen)
            kept = {"sepllm": None, "streaming": set(), "fixed": {j for j in range(cfg.block_size) if j % 5 == 4}}[kind]
            masks = [None if w == 0 else rule_1_mask(x, sep, n_init, w, kept) for w in windows]
            masked.append(model(x, y, attn_mask=masks).loss.item())
            full.append(model(x, y).loss.item())
    expect, full = sum(masked) / len(masked), sum(full) / len(full)
    assert loss == pytest.approx(expect, abs=1e-4)           # the script prints 4 decimals
    assert abs(expect - full) > 0.01                         # and full attention would have been caught


def test_training_steps_every_parameter_group_with_the_schedule(tmp_path, monkeypatch):
    """train_lm's loop: optimizer step `it` runs with lr_it of the closed form, in every parameter group."""
    d = tmp_path / "data" / "shakespeare"
    d.mkdir(parents=True)
    (d / "input.txt").write_text(TEXT)
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return step(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    cfg = TrainConfig(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"),
                      n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, eval_iters=1, eval_interval=100,
                      log_interval=100, max_iters=8, warmup_iters=3, lr_decay_iters=7, lr=1e-2, min_lr=1e-3)
    with contextlib.redirect_stdout(io.StringIO()):
        train_lm.train(cfg)
    expect = [1e-2 * (it + 1) / 4 for it in range(3)] + \
             [1e-3 + 0.5 * (1 + math.cos(math.pi * (it - 3) / 4)) * 9e-3 for it in range(3, 8)]
    assert len(seen) == 8 and all(len(groups) == 2 for groups in seen)
    for it, groups in enumerate(seen):
        assert groups == pytest.approx([expect[it]] * 2, rel=1e-12), it
