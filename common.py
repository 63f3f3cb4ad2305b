"""
The plumbing both training scripts share, kept out of them so each reads as config -> data -> model -> loop:
flags generated from a dataclass (none silently ignored), the device and the precision, a run folder that is
never overwritten by accident, checksummed downloads, atomic checkpoints, JSON logs.
"""
import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import signal
import sys
import tempfile
import threading
import urllib.request

import torch


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong checkpoint): printed as one line, exit 2."""


_interrupt_hint = ""


def on_interrupt(hint):
    """What run_main says after Ctrl-C, e.g. how to resume (set by a script once it knows its out_dir): a string,
    or a function returning one, called at the interrupt (to say what there is to resume from by then)."""
    global _interrupt_hint
    _interrupt_hint = hint


def run_main(main):
    """Call main(); a UserError becomes one line on stderr and exit status 2 instead of a traceback, Ctrl-C one
    line (nothing new is saved: checkpoints are only ever replaced whole) and exit status 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        hint = _interrupt_hint() if callable(_interrupt_hint) else _interrupt_hint
        print(f"\ninterrupted: nothing new was saved{'; ' + hint if hint else ''}",
              file=sys.stderr)
        sys.exit(130)


def parse_flags(cls, argv):
    """Build the dataclass `cls` from `--key=value` flags. A bare `--flag` sets a bool to True.

    Unknown keys and values of the wrong type raise UserError naming the flag and the expected type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "-h" in argv or "--help" in argv:
        print("flags (--key=value), with their defaults; the config dataclass in the script says what each does:")
        for f in fields.values():
            print(f"  --{f.name}={f.default!r}")
        sys.exit(0)
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; flags look like --key=value")
        key, eq, raw = arg[2:].partition("=")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            raise UserError(f"unknown flag --{key}; " + (f"did you mean --{close[0]}?" if close else
                            "known flags: " + " ".join(f"--{k}" for k in fields)))
        typ = type(fields[key].default)
        if not eq:
            if typ is not bool:
                raise UserError(f"flag --{key} needs a value: --{key}=<{typ.__name__}>")
            raw = "true"
        values[key] = convert(key, raw, typ)
    return cls(**values)


def given_flags(argv):
    """The keys of the flags on a command line (`--key=value` or `--key`), in order."""
    return [a[2:].partition("=")[0] for a in argv if a.startswith("--")]


def resumed_config(cls, saved, argv, may_change):
    """The config of a resumed run: the run's saved settings (a dict from its checkpoint), with the flags given on
    the command line on top. A given flag outside `may_change` (the settings that do not change what the run
    computes: paths, logging, the device) must equal the saved value, else one clear error: a resumed run
    continues exactly. Saved keys this version does not know are ignored; new keys take their defaults."""
    now = parse_flags(cls, argv)
    given = set(given_flags(argv)) - {"resume"}
    diff = [f"--{k}={getattr(now, k)!r} (the run has {saved[k]!r})" for k in given - set(may_change)
            if k in saved and saved[k] != getattr(now, k)]
    if diff:
        raise UserError(f"--resume continues the run exactly, so it keeps its settings: drop {', '.join(diff)}; "
                        f"for another config, start a new run (another --out_dir, or --overwrite)")
    fields = {f.name for f in dataclasses.fields(cls)}
    fresh = {"resume": True, **({"overwrite": False} if "overwrite" in fields else {})}
    return cls(**{**{k: v for k, v in saved.items() if k in fields}, **{k: getattr(now, k) for k in given}, **fresh})


RUN_FILES = ("ckpt_last.pt", "ckpt_best.pt", "metrics.jsonl", "summary.json")


def run_files(folder):
    """The files a training run wrote in folder or in its sub-folders (a pipeline's stages), sorted."""
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f in RUN_FILES]
    return sorted(found)


