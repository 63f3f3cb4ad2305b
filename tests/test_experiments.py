import json
import os
import subprocess
import sys

import pytest

import bench_rec
import eval_lm
import experiments
import bench_kernels
import train_lm
import train_rec
from common import UserError
from experiments import TABLES, Run, Table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Stop(BaseException):  # not an Exception: a script's own error handling must not swallow it
    """Raised where a script would start its work: its flags were parsed and checked."""


def stop(*args, **kwargs):
    raise Stop


def check_with_script(argv, monkeypatch):
    """Give argv (what follows `python`) to the script's own main(), with its work replaced by Stop: the flag
    parser and every check the script makes before training must pass."""
    script, flags = argv[0], argv[1:]
    module, work = {"train_lm.py": (train_lm, ["train"]), "train_rec.py": (train_rec, ["load_data"]),
                    "eval_lm.py": (eval_lm, ["sample", "probe_router", "eval_mask", "stream_eval"]),
                    "bench_rec.py": (bench_rec, ["load_lightgcn_dir"]),
                    "bench_kernels.py": (bench_kernels, ["moe_layer_bench", "attention_bench_cpu", "train_step_bench"])}[script]
    for name in work:
        monkeypatch.setattr(module, name, stop)
    monkeypatch.setattr(sys, "argv", [script, *flags])
    with pytest.raises(Stop):
        module.main()


@pytest.fixture
def data_dir(tmp_path):
    for name in ("ml-1m", "yelp-lightgnn"):
        os.makedirs(tmp_path / "data" / name)
        (tmp_path / "data" / name / "train.txt").write_text("0 1\n")
    return str(tmp_path / "data")


@pytest.mark.parametrize("quick", [False, True])
def test_every_command_passes_its_scripts_flag_checks(quick, data_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "runs")
    folders = set()
    for name, table in TABLES.items():
        table_dir = os.path.join(out, name + ("-quick" if quick else ""))
        runs = table.runs(quick)
        cmds = [experiments.command(r, table_dir, data_dir) for r in runs]
        experiments.check_data(cmds, data_dir)
        for i, (run, argv) in enumerate(zip(runs, cmds)):
            check_with_script(argv, monkeypatch)
            # its own folder inside the table's, and it reads only runs of its table that come before it
            run_dir = os.path.join(table_dir, run.name)
            own = [f for f in argv if f in (f"--out_dir={run_dir}", f"--out_json={run_dir}{os.sep}summary.json")]
            assert run.script in experiments.BENCHES or own, argv
            folders.add(run_dir)
            for f in argv:
                if table_dir in f and f not in own:
                    used = f.split("=", 1)[1][len(table_dir) + 1:].split(os.sep)[0]
                    assert used in [r.name for r in runs[:i]], (name, run.name, f)
        assert len(runs) == len({r.name for r in runs})
    assert len(folders) == sum(len(t.runs(quick)) for t in TABLES.values())     # no run shares a folder


