import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

import plot
from common import UserError
from sepllm import fixed_interval_mask, pattern_codes, pattern_text, separator_ids, sepllm_mask, streaming_mask
from train_lm import TrainConfig
from train_rec import RecConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def mpl():
    pytest.importorskip("matplotlib", reason="plot.py draws with matplotlib, an optional package: "
                                             "pip install matplotlib to test the figures")


def write_run(folder, records=(), summary=None, **arrays):
    """A run folder as the scripts write it: metrics.jsonl (one JSON object a line), summary.json, scores.npz."""
    folder.mkdir()
    if records:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    if arrays:
        np.savez(folder / "scores.npz", **arrays)
    return str(folder)


def lm_run(folder, ffn="dense", L=2, E=4, pool_groups=1, iters=(0, 10, 20), log_every=5, ms=20.0):
    """train_lm.py's records: an evaluation line every iters step, a progress line at 1 and every log_every."""
    rng = np.random.default_rng(len(str(folder)))
    cfg = asdict(TrainConfig(ffn=ffn, n_layer=L, n_experts=E, pool_groups=pool_groups, out_dir=str(folder)))
    records = []
    for it in range(iters[-1] + 1):
        if it in iters:
            records.append({"iter": it, "train_loss": 4 - it / 10, "val_loss": 4.1 - it / 11})
        if it < iters[-1] and ((it + 1) % log_every == 0 or it == 0):
            rec = {"iter": it + 1, "loss": 4.0, "aux_loss": 0.01, "lr": 1e-3, "ms_per_iter": ms}
            if ffn != "dense":
                rec["expert_counts"] = rng.integers(0, 50, (L, E)).tolist()
                rec.update({"load_cv": [0.5] * L, "dead_experts": [0] * L, "dropped": [0.0] * L,
                            "pool_coverage": [1.0]})
            records.append(rec)
    summary = {"final_val_loss": 2.0, "final_train_loss": 2.0, "best_val_loss": 2.0, "iters": iters[-1],
               "wall_seconds": 1.0, "train_seconds": 0.5, "eval_seconds": 0.5, "tokens_per_second": 1e4, "params": 1,
               "world_size": 1, "device": "cpu", "kept_fraction": 1.0, "config": cfg}
    return write_run(folder, records, summary)


def recall_run(folder):
    """train_lm.py --dataset=recall's evaluation lines (answer accuracy, far answers) and progress lines."""
    ev = lambda it, acc, far: {"iter": it, "train_loss": 1.0, "val_loss": 1.0, "val_answer_acc": acc,
                               "val_answer_acc_far": far, "val_answer_acc_by_query": [acc] * 4}
    records = [ev(0, 0.0, 0.0), {"iter": 1, "loss": 1.0, "ms_per_iter": 5.0}, ev(10, 0.5, 0.25), ev(20, 0.9, 0.75),
               ev(20, 1.0, 1.0)]                             # a resumed run repeats an iteration: the last wins
    return write_run(folder, records, {"config": asdict(TrainConfig(dataset="recall", out_dir=str(folder)))})


def test_recall_curves_read_the_evaluations(tmp_path):
    it, acc, far = plot.recall_curves(recall_run(tmp_path / "r"))
    assert it.tolist() == [0, 10, 20] and acc.tolist() == [0.0, 0.5, 1.0] and far.tolist() == [0.0, 0.25, 1.0]
    with pytest.raises(UserError, match="no answer accuracy"):
        plot.recall_curves(lm_run(tmp_path / "not_recall"))


def metrics(recall, ndcg):
    return {"recall@20": recall, "ndcg@20": ndcg}


def lightgnn_run(folder, **flags):
    rows = [{"model": "teacher", "edges_kept": 1.0, "entries_kept": 1.0, "cost": 1.0, "val": metrics(0.18, 0.24),
             "test": metrics(0.18, 0.25), "train_seconds": 10.0},
            {"model": "intermediate", "edges_kept": 2.3, "entries_kept": 1.0, "cost": 1.6, "val": metrics(0.14, 0.2),
             "test": metrics(0.14, 0.2), "train_seconds": 10.0}]
    for r in range(4):
        rows.append({"model": f"student round {r}", "edges_kept": 0.72 ** r, "entries_kept": 0.64 ** r,
                     "cost": 0.25 * 0.72 ** r, "val": metrics(0.05 + r / 50, 0.1), "test": metrics(0.05 + r / 50, 0.1),
                     "train_seconds": 2.0})
    return write_run(folder, summary={"rounds": rows, "config": asdict(RecConfig(method="lightgnn", **flags))})