def prepare_out_dir(out_dir, resume, overwrite):
    """Nothing a user made is lost: a folder that already holds a run is only written to with --resume (continue
    it) or --overwrite (its run files are removed first, so no stale file mixes with the new run)."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out_dir, --overwrite replaces it: pick one")
    old = run_files(out_dir) if os.path.isdir(out_dir) else []
    if old and not resume:
        if not overwrite:
            raise UserError(f"--out_dir={out_dir} already holds a run ({os.path.relpath(old[0], out_dir)}, ...): "
                            f"continue it with --resume, replace it with --overwrite, or pass another --out_dir")
        for f in old:
            os.remove(f)
    os.makedirs(out_dir, exist_ok=True)


def convert(key, raw, typ):
    if typ is bool:
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise UserError(f"bad value for --{key}: {raw!r} is not a bool (use true or false)")
    try:
        return typ(raw)
    except ValueError:
        raise UserError(f"bad value for --{key}: {raw!r} is not {typ.__name__}") from None


def pick_device(name="auto"):
    """cuda -> mps -> cpu, or the device named."""
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device={name} but CUDA is not available; use --device=auto or --device=cpu")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(name, device):
    """--dtype: the precision the model computes in (its weights and optimizer stay float32). auto = bfloat16 on
    a CUDA GPU that has it (Ampere and later), float16 on one that does not (T4, V100; with a gradient scaler),
    float32 elsewhere. A choice the device cannot run is one clear error."""
    cuda = str(device).startswith("cuda")
    bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "auto":
        return torch.bfloat16 if bf16 else torch.float16 if cuda else torch.float32
    if name not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype={name} must be one of auto, bfloat16, float16, float32")
    if name != "float32" and not cuda:
        raise UserError(f"--dtype={name} needs a CUDA GPU; on {device} use --dtype=float32 (or auto, which picks it)")
    if name == "bfloat16" and not bf16:
        raise UserError(f"--dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic; use "
                        f"--dtype=float16 (or auto, which picks it with a gradient scaler)")
    return getattr(torch, name)


def autocast_for(device, dtype):
    """The context the forward passes run in: autocast to dtype, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(str(device).split(":")[0], dtype=dtype)


def refuse_unused(cfg, rules):
    """No flag is silently ignored. rules: (flags, whether they have an effect under cfg's mode, the flags that
    would give them one). A flag set away from its default where it has no effect is one clear error."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for flags, counts, fix in rules:
        for k in flags:
            if not counts and getattr(cfg, k) != defaults[k]:
                raise UserError(f"--{k}={getattr(cfg, k)} has no effect with these flags: it counts only with {fix}")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest, sha256, timeout=30):
    """Download url to dest, verifying its sha256; nothing is left at dest unless the file is good."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dest)), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
        got = sha256_of(tmp)
        if got != sha256:
            raise UserError(f"downloaded {url} but its sha256 is {got}, expected {sha256}: the file is corrupt "
                            f"or has changed; nothing was saved")
        os.replace(tmp, dest)
    except OSError as e:
        raise UserError(f"could not download {url} ({e}); put a copy at {dest} or pass --data_dir") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def interrupt_after():
    """Ctrl-C inside the block takes effect when the block ends. (A KeyboardInterrupt raised inside torch.save's
    writer gets through as a RuntimeError, or aborts the process: not the one-line exit of run_main.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught:
            signal.raise_signal(signal.SIGINT)     # delivered now, to the handler the block found


def save_atomic(obj, path, save=torch.save):
    """save(obj, file) (torch.save; or e.g. lambda a, f: np.savez(f, **a)) into a temp file in the same folder,
    then rename: a crash never leaves a half-written file, and Ctrl-C waits for the file to be whole."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        with interrupt_after():
            with open(tmp, "wb") as f:
                save(obj, f)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, device="cpu"):
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train first or point --out_dir at a run folder")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {e}") from None


def resume_from(path, config, keys, model, optimizer, device):
    """Load a run's last checkpoint into model and optimizer, after checking that it was made with the same
    config on `keys`; returns the checkpoint for the rest of its state."""
    ckpt = load_checkpoint(path, device)
    check_same(ckpt["config"], config, keys, path)
    load_weights(model, ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt


def load_weights(model, state, path):
    """model.load_state_dict(state), with one clear error when the saved tensors do not fit the model."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"checkpoint {path} does not fit this model ({detail}); it was saved with another config "
                        f"or by an older version of the code: train it again") from None


def check_same(saved, current, keys, path):
    """Raise UserError if the config stored in a checkpoint differs from the current one on any of `keys`."""
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise UserError(f"checkpoint {path} was made with another config ({'; '.join(diff)}); "
                        f"pass the same flags or use another --out_dir")


def drop_records_after(path, key, last):
    """Keep the JSONL records of path with record[key] <= last: a resumed run logs the later ones again."""
    with open(path) as f:
        kept = [line for line in f if json.loads(line)[key] <= last]
    with open(path, "w") as f:
        f.writelines(kept)


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def fmt_seconds(s):
    if s != s:
        return "n/a"                       # NaN: a time that was not recorded
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
