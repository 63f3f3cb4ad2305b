"""The plumbing the scripts share: flag suggestions, resumed settings, out_dir protection, Ctrl-C."""
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from common import UserError, parse_flags, pick_dtype, prepare_out_dir, refuse_unused, resumed_config


@dataclass
class C:
    max_iters: int = 10
    lr: float = 1e-3
    out_dir: str = "out"
    log_interval: int = 5
    resume: bool = False
    overwrite: bool = False


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


def test_ctrl_c_while_a_checkpoint_is_written_keeps_it_whole_then_exits_130(tmp_path):
    """Ctrl-C arriving inside torch.save's writer (here: at its second write) waits for the file: the checkpoint is
    whole and loads, and the run exits with run_main's one line, not a RuntimeError or an abort."""
    script = tmp_path / "s.py"
    script.write_text(
        "import signal, torch, common\n"
        "class InterruptOnSecondWrite:\n"
        "    def __init__(self, f): self.f, self.n = f, 0\n"
        "    def write(self, b):\n"
        "        self.n += 1\n"
        "        if self.n == 2: signal.raise_signal(signal.SIGINT)\n"   # to this thread: handled right here
        "        return self.f.write(b)\n"
        "    def flush(self): self.f.flush()\n"
        "def main():\n"
        "    common.save_atomic({'w': torch.arange(100000.0)}, 'ckpt.pt',\n"
        "                       save=lambda o, f: torch.save(o, InterruptOnSecondWrite(f)))\n"
        "    print('not interrupted')\n"
        "common.run_main(main)\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert (p.returncode, p.stdout, p.stderr.strip()) == (130, "", "interrupted: nothing new was saved")
    assert torch.equal(torch.load(tmp_path / "ckpt.pt", weights_only=True)["w"], torch.arange(100000.0))
    assert [f.name for f in tmp_path.iterdir() if f.suffix == ".tmp"] == []


def test_resumed_run_is_never_an_overwrite():
    """A run started with --overwrite saves overwrite=True; resuming it must not replace it again."""
    saved = {"max_iters": 10, "lr": 1e-3, "out_dir": "run", "log_interval": 5, "resume": False, "overwrite": True}
    cfg = resumed_config(C, saved, ["--resume"], set())
    assert cfg.resume and not cfg.overwrite


def test_a_flag_without_effect_is_refused_naming_what_makes_it_count():
    @dataclass
    class M:
        ffn: str = "dense"
        pool_size: int = 0

    rules = lambda c: [(("pool_size",), c.ffn == "unipool", "--ffn=unipool")]     # noqa: E731
    refuse_unused(M(), rules(M()))                                                  # defaults: fine
    refuse_unused(M("unipool", 16), rules(M("unipool", 16)))                        # counts: fine
    with pytest.raises(UserError, match="^--pool_size=16 has no effect with these flags: it counts only with "
                                        "--ffn=unipool$"):
        refuse_unused(M("dense", 16), rules(M("dense", 16)))


def test_dtype_auto_follows_the_device_and_impossible_choices_name_the_fix(monkeypatch):
    assert pick_dtype("auto", "cpu") == pick_dtype("float32", "cpu") == torch.float32
    for name in ("float16", "bfloat16"):
        with pytest.raises(UserError, match=f"--dtype={name} needs a CUDA GPU; on cpu use --dtype=float32"):
            pick_dtype(name, "cpu")
    with pytest.raises(UserError, match="must be one of auto, bfloat16, float16, float32"):
        pick_dtype("half", "cpu")
    # a GPU without bfloat16 arithmetic (a T4): torch reports emulated support unless asked for native support
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert pick_dtype("auto", "cuda") == torch.float16 and pick_dtype("float16", "cuda:0") == torch.float16
    with pytest.raises(UserError, match="--dtype=bfloat16 but Tesla T4 has no bfloat16 arithmetic; use --dtype=flo"):
        pick_dtype("bfloat16", "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)   # an A100
    assert pick_dtype("auto", "cuda") == pick_dtype("bfloat16", "cuda") == torch.bfloat16
