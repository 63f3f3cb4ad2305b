import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "toy"
    folder.mkdir(parents=True)
    for name, n in (("train.txt", 25), ("test.txt", 5)):
        lines = [" ".join(map(str, [u, *sorted(rng.choice(60, n, replace=False))])) for u in range(40)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return tmp_path


def run(tmp_path, *args):
    flags = [f"--data_dir={tmp_path / 'data'}", "--dataset=ml-1m", "--dim=8", "--n_layers=2", "--batch_size=128",
             "--eval_every=2", "--lr=5e-3", *args]
    return subprocess.run([sys.executable, "train_rec.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)


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
