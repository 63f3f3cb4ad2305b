"""The plumbing the scripts share: flag suggestions, resumed settings, out_dir protection, Ctrl-C."""
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from common import UserError, parse_flags, prepare_out_dir, resumed_config


@dataclass
class C:
    max_iters: int = 10
    lr: float = 1e-3
    out_dir: str = "out"
    log_interval: int = 5
    resume: bool = False


def test_unknown_flag_suggests_the_closest_known_one():
    with pytest.raises(UserError, match=r"unknown flag --max_iter; did you mean --max_iters\?"):
        parse_flags(C, ["--max_iter=100"])
    with pytest.raises(UserError, match="known flags: --max_iters --lr"):   # nothing close: the list
        parse_flags(C, ["--zzz=1"])


def test_resume_takes_the_saved_settings_and_only_harmless_flags_on_top():
    saved = {"max_iters": 1000, "lr": 3e-3, "out_dir": "run", "log_interval": 5, "resume": False, "gone": 1}
    cfg = resumed_config(C, saved, ["--out_dir=run", "--resume", "--log_interval=50"], {"out_dir", "log_interval"})
    assert cfg == C(max_iters=1000, lr=3e-3, out_dir="run", log_interval=50, resume=True)
    # repeating a saved value is fine; changing it is one clear error naming the flag and the saved value
    assert resumed_config(C, saved, ["--resume", "--max_iters=1000"], set()).max_iters == 1000
    with pytest.raises(UserError, match=r"drop --max_iters=2000 \(the run has 1000\)"):
        resumed_config(C, saved, ["--resume", "--max_iters=2000"], {"out_dir"})


def test_out_dir_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    prepare_out_dir(str(run), resume=False, overwrite=False)                  # new folder: made
    assert run.is_dir()
    prepare_out_dir(str(run), resume=False, overwrite=False)                  # empty folder: fine
    (run / "stage").mkdir()
    (run / "stage" / "ckpt_best.pt").write_bytes(b"weights")                  # a pipeline stage's checkpoint
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
        prepare_out_dir(str(run), resume=False, overwrite=False)
    assert (run / "stage" / "ckpt_best.pt").exists()                          # nothing touched
    prepare_out_dir(str(run), resume=True, overwrite=False)
    assert (run / "stage" / "ckpt_best.pt").exists()
    with pytest.raises(UserError, match="pick one"):
        prepare_out_dir(str(run), resume=True, overwrite=True)
    prepare_out_dir(str(run), resume=False, overwrite=True)                   # the run's files go, others stay
    assert not (run / "stage" / "ckpt_best.pt").exists() and (run / "notes.txt").read_text() == "mine"


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import common\ncommon.on_interrupt('continue with --resume')\n"
                      "def main():\n    raise KeyboardInterrupt\ncommon.run_main(main)\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert p.returncode == 130
    assert p.stderr.strip() == "interrupted: nothing new was saved; continue with --resume"
