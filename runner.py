"""
How experiments.py runs a table's runs: a Run is a script and the flags the README gives; `command` makes its
command line (its own folder, --data_dir, a seed offset), `execute` runs it as a subprocess of this Python with its
output shown and kept in log.txt, and `load_summary` reads back its summary.json, which marks the run done (so the
same command resumes an interrupted table).
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from common import UserError, prepare_out_dir, write_json

ROOT = os.path.dirname(os.path.abspath(__file__))
BENCHES = ("bench_rec.py", "bench_kernels.py")     # they print tables: their output becomes summary.json
SEED = {"train_lm.py": 1337, "train_rec.py": 2020}   # the scripts' default seeds (--seed=S adds S)


@dataclass
class Run:
    name: str                   # its folder, OUT/TABLE/name
    script: str                 # train_lm.py | eval_lm.py | train_rec.py | bench_rec.py | bench_kernels.py
    flags: list                 # "{dir}" stands for OUT/TABLE (eval runs: --out_dir={dir}/RUN of a trained run)
    data: bool = True           # takes --data_dir
    done: object = None         # summary -> bool, for scripts that write summary.json before they finish


def merge(*groups):
    """Flags in order; a later --key replaces an earlier one in place (the quick budget overrides the README's)."""
    out = {}
    for f in (f for group in groups for f in group):
        out[f.split("=")[0]] = f
    return list(out.values())


def command(run, table_dir, data_dir, seed=0):
    """The argv after `python` that makes `run`: its flags (its seed + seed), its out_dir (or out_json), --data_dir."""
    run_dir = os.path.join(table_dir, run.name)
    flags = [f.replace("{dir}", table_dir) for f in run.flags]
    if seed and run.script in SEED:
        own = [int(f.split("=")[1]) for f in flags if f.startswith("--seed=")]
        flags = merge(flags, [f"--seed={(own or [SEED[run.script]])[-1] + seed}"])
    if run.script in ("train_lm.py", "train_rec.py"):
        flags.append(f"--out_dir={run_dir}")
    elif run.script == "eval_lm.py":
        flags.append(f"--out_json={os.path.join(run_dir, 'summary.json')}")
    flags += [f"--data_dir={data_dir}"] if data_dir and run.data else []
    return [run.script] + flags


def load_summary(run, run_dir):
    """The run's summary.json, or None where the run has not finished."""
    path = os.path.join(run_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            s = json.load(f)
        return s if run.done is None or run.done(s) else None


def execute(run, argv, run_dir):
    """Run one script as a subprocess of this Python, its output shown and saved in run_dir/log.txt. An unfinished
    run's files (the scripts refuse to write over them) are removed first: it starts over."""
    prepare_out_dir(run_dir, resume=False, overwrite=True)
    log_path = os.path.join(run_dir, "log.txt")
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    t0 = time.time()
    with open(log_path, "w") as log, subprocess.Popen([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], env=env,
                                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as p:
        for line in p.stdout:
            sys.stdout.write(line)
            log.write(line)
    if p.returncode:
        raise UserError(f"{run_dir} failed (exit {p.returncode}; its output is in {log_path}); finished runs are "
                        f"kept, so the same command resumes after a fix")
    if run.script in BENCHES:
        with open(log_path) as f:
            write_json(os.path.join(run_dir, "summary.json"), {"output": f.read().strip(),
                                                               "wall_seconds": time.time() - t0})


def check_data(cmds, data_dir):
    """Data sets with no download (LightGCN's text format) must be under --data_dir: one error before any run."""
    for name in {f.split("=", 1)[1] for argv in cmds for f in argv if f.startswith("--dataset=")}:
        if name in ("ml-1m", "yelp-lightgnn") and not os.path.exists(os.path.join(data_dir, name, "train.txt")):
            raise UserError(f"this table reads {name}, which has no download: pass --data_dir=DIR with "
                            f"DIR/{name}/train.txt and test.txt (LightGCN's text format)")
