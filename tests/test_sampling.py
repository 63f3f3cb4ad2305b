"""GPT.generate samples from the distribution its flags ask for: softmax(logits / T) restricted to the top k.

The reference is the formula written out on known logits: a stand-in model returns the same logits for every
row of a large batch, so one call draws many independent tokens and a chi-square test compares their counts
with softmax(z / T) (renormalised over the k largest z). Each test also shows it has the power to reject the
distribution a plausible bug would produce (temperature ignored, top-k ignored)."""
import contextlib
import io
from dataclasses import asdict

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import eval_lm
from gpt import GPT, GPTConfig, GPTOutput
from lm_common import build_model, prepare_data
from train_lm import TrainConfig

Z = torch.tensor([1.2, -0.3, 0.8, 0.0, -1.0, 0.5, 1.5, -0.6])       # logits of the stand-in model
N = 40_000                                                             # draws per test (one batch row each)


class FixedLogits:
    """A stand-in for GPT: every position of every row gets the logits Z (generate only needs blocks and a call)."""

    blocks = [None]

    def __call__(self, idx, cache=None):
        B, T = idx.shape
        return GPTOutput(Z.expand(B, T, len(Z)).clone(), None, {})


def draw(temperature, top_k=None, n=N, seed=0):
    idx = torch.zeros(n, 1, dtype=torch.long)
    out = GPT.generate(FixedLogits(), idx, 1, temperature, top_k, generator=torch.Generator().manual_seed(seed))
    return out[:, 1]


def expected(temperature, top_k=None):
    """softmax(Z / T) over the top_k largest logits, 0 elsewhere, written out in float64 numpy."""
    z = Z.double().numpy() / temperature
    keep = np.ones(len(z), bool) if top_k is None else z >= np.sort(z)[-top_k]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    return p / p.sum()


def chi2_pvalue(tokens, p):
    """Chi-square goodness of fit of the token counts on the support of p; a token outside it fails outright."""
    counts = np.bincount(tokens.numpy(), minlength=len(p))
    assert counts[p == 0].sum() == 0, f"tokens outside the support: {counts}"
    support = p > 0
    return chisquare(counts[support], N * p[support]).pvalue


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_samples_softmax_of_scaled_logits(temperature):
    tokens = draw(temperature)
    assert chi2_pvalue(tokens, expected(temperature)) > 1e-3
    # the test can tell the temperatures apart: T ignored (T = 1) is rejected
    if temperature != 1.0:
        counts = np.bincount(tokens.numpy(), minlength=len(Z))
        assert chisquare(counts, N * expected(1.0)).pvalue < 1e-9


@pytest.mark.parametrize("top_k, temperature", [(1, 1.0), (3, 1.0), (3, 0.7), (5, 2.0)])
def test_top_k_samples_only_the_k_most_likely_in_proportion(top_k, temperature):
    tokens = draw(temperature, top_k)
    p = expected(temperature, top_k)
    assert set(tokens.tolist()) <= set(np.flatnonzero(p).tolist())      # never a token outside the k most likely
    assert len(set(tokens.tolist())) == top_k                            # and every one of them is drawn
    if top_k > 1:
        assert chi2_pvalue(tokens, p) > 1e-3


def test_top_k_larger_than_vocabulary_is_plain_sampling():
    assert chi2_pvalue(draw(1.0, top_k=100), expected(1.0)) > 1e-3


@pytest.mark.parametrize("temperature", [0, 1e-4])
def test_temperature_to_zero_is_argmax(temperature):
    assert torch.all(draw(temperature, n=2000) == Z.argmax())


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=23, block_size=64, n_layer=2, n_head=2, n_embd=16, init_std=0.5)).eval()


def test_greedy_decoding_equals_argmax_of_full_recomputation():
    """Temperature 0 through the KV cache = at each step, argmax of the model's logits on the whole sequence."""
    model = tiny_gpt()
    idx = torch.randint(0, 23, (3, 5), generator=torch.Generator().manual_seed(1))
    out = model.generate(idx, 12, temperature=0)
    seq = idx
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_every_sampled_token_of_a_long_generation_is_in_the_top_k():
    """With a real model over many steps (so top-k must hold after the first one too), each new token is among
    the k largest logits of the full forward on the sequence before it; and the draws are not greedy."""
    model = tiny_gpt()
    k = 3
    idx = torch.randint(0, 23, (16, 3), generator=torch.Generator().manual_seed(2))
    out = model.generate(idx, 20, temperature=1.5, top_k=k, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(out[:, :-1]).logits[:, 2:]                          # (B, 20, V): logits before each new token
    new = out[:, 3:]
    rank = (logits > logits.gather(2, new[..., None])).sum(-1)             # how many tokens beat the drawn one
    assert rank.max() < k
    assert (rank > 0).float().mean() > 0.2                                 # not greedy: the 2nd and 3rd are drawn


@pytest.mark.parametrize("flags", [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 1}])
def test_eval_lm_sample_passes_its_flags_to_generate(tmp_path, flags):
    """eval_lm --sample with --temperature=0, or with --top_k=1, prints the greedy continuation written out."""
    (tmp_path / "data" / "shakespeare").mkdir(parents=True)
    (tmp_path / "data" / "shakespeare" / "input.txt").write_text("to be, or not to be: that is the question.\n" * 50)
    cfg = TrainConfig(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"),
                      n_layer=1, n_head=2, n_embd=16, block_size=16, init_std=0.5)
    tok = prepare_data(cfg)[1]
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size).eval()
    (tmp_path / "run").mkdir()
    torch.save({"model": model.state_dict(), "config": asdict(cfg), "chars": tok.chars}, tmp_path / "run" / "ckpt_best.pt")
    ecfg = eval_lm.EvalConfig(out_dir=cfg.out_dir, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, device="cpu",
                              sample=True, prompt="to be", max_new_tokens=30, **flags)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        eval_lm.sample(ecfg)
    seq = torch.tensor([tok.encode("to be")])
    with torch.no_grad():
        for _ in range(30):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert buf.getvalue() == tok.decode(seq[0].tolist()) + "\n"
