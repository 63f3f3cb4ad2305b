import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from common import UserError, download, parse_flags
import train_lm
from train_lm import TrainConfig, prepare_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "".join(f"Line {i}: to be, or not to be; that is the question.\n" for i in range(300))
SMALL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--eval_iters=2",
         "--eval_interval=10", "--log_interval=5", "--warmup_iters=3", "--lr_decay_iters=20"]


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data" / "shakespeare"
    d.mkdir(parents=True)
    (d / "input.txt").write_text(TEXT)
    return tmp_path


def run(args, tmp_path, *, torchrun=0, script="train_lm.py"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    flags = [f"--data_dir={tmp_path / 'data'}", f"--cache_dir={tmp_path / 'cache'}",
             *(SMALL if script == "train_lm.py" else ["--eval_iters=2"]), *args]
    cmd = [sys.executable, script, *flags]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "train_lm.py", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def train_losses(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


def test_flags_reject_unknown_key_and_wrong_type():
    @dataclass
    class C:
        n: int = 1
        lr: float = 0.1
        name: str = "a"
        flag: bool = False

    c = parse_flags(C, ["--n=3", "--lr=1e-3", "--name=b", "--flag"])
    assert (c.n, c.lr, c.name, c.flag) == (3, 1e-3, "b", True)
    with pytest.raises(UserError, match="unknown flag --m"):
        parse_flags(C, ["--m=1"])
    with pytest.raises(UserError, match="--n: '1.5' is not int"):
        parse_flags(C, ["--n=1.5"])
    with pytest.raises(UserError, match="not a bool"):
        parse_flags(C, ["--flag=maybe"])
    with pytest.raises(UserError, match="needs a value"):
        parse_flags(C, ["--n"])


def test_script_bad_flag_is_one_line_and_exit_2(tmp_path):
    for bad in (["--no_such_flag=1"], ["--max_iters=ten"], ["--n_head=3"], ["--dataset=wiki"],
                ["--ffn=moe", "--top_k=9"], ["--ffn=unipool", "--pool_size=-1"], ["--layer_windows=0,64"],
                ["--attn_mask=sparse"]):
        r = subprocess.run([sys.executable, "train_lm.py", *bad], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_prepare_data_from_local_copy(data_dir):
    cfg = TrainConfig(data_dir=str(data_dir / "data"), cache_dir=str(data_dir / "cache"), block_size=16)
    data, tok = prepare_data(cfg)
    n = int(0.9 * len(TEXT))
    assert tok.decode(data["train"].tolist()) == TEXT[:n]
    assert tok.decode(data["val"].tolist()) == TEXT[n:]
    assert data["train"].dtype == np.uint16 and tok.vocab_size == len(set(TEXT))
    os.chmod(data_dir / "data" / "shakespeare", 0o555)  # the local copy may be read-only: nothing is written there
    assert os.listdir(data_dir / "data" / "shakespeare") == ["input.txt"]


def test_prepare_data_missing_local_copy(tmp_path):
    cfg = TrainConfig(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="has no shakespeare/input.txt"):
        prepare_data(cfg)


class _Server:
    def __init__(self, payload):
        payload_ = payload

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload_)))
                self.end_headers()
                self.wfile.write(payload_)

            def log_message(self, *a):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/input.txt"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_download_verifies_checksum_and_leaves_nothing_behind(tmp_path):
    good = TEXT.encode()
    sha = hashlib.sha256(good).hexdigest()
    server = _Server(good)
    try:
        dest = tmp_path / "dl" / "input.txt"
        download(server.url, str(dest), sha)
        assert dest.read_bytes() == good
    finally:
        server.close()
    server = _Server(good[:-10] + b"corrupted!")
    try:
        dest2 = tmp_path / "dl2" / "input.txt"
        with pytest.raises(UserError, match="sha256"):
            download(server.url, str(dest2), sha)
        assert os.listdir(dest2.parent) == []  # no partial or corrupt file left behind
    finally:
        server.close()
    with pytest.raises(UserError, match="could not download"):
        download("http://127.0.0.1:9/nothing", str(tmp_path / "dl3" / "x"), sha)


