"""The recall task (recall.py): the episode layout, the answers' positions and distances, "far", and bad input,
each checked against a loop over the decoded text."""
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from common import UserError, parse_flags
from eval_lm import EvalConfig, load_trained, stream_eval
from lm_common import check_train_flags, prepare_data, recall_eval
from recall import RecallData, answer_accuracy
from train_lm import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P, Q, K, V, F = 5, 6, 7, 6, 3


def brute_force(text, P, Q, F):
    """From one decoded episode, by hand: the answers' input positions and their distances back to the nearest
    earlier copy of the value (a key followed by its value, in a segment or an earlier query)."""
    assert text[:F] == "_" * F                                                   # the filler: no segment there
    segs, queries = text[F:F + 3 * P], text[F + 3 * P:]
    assert len(queries) == 4 * Q
    table = {}
    for i in range(P):
        key, value, sep = segs[3 * i:3 * i + 3]
        assert key.isupper() and value.islower() and sep == "." and key not in table
        table[key] = value
    positions, distances = [], []
    for j in range(Q):
        mark, key, value, sep = queries[4 * j:4 * j + 4]
        assert (mark, sep) == ("#", ".") and value == table[key]                  # the answer is the segment's value
        p = F + 3 * P + 4 * j + 1                                                 # the query's key predicts it
        positions.append(p)
        t = p - 1
        while not (text[t] == key and text[t + 1] == value):                      # walk back to the nearest copy
            t -= 1
        distances.append(p - (t + 1))
    return positions, distances


def test_layout_answers_and_distances_against_a_loop():
    data = RecallData(P, Q, K, V, F, seed=3, n_fixed=200)
    x, y = data.batch(200, torch.Generator().manual_seed(0))
    e = torch.cat([x, y[:, -1:]], 1)
    d = data.answer_distance(x)
    assert e.shape[1] == F + 3 * P + 4 * Q
    repeats = 0
    for b in range(200):
        text = "".join(data.chars[t] for t in e[b].tolist())
        positions, distances = brute_force(text, P, Q, F)
        assert data.answers().tolist() == positions
        assert [text[p + 1] for p in positions] == [data.chars[t] for t in y[b, positions].tolist()]
        assert d[b].tolist() == distances, text
        asked = [text[p] for p in positions]
        repeats += len(set(asked)) < Q
    # queries are drawn with replacement (Q > P here, and repeats occur at the rate chance gives), so the last
    # query cannot be answered by elimination
    assert repeats == 200
    # an oracle's logits score 1, a model that always says "." scores 0
    oracle = torch.nn.functional.one_hot(y.clamp_min(0), len(data.chars)).float()
    assert answer_accuracy(oracle, x, y, data)[0].all()
    assert not answer_accuracy(torch.zeros_like(oracle), x, y, data)[0].any()


def test_queries_are_drawn_with_replacement_uniformly():
    """The segment each query asks about is uniform and independent of the others: the last query's key was
    already asked about as often as chance says (1 − (1 − 1/P)^(Q−1)), so elimination tells nothing."""
    data = RecallData(4, 4, 8, 8, 3)
    x, _ = data.batch(4000, torch.Generator().manual_seed(1))
    keys = x[:, data.answers()]                                                   # (B, Q) the queries' keys
    seen = (keys[:, -1:] == keys[:, :-1]).any(1).float().mean().item()
    assert abs(seen - (1 - 0.75 ** 3)) < 0.03, seen
    seg_keys = x[:, data.seg_start]
    seg = (keys[:, -1:] == seg_keys).float().argmax(1)
    assert (torch.bincount(seg, minlength=4).float() / 4000 - 0.25).abs().max() < 0.03


def test_answers_only_targets_and_a_fixed_validation_set():
    args = (P, Q, K, V, F)
    x, y = RecallData(*args, seed=3, n_fixed=50).batch(40, torch.Generator().manual_seed(0))
    data = RecallData(*args, seed=3, n_fixed=50, answers_only=True)
    xa, ya = data.batch(40, torch.Generator().manual_seed(0))
    assert torch.equal(xa, x) and torch.equal(ya[:, data.answers()], y[:, data.answers()])
    assert (ya >= 0).sum() == 40 * Q


class Oracle(torch.nn.Module):
    """Right on the answers of the episodes in `right`, wrong (".") elsewhere."""

    def __init__(self, n_vocab, right):
        super().__init__()
        self.n_vocab, self.right = n_vocab, right

    def forward(self, x, attn_mask=None):
        rows = [self.right.get(tuple(r.tolist())) for r in x]
        logits = torch.zeros(*x.shape, self.n_vocab)
        logits[..., 0] = 1
        for b, r in enumerate(rows):
            if r is not None:
                logits[b, torch.arange(x.shape[1]), r] = 2
        return type("Out", (), {"logits": logits})()


