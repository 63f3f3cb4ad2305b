"""
Figures of what the runs already wrote (metrics.jsonl, summary.json, scores.npz): nothing is re-trained.

    python plot.py loss RUN_DIR [RUN_DIR ...] --out=loss.png         # train_lm.py: loss vs iterations and seconds
    python plot.py routing RUN_DIR [RUN_DIR ...] --out=routing.png   # --ffn=moe / unipool: token share, layer x expert
    python plot.py mask --text="One clause, then another. Done!" --out=mask.png   # SepLLM / StreamingLLM / FixLLM
    python plot.py pruning RUN_DIR [RUN_DIR ...] --out=pruning.png   # train_rec.py --method=lightgnn (and controls)
    python plot.py unlearning RUN_DIR --out=unlearning.png           # train_rec.py --method=unlearnrec
    python plot.py recall RUN_DIR [RUN_DIR ...] --out=recall.png     # train_lm.py --dataset=recall
    python plot.py stream FILE.json [FILE.json ...] --out=stream.png  # eval_lm.py --stream=... --out_json=FILE.json

What each kind reads:
- loss: metrics.jsonl; evaluation lines (train_loss, val_loss) against iterations, and against training seconds,
  summed from the progress lines' ms_per_iter (evaluation time excluded, as the progress lines count it).
- routing: the expert_counts of metrics.jsonl's progress lines (tokens per expert in each layer, last micro-batch),
  summed over the last half of training, as a share of the layer's tokens. UniPool with --pool_groups > 1: each
  layer's row is placed at its own pool's columns.
- mask: no run. sepllm.py's rule (1) on --text, split by --tokenizer (gpt2: tiktoken's r50k_base).
- pruning: summary.json's rounds: Recall@topk of the --split against the share of edges each student round kept,
  the teacher as a horizontal line.
- recall: metrics.jsonl; the evaluations' answer accuracy (all answers, and the far ones) against iterations.
- stream: eval_lm.py's --out_json of a --stream run: perplexity per window of tokens along the stream (a last
  window under half the size left out), one line per file, labelled by the cache and its average KV.
- unlearning: scores.npz (up to 2000 scores per kind) and summary.json: per model of request --step, histograms of
  the scores of the forgotten edges, of the same users' held-out interactions and of never-seen pairs.
Runs are labelled by --labels=a,b,c, else by the config keys that differ between the runs given (their
summary.json "config"; paths left out), else by folder name. matplotlib is the one extra package, imported when a
figure is drawn; without it `python sepllm.py "Some text."` still prints the mask in the terminal.

Every flag is a field of PlotConfig below, written --key=value.
"""
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from common import UserError, parse_flags, run_main
from sepllm import demo_tokens, pattern_codes, rule_keep

# where a run read or wrote, not what it did: never part of a label
PATH_KEYS = ("out_dir", "data_dir", "cache_dir", "device", "resume", "overwrite", "init_from", "teacher",
             "intermediate", "base", "encoder")
RULE_NAMES = {"sepllm": "SepLLM", "streaming": "StreamingLLM", "fixed": "FixLLM (every 5th)"}
MAX_MASK_TOKENS = 80


@dataclass
class PlotConfig:
    out: str = ""                       # the PNG to write
    dpi: int = 100
    labels: str = ""                    # names of the runs, comma-separated, in order; "" = the flags that differ
    # mask
    text: str = "Separators, like these, close segments. A query keeps them; the rest fades!"
    rules: str = "sepllm,streaming,fixed"   # one panel each
    tokenizer: str = "gpt2"             # gpt2 (tiktoken r50k_base) | char | words (a regex split)
    n_init: int = 3                     # sink tokens a
    n_local: int = 4                    # local window w
    # pruning
    split: str = "test"                 # test | val: whose Recall is drawn
    # unlearning
    step: int = 1                       # which request of a --sequence (1 = the first, where the base model is)


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError('plot.py needs matplotlib (pip install matplotlib); without it, '
                        'python sepllm.py "Some text." prints the mask in the terminal') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------- reading runs