def test_resume_reproduces_uninterrupted_run(data_dir):
    full, part = data_dir / "full", data_dir / "part"
    r = run([f"--out_dir={full}", "--max_iters=20"], data_dir)
    assert r.returncode == 0, r.stderr
    r = run([f"--out_dir={part}", "--max_iters=10"], data_dir)
    assert r.returncode == 0, r.stderr
    r = run([f"--out_dir={part}", "--max_iters=20", "--resume"], data_dir)
    assert r.returncode == 0, r.stderr
    a, b = train_losses(full), train_losses(part)
    assert [k for k in b if k > 10 and k in a] == [15, 20]
    for it in (15, 20):
        assert a[it] == b[it], (it, a[it], b[it])
    # a checkpoint from another model shape is refused with a clear message
    r = run([f"--out_dir={part}", "--max_iters=30", "--resume", "--n_embd=64"], data_dir)
    assert r.returncode == 2 and "another config" in r.stderr and "n_embd" in r.stderr


def test_resume_refuses_to_change_the_learning_rate_schedule(data_dir):
    part = data_dir / "part"
    r = run([f"--out_dir={part}", "--max_iters=10", "--lr_decay_iters=0"], data_dir)  # the cosine ends at max_iters
    assert r.returncode == 0, r.stderr
    # a longer max_iters would re-stretch the cosine, so the learning rate of resumed iterations would jump
    r = run([f"--out_dir={part}", "--max_iters=20", "--lr_decay_iters=0", "--resume"], data_dir)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--lr_decay_iters=10" in r.stderr, r.stderr
    # the fix the message names: the same schedule, trained past its end at min_lr
    r = run([f"--out_dir={part}", "--max_iters=20", "--lr_decay_iters=10", "--resume"], data_dir)
    assert r.returncode == 0, r.stderr
    lrs = {json.loads(l)["iter"]: json.loads(l)["lr"] for l in open(part / "metrics.jsonl") if '"lr"' in l}
    assert lrs[15] == lrs[20] == TrainConfig().min_lr


def test_short_run_caps_warmup_so_the_peak_is_reached(data_dir):
    out = data_dir / "short"
    r = run([f"--out_dir={out}", "--max_iters=20", "--lr_decay_iters=0", "--warmup_iters=100", "--log_interval=1"],
            data_dir)
    assert r.returncode == 0, r.stderr
    assert "warm-up capped at 2 iterations" in r.stdout
    lrs = [json.loads(l)["lr"] for l in open(out / "metrics.jsonl") if '"lr"' in l]
    lr, min_lr = TrainConfig().lr, TrainConfig().min_lr
    assert lrs[:3] == pytest.approx([lr / 3, 2 * lr / 3, lr])   # get_lr's warm-up: lr * (it + 1) / (warmup + 1)
    assert lrs[-1] < lrs[3] and min(lrs) > min_lr             # then the cosine, down towards min_lr


def test_progress_line_times_training_steps_apart_from_evaluation(data_dir, monkeypatch, capsys, request):
    real = train_lm.estimate_loss

    def slow_evaluation(*args, **kw):   # an evaluation that takes 2 s, far longer than a step of this model
        time.sleep(2.0)
        return real(*args, **kw)

    monkeypatch.setattr(train_lm, "estimate_loss", slow_evaluation)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the other runs here: a 2-thread step of a tiny model stalls on a busy machine
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    cfg = TrainConfig(data_dir=str(data_dir / "data"), cache_dir=str(data_dir / "cache"), out_dir=str(data_dir / "p"),
                      n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=1, max_iters=6,
                      eval_interval=3, log_interval=1, warmup_iters=1)
    train_lm.train(cfg)
    first = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("iter 1 "))
    ms_per_iter = float(re.search(r"([\d.]+) ms/iter", first).group(1))
    m, s = re.search(r"ETA (\d+)m(\d+)s", first).groups()
    assert ms_per_iter < 1000, first         # the 2 s evaluation before the first step is not a step
    assert int(m) * 60 + int(s) >= 4, first  # 2 evaluations left (iters 3 and 6) of >= 2 s each, plus 5 steps
    summary = json.load(open(data_dir / "p" / "summary.json"))
    assert summary["eval_seconds"] >= 6 and summary["train_seconds"] < summary["wall_seconds"] - 6