def test_far_is_one_threshold_for_every_run():
    """answer_acc_far: the answers whose nearest value copy lies >= recall_far back, whatever the run's window."""
    cfg = parse_flags(TrainConfig, ["--dataset=recall", "--block_size=30", "--recall_far=9"])
    data, tok = prepare_data(cfg)
    val = data["val"]
    e = val.fixed
    right = {tuple(r[:-1].tolist()): r[1:] for r in e[::2]}                         # every other episode right
    model = Oracle(len(tok.chars), right)
    results = [recall_eval(model, val, replace(cfg, n_local=w, attn_mask=m), "cpu", torch.no_grad())
               for w, m in ((64, "full"), (4, "sepllm"), (7, "streaming"))]
    hits, far = [], []
    for b, row in enumerate(e):
        text = "".join(tok.chars[t] for t in row.tolist())
        for dist in brute_force(text, 4, 4, 3)[1]:
            far.append(dist >= 9)
            hits.append(b % 2 == 0)
    expect = sum(h for h, f in zip(hits, far) if f) / sum(far)
    assert 0 < sum(far) < len(far)
    for r in results:
        assert r["answer_acc_far"] == pytest.approx(expect, abs=1e-6)
        assert r["answer_acc"] == pytest.approx(0.5, abs=1e-6)


def flags_error(argv):
    cfg = parse_flags(TrainConfig, argv)
    with pytest.raises(UserError) as e:
        check_train_flags(cfg)
        prepare_data(cfg)
    return str(e.value)


def test_bad_layouts_are_one_clear_error_each():
    base = ["--dataset=recall", "--recall_pairs=4", "--recall_queries=4"]
    # a block size that does not fit the layout: the error names the one that does
    assert "use --block_size=30" in flags_error([*base, "--block_size=27"])
    assert "use --block_size=27" in flags_error([*base, "--block_size=30", "--recall_filler=0"])
    # a window as long as the episode: full attention, and the fix is a smaller window or a longer episode
    says = flags_error([*base, "--block_size=30", "--attn_mask=sepllm", "--n_local=30"])
    assert "covers the whole context" in says and "smaller --n_local" in says and "--recall_pairs" in says
    # a filler shorter than the sinks: the sinks would hold a segment
    says = flags_error([*base, "--block_size=29", "--recall_filler=2", "--attn_mask=streaming", "--n_init=3",
                        "--n_local=4"])
    assert "--recall_filler=3" in says and "smaller --n_init" in says
    # "far" beyond the episode would select nothing
    assert "--recall_far=40 must be in 1..29" in flags_error([*base, "--block_size=30", "--recall_far=40"])
    # a sink/window flag under full attention does nothing on the recall task either
    assert "--n_local=4 has no effect" in flags_error([*base, "--block_size=30", "--n_local=4"])


def test_eval_with_sinks_over_the_filler_is_one_clear_error(tmp_path):
    """A full-attention checkpoint evaluated with more sinks than its episodes' filler: one line, with the fix."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "full"
    r = subprocess.run([sys.executable, "train_lm.py", "--dataset=recall", "--block_size=28", "--recall_filler=1",
                        "--n_layer=1", "--n_embd=16", "--n_head=2", "--max_iters=40",
                        "--eval_interval=40", "--eval_iters=1", "--recall_targets=answers", "--lr=1e-2",
                        "--warmup_iters=0", f"--out_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for mode in (["--eval_mask=sepllm", "--n_init=3", "--n_local=4"],
                 ["--stream=sink", "--n_init=3", "--cache_capacity=10"]):
        r = subprocess.run([sys.executable, "eval_lm.py", f"--out_dir={out}", *mode], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--recall_filler=3" in r.stderr, (mode, r.stderr)
    # streaming: the episodes one after another are one stream; with the full cache, its answers are those of
    # one forward over the concatenated episodes (a model trained 40 steps answers a value of the context)
    cfg = parse_flags(EvalConfig, [f"--out_dir={out}", "--stream=full", "--stream_tokens=87"])   # 3 episodes of 29
    result = stream_eval(cfg)
    model, _, saved, _, data = load_trained(cfg)
    e = data["val"].fixed[:3]
    with torch.no_grad():
        pred = model(e.flatten()[None, :-1]).logits[0].argmax(-1)
    at = torch.cat([i * 29 + data["val"].answers() for i in range(3)])
    assert result["answer_acc"] == pytest.approx((pred[at] == e.flatten()[at + 1]).float().mean().item())
    assert result["answer_acc"] > 0.05        # it answers with values (an answer position off by one scores 0)