def read_json(path, what):
    """what: the sentence that says which run the kind needs, for the error."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: {what}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def read_metrics(run, what):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{path} not found: {what}")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{n} is not a JSON line") from None
    return records


def config_of(run):
    path = os.path.join(run, "summary.json")
    return read_json(path, "").get("config", {}) if os.path.exists(path) else {}


def labels(runs, given=""):
    """One label per run: `given` (comma-separated), else the config keys whose values differ between the runs,
    else the folder name."""
    if given:
        if len(given.split(",")) != len(runs):
            raise UserError(f"--labels={given} names {len(given.split(','))} runs, but {len(runs)} were given")
        return given.split(",")
    names = [os.path.basename(os.path.normpath(r)) for r in runs]
    configs = [config_of(r) for r in runs]
    if len(runs) < 2 or not all(configs):
        return names
    keys = sorted(k for k in set().union(*configs)
                  if k not in PATH_KEYS and len({json.dumps(c.get(k)) for c in configs}) > 1)
    out = [" ".join(f"{k}={c.get(k)}" for k in keys) for c in configs]
    return out if keys and len(set(out)) == len(out) else names


# ----------------------------------------------------------------------------- the kinds

LOSS_NEED = "plot.py loss needs a train_lm.py run folder"


def loss_curves(run):
    """A train_lm.py run's evaluations -> iterations, training seconds at each, val loss, train loss (arrays)."""
    records = read_metrics(run, LOSS_NEED)
    # by iteration, the last record winning (a resumed run logs the iterations after its checkpoint again)
    evals = sorted({r["iter"]: r for r in records if "val_loss" in r}.items())
    steps = sorted({r["iter"]: r["ms_per_iter"] for r in records if "ms_per_iter" in r}.items())
    if not evals or not steps:
        missing = "evaluation (val_loss)" if not evals else "progress (ms_per_iter)"
        raise UserError(f"{run}/metrics.jsonl has no {missing} lines: {LOSS_NEED} that evaluated and logged")
    it = np.array([i for i, _ in evals])
    # a progress line's ms_per_iter is the mean over the iterations since the previous line
    log_it = np.array([0] + [i for i, _ in steps])
    seconds = np.concatenate([[0.0], np.cumsum(np.diff(log_it) * np.array([ms for _, ms in steps]) / 1000)])
    return (it, np.interp(it, log_it, seconds), np.array([r["val_loss"] for _, r in evals]),
            np.array([r["train_loss"] for _, r in evals]))


def draw_loss(plt, runs, cfg):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True, layout="constrained")
    for n, (run, label) in enumerate(zip(runs, labels(runs, cfg.labels))):
        it, seconds, val, train = loss_curves(run)
        for ax, x in ((axes[0], it), (axes[1], seconds)):
            ax.plot(x, val, color=f"C{n}", label=label)
            ax.plot(x, train, color=f"C{n}", ls="--", lw=1)
    axes[0].set(xlabel="iteration", ylabel="loss", title="val (solid) and train (dashed) loss")
    axes[1].set(xlabel="training seconds (evaluation excluded)", title="the same against time")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


RECALL_NEED = "plot.py recall needs a train_lm.py --dataset=recall run folder"


def recall_curves(run):
    """A recall run's evaluations -> iterations, answer accuracy, far-answer accuracy (arrays)."""
    evals = sorted({r["iter"]: r for r in read_metrics(run, RECALL_NEED) if "val_answer_acc" in r}.items())
    if not evals:
        raise UserError(f"{run}/metrics.jsonl has no answer accuracy (val_answer_acc): {RECALL_NEED}")
    return (np.array([i for i, _ in evals]), np.array([r["val_answer_acc"] for _, r in evals]),
            np.array([r["val_answer_acc_far"] for _, r in evals]))


def draw_recall(plt, runs, cfg):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True, layout="constrained")
    for n, (run, label) in enumerate(zip(runs, labels(runs, cfg.labels))):
        it, acc, far = recall_curves(run)
        axes[0].plot(it, acc, color=f"C{n}", label=label)
        axes[1].plot(it, far, color=f"C{n}", label=label)
    axes[0].set(xlabel="iteration", ylabel="validation answer accuracy", title="every answer")
    axes[1].set(xlabel="iteration", title="far answers (value beyond every window)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


def routing_share(run):
    """The share of each layer's routed tokens that each expert got, summed over the progress lines of the last
    half of training: (L, E), each row summing to 1; grouped UniPool (L, G·E), NaN outside a layer's pool."""
    records = [r for r in read_metrics(run, "plot.py routing needs a train_lm.py run") if "expert_counts" in r]
    if not records:
        raise UserError(f"{run}/metrics.jsonl has no expert_counts: plot.py routing needs a train_lm.py run "
                        f"with --ffn=moe or --ffn=unipool")
    last = records[-1]["iter"]
    counts = sum(np.array(r["expert_counts"], dtype=float) for r in records if r["iter"] > last / 2)  # (L, E)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    c = config_of(run)
    if c.get("ffn") != "unipool" or c.get("pool_groups", 1) == 1:
        return share
    L, E, G = *share.shape, c["pool_groups"]
    wide = np.full((L, G * E), np.nan)
    for l in range(L):
        g = l // (L // G)                                    # layer l draws from pool g only
        wide[l, g * E:(g + 1) * E] = share[l]
    return wide


def draw_routing(plt, runs, cfg):
    fig, axes = plt.subplots(1, len(runs), figsize=(1 + 4.5 * len(runs), 3.8), squeeze=False, layout="constrained")
    for ax, run, label in zip(axes[0], runs, labels(runs, cfg.labels)):
        share = routing_share(run)
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.05)
        pool = {"moe": "each layer its own", "unipool": "of the pool"}.get(config_of(run).get("ffn"), "index")
        E = np.isfinite(share[0]).sum()                      # the experts a layer can reach
        ax.set(xlabel=f"expert ({pool})", ylabel="layer", title=f"{label}\nuniform = {1 / E:.3f} per expert")
        ax.set_yticks(range(len(share)))
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle("token share per expert (each layer's row sums to 1)\nlogged batches, last half of training",
                 fontsize=10)
    return fig


