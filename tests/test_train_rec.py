import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "toy"
    folder.mkdir(parents=True)
    items = [rng.choice(60, 30, replace=False) for _ in range(40)]     # 25 train, 5 test items per user, disjoint
    for name, part in (("train.txt", slice(0, 25)), ("test.txt", slice(25, 30))):
        lines = [" ".join(map(str, [u, *sorted(items[u][part])])) for u in range(40)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return tmp_path


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def command(tmp_path, *args):
    """train_rec.py on the toy data, on the CPU (the same numbers on a CUDA machine). A 2-layer LightGCN where
    --n_layers counts (a plain run; the pipelines and MF refuse it)."""
    layers = [] if any(a.startswith(("--method=", "--model=mf")) for a in args) else ["--n_layers=2"]
    return [sys.executable, "train_rec.py", f"--data_dir={tmp_path / 'data'}", "--dataset=ml-1m", "--dim=8", *layers,
            "--batch_size=128", "--eval_every=2", "--lr=5e-3", "--device=cpu", *args]


def run(tmp_path, *args):
    return subprocess.run(command(tmp_path, *args), cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)


def losses(out_dir):
    return [json.loads(l)["loss"] for l in open(os.path.join(out_dir, "metrics.jsonl"))]


def test_resume_continues_exactly(data_dir):
    (data_dir / "data" / "ml-1m").symlink_to(data_dir / "data" / "toy")
    full, part = data_dir / "full", data_dir / "part"
    r = run(data_dir, f"--out_dir={full}", "--epochs=8")
    assert r.returncode == 0, r.stderr
    r = run(data_dir, f"--out_dir={part}", "--epochs=4")
    assert r.returncode == 0, r.stderr
    r = run(data_dir, f"--out_dir={part}", "--epochs=8", "--resume")
    assert r.returncode == 0, r.stderr
    assert losses(full) == losses(part) and len(losses(full)) == 8
    a, b = (json.load(open(d / "summary.json")) for d in (full, part))
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]
    r = run(data_dir, f"--out_dir={part}", "--epochs=10", "--resume", "--dim=16")
    assert r.returncode == 2 and "another config" in r.stderr