def unlearn_run(folder, models=("base", "unlearnrec", "fine-tune-only", "retrained")):
    rng = np.random.default_rng(0)
    quantiles = {"mean": 0.0, "q10": -1.0, "q50": 0.0, "q90": 1.0}
    rows = [{"model": m, "val": metrics(0.1, 0.1), "test": metrics(0.1, 0.1), "seconds": 1.0, "forgotten": quantiles,
             "held_out": quantiles, "negatives": quantiles, "mia_auc": 0.6} for m in models]
    arrays = {f"1/{m}/{k}": rng.normal(mu, 1, n) for m in models
              for k, mu, n in (("forgotten", 2, 300), ("held_out", 1.5, 2000), ("negatives", -1, 300))}
    summary = {"steps": [{"requests": 300, "rows": rows}], "times": {"pretrain_seconds": 1.0},
               "config": asdict(RecConfig(method="unlearnrec"))}
    return write_run(folder, summary=summary, **arrays)


def draws(tmp_path, kind, *args):
    out = tmp_path / f"{kind}.png"
    plot.main([kind, *args, f"--out={out}"])
    blob = out.read_bytes()
    assert blob.startswith(PNG) and len(blob) < 150_000, len(blob)


def test_every_kind_writes_a_small_png(tmp_path, mpl):
    dense, moe = lm_run(tmp_path / "dense"), lm_run(tmp_path / "moe", ffn="moe")
    pool = lm_run(tmp_path / "pool", ffn="unipool", L=4, E=6, pool_groups=2)
    draws(tmp_path, "loss", dense, moe, pool)
    draws(tmp_path, "routing", moe, pool)
    draws(tmp_path, "mask", "--text=One clause, then another. Done!", "--tokenizer=char", "--n_local=3")
    draws(tmp_path, "pruning", lightgnn_run(tmp_path / "lg"), lightgnn_run(tmp_path / "random", prune="random"),
          lightgnn_run(tmp_path / "nokd", kd_pred=0.0, kd_emb=0.0))
    draws(tmp_path, "unlearning", unlearn_run(tmp_path / "ul"), unlearn_run(tmp_path / "ul2", models=("base", "x")))
    draws(tmp_path, "recall", recall_run(tmp_path / "rc"), recall_run(tmp_path / "rc2"))
    streams = []
    for name in ("sepcache", "sink"):
        streams.append(tmp_path / f"{name}.json")
        streams[-1].write_text(json.dumps({"stream": name, "average_kv": 700.0, "max_kv": 800, "window_tokens": 65536,
                                           "tokens": 140000, "window_ppl": [4.1, 4.0, 4.05]}))
    draws(tmp_path, "stream", *map(str, streams))


def test_runs_are_labelled_by_the_flags_that_differ(tmp_path):
    runs = [lm_run(tmp_path / "a"), lm_run(tmp_path / "b", ffn="moe"), lm_run(tmp_path / "c", ffn="unipool")]
    summary = json.load(open(os.path.join(runs[1], "summary.json")))
    summary["config"]["overwrite"] = True                         # made with --overwrite: where, not what
    json.dump(summary, open(os.path.join(runs[1], "summary.json"), "w"))
    assert plot.labels(runs) == ["ffn=dense", "ffn=moe", "ffn=unipool"]
    runs = [lightgnn_run(tmp_path / "lg"), lightgnn_run(tmp_path / "nokd", kd_pred=0.0, kd_emb=0.0)]
    assert plot.labels(runs) == ["kd_emb=0.01 kd_pred=1.0", "kd_emb=0.0 kd_pred=0.0"]
    assert plot.labels(runs[:1]) == ["lg"]                    # one run: its folder
    reuse = lightgnn_run(tmp_path / "reuse", prune="random", teacher="lg/teacher/ckpt_best.pt")
    assert plot.labels([runs[0], reuse]) == ["prune=learned", "prune=random"]      # paths are no difference
    assert plot.labels(runs, "LightGNN,no distillation") == ["LightGNN", "no distillation"]
    with pytest.raises(UserError, match="names 1 runs, but 2 were given"):
        plot.labels(runs, "LightGNN")


def test_training_seconds_sum_the_progress_lines(tmp_path):
    ev = lambda it, val: {"iter": it, "train_loss": 3.0, "val_loss": val}
    step = lambda it, ms: {"iter": it, "loss": 3.0, "aux_loss": 0.0, "lr": 1e-3, "ms_per_iter": ms}
    # progress lines at 1, 5, 10: the first times iteration 0 alone, then 4 and 5 iterations at their mean
    records = [ev(0, 4.0), step(1, 100.0), ev(3, 3.5), step(5, 10.0), ev(10, 3.0), step(10, 20.0),
               ev(10, 2.9)]                                  # a resumed run repeats an iteration: the last wins
    it, seconds, val, _ = plot.loss_curves(write_run(tmp_path / "r", records))
    assert it.tolist() == [0, 3, 10] and val.tolist() == [4.0, 3.5, 2.9]
    assert seconds == pytest.approx([0.0, 0.1 + 2 * 0.01, 0.1 + 4 * 0.01 + 5 * 0.02])


