import contextlib
import hashlib
import http.server
import json
import math
import os
import re
import signal
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
from lm_common import get_batch, prepare_data, sparse_patterns
from sepllm import SparsePattern
from train_lm import TrainConfig

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
    """The script with the test's data folder and (train_lm.py) the SMALL model; the flags a mode does not read
    are left out, since each would be an error."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    data = [f"--data_dir={tmp_path / 'data'}", f"--cache_dir={tmp_path / 'cache'}"]
    if script == "train_lm.py":
        flags = [*([] if "--dataset=recall" in args else data), *SMALL, *args]
    else:
        reads_data = not any(a.startswith("--sample") for a in args)
        loss_mode = any(a.startswith(("--probe_router", "--eval_mask")) for a in args)
        flags = [*(data if reads_data else []), *(["--eval_iters=2"] if loss_mode else []), *args]
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


def test_prepare_data_missing_local_copy(tmp_path, data_dir):
    """The message says which file it looked for and what to pass; given the shakespeare folder itself (the file
    is there), it names its parent."""
    cfg = TrainConfig(data_dir=str(tmp_path / "none"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=f"looked for {tmp_path / 'none' / 'shakespeare' / 'input.txt'} .*"
                                        "--data_dir=DIR where DIR/shakespeare/input.txt"):
        prepare_data(cfg)
    cfg = TrainConfig(data_dir=str(data_dir / "data" / "shakespeare"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=f"is the shakespeare folder itself; .*--data_dir={data_dir / 'data'}$"):
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
    """Pinned to the CPU: it compares losses bit for bit (GPU kernels may use atomics that reorder sums)."""
    full, part = data_dir / "full", data_dir / "part"
    r = run([f"--out_dir={full}", "--max_iters=20", "--device=cpu"], data_dir)
    assert r.returncode == 0, r.stderr
    r = run([f"--out_dir={part}", "--max_iters=10", "--device=cpu"], data_dir)
    assert r.returncode == 0, r.stderr
    # the run's own settings (SMALL's model, data folders, schedule) come from its checkpoint: only the new length
    r = subprocess.run([sys.executable, "train_lm.py", f"--out_dir={part}", "--max_iters=20", "--resume"], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = train_losses(full), train_losses(part)
    assert [k for k in b if k > 10 and k in a] == [15, 20]
    for it in (15, 20):
        assert a[it] == b[it], (it, a[it], b[it])
    # a setting that would change the run is refused, naming the flag and the run's value
    r = run([f"--out_dir={part}", "--max_iters=30", "--resume", "--n_embd=64"], data_dir)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "drop --n_embd=64 (the run has 32)" in r.stderr
    r = run([f"--out_dir={part}", "--max_iters=30", "--resume", "--weight_decay=0.5"], data_dir)
    assert r.returncode == 2 and "drop --weight_decay=0.5 (the run has 0.1)" in r.stderr, r.stderr


def test_resume_refuses_to_change_the_learning_rate_schedule(data_dir):
    part = data_dir / "part"
    r = run([f"--out_dir={part}", "--max_iters=10", "--lr_decay_iters=0"], data_dir)  # the cosine ends at max_iters
    assert r.returncode == 0, r.stderr
    # a longer max_iters would re-stretch the cosine, so the learning rate of resumed iterations would jump: the
    # message names the run's own --max_iters first (the flag the student set), then how to train on past it
    r = run([f"--out_dir={part}", "--max_iters=20", "--lr_decay_iters=0", "--resume"], data_dir)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "finish the run with its --max_iters=10" in r.stderr and "--max_iters=20 --lr_decay_iters=10" in r.stderr
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
    # pinned to the CPU: on a GPU the first step also compiles the kernels, so its time is not a step's
    cfg = TrainConfig(data_dir=str(data_dir / "data"), cache_dir=str(data_dir / "cache"), out_dir=str(data_dir / "p"),
                      n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=1, max_iters=6,
                      eval_interval=3, log_interval=1, warmup_iters=1, device="cpu")
    train_lm.train(cfg)
    first = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("iter 1 "))
    ms_per_iter = float(re.search(r"([\d.]+) ms/iter", first).group(1))
    m, s = re.search(r"ETA (\d+)m(\d+)s", first).groups()
    assert ms_per_iter < 1000, first         # the 2 s evaluation before the first step is not a step
    assert int(m) * 60 + int(s) >= 4, first  # 2 evaluations left (iters 3 and 6) of >= 2 s each, plus 5 steps
    summary = json.load(open(data_dir / "p" / "summary.json"))
    assert summary["eval_seconds"] >= 6 and summary["train_seconds"] < summary["wall_seconds"] - 6


def test_two_process_ddp_matches_grad_accumulation(data_dir):
    """Pinned to the CPU (gloo): two nccl processes need two GPUs, and the tolerance is fp32's."""
    one, two = data_dir / "one", data_dir / "two"
    r = run([f"--out_dir={one}", "--max_iters=10", "--grad_accum=2", "--device=cpu"], data_dir)
    assert r.returncode == 0, r.stderr
    r = run([f"--out_dir={two}", "--max_iters=10", "--grad_accum=1", "--device=cpu"], data_dir, torchrun=2)
    assert r.returncode == 0, r.stderr
    s1 = json.load(open(one / "summary.json"))
    s2 = json.load(open(two / "summary.json"))
    # the same data and the same averaged gradient; only float summation order differs
    assert abs(s1["final_val_loss"] - s2["final_val_loss"]) < 1e-4
    assert s2["world_size"] == 2