def test_bad_flags_and_missing_data_are_one_line_errors(tmp_path):
    for args in (["--epochs=many"], ["--no_such=1"], ["--dataset=netflix"], ["--combine=max"],
                 [f"--data_dir={tmp_path}", "--dataset=gowalla"]):
        r = subprocess.run([sys.executable, "train_rec.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_lightgnn_pipeline_reports_every_round(data_dir):
    (data_dir / "data" / "ml-1m").symlink_to(data_dir / "data" / "toy")
    out = data_dir / "lg"
    r = run(data_dir, f"--out_dir={out}", "--method=lightgnn", "--epochs=2", "--mid_epochs=2", "--round_epochs=2",
            "--rounds=2", "--teacher_layers=3", "--mid_layers=2", "--mid_topk=3")
    assert r.returncode == 0, r.stderr
    rows = json.load(open(out / "summary.json"))["rounds"]
    assert [x["model"] for x in rows] == ["teacher", "intermediate", "student round 0", "student round 1",
                                          "student round 2"]
    E = 40 * 25 - 40 * int(0.1 * 25)                                  # training edges after the validation split
    kept1 = E - int(0.15 * E)
    assert rows[3]["edges_kept"] == pytest.approx(kept1 / E)
    assert rows[4]["edges_kept"] == pytest.approx((kept1 - int(0.15 * kept1)) / E)
    assert rows[4]["entries_kept"] < rows[3]["entries_kept"] < 1 and rows[4]["cost"] < rows[2]["cost"] < 1
    # the saved teacher is reused, not retrained
    r = run(data_dir, f"--out_dir={data_dir / 'lg2'}", "--method=lightgnn", f"--teacher={out}/teacher/ckpt_best.pt",
            "--mid_epochs=2", "--round_epochs=2", "--rounds=0", "--mid_layers=2", "--mid_topk=3")
    assert r.returncode == 0, r.stderr
    assert json.load(open(data_dir / "lg2" / "summary.json"))["rounds"][0] == rows[0]


def test_unlearnrec_pipeline_and_its_errors(data_dir):
    (data_dir / "data" / "ml-1m").symlink_to(data_dir / "data" / "toy")
    base = data_dir / "base"
    assert run(data_dir, f"--out_dir={base}", "--epochs=2").returncode == 0
    out = data_dir / "ul"
    r = run(data_dir, f"--out_dir={out}", "--method=unlearnrec", f"--base={base}/ckpt_best.pt", "--forget=0.1",
            "--epochs=2", "--pre_epochs=2", "--redraw_every=1", "--finetune_epochs=1")
    assert r.returncode == 0, r.stderr
    s = json.load(open(out / "summary.json"))
    assert s["steps"][0]["requests"] == round(0.1 * (40 * 25 - 40 * 2))
    rows = {r["model"]: r for r in s["steps"][0]["rows"]}
    # --finetune_epochs=1: each method also after 0 steps and 1 step (snapshots of the same fine-tuning)
    assert list(rows) == ["base", "unlearnrec @ 0 steps", "unlearnrec @ 1 step", "unlearnrec",
                          "fine-tune-only @ 0 steps", "fine-tune-only @ 1 step", "fine-tune-only", "retrained"]
    assert 0 <= rows["unlearnrec"]["mia_auc"] <= 1 and s["times"]["speedup_amortised"] > 0
    assert rows["fine-tune-only @ 0 steps"]["seconds"] == 0 and 0 < rows["unlearnrec @ 1 step"]["seconds"]
    with np.load(out / "scores.npz") as z:                                           # the samples plot.py draws
        assert sorted(z) == sorted(f"1/{m}/{k}" for m in rows for k in ("forgotten", "held_out", "negatives"))
        assert len(z["1/base/forgotten"]) == s["steps"][0]["requests"] and "scores" not in rows["base"]
    r = run(data_dir, f"--out_dir={data_dir / 'adv'}", "--method=unlearnrec", f"--base={base}/ckpt_best.pt",
            "--forget=adversarial", "--epochs=2", "--pre_epochs=1", "--finetune_epochs=1")
    assert r.returncode == 0, r.stderr
    s = json.load(open(data_dir / "adv" / "summary.json"))
    assert s["steps"][0]["requests"] == 40 // 2                                     # one edge, half the users
    rows = {r["model"]: r for r in s["steps"][0]["rows"]}
    # removing the injected edges gives back the clean data: the "retrained" model is the clean base itself
    assert not os.path.exists(data_dir / "adv" / "retrained1")
    clean = json.load(open(base / "summary.json"))
    assert rows["retrained"]["test"] == clean["test"]
    item = (data_dir / "data" / "toy" / "train.txt").read_text().split()[1]     # a training item of user 0
    (data_dir / "bad.txt").write_text(f"0 {item}\n99 1\n")
    for args, msg in (([f"--forget={data_dir / 'bad.txt'}"], "bad.txt:2: unknown user 99"),
                      (["--forget=adversarial", f"--encoder={out}/encoder_pretrained.pt"], "another config"),
                      (["--forget=1.5"], "must be in (0, 1)"),
                      (["--forget=0.1", "--snapshots_per_epoch=0"], "--snapshots_per_epoch=0 must be >= 1"),
                      (["--forget=adversarial", "--sequence=2"], "needs --forget=<fraction>"),
                      ([], "needs --base")):
        r = run(data_dir, f"--out_dir={out}", "--method=unlearnrec", *([f"--base={base}/ckpt_best.pt"] if args else []),
                *args)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_unlearnrec_saved_model_is_the_encoders_output(data_dir):
    """unlearned.pt holds what the saved encoder gives, propagated over the remaining graph; summary scores match."""
    import torch
    sys.path.insert(0, ROOT)
    from lightgcn import Graph, LightGCN, load_lightgcn_dir
    from unlearnrec import InfluenceEncoder, remove_edges, request_adjacency
    (data_dir / "data" / "ml-1m").symlink_to(data_dir / "data" / "toy")
    base = data_dir / "base"
    assert run(data_dir, f"--out_dir={base}", "--epochs=4", "--lr=0.05").returncode == 0
    out = data_dir / "ul"
    r = run(data_dir, f"--out_dir={out}", "--method=unlearnrec", f"--base={base}/ckpt_best.pt", "--forget=0.05",
            "--pre_epochs=1", "--finetune_epochs=2", "--retrain=false", "--lr=0.05", "--epochs=4")
    assert r.returncode == 0, r.stderr
    s = json.load(open(out / "summary.json"))
    saved = torch.load(out / "unlearned.pt", weights_only=True)
    data = load_lightgcn_dir(str(data_dir / "data" / "toy"), 0.1, 2020)
    model = LightGCN(data.n_users, data.n_items, 8, 2)
    model.load_state_dict(torch.load(base / "ckpt_best.pt", weights_only=True)["model"])
    req = saved["requests"].numpy()
    A_delta = request_adjacency(req, data.n_users, data.n_items)
    A_r = Graph(data.n_users, data.n_items, remove_edges(data.train, req)).normalized()
    with torch.no_grad():
        E_L = model.propagate(Graph(data.n_users, data.n_items, data.train).normalized())
        enc = InfluenceEncoder(data.n_users + data.n_items, 8, 3)
        enc.load_state_dict(saved["encoder"])
        E_user, E_item = model.propagate(A_r, enc(A_delta, model.E0, E_L)).split([data.n_users, data.n_items])
        torch.testing.assert_close((E_user, E_item), (saved["E_user"], saved["E_item"]))
        rows = {r["model"]: r for r in s["steps"][0]["rows"]}
        assert [m for m in rows if " @ " not in m] == ["base", "unlearnrec", "fine-tune-only"]
        forgotten = (E_user[req[:, 0]] * E_item[req[:, 1]]).sum(-1).mean().item()
        assert rows["unlearnrec"]["forgotten"]["mean"] == pytest.approx(forgotten, rel=1e-5)
        # an encoder reset to the identity (zero H0 and η) would have given the base's scores on Â_r instead
        Z_user, Z_item = model.propagate(A_r).split([data.n_users, data.n_items])
        assert abs((Z_user[req[:, 0]] * Z_item[req[:, 1]]).sum(-1).mean().item() - forgotten) > 0.05


def test_mf_base_is_lightgcn_without_propagation_and_can_be_unlearned(data_dir):
    import torch
    sys.path.insert(0, ROOT)
    from lightgcn import evaluate, load_lightgcn_dir
    (data_dir / "data" / "ml-1m").symlink_to(data_dir / "data" / "toy")
    mf = data_dir / "mf"
    assert run(data_dir, f"--out_dir={mf}", "--model=mf", "--epochs=2").returncode == 0
    s = json.load(open(mf / "summary.json"))
    assert s["config"]["model"] == "mf" and s["config"]["n_layers"] == 0
    # scores are plain dot products of the layer-0 embeddings
    data = load_lightgcn_dir(str(data_dir / "data" / "toy"), 0.1, 2020)
    E0 = torch.load(mf / "ckpt_best.pt", weights_only=True)["model"]["E0"]
    E_user, E_item = E0.split([data.n_users, data.n_items])
    assert s["test"] == evaluate(E_user, E_item, data.test, [data.train, data.val])
    r = run(data_dir, f"--out_dir={data_dir / 'ulmf'}", "--method=unlearnrec", f"--base={mf}/ckpt_best.pt",
            "--forget=0.05", "--pre_epochs=1", "--finetune_epochs=1", "--enc_layers=2")
    assert r.returncode == 0, r.stderr
    rows = json.load(open(data_dir / "ulmf" / "summary.json"))["steps"][0]["rows"]
    assert [x["model"] for x in rows if " @ " not in x["model"]] == ["base", "unlearnrec", "fine-tune-only",
                                                                      "retrained"]
    # the retraining is an MF model too
    assert torch.load(data_dir / "ulmf" / "retrained1" / "ckpt_best.pt", weights_only=True)["config"]["n_layers"] == 0


def test_no_validation_split_is_one_clear_error(data_dir):
    (data_dir / "data" / "ml-1m").symlink_to(data_dir / "data" / "toy")
    r = run(data_dir, f"--out_dir={data_dir / 'nv'}", "--val_frac=0")
    assert r.returncode == 2 and "no validation interactions" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def one_line_error(r, *fragments):
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)


def test_out_dir_holding_a_run_is_kept_unless_resume_or_overwrite(data_dir):
    (data_dir / "data" / "ml-1m").symlink_to(data_dir / "data" / "toy")
    out = data_dir / "run"
    assert run(data_dir, f"--out_dir={out}", "--epochs=4").returncode == 0
    best = (out / "ckpt_best.pt").read_bytes()
    for args in (["--epochs=2"], ["--method=lightgnn", "--epochs=2", "--rounds=0"]):
        one_line_error(run(data_dir, f"--out_dir={out}", *args), "already holds a run", "--resume", "--overwrite")
    assert (out / "ckpt_best.pt").read_bytes() == best and len(losses(out)) == 4          # nothing touched
    one_line_error(run(data_dir, f"--out_dir={out}", "--resume", "--overwrite"), "pick one")
    one_line_error(run(data_dir, f"--out_dir={out}", "--method=lightgnn", f"--teacher={out}/ckpt_best.pt", "--rounds=0",
                       "--overwrite"), f"--overwrite would delete --teacher={out}/ckpt_best.pt")
    r = run(data_dir, f"--out_dir={out}", "--epochs=2", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert len(losses(out)) == 2 and json.load(open(out / "summary.json"))["epochs_run"] == 2


def test_resume_takes_the_runs_saved_settings(data_dir):
    """--resume with only where the run is and how long it trains continues it on its own flags, exactly."""
    (data_dir / "data" / "ml-1m").symlink_to(data_dir / "data" / "toy")
    full, part = data_dir / "full", data_dir / "part"
    assert run(data_dir, f"--out_dir={full}", "--epochs=6", "--seed=7").returncode == 0
    assert run(data_dir, f"--out_dir={part}", "--epochs=2", "--seed=7").returncode == 0
    r = subprocess.run([sys.executable, "train_rec.py", f"--out_dir={part}", f"--data_dir={data_dir / 'data'}",
                        "--resume", "--epochs=6", "--device=cpu"], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert losses(full) == losses(part) and len(losses(part)) == 6
    r = subprocess.run([sys.executable, "train_rec.py", f"--out_dir={part}", f"--data_dir={data_dir / 'data'}",
                        "--resume", "--lr=0.1"], cwd=ROOT, capture_output=True, text=True, env=ENV)
    one_line_error(r, "drop --lr=0.1 (the run has 0.005)")


def test_ctrl_c_keeps_the_checkpoint_and_says_how_to_resume(data_dir):
    (data_dir / "data" / "ml-1m").symlink_to(data_dir / "data" / "toy")
    out = data_dir / "run"
    every = ["--eval_every=1", "--patience=100000"]
    p = subprocess.Popen(command(data_dir, f"--out_dir={out}", "--epochs=100000", *every), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
    deadline = time.time() + 120
    while not (out / "ckpt_last.pt").exists():
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert err.strip() == f"interrupted: nothing new was saved; continue with: python train_rec.py --out_dir={out} --resume"
    epoch = torch.load(out / "ckpt_last.pt", weights_only=True)["state"]["epoch"]
    r = run(data_dir, f"--out_dir={out}", "--resume", f"--epochs={epoch + 2}", *every)
    assert r.returncode == 0, r.stderr
    assert [json.loads(l)["epoch"] for l in open(out / "metrics.jsonl")] == list(range(1, epoch + 3))


def test_a_flag_without_effect_is_one_error_naming_what_makes_it_count(data_dir):
    (data_dir / "data" / "ml-1m").symlink_to(data_dir / "data" / "toy")
    out = data_dir / "run"
    for args, fix in ((["--forget=0.01"], "--method=unlearnrec"),
                      (["--mid_topk=5"], "--method=lightgnn"),
                      (["--method=lightgnn", "--n_layers=4"], "--method=lightgcn"),
                      (["--method=lightgnn", "--rounds=0", "--rho=0.3"], "--rounds >= 1"),
                      (["--method=lightgnn", "--prune=random", "--beta1=0.1"], "--prune=learned"),
                      (["--model=mf", "--combine=sum"], "--n_layers >= 1"),
                      (["--min_rating=4.0"], "--dataset=ml-latest-small"),
                      (["--cache_dir=/tmp/x"], "no --data_dir"),
                      (["--method=lightgnn", "--resume"], "--method=lightgcn"),
                      (["--method=unlearnrec", "--base=b.pt", "--forget=0.1", "--pre_epochs=0",
                        "--pretrain_control"], "--pre_epochs >= 1"),
                      (["--method=unlearnrec", "--base=b.pt", "--forget=0.1", "--finetune_epochs=0",
                        "--snapshots_per_epoch=4"], "--finetune_epochs >= 1")):
        flag = args[-1].split("=")[0]
        one_line_error(run(data_dir, f"--out_dir={out}", "--epochs=2", *args), f"error: {flag}=", "has no effect", fix)
    assert not out.exists()
    # unlearnrec's model and its retraining are the base run's: another value there would be ignored
    assert run(data_dir, f"--out_dir={data_dir / 'base'}", "--epochs=2").returncode == 0
    one_line_error(run(data_dir, f"--out_dir={out}", "--method=unlearnrec", f"--base={data_dir}/base/ckpt_best.pt",
                       "--forget=0.1", "--dim=16"), "--dim=16 has no effect", "the --base run's dim=8")
    # a data set that brings its own val.txt ignores --val_frac
    (data_dir / "data" / "toy" / "val.txt").write_text("0 " + (data_dir / "data" / "toy" / "train.txt").read_text()
                                                         .split()[1] + "\n")
    one_line_error(run(data_dir, f"--out_dir={out}", "--val_frac=0.2"), "--val_frac=0.2 has no effect", "val.txt")


def test_data_folder_message_says_what_it_looked_for_and_what_to_pass(data_dir):
    toy = data_dir / "data" / "toy"
    r = subprocess.run([sys.executable, "train_rec.py", "--dataset=ml-1m", f"--data_dir={toy}"], cwd=ROOT,
                       capture_output=True, text=True, env=ENV)          # the data set's folder, not its parent
    one_line_error(r, f"looked for {toy}/ml-1m/train.txt", f"--data_dir={data_dir / 'data'}")
    r = subprocess.run([sys.executable, "train_rec.py", f"--data_dir={toy}"], cwd=ROOT, capture_output=True,
                       text=True, env=ENV)
    one_line_error(r, f"looked for {toy}/ml-latest-small/ml-latest-small.zip",
                   "--data_dir=DIR where DIR/ml-latest-small/ml-latest-small.zip", "or no --data_dir")