def test_routing_share_per_layer_and_grouped_pools(tmp_path):
    run = lm_run(tmp_path / "pool", ffn="unipool", L=4, E=3, pool_groups=2, iters=(0, 10, 20), log_every=5)
    records = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if "expert_counts" in l]
    counts = sum(np.array(r["expert_counts"], float) for r in records if r["iter"] > 10)   # 15 and 20
    share = plot.routing_share(run)
    assert share.shape == (4, 6)
    for l in range(4):
        g = l // 2                                            # layers 0, 1 share pool 0; 2, 3 pool 1
        assert share[l, 3 * g:3 * g + 3] == pytest.approx(counts[l] / counts[l].sum())
        assert np.isnan(share[l, 3 * (1 - g):3 * (1 - g) + 3]).all()


@pytest.mark.parametrize("a, w", [(1, 2), (3, 4)])
def test_mask_data_is_sepllm_rule(a, w):
    text = "The cat sat, then slept. Done; bye!\nNext: a new line."
    ids = torch.tensor([sorted(set(text)).index(c) for c in text])[None]
    seps = separator_ids(sorted(set(text)))
    expected = {"sepllm": sepllm_mask(ids, seps, a, w)[0], "streaming": streaming_mask(len(text), a, w)[0],
                "fixed": fixed_interval_mask(len(text), a, w)[0]}
    for rule, mask in expected.items():
        tokens, codes = plot.mask_data(text, rule, "char", a, w)
        assert tokens == list(text) and np.array_equal(codes >= 2, mask.numpy()), rule


def test_mask_data_with_gpt2_tokens():
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("r50k_base")
    except Exception as e:
        pytest.skip(f"r50k_base not available offline ({e}); set TIKTOKEN_CACHE_DIR")
    text = "Hello, world. This is SepLLM: separators stay!"
    ids = torch.tensor(enc.encode_ordinary(text))[None]
    tokens, codes = plot.mask_data(text, "sepllm", "gpt2", 2, 3)
    assert "".join(tokens) == text
    assert np.array_equal(codes >= 2, sepllm_mask(ids, separator_ids(enc), 2, 3)[0].numpy())


def brute_force_picture(tokens, seps, a, w):
    """The terminal picture written out: '#' sink or separator, 'o' window, '.' dropped, nothing past the query."""
    lines = [" " * 17 + "".join(str(j % 10) for j in range(len(tokens)))]
    for i, t in enumerate(tokens):
        row = ""
        for j in range(i + 1):
            row += "#" if (j < a or tokens[j] in seps) else ("o" if i - j < w else ".")
        lines.append(f"{i:3d} {t!r:>12} " + row)
    return lines


def test_terminal_print_matches_brute_force():
    r = subprocess.run([sys.executable, "sepllm.py", "ab. cd, e\nf", "--tokenizer=char", "--n_init=1",
                        "--n_local=2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1:] == brute_force_picture(list("ab. cd, e\nf"), {".", ",", " ", "\n"}, 1, 2)
    assert lines[4] == "  2          '.' #o#"                # spelled out: sink, window, the separator itself
    tokens = list("x; yz")                                    # no sinks, a window of the query alone
    picture = pattern_text(tokens, pattern_codes(torch.tensor([False, True, False, False, False]), 0, 1))
    assert picture.splitlines() == brute_force_picture(tokens, {";"}, 0, 1)


def test_missing_run_files_are_one_clear_error(tmp_path, mpl):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "plot.py", "loss", str(empty), f"--out={tmp_path / 'x.png'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {empty}/metrics.jsonl not found: plot.py loss needs a train_lm.py run")
    dense = lm_run(tmp_path / "dense")
    for args, msg in ((["routing", dense], "has no expert_counts"), (["pruning", str(empty)], "summary.json not found"),
                      (["unlearning", lightgnn_run(tmp_path / "lg")], "has 0 unlearning request(s)"),
                      (["loss", str(tmp_path / "nowhere")], "is not a folder"), (["nonsense"], "usage:"),
                      (["stream", str(empty)], "is not a file: pass eval_lm.py --out_json files"),
                      (["loss", dense, "--dpi=high"], "bad value for --dpi")):
        with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            plot.main([*args, f"--out={tmp_path / 'x.png'}"])
    scores = os.path.join(unlearn_run(tmp_path / "ul"), "scores.npz")
    np.savez(scores, **{"1/another/forgotten": np.zeros(3)})
    with pytest.raises(UserError, match="scores.npz lacks the scores of request 1"):
        plot.main(["unlearning", str(tmp_path / "ul"), f"--out={tmp_path / 'x.png'}"])
    os.remove(scores)
    with pytest.raises(UserError, match="scores.npz not found"):
        plot.main(["unlearning", str(tmp_path / "ul"), f"--out={tmp_path / 'x.png'}"])