def mask_data(text, rule, tokenizer, n_init, n_local):
    """(token strings, (T, T) codes of sepllm.pattern_codes) of a sentence under rule (1)."""
    try:
        tokens, is_sep = demo_tokens(text, tokenizer)
        return tokens, pattern_codes(rule_keep(rule, is_sep), n_init, n_local).numpy()
    except ValueError as e:
        raise UserError(str(e)) from None


def draw_mask(plt, runs, cfg):
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    if runs:
        raise UserError('plot.py mask draws --text, not run folders: python plot.py mask --text="..." --out=FILE.png')
    if cfg.n_init < 0 or cfg.n_local < 1:
        raise UserError("--n_init must be >= 0 and --n_local >= 1")
    rules = cfg.rules.split(",")
    panels = [mask_data(cfg.text, rule, cfg.tokenizer, cfg.n_init, cfg.n_local) for rule in rules]
    colors = ["white", "#e8e8e8", "#6baed6", "#d62728"]      # future, dropped, local window, sink or separator
    T = len(panels[0][0])
    if not 2 <= T <= MAX_MASK_TOKENS:
        raise UserError(f"--text has {T} tokens; the figure is drawn for 2 to {MAX_MASK_TOKENS}")
    side = max(3.0, 0.16 * T + 1)
    fig, axes = plt.subplots(1, len(rules), figsize=(side * len(rules), side + 1.8), squeeze=False,
                             layout="constrained")
    for ax, rule, (tokens, codes) in zip(axes[0], rules, panels):
        ax.imshow(codes, cmap=ListedColormap(colors), vmin=0, vmax=3, interpolation="nearest")
        names = [t.replace(" ", "\u2423").replace("\n", "\\n") for t in tokens]
        ax.set_xticks(range(T), names, rotation=90, fontsize=7)
        ax.set_yticks(range(T), names, fontsize=7)
        kept = (codes >= 2).sum() / (T * (T + 1) / 2)
        ax.set(xlabel="key", ylabel="query", title=f"{RULE_NAMES.get(rule, rule)}\n{kept:.0%} of causal pairs kept")
    fig.legend([Patch(color=c) for c in colors[1:]],
               ["dropped", "local window", "sink or separator (FixLLM: every 5th)"], loc="outside lower center", ncol=3,
               fontsize=8, frameon=False)
    fig.suptitle(f"rule (1) with a = {cfg.n_init} sinks and a window of w = {cfg.n_local}")
    return fig