def test_dry_run_prints_the_commands_only(tmp_path, capsys):
    experiments.main(["unipool", f"--out_dir={tmp_path}", "--dry_run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7 * 2 - 2 + 1 and all(line.startswith("python ") for line in lines)
    assert "--ffn=unipool --pool_size=16 --router=norm --aux_loss=pool --seed=1338" in lines[7]
    assert lines[-1].startswith("python eval_lm.py --probe_router=all --eval_iters=50 --out_dir=")
    assert not os.listdir(tmp_path)


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_tables_print_from_summaries(tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    lm = {"dense_s1337": 1.70, "dense_s1338": 1.68, "moe_s1337": 1.75}
    for run in TABLES["unipool"].runs(False):
        if run.name in lm:
            write(out / "unipool" / run.name / "summary.json", {"final_val_loss": lm[run.name]})
    write(out / "unipool" / "probe" / "summary.json",
          {"val_loss": 1.5, "random_layer_val_loss": {"0": 2.5, "1": 1.75, "2": 1.625, "3": 1.5}})
    monkeypatch.setattr(experiments, "execute", lambda run, argv, run_dir: None)   # the missing runs "fail"
    experiments.main(["unipool", f"--out_dir={out}"])
    text = capsys.readouterr().out
    assert "| dense | 1.6900 ± 0.0100 | 1.6919 ± 0.0055 | 2.042 |" in text       # mean ± half the spread
    assert "| vanilla MoE: 8 experts per layer, softmax router, Switch loss | 1.7500 |" in text   # one seed so far
    assert "| UniPool: one pool of M = 8L = 32, NormRouter, pool loss | — |" in text
    assert "| Δ |  | +1.000 | +0.250 | +0.125 | +0.000 |" in text
    assert "quick budget" not in text

    row = {"edges_kept": 1.0, "entries_kept": 1.0, "cost": 1.0, "val": {"recall@20": 0.2},
           "test": {"recall@20": 0.2, "ndcg@20": 0.3}, "train_seconds": 120}
    rounds = [dict(row, model=m) for m in ("teacher", "intermediate", "student round 0", "student round 1")]
    rounds[-1] = dict(rounds[-1], edges_kept=0.44, test={"recall@20": 0.15, "ndcg@20": 0.2})
    for name in ("stages", "learned", "random", "no_kd"):
        write(out / "lightgnn-quick" / name / "summary.json", {"rounds": rounds[:3] if name == "stages" else rounds})
    calls = []
    monkeypatch.setattr(experiments, "execute", lambda run, argv, run_dir: calls.append(run.name))
    experiments.main(["lightgnn", f"--out_dir={out}", "--quick"])
    text = capsys.readouterr().out
    # the quick budget has 2 rounds: 5 rows make a finished run; a summary with 4 (written after each row) does not
    assert calls == ["learned", "random", "no_kd"] and "quick budget: numbers are not the README's" in text
    rounds.append(dict(rounds[-1], model="student round 2"))
    write(out / "lightgnn-quick" / "learned" / "summary.json", {"rounds": rounds})
    calls.clear()
    experiments.main(["lightgnn", f"--out_dir={out}", "--quick"])
    text = capsys.readouterr().out
    assert calls == ["random", "no_kd"]
    assert "| student round 2 | 0.440 | 1.000 | 1.000 | 0.2000 | 0.1500 | 75.0% | 0.2000 | 2.0 |" in text

    for name, table in TABLES.items():      # every table prints with no runs at all
        table.show({}, False)
    assert "—" in capsys.readouterr().out


def test_unknown_table_and_flags_are_one_clear_error(tmp_path):
    for args, says in ((["nope"], "unknown table 'nope'; the tables are backbone, unipool"),
                       ([], "name a table"), (["unipool", "--fast"], "unknown flag --fast")):
        r = subprocess.run([sys.executable, "experiments.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, (args, r.stderr)
    r = subprocess.run([sys.executable, "experiments.py", "lightgcn", f"--out_dir={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "pass --data_dir=DIR with DIR/ml-1m/train.txt" in r.stderr
    assert not os.listdir(tmp_path)


def test_a_table_runs_its_scripts_then_resumes(tmp_path, monkeypatch, capsys):
    """A two-run table through the real scripts: a tiny recall run and a training-free mask on its checkpoint,
    read back through eval_lm.py's --out_json; a second call runs nothing; a failing run is one clear error."""
    tiny = ["--dataset=recall", "--block_size=30", "--recall_targets=answers", "--n_layer=1", "--n_embd=32",
            "--n_head=2", "--max_iters=4", "--eval_iters=2"]
    runs = [Run("full_s1337", "train_lm.py", tiny, data=False),
            Run("free_sepllm_s1337", "eval_lm.py", ["--out_dir={dir}/full_s1337", "--eval_mask=sepllm", "--n_init=3",
                                                    "--n_local=4", "--eval_iters=2"], data=False)]
    monkeypatch.setitem(TABLES, "tiny", Table("a test", "", "", lambda quick: runs, experiments.recall_show, "-"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    experiments.main(["tiny", f"--out_dir={tmp_path}"])
    text = capsys.readouterr().out
    s = json.load(open(tmp_path / "tiny" / "free_sepllm_s1337" / "summary.json"))
    assert f"val loss {s['val_loss']:.4f}, kept fraction {s['kept_fraction']:.3f}" in text   # what eval_lm printed
    by_query = s["val_answer_acc_by_query"]
    assert len(by_query) == 4 and abs(sum(by_query) / 4 - s["val_answer_acc"]) < 1e-6
    assert (f"| SepLLM mask on the full checkpoint, training-free | {s['kept_fraction']:.4f} | "
            f"{s['val_answer_acc']:.4f} | {s['val_answer_acc_far']:.4f} | {by_query[0]:.4f} | {by_query[3]:.4f} |"
            ) in text
    assert os.path.exists(tmp_path / "tiny" / "full_s1337" / "log.txt")

    experiments.main(["tiny", f"--out_dir={tmp_path}"])
    assert capsys.readouterr().out.count("not run again") == 2

    os.remove(tmp_path / "tiny" / "full_s1337" / "summary.json")  # an unfinished run (its checkpoints are there)
    experiments.main(["tiny", f"--out_dir={tmp_path}"])            # starts over: the script would refuse the folder
    assert capsys.readouterr().out.count("not run again") == 1
    assert os.path.exists(tmp_path / "tiny" / "full_s1337" / "summary.json")

    runs.append(Run("bad", "train_lm.py", ["--max_iters=0"]))
    with pytest.raises(UserError, match="bad failed .exit 2; its output is in .*bad/log.txt"):
        experiments.main(["tiny", f"--out_dir={tmp_path}"])
    assert "--max_iters=0 must be >= 1" in open(tmp_path / "tiny" / "bad" / "log.txt").read()


def test_bench_rec_times_a_share_of_an_epoch(tmp_path, monkeypatch, capsys):
    """--share (the quick lightgcn table) times that share of an epoch's triples, in both ways."""
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "train.txt").write_text("".join(f"{u} " + " ".join(str((u + k) % 30) for k in range(8)) + "\n"
                                              for u in range(40)))
    (folder / "test.txt").write_text("".join(f"{u} {(u + 9) % 30}\n" for u in range(40)))
    monkeypatch.setattr(sys, "argv", ["bench_rec.py", f"--data_dir={tmp_path}", "--dataset=toy", "--share=0.25",
                                      "--batch_size=16"])
    bench_rec.main()
    out = capsys.readouterr().out
    n_train = 40 * 8 - int(0.1 * 8) * 40            # LightGCN's loader moves 10 % of each user's items to validation
    assert f"toy: {int(0.25 * n_train)} training triples (0.25 of an epoch)" in out
    assert "| sample 0.25 of an epoch of triples |" in out and "| sampling + steps, 0.25 of an epoch |" in out
    monkeypatch.setattr(sys, "argv", ["bench_rec.py", f"--data_dir={tmp_path}", "--dataset=toy", "--share=0"])
    with pytest.raises(UserError, match="--share=0.0 must be in"):
        bench_rec.main()


def test_a_quick_run_is_printed_beside_its_expected_values(tmp_path, monkeypatch, capsys):
    """--quick ends with each stored expected value (mean ± half the spread of two seeds) beside this run's."""
    runs = [Run("a", "train_lm.py", []), Run("b", "train_rec.py", [])]
    expected = (("a", "final_val_loss", 2.0, 0.01), ("b", "test/recall@20", 0.1, 0.002))
    monkeypatch.setitem(TABLES, "tiny", Table("a test", "", "", lambda quick: runs, lambda S, quick: None, "-",
                                              expected))
    write(tmp_path / "tiny-quick" / "a" / "summary.json", {"final_val_loss": 2.0071})
    write(tmp_path / "tiny-quick" / "b" / "summary.json", {"test": {"recall@20": 0.0950}})
    experiments.main(["tiny", f"--out_dir={tmp_path}", "--quick"])
    text = capsys.readouterr().out
    assert "| a | final_val_loss | 2.0071 | 2.0000 ± 0.0100 | yes |" in text
    assert "| b | test/recall@20 | 0.0950 | 0.1000 ± 0.0020 | no |" in text
    for run in ("a", "b"):                                          # the README's budget: no quick check
        write(tmp_path / "tiny" / run / "summary.json", {})
    experiments.main(["tiny", f"--out_dir={tmp_path}"])
    assert "expected" not in capsys.readouterr().out
    # every table has the field; the measured ones name runs and keys their quick runs have
    for name in ("backbone", "sa_softmax", "sepllm", "lightgcn"):
        table = TABLES[name]
        assert table.expected, name
        names = {r.name for r in table.runs(True)}
        assert all(run in names and spread >= 0 for run, _, _, spread in table.expected), name


def test_seed_offsets_every_training_run_into_its_own_folder(tmp_path, capsys):
    """--seed=1 (the second seed of the expected values) adds 1 to each training run's seed, into TABLE-quick-seed1."""
    experiments.main(["sa_softmax", f"--out_dir={tmp_path}", "--quick", "--seed=1", "--dry_run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("--seed=1338" in line and "--seed=1337" not in line for line in lines)
    assert all(f"--out_dir={tmp_path}{os.sep}sa_softmax-quick-seed1{os.sep}" in line for line in lines)
    experiments.main(["lightgcn", f"--out_dir={tmp_path}", "--quick", "--seed=1", "--dry_run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.count("--seed=2021") for line in lines] == [1, 1, 0]     # train_rec.py twice, not the benchmark