def test_ideas_combine_in_one_run(data_dir):
    """UniPool FFNs, SA-Softmax scores and the SepLLM mask together; then the eval modes on the checkpoint.
    Holds on CUDA too (device auto): it checks that every mode runs, not numbers."""
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
    """--n_local=0 once trained full attention silently; a window covering the context is full attention too.
    Holds on CUDA too: flag checks, and one iteration of a run."""
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
    """The kept share of causal pairs, against a count written out over the first evaluation batch. Holds on CUDA
    too: the share is counted on the CPU batch."""
    out = data_dir / "sep"
    r = run([f"--out_dir={out}", "--max_iters=1", "--eval_interval=1", "--attn_mask=sepllm", "--n_init=2",
             "--n_local=3"], data_dir)
    assert r.returncode == 0, r.stderr
    got = json.load(open(out / "summary.json"))["kept_fraction"]
    assert f"kept fraction {got:.3f}" in r.stdout
    cfg = TrainConfig(data_dir=str(data_dir / "data"), cache_dir=str(data_dir / "cache"), block_size=16,
                      batch_size=4)
    data, tok = prepare_data(cfg)
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
    the source checkpoint under the same mask; its schedule restarts at warm-up; another shape is refused.
    Holds on CUDA too: train_lm.py and eval_lm.py evaluate in the same precision (--dtype=auto) with the same code."""
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
    r = run([f"--out_dir={src}", f"--init_from={src / 'ckpt_best.pt'}", "--resume"], data_dir)
    assert r.returncode == 2 and "pick one" in r.stderr, r.stderr


def test_recall_dataset_trains_and_reports_answer_accuracy(tmp_path):
    """Holds on CUDA too: accuracies are checked for range and agreement with summary.json, not values."""
    out = tmp_path / "recall"
    r = run([f"--out_dir={out}", "--dataset=recall", "--block_size=30", "--max_iters=4", "--attn_mask=sepllm",
             "--n_init=1", "--n_local=4"], tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.load(open(out / "summary.json"))
    assert 0 <= s["val_answer_acc"] <= 1 and s["val_answer_acc_by_distance"] and 0 < s["kept_fraction"] < 1
    by_query = " ".join(f"{a:.3f}" for a in s["val_answer_acc_by_query"])      # per query, on the console too
    assert len(s["val_answer_acc_by_query"]) == 4
    assert f"val answer accuracy {s['val_answer_acc']:.3f} " in r.stdout and f"by query {by_query})" in r.stdout
    for mode, says in ((["--eval_mask=sepllm", "--n_init=1", "--n_local=4"], "kept fraction 0.469"),
                       (["--stream=sepcache", "--n_init=1", "--sep_size=2", "--n_local=4", "--cache_capacity=10",
                         "--stream_tokens=56"], "answer accuracy")):
        r = run([f"--out_dir={out}", *mode], tmp_path, script="eval_lm.py")
        assert r.returncode == 0 and says in r.stdout, (mode, r.stdout, r.stderr)
    r = run([f"--out_dir={tmp_path / 'other'}", "--dataset=recall", "--block_size=64"], tmp_path)
    assert r.returncode == 2 and "--block_size=30" in r.stderr, r.stderr


def test_compile_without_a_cpu_compiler_is_one_clear_error(data_dir, monkeypatch):
    """torch.compile on the CPU builds C++: without a compiler the run stops before training, with the fix."""
    monkeypatch.setattr(train_lm.shutil, "which", lambda name: None)
    cfg = parse_flags(TrainConfig, [f"--data_dir={data_dir / 'data'}", f"--cache_dir={data_dir / 'cache'}",
                                    f"--out_dir={data_dir / 'out'}", "--compile", "--device=cpu", *SMALL])
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler.*without --compile"):
        train_lm.train(cfg)


def test_a_folder_holding_a_run_is_only_replaced_with_overwrite(data_dir):
    """A short run into the folder of a longer one is refused (nothing touched) unless --overwrite, which
    replaces the run's files whole. Holds on CUDA too: files, not numbers."""
    out = data_dir / "run"
    r = run([f"--out_dir={out}", "--max_iters=10"], data_dir)
    assert r.returncode == 0, r.stderr
    before = {f: (out / f).read_bytes() for f in ("ckpt_best.pt", "metrics.jsonl", "summary.json")}
    r = run([f"--out_dir={out}", "--max_iters=2"], data_dir)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "already holds a run" in r.stderr and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert all((out / f).read_bytes() == b for f, b in before.items())
    r = run([f"--out_dir={out}", "--max_iters=2", "--eval_interval=1", "--overwrite"], data_dir)
    assert r.returncode == 0, r.stderr
    assert json.load(open(out / "summary.json"))["iters"] == 2
    assert [json.loads(l)["iter"] for l in open(out / "metrics.jsonl") if "val_loss" in l] == [0, 1, 2]