def draw_pruning(plt, runs, cfg):
    if cfg.split not in ("test", "val"):
        raise UserError(f"--split={cfg.split} must be test or val")
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    teachers = {}
    for n, (run, label) in enumerate(zip(runs, labels(runs, cfg.labels))):
        rows = read_json(os.path.join(run, "summary.json"),
                         "plot.py pruning needs a train_rec.py --method=lightgnn run").get("rounds")
        students = [r for r in rows or [] if r["model"].startswith("student")]
        if not students:
            raise UserError(f"{run}/summary.json has no student rounds: plot.py pruning needs a train_rec.py "
                            f"--method=lightgnn run that finished at least round 0")
        key = next(k for k in students[0][cfg.split] if k.startswith("recall@"))
        ax.plot([100 * r["edges_kept"] for r in students], [r[cfg.split][key] for r in students], "o-",
                color=f"C{n}", label=label)
        for r in rows:
            if r["model"] == "teacher":
                teachers.setdefault(r[cfg.split][key], label)
    for n, (value, label) in enumerate(teachers.items()):
        ax.axhline(value, color="k", ls="--", lw=1, alpha=1 - 0.3 * n,
                   label="teacher" if len(teachers) == 1 else f"teacher ({label})")
    ax.invert_xaxis()                                        # the rounds run left to right
    ax.set(xlabel="edges kept (%), one point per student round", title="LightGNN: accuracy while pruning",
           ylabel=f"{cfg.split} {key.replace('recall', 'Recall')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def draw_unlearning(plt, runs, cfg):
    need = "plot.py unlearning needs a train_rec.py --method=unlearnrec run"
    panels = []                                              # per run: [(a model's summary row, its scores)]
    for run in runs:
        steps = read_json(os.path.join(run, "summary.json"), need).get("steps", [])
        if not 1 <= cfg.step <= len(steps):
            raise UserError(f"{run}/summary.json has {len(steps)} unlearning request(s); --step={cfg.step} is not one")
        path = os.path.join(run, "scores.npz")
        if not os.path.exists(path):
            raise UserError(f"{path} not found: {need} (runs made before the scores were saved lack it)")
        rows = [r for r in steps[cfg.step - 1]["rows"] if " @ " not in r["model"]]   # the smaller budgets: table only
        with np.load(path) as z:
            if any(f"{cfg.step}/{r['model']}/forgotten" not in z for r in rows):
                raise UserError(f"{path} lacks the scores of request {cfg.step}: it is not from the run of "
                                f"{run}/summary.json; re-run that run")
            panels.append([(r, {k: z[f"{cfg.step}/{r['model']}/{k}"] for k in ("forgotten", "held_out", "negatives")})
                           for r in rows])
    cols = max(map(len, panels))
    fig, axes = plt.subplots(len(runs), cols, figsize=(3.2 * cols, 2.8 * len(runs) + 0.4), squeeze=False,
                             layout="constrained")
    for ax_row, row_panels, label in zip(axes, panels, labels(runs, cfg.labels)):
        every = np.concatenate([s for _, scores in row_panels for s in scores.values()])
        bins = np.linspace(every.min(), every.max(), 40)     # one scale per run, so the models compare
        for ax, (r, scores) in zip(ax_row, row_panels):
            for kind, s in scores.items():
                ax.hist(s, bins, density=True, alpha=0.5, label=kind.replace("_", "-"))
            ax.set(title=f"{r['model']}: MIA AUC {r['mia_auc']:.2f}", xlabel="score e_u . e_i")
        ax_row[0].set_ylabel(f"{label}\ndensity" if len(runs) > 1 else "density")
        for ax in ax_row[len(row_panels):]:
            ax.axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"request {cfg.step}: scores of the forgotten edges, held-out interactions, never-seen pairs")
    return fig


def draw_stream(plt, files, cfg):
    need = "plot.py stream needs eval_lm.py --stream=... --out_json=FILE.json files"
    fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    for path, label in zip(files, cfg.labels.split(",") if cfg.labels else [None] * len(files)):
        r = read_json(path, need)
        if "window_ppl" not in r:
            raise UserError(f"{path} has no window_ppl: {need}")
        W, ppl = r["window_tokens"], np.array(r["window_ppl"])
        ends = np.minimum(np.arange(1, len(ppl) + 1) * W, r["tokens"])
        full = np.diff(ends, prepend=0) >= W // 2               # a last window under half a window is left out
        ax.plot(ends[full] / 1e6, ppl[full], marker="o", label=label or f"{r['stream']}: average KV "
                                                                         f"{r['average_kv']:.0f}, max {r['max_kv']}")
    ax.set(xlabel="tokens into the stream (millions; a point at the end of each window)",
           ylabel="perplexity of the window", title="one long stream through a bounded KV cache")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
    ax.legend(fontsize=8)
    return fig


DRAW = {"loss": draw_loss, "routing": draw_routing, "mask": draw_mask, "pruning": draw_pruning,
        "unlearning": draw_unlearning, "recall": draw_recall, "stream": draw_stream}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_flags(PlotConfig, [a for a in argv if a.startswith("-")])
    args = [a for a in argv if not a.startswith("-")]
    if not args or args[0] not in DRAW:
        raise UserError(f"usage: python plot.py KIND RUN_DIR [RUN_DIR ...] --out=FILE.png, with KIND one of "
                        f"{', '.join(DRAW)}")
    kind, runs = args[0], args[1:]
    if not cfg.out:
        raise UserError("--out=FILE.png is required: where to write the figure")
    if kind != "mask" and not runs:
        raise UserError(f"plot.py {kind} needs at least one run folder")
    for run in runs:
        if kind == "stream" and not os.path.isfile(run):
            raise UserError(f"{run} is not a file: pass eval_lm.py --out_json files")
        if kind != "stream" and not os.path.isdir(run):
            raise UserError(f"{run} is not a folder: pass run folders (a script's --out_dir)")
    plt = pyplot()
    fig = DRAW[kind](plt, runs, cfg)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    fig.savefig(cfg.out, dpi=cfg.dpi)
    plt.close(fig)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    run_main(main)