def test_two_process_ddp_matches_grad_accumulation(data_dir):
    one, two = data_dir / "one", data_dir / "two"
    r = run([f"--out_dir={one}", "--max_iters=10", "--grad_accum=2"], data_dir)
    assert r.returncode == 0, r.stderr
    r = run([f"--out_dir={two}", "--max_iters=10", "--grad_accum=1"], data_dir, torchrun=2)
    assert r.returncode == 0, r.stderr
    s1 = json.load(open(one / "summary.json"))
    s2 = json.load(open(two / "summary.json"))
    # the same data and the same averaged gradient; only float summation order differs
    assert abs(s1["final_val_loss"] - s2["final_val_loss"]) < 1e-4
    assert s2["world_size"] == 2


def test_ideas_combine_in_one_run(data_dir):
    """UniPool FFNs, SA-Softmax scores and the SepLLM mask together; then the eval modes on the checkpoint."""
    out = data_dir / "combo"
    r = run([f"--out_dir={out}", "--max_iters=10", "--ffn=unipool", "--n_experts=2", "--top_k=2", "--attn_score=sa",
             "--attn_mask=sepllm", "--n_init=2", "--n_local=4"], data_dir)
    assert r.returncode == 0, r.stderr
    assert "in experts" in r.stdout and "active per token" in r.stdout
    for mode in (["--probe_router=all"], ["--eval_mask=streaming", "--n_local=4"],
                 ["--stream=sepcache", "--n_init=2", "--sep_size=4", "--n_local=8", "--cache_capacity=20",
                  "--stream_tokens=60"], ["--sample", "--max_new_tokens=20"]):
        r = run([f"--out_dir={out}", *mode], data_dir, script="eval_lm.py")
        assert r.returncode == 0, (mode, r.stderr)
        assert r.stdout.strip(), mode
    for bad in (["--probe_router=7"], ["--eval_mask=streaming", "--layer_windows=1,2"], ["--stream=disk"], []):
        r = run([f"--out_dir={out}", *bad], data_dir, script="eval_lm.py")
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, (bad, r.stderr)


def test_sparse_window_must_be_positive_and_smaller_than_the_context(data_dir):
    """--n_local=0 once trained full attention silently; a window covering the context is full attention too."""
    for bad, says in ((["--attn_mask=sepllm", "--n_local=0"], "--n_local=0"),
                      (["--attn_mask=streaming", "--n_local=0"], "--n_local=0"),
                      (["--attn_mask=sepllm", "--n_local=16"], "--block_size="),    # SMALL has block_size=16
                      (["--attn_mask=fixed", "--layer_windows=0,20", "--n_layer=2"], "--block_size="),
                      (["--attn_mask=sepllm", "--layer_windows=0,0", "--n_layer=2"], "--attn_mask=full")):
        r = run([f"--out_dir={data_dir / 'bad'}", *bad], data_dir)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, (bad, r.stderr)
    out = data_dir / "ok"
    r = run([f"--out_dir={out}", "--max_iters=1", "--eval_interval=1"], data_dir)
    assert r.returncode == 0, r.stderr
    for bad in (["--eval_mask=sepllm", "--n_local=0"], ["--eval_mask=streaming", "--n_local=16"],
                ["--stream=sepcache", "--n_local=0", "--sep_size=2", "--cache_capacity=10"]):
        r = run([f"--out_dir={out}", *bad], data_dir, script="eval_lm.py")
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (bad, r.stderr)