def test_ctrl_c_is_one_line_and_the_printed_command_resumes_exactly(data_dir):
    """Ctrl-C during training: exit 130, one line naming the resume command, the checkpoint kept; that command
    (no other flag: the settings are the run's) ends where an uninterrupted run ends. Pinned to the CPU: the
    losses are compared bit for bit."""
    flags = ["--max_iters=300", "--eval_interval=20", "--lr_decay_iters=0", "--device=cpu"]
    out = data_dir / "stopped"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "train_lm.py", f"--data_dir={data_dir / 'data'}", f"--cache_dir={data_dir / 'cache'}",
           *SMALL, *flags, f"--out_dir={out}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def evaluated():                           # the iterations evaluated (and saved) so far
        rows = open(out / "metrics.jsonl").readlines() if (out / "metrics.jsonl").exists() else []
        return [json.loads(r)["iter"] for r in rows if "val_loss" in r]

    deadline = time.time() + 120
    while max(evaluated(), default=0) < 40 and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)               # past the checkpoint of iter 20 (written before iter 40's metrics)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, (stdout, stderr)
    hint = f"python train_lm.py --out_dir={out} --resume"
    assert stderr.strip() == f"interrupted: nothing new was saved; continue with: {hint}", stderr
    saved = torch.load(out / "ckpt_last.pt", weights_only=True)["iter"]
    assert 20 <= saved < 300
    python, *args = hint.split()                # the printed command, run by this interpreter (python may be another)
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"resuming from {out}/ckpt_last.pt at iter {saved}" in r.stdout, r.stderr
    r = run([f"--out_dir={data_dir / 'whole'}", *flags], data_dir)
    assert r.returncode == 0, r.stderr
    a, b = (json.load(open(d / "summary.json")) for d in (out, data_dir / "whole"))
    assert a["final_val_loss"] == b["final_val_loss"] and a["iters"] == 300