def test_kept_fraction_printed_and_stored(data_dir):
    """The kept share of causal pairs, against a count written out over the first evaluation batch."""
    out = data_dir / "sep"
    r = run([f"--out_dir={out}", "--max_iters=1", "--eval_interval=1", "--attn_mask=sepllm", "--n_init=2",
             "--n_local=3"], data_dir)
    assert r.returncode == 0, r.stderr
    got = json.load(open(out / "summary.json"))["kept_fraction"]
    assert f"kept fraction {got:.3f}" in r.stdout
    cfg = TrainConfig(data_dir=str(data_dir / "data"), cache_dir=str(data_dir / "cache"), block_size=16,
                      batch_size=4)
    data, tok = prepare_data(cfg)
    from train_lm import get_batch
    x = get_batch(data["val"], 4, 16, torch.Generator().manual_seed(cfg.seed + 1))[0]
    sep = {tok.stoi[c] for c in ".,?!;:\n \t" if c in tok.stoi}
    kept = sum(j <= i and (j < 2 or int(x[b, j]) in sep or i - j < 3)
               for b in range(4) for i in range(16) for j in range(16))
    assert got == pytest.approx(kept / (4 * 16 * 17 / 2), rel=1e-9)
    assert 0.2 < got < 0.9
    r = run([f"--out_dir={data_dir / 'full'}", "--max_iters=1", "--eval_interval=1"], data_dir)
    assert json.load(open(data_dir / "full" / "summary.json"))["kept_fraction"] == 1.0


def test_init_from_starts_from_the_weights_with_a_fresh_schedule(data_dir):
    """Post-training: the new run's first evaluation (before any step) equals the training-free evaluation of
    the source checkpoint under the same mask; its schedule restarts at warm-up; another shape is refused."""
    src, post = data_dir / "src", data_dir / "post"
    r = run([f"--out_dir={src}", "--max_iters=10"], data_dir)
    assert r.returncode == 0, r.stderr
    sparse = ["--n_init=2", "--n_local=4"]
    r = run([f"--out_dir={src}", "--eval_mask=sepllm", *sparse], data_dir, script="eval_lm.py")
    assert r.returncode == 0, r.stderr
    free = float(r.stdout.split("val loss ")[1].split(",")[0])
    r = run([f"--out_dir={post}", f"--init_from={src / 'ckpt_best.pt'}", "--attn_mask=sepllm", *sparse,
             "--max_iters=5", "--log_interval=1"], data_dir)
    assert r.returncode == 0, r.stderr
    first = float(r.stdout.split("eval iter 0: ")[1].split("val loss ")[1].split()[0].rstrip(","))
    assert first == pytest.approx(free, abs=1e-4)
    fresh = [json.loads(l) for l in open(post / "metrics.jsonl") if '"lr"' in l]
    assert fresh[0]["iter"] == 1 and fresh[0]["lr"] == pytest.approx(1e-3 * 1 / 4)   # warm-up step 0 of 3
    # the untrained model of the same seed starts elsewhere
    r = run([f"--out_dir={data_dir / 'scratch'}", "--attn_mask=sepllm", *sparse, "--max_iters=1"], data_dir)
    assert float(r.stdout.split("eval iter 0: ")[1].split("val loss ")[1].split()[0].rstrip(",")) > first + 0.2
    r = run([f"--out_dir={data_dir / 'x'}", f"--init_from={src / 'ckpt_best.pt'}", "--n_embd=64"], data_dir)
    assert r.returncode == 2 and "n_embd" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = run([f"--out_dir={post}", f"--init_from={src / 'ckpt_best.pt'}", "--resume"], data_dir)
    assert r.returncode == 2 and "pick one" in r.stderr