def test_flags_without_effect_are_one_clear_error(data_dir):
    """A flag the chosen mode never reads is refused, naming the flag that makes it count. Flag checks only."""
    for bad, says in ((["--pool_size=16"], "--pool_size=16 has no effect with these flags: it counts only with "
                                          "--ffn=unipool (not --ffn=dense)"),
                      (["--ffn=moe", "--pool_groups=2"], "--ffn=unipool (not --ffn=moe)"),
                      (["--ffn=unipool", "--pool_size=16", "--n_experts=4"], "--ffn=unipool without --pool_size"),
                      (["--top_k=2"], "--ffn=moe or --ffn=unipool"),
                      (["--ffn=moe", "--aux_loss=none", "--aux_coef=0.1"], "an --aux_loss other than none"),
                      (["--n_local=8"], "--attn_mask=sepllm, streaming or fixed (not --attn_mask=full)"),
                      (["--layer_windows=0,8"], "--attn_mask=sepllm"),
                      (["--recall_pairs=5"], "--dataset=recall (not --dataset=shakespeare_char)"),
                      (["--recall_targets=answers"], "--dataset=recall"),
                      (["--kernels=torch"], "a sparse --attn_mask or --ffn=moe"),
                      (["--init_from=x.pt", "--init_std=0.01"], "a fresh model")):
        r = run([f"--out_dir={data_dir / 'bad'}", *bad], data_dir)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, (bad, r.stderr)
    r = subprocess.run([sys.executable, "train_lm.py", "--dataset=recall", "--block_size=30", "--data_dir=x"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--data_dir=x has no effect" in r.stderr and "recall is generated" in r.stderr
    for bad, says in ((["--sample", "--eval_iters=5"], "--eval_iters=5 has no effect with these flags: it counts "
                                                       "only with --probe_router or --eval_mask"),
                      (["--eval_mask=full", "--n_local=8"], "--eval_mask=sepllm, streaming or fixed"),
                      (["--stream=sink", "--n_local=8"], "--stream=sepcache"),
                      (["--stream=full", "--cache_capacity=100"], "--stream=sepcache or sink"),
                      (["--stream=full", "--cache_positions=stream"], "--stream=sepcache or sink"),
                      (["--stream=sink", "--cache_positions=abs"], "must be one of cache, stream"),
                      (["--probe_router=all", "--temperature=0.5"], "only with --sample"),
                      (["--eval_mask=sepllm", "--seed=1"], "--sample or --probe_router"),
                      (["--sample", "--data_dir=x"], "--probe_router, --eval_mask or --stream"),
                      (["--eval_mask=sepllm", "--overwrite"], "--out_json")):
        r = subprocess.run([sys.executable, "eval_lm.py", f"--out_dir={data_dir / 'none'}", *bad], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, (bad, r.stderr)


def test_eval_lm_refuses_to_replace_a_result_without_overwrite(data_dir):
    out, result = data_dir / "run", data_dir / "result.json"
    r = run([f"--out_dir={out}", "--max_iters=1", "--eval_interval=1"], data_dir)
    assert r.returncode == 0, r.stderr
    result.write_text("{}")
    r = run([f"--out_dir={out}", "--eval_mask=streaming", "--n_local=4", f"--out_json={result}"], data_dir,
            script="eval_lm.py")
    assert r.returncode == 2 and "exists: replace it with --overwrite" in r.stderr and result.read_text() == "{}"
    r = run([f"--out_dir={out}", "--eval_mask=streaming", "--n_local=4", f"--out_json={result}", "--overwrite"],
            data_dir, script="eval_lm.py")
    assert r.returncode == 0 and json.load(open(result))["kept_fraction"] < 1, r.stderr


def test_runs_and_default_out_dirs_are_git_ignored():
    from train_rec import RecConfig
    for path in ("runs/unipool/x/ckpt_last.pt", f"{TrainConfig().out_dir}/ckpt_best.pt",
                 f"{RecConfig().out_dir}/summary.json"):
        r = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert r.returncode == 0, path


def test_layers_with_the_same_window_share_one_sparse_pattern():
    """One SparsePattern object per distinct window (a per-batch plan cached on it serves all its layers),
    each equal to sepllm.py's rule for its window; 0 = full attention."""
    cfg = TrainConfig(n_layer=4, n_init=2, layer_windows="0,4,4,8", block_size=16)
    x = torch.randint(0, 20, (3, 16), generator=torch.Generator().manual_seed(0))
    p = sparse_patterns(cfg, "sepllm", x, [3, 5])
    assert p[0] is None and p[1] is p[2] and p[3] is not p[1]
    assert all(isinstance(q, SparsePattern) for q in p[1:])
    assert (p[1].n_init, p[1].n_local, p[3].n_local) == (2, 4, 8)
    assert torch.equal(p[1].keep, (x == 3) | (x == 5))
    q = sparse_patterns(TrainConfig(n_layer=3, n_local=5), "streaming", x, [3])
    assert q[0] is q[1] is q[2] and not q[0].keep.any()
    assert sparse_patterns(cfg, "full", x, [3]) is None


def test_first_line_names_the_precision_and_the_cpu_refuses_half_precision(data_dir):
    r = run([f"--out_dir={data_dir / 'a'}", "--max_iters=1", "--eval_interval=1", "--device=cpu"], data_dir)
    assert r.returncode == 0 and "| device cpu x1 | float32 |" in r.stdout.splitlines()[0], r.stdout
    for dtype in ("float16", "bfloat16"):
        r = run([f"--out_dir={data_dir / 'b'}", "--device=cpu", f"--dtype={dtype}"], data_dir)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"--dtype={dtype} needs a CUDA GPU; on cpu use --dtype=float32 (or auto" in r.stderr
    r = run([f"--out_dir={data_dir / 'b'}", "--device=cpu", "--dtype=float8"], data_dir)
    assert r.returncode == 2 and "--dtype=float8 must be one of auto, bfloat16, float16, float32" in r.stderr
    r = subprocess.run([sys.executable, "train_lm.py", f"--data_dir={data_dir / 'data'}", f"--out_dir={data_dir / 'c'}",
                        f"--cache_dir={data_dir / 'cache'}", *SMALL, "--device=cpu", "--ffn=moe", "--kernels=triton"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--kernels=triton needs a CUDA device" in r.stderr and "--kernels=auto" in r.stderr


def test_gradient_scaler_step_equals_the_unscaled_step():
    """train_step with a gradient scaler: the loss is scaled by 2^16 before backward and the gradients unscaled
    before clipping, so (power-of-two scaling being exact) the step equals the plain one bit for bit, clipping
    included. Runs on the CPU in float32 (the scaler's arithmetic is the same as under float16 autocast)."""
    cfg = TrainConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, grad_accum=2, grad_clip=0.05)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 30, (8, 16), generator=gen), torch.randint(0, 30, (8, 16), generator=gen)
    params = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = train_lm.build_model(cfg, 30)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", enabled=enabled)
        for _ in range(2):
            train_lm.train_step(model, [], opt, scaler, x, y, cfg, contextlib.nullcontext(), lambda x: None)
        assert scaler.get_scale() == (65536.0 if enabled else 1.0)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(params[0], params[1])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", ["auto", "float16", "float32", "bfloat16"])
def test_cuda_run_in_each_precision_ends_with_a_finite_loss(data_dir, dtype):
    """On a GPU: each --dtype trains (float16 through the gradient scaler) to a finite loss below the start,
    with the sparse-attention and MoE kernels in the model; the first line names the precision."""
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bfloat16")
    out = data_dir / dtype
    r = run([f"--out_dir={out}", "--max_iters=20", "--device=cuda", f"--dtype={dtype}", "--ffn=unipool",
             "--n_experts=2", "--attn_mask=sepllm", "--n_init=2", "--n_local=4"], data_dir)
    assert r.returncode == 0, r.stderr
    s = json.load(open(out / "summary.json"))
    assert math.isfinite(s["final_val_loss"]) and s["final_val_loss"] < json.loads(open(out / "metrics.jsonl")
                                                                                     .readline())["val_loss"]
    want = {"auto": "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"}
    assert f"| {want.get(dtype, dtype)}" in r.stdout.splitlines()[0] and s["dtype"] == want.get(dtype, dtype)


@pytest.mark.cuda
@cuda
def test_cuda_float16_resume_restores_the_gradient_scaler(data_dir):
    """A float16 run saves its loss scale; --resume restores it and trains on to a finite loss."""
    out = data_dir / "fp16"
    r = run([f"--out_dir={out}", "--max_iters=10", "--device=cuda", "--dtype=float16"], data_dir)
    assert r.returncode == 0, r.stderr
    scale = torch.load(out / "ckpt_last.pt", weights_only=True)["scaler"]["scale"]
    assert scale > 0
    r = run([f"--out_dir={out}", "--max_iters=20", "--resume"], data_dir)
    assert r.returncode == 0 and "float16 autocast + gradient scaler" in r.stdout, r.stderr
    assert math.isfinite(json.load(open(out / "summary.json"))["final_val_loss"])
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["scaler"]["scale"] > 0


@pytest.mark.cuda
@cuda
def test_cuda_eval_lm_runs_each_mode_in_the_run_precision(data_dir):
    out = data_dir / "gpu"
    r = run([f"--out_dir={out}", "--max_iters=10", "--device=cuda"], data_dir)
    assert r.returncode == 0, r.stderr
    for mode in (["--eval_mask=sepllm", "--n_local=4"], ["--sample", "--max_new_tokens=20"],
                 ["--stream=sepcache", "--n_init=2", "--sep_size=4", "--n_local=8", "--cache_capacity=20",
                  "--stream_tokens=60"], ["--eval_mask=sepllm", "--n_local=4", "--dtype=float16"]):
        r = run([f"--out_dir={out}", "--device=cuda", *mode], data_dir, script="eval_lm.py")
        assert r.returncode == 0 and r.stdout.strip(), (mode, r.stderr)


class RecordGradients:
    """An optimizer for train_step that keeps the gradients it is given instead of stepping."""

    def __init__(self, model):
        self.model, self.grads, self.param_groups = model, [], []

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters()})

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch():
    """The gradients train_step hands the optimizer (clipping off): grad_accum=2 of 4 rows equals grad_accum=1 of
    the same 8 rows, and both equal the gradient of the mean loss over the 8 rows computed here in one pass. AdamW
    and clipping would hide a wrong scale of the micro-batch losses; the gradients themselves do not."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 30, (8, 16), generator=gen), torch.randint(0, 30, (8, 16), generator=gen)
    grads = []
    for batch_size, grad_accum in ((8, 1), (4, 2)):
        cfg = TrainConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=batch_size, grad_accum=grad_accum,
                          grad_clip=0.0)
        torch.manual_seed(0)
        model = train_lm.build_model(cfg, 30)
        opt = RecordGradients(model)
        loss, _, _ = train_lm.train_step(model, [], opt, torch.amp.GradScaler("cpu", enabled=False), x, y, cfg,
                                         contextlib.nullcontext(), lambda x: None)
        grads.append(opt.grads[0])
        assert all(p.grad is None for p in model.parameters())          # zeroed for the next step
        model.zero_grad()
        out = model(x, y)                                                # the whole batch at once
        out.loss.backward()
        assert float(loss) == pytest.approx(out.loss.item(), rel=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[-1][n], p.grad, rtol=1e-4, atol=1e-7, msg=f"{grad_accum}: {n}")
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)