def test_recall_episodes_answers_and_accuracy_against_a_loop():
    from recall import RecallData, answer_accuracy
    P, Q, K, V = 5, 3, 7, 6
    data = RecallData(P, Q, K, V, seed=3, n_fixed=50)
    x, y = data.batch(40, torch.Generator().manual_seed(0))
    e = torch.cat([x, y[:, -1:]], 1)
    chars = data.chars
    d = data.answer_distance(x)
    for b in range(40):
        text = "".join(chars[t] for t in e[b].tolist())
        segs, queries = text[:3 * P], text[3 * P:]
        assert all(segs[3 * i + 2] == "." and segs[3 * i].isupper() and segs[3 * i + 1].islower() for i in range(P))
        table = {segs[3 * i]: (segs[3 * i + 1], i) for i in range(P)}
        assert len(table) == P                                           # distinct keys
        asked = [queries[4 * j + 1] for j in range(Q)]
        assert len(set(asked)) == Q
        for j in range(Q):
            assert queries[4 * j] == "#" and queries[4 * j + 3] == "."
            value, seg = table[asked[j]]
            assert queries[4 * j + 2] == value                           # the answer is the segment's value
            pos = 3 * P + 4 * j + 1                                      # the query's key predicts the answer
            assert data.answers()[j] == pos and chars[y[b, pos]] == value
            assert d[b, j] == pos - (3 * seg + 2)                        # back to the segment's separator
    # an oracle's logits score 1, a model that always says "." scores 0
    oracle = torch.nn.functional.one_hot(y, len(chars)).float()
    assert answer_accuracy(oracle, x, y, data)[0].all()
    assert not answer_accuracy(torch.zeros_like(oracle), x, y, data)[0].any()
    # answers-only targets, and a fixed validation set that does not depend on anything else
    xa, ya = RecallData(P, Q, K, V, seed=3, n_fixed=50, answers_only=True).batch(40,
                                                                               torch.Generator().manual_seed(0))
    assert torch.equal(xa, x) and torch.equal(ya[:, data.answers()], y[:, data.answers()])
    assert (ya >= 0).sum() == 40 * Q


def test_recall_dataset_trains_and_reports_answer_accuracy(tmp_path):
    out = tmp_path / "recall"
    r = run([f"--out_dir={out}", "--dataset=recall", "--block_size=27", "--max_iters=4", "--attn_mask=sepllm",
             "--n_init=1", "--n_local=4"], tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.load(open(out / "summary.json"))
    assert 0 <= s["val_answer_acc"] <= 1 and s["val_answer_acc_by_distance"] and 0 < s["kept_fraction"] < 1
    assert "val answer accuracy" in r.stdout
    for mode, says in ((["--eval_mask=sepllm", "--n_init=1", "--n_local=4"], "kept fraction 0.537"),
                       (["--stream=sepcache", "--n_init=1", "--sep_size=2", "--n_local=4", "--cache_capacity=10",
                         "--stream_tokens=56"], "answer accuracy")):
        r = run([f"--out_dir={out}", *mode], tmp_path, script="eval_lm.py")
        assert r.returncode == 0 and says in r.stdout, (mode, r.stdout, r.stderr)
    r = run([f"--out_dir={out}", "--dataset=recall", "--block_size=64"], tmp_path)
    assert r.returncode == 2 and "--block_size=27" in r.stderr


def test_compile_without_a_cpu_compiler_is_one_clear_error(data_dir, monkeypatch):
    """torch.compile on the CPU builds C++: without a compiler the run stops before training, with the fix."""
    monkeypatch.setattr(train_lm.shutil, "which", lambda name: None)
    cfg = parse_flags(TrainConfig, [f"--data_dir={data_dir / 'data'}", f"--cache_dir={data_dir / 'cache'}",
                                    f"--out_dir={data_dir / 'out'}", "--compile", "--device=cpu", *SMALL])
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler.*without --compile"):
        train_lm.train(cfg)
