"""
One command per results table of the README: it runs what the table needs and prints the table, our numbers
beside the README's and the paper's claim.

    python experiments.py list                         # the tables, what each reproduces, how long it takes
    python experiments.py unipool                      # the README's budget (about 1.5 h on a 2-core CPU)
    python experiments.py unipool --quick              # a reduced budget: minutes; checked against its own values
    python experiments.py sepllm --dry_run             # print the commands only
    python experiments.py lightgcn --data_dir=DIR      # DIR/ml-1m/train.txt, test.txt (LightGCN's text format)

Each table is data: its runs (a script and the flags the README gives), a function that prints the table from
the runs' summary.json, and the values a --quick run should give (mean and spread of --seed=0 and --seed=1),
printed beside it. Runs (runner.py) write into OUT/TABLE/RUN (OUT/TABLE-quick/RUN with --quick), output mirrored
to log.txt. A run whose summary.json exists is not run again: the same command resumes an interrupted table (an
unfinished run starts over). --data_dir=DIR goes to every script that reads data (DIR/shakespeare/input.txt,
DIR/ml-1m/...); ml-1m has no download. sepllm needs GPT-2's BPE (offline: TIKTOKEN_CACHE_DIR). On a busy machine:
OMP_NUM_THREADS=1.
"""
import os
import shlex
import sys
import time
from dataclasses import dataclass

from common import UserError, fmt_seconds, parse_flags, run_main
from runner import BENCHES  # noqa: F401 (importable from here)
from runner import Run, check_data, command, execute, load_summary, merge


@dataclass
class Table:
    about: str                  # what it reproduces
    full: str                   # estimated time at the README's budget
    quick: str                  # measured time with --quick
    runs: object                # quick -> [Run]
    show: object                # (summaries by run name, quick) -> prints the table
    claim: str = ""             # the paper's claim, printed above the table
    expected: tuple = ()        # --quick: (run, summary key (a/b for nested), mean, half the spread of 2 seeds)


@dataclass
class Flags:
    quick: bool = False         # the reduced budget (about 15 minutes for all tables together)
    out_dir: str = "runs"       # runs go to OUT/TABLE/RUN
    data_dir: str = ""          # passed to every script that reads data
    dry_run: bool = False       # print the commands only
    seed: int = 0               # added to every training run's seed (into OUT/TABLE-seedS): --seed=1 is a 2nd seed


def get(S, *keys):
    """S[k1][k2]... (dict keys or list indices), None where a run or a key is missing."""
    for k in keys:
        S = S.get(k) if isinstance(S, dict) else S[k] if isinstance(S, list) and -len(S) <= k < len(S) else None
    return S


def fmt(x, spec=".4f"):
    return "—" if x is None else format(x, spec)


def pm(values, spec=".4f"):
    """Mean ± half the spread of the seeds (the README's ±), over the runs that exist."""
    v = [x for x in values if x is not None]
    return (fmt(v[0] if v else None, spec) if len(v) < 2 else
            f"{sum(v) / len(v):{spec}} ± {(max(v) - min(v)) / 2:{spec}}")


def md(header, rows):
    print("\n".join(["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                    ["| " + " | ".join(map(str, r)) + " |" for r in rows]))


# ----------------------------------------------------------------------------- LM tables (train_lm.py, eval_lm.py)

LM_QUICK = ["--max_iters=300", "--eval_interval=150", "--eval_iters=10"]
SEEDS = (1337, 1338)
BACKBONE_QUICK = (("default", "final_val_loss", 2.0788, 0.0077),)   # seeds 1337, 1338: 2.0866, 2.0711


def seeded(rows, quick):
    """train_lm.py runs NAME_sSEED of (name, flags, seeds, ...) rows; the quick budget has one seed."""
    return [Run(f"{name}_s{s}", "train_lm.py", merge(flags, [f"--seed={s}"], LM_QUICK if quick else []))
            for name, flags, n, *_ in rows for s in SEEDS[:1 if quick else n]]


def backbone_show(S, quick):
    s = S.get("default") or {}
    md(["run", "final val loss", "README", "wall", "training tokens/s", "README tokens/s"],
       [("`python train_lm.py`", fmt(s.get("final_val_loss")), "1.6865", fmt_seconds(s["wall_seconds"]) if s else "—",
         fmt(s.get("tokens_per_second"), ",.0f"), "15.3 k (quiet, 2 threads)")])


MOE = ["--ffn=moe", "--n_experts=8", "--top_k=1", "--router=softmax", "--aux_loss=switch"]
POOL = ["--ffn=unipool", "--pool_size=32", "--router=norm", "--aux_loss=pool"]
UNIPOOL = [  # run, flags, seeds, row label, README, paper (182M, Pile)
    ("dense", [], 2, "dense", "1.6919 ± 0.0055", "2.042"),
    ("moe", MOE, 2, "vanilla MoE: 8 experts per layer, softmax router, Switch loss", "1.7092 ± 0.0003", "1.9317"),
    ("unipool", POOL, 2, "UniPool: one pool of M = 8L = 32, NormRouter, pool loss", "1.6894 ± 0.0119", "1.9029"),
    ("unipool16", merge(POOL, ["--pool_size=16"]), 2, "UniPool, reduced pool M = 4L = 16 (50 %)", "1.6856 ± 0.0006",
     "1.9215 (M = 64, 66.7 %)"),
    ("ablation", merge(POOL, ["--router=softmax", "--aux_loss=switch"]), 2,
     "ablation: shared pool of 32 + softmax router + Switch loss", "1.7254 ± 0.0090", "1.9480"),
    ("shared", POOL + ["--n_shared=1"], 1, "UniPool + 1 shared expert per layer", "1.6421 (seed 1337)", "—"),
    ("biasfree", merge(POOL, ["--aux_loss=none", "--bias_rate=1e-3"]), 1, "UniPool, aux-loss-free balancing",
     "1.7397 (seed 1337)", "—")]


def unipool_runs(quick):
    probe = ["--probe_router=all", f"--eval_iters={10 if quick else 50}", "--out_dir={dir}/moe_s1337"]
    return seeded(UNIPOOL, quick) + [Run("probe", "eval_lm.py", probe)]


def unipool_show(S, quick):
    md(["model", "val loss", "README", "paper, 182M (Pile)"],
       [(label, pm([get(S, f"{name}_s{s}", "final_val_loss") for s in SEEDS[:1 if quick else n]]), readme, paper)
        for name, _, n, label, readme, paper in UNIPOOL])
    base = get(S, "probe", "val_loss")
    probe = [get(S, "probe", "random_layer_val_loss", str(layer)) for layer in range(4)]
    print("\nRouting probe of the vanilla MoE (seed 1337); the paper: a deep layer at random costs 1.0–1.6 points")
    md(["layer routed at random", "none", "0", "1", "2", "3"],
       [("val loss", fmt(base), *map(fmt, probe)), ("Δ", "", *(fmt(v and base and v - base, "+.3f") for v in probe)),
        ("Δ, README", "", "+1.016", "+0.286", "+0.113", "+0.148")])


SA = [("softmax", [], 2, "softmax (SDPA)", "1.6919 ± 0.0055"), ("sa", ["--attn_score=sa"], 2, "SA-1, x·softmax(x)",
      "1.7153 ± 0.0105"), ("sa_norm", ["--attn_score=sa_norm"], 2, "SA-2, normalised", "1.6929 ± 0.0075")]
SA_QUICK = (("softmax_s1337", "final_val_loss", 2.0788, 0.0077), ("sa_s1337", "final_val_loss", 2.1319, 0.0006),
            ("sa_norm_s1337", "final_val_loss", 2.1291, 0.0001))


def sa_show(S, quick):
    tps = {name: get(S, f"{name}_s1337", "tokens_per_second") for name, *_ in SA}
    md(["score", "val loss", "README", "train loss (seed 1337)", "tokens/s (seed 1337)", "vs softmax"],
       [(label, pm([get(S, f"{name}_s{s}", "final_val_loss") for s in SEEDS[:1 if quick else 2]]), readme,
         fmt(get(S, f"{name}_s1337", "final_train_loss")), fmt(tps[name], ",.0f"),
         fmt(tps[name] and tps["softmax"] and tps[name] / tps["softmax"], ".2f")) for name, _, _, label, readme in SA])


BPE = ["--dataset=shakespeare", "--block_size=256", "--batch_size=3", "--max_iters=600", "--eval_interval=200",
       "--warmup_iters=50"]
SEPLLM = [  # run, flags (train_lm.py, or eval_lm.py on the full-attention run), label, README val loss, paper
    ("full", [], "full attention, trained", "4.9426", "33.66 (full)"),
    ("sepllm", ["--attn_mask=sepllm", "--n_init=3", "--n_local=64"], "SepLLM (a=3, w=64), trained from scratch",
     "4.9569", "30.84 (n=64)"),
    ("streaming", ["--attn_mask=streaming", "--n_init=3", "--n_local=92"], "StreamingLLM (a=3, w=92), trained from "
     "scratch", "4.9516", "36.23 (n=64)"),
    ("free_sepllm", ["--eval_mask=sepllm", "--n_init=3", "--n_local=64"], "full-attention checkpoint, training-free "
     "SepLLM mask", "4.9431", "GSM8K: full's accuracy with 42 % of the KV"),
    ("free_streaming", ["--eval_mask=streaming", "--n_init=3", "--n_local=92"], "full-attention checkpoint, "
     "training-free StreamingLLM mask", "4.9405", "—")]
SEPCACHE = ["--stream=sepcache", "--n_init=4", "--sep_size=32", "--n_local=64", "--cache_capacity=256"]
SINK = ["--stream=sink", "--n_init=4", "--cache_capacity=178"]
STREAMS = [  # run, flags, tokens (full, quick), label, README perplexity, paper (PG19)
    ("sepcache_16k", SEPCACHE, (16384, 1024), "SepCache a=4, s=32, w=64, c=256", "134.17", "28.26"),
    ("sink_16k", SINK, (16384, 1024), "SinkCache a=4, c=178 (same average KV)", "133.60", "31.45"),
    ("sepcache_4k", SEPCACHE, (4096, 512), "SepCache, as above", "116.96", ""),
    ("sink_4k", SINK, (4096, 512), "SinkCache, as above", "116.46", ""),
    ("full_4k", ["--stream=full"], (4096, 512), "full cache, positions past the 256 trained", "161.77", "302.56")]
SEPLLM_QUICK = (("full", "final_val_loss", 8.1260, 0.0249), ("sepllm", "final_val_loss", 8.1043, 0.0399),
                ("streaming", "final_val_loss", 8.1205, 0.0237), ("free_sepllm", "val_loss", 8.1265, 0.0257),
                ("free_streaming", "val_loss", 8.1260, 0.0250), ("sepcache_16k", "ppl", 3367.1552, 46.6673),
                ("sink_16k", "ppl", 3365.4889, 49.3930), ("sepcache_4k", "ppl", 3281.8415, 20.0308),
                ("sink_4k", "ppl", 3280.6257, 21.9751), ("full_4k", "ppl", 3281.7244, 23.3092))


def sepllm_runs(quick):
    # quick: the GPT-2 vocabulary's output layer makes an iteration ~1 s on a CPU thread, so only the pipeline runs
    budget = ["--max_iters=30", "--eval_interval=30", "--warmup_iters=5"] if quick else []
    evals = ["--eval_iters=3"] if quick else []
    return ([Run(n, "train_lm.py", merge(BPE, f, budget, evals)) for n, f, *_ in SEPLLM[:3]] +
            [Run(n, "eval_lm.py", ["--out_dir={dir}/full", *f, *evals]) for n, f, *_ in SEPLLM[3:]] +
            [Run(n, "eval_lm.py", ["--out_dir={dir}/full", *f, f"--stream_tokens={tokens[quick]}"])
             for n, f, tokens, *_ in STREAMS])


def sepllm_show(S, quick):
    if quick:
        print("30 iterations: the pipeline runs, nothing is learnt yet (the README's budget itself does not separate "
              "the patterns at this size).")
    md(["run", "val loss", "README", "kept fraction", "paper: Pythia-160M WikiText ppl (GSM8K)"],
       [(label, fmt(get(S, n, "final_val_loss") or get(S, n, "val_loss")), readme,
         fmt(get(S, n, "kept_fraction"), ".3f"), paper) for n, _, label, readme, paper in SEPLLM])
    md(["cache", "tokens", "perplexity", "README", "average KV", "max KV", "tokens/s", "paper: PG19 20K, Llama-3-8B"],
       [(label, fmt(get(S, n, "tokens"), ","), fmt(get(S, n, "ppl"), ".2f"), readme,
         *(fmt(get(S, n, k), ".0f") for k in ("average_kv", "max_kv", "tokens_per_second")), paper)
        for n, _, _, label, readme, paper in STREAMS])


RECALL = ["--dataset=recall", "--block_size=30", "--recall_targets=answers", "--n_layer=2", "--n_embd=64",
          "--n_head=4", "--batch_size=32", "--lr=5e-4", "--min_lr=5e-4", "--warmup_iters=50", "--weight_decay=0",
          "--max_iters=6000", "--eval_interval=250", "--recall_far=8"]
RECALL_SEEDS = (1337, 1338, 1339, 1340)
POST = ["--lr=5e-4", "--min_lr=5e-4", "--max_iters=1500", "--warmup_iters=20", "--eval_interval=100",
        "--init_from={dir}/full_s{seed}/ckpt_best.pt"]
SEPLLM_MASK, STREAMING_MASK = ["--n_init=3", "--n_local=4"], ["--n_init=3", "--n_local=8"]   # kept 0.574 | 0.591
FIXLLM_MASK = ["--n_init=3", "--n_local=5"]        # every 5th token kept (the paper's k): kept 0.574, as SepLLM
RECALL_RUNS = [  # run, script, flags ({seed}: the row's seed), label, README answer acc / far (4 seeds)
    ("full", "train_lm.py", RECALL, "full attention", "1.000 / 1.000"),
    ("sepllm_post", "train_lm.py", merge(RECALL, POST, ["--attn_mask=sepllm"], SEPLLM_MASK),
     "SepLLM (a=3, w=4), post-trained from full", "1.000 / 1.000"),
    ("streaming_post", "train_lm.py", merge(RECALL, POST, ["--attn_mask=streaming"], STREAMING_MASK),
     "StreamingLLM (a=3, w=8), post-trained from full", "0.687 / 0.433"),
    ("fixllm_post", "train_lm.py", merge(RECALL, POST, ["--attn_mask=fixed"], FIXLLM_MASK),
     "FixLLM (a=3, every 5th, w=5), post-trained from full", "0.882 / 0.827"),
    ("sepllm_scratch", "train_lm.py", merge(RECALL, ["--attn_mask=sepllm", "--max_iters=10000"], SEPLLM_MASK),
     "SepLLM (a=3, w=4) from scratch, 10,000 steps", "0.409 / 0.408"),
    ("sa1", "train_lm.py", merge(RECALL, ["--attn_score=sa"]), "full attention, SA-1 x·softmax(x)", "0.849 / 0.849"),
    ("sa2", "train_lm.py", merge(RECALL, ["--attn_score=sa_norm"]), "full attention, SA-2 normalised", "1.000 / 1.000"),
    ("free_sepllm", "eval_lm.py", ["--out_dir={dir}/full_s{seed}", "--eval_mask=sepllm", *SEPLLM_MASK],
     "SepLLM mask on the full checkpoint, training-free", "0.261 / 0.123"),
    ("free_streaming", "eval_lm.py", ["--out_dir={dir}/full_s{seed}", "--eval_mask=streaming", *STREAMING_MASK],
     "StreamingLLM mask on the full checkpoint, training-free", "0.384 / 0.128")]
RECALL_SWEEP = [  # run, flags, label: SepLLM from scratch at two more learning rates, the first 2 seeds only
    (f"sepllm_scratch_lr{lr}", merge(RECALL, ["--attn_mask=sepllm", "--max_iters=10000", f"--lr={lr}",
                                              f"--min_lr={lr}"], SEPLLM_MASK), f"SepLLM from scratch, lr {lr}")
    for lr in ("1e-3", "2.5e-4")]
CACHES = [  # run, checkpoint, flags, label: average KV 15-16 on the stream of episodes. SepCache's w counts cached
    # entries, the new token comes on top: w=3 shows it the 4 tokens of the trained window (n_local=4), w=4 one more
    ("sepcache_w3", "sepllm_post", ["--stream=sepcache", "--n_init=3", "--sep_size=8", "--n_local=3",
                                    "--cache_capacity=15"], "SepCache a=3, s=8, w=3, c=15 on post-trained SepLLM"),
    ("sepcache", "sepllm_post", ["--stream=sepcache", "--n_init=3", "--sep_size=8", "--n_local=4",
                                 "--cache_capacity=16"], "SepCache a=3, s=8, w=4, c=16 on post-trained SepLLM"),
    ("sink", "streaming_post", ["--stream=sink", "--n_init=3", "--cache_capacity=16"],
     "SinkCache a=3, c=16 on post-trained StreamingLLM"),
    ("sepcache_at_stream", "sepllm_post", ["--stream=sepcache", "--n_init=3", "--sep_size=8", "--n_local=4",
                                           "--cache_capacity=16", "--cache_positions=stream"],
     "SepCache w=4, c=16, RoPE at stream positions"),
    ("sink_at_stream", "streaming_post", ["--stream=sink", "--n_init=3", "--cache_capacity=16",
                                          "--cache_positions=stream"], "SinkCache c=16, RoPE at stream positions")]


def recall_runs(quick):
    """Per seed (quick: the first), every row, so a table cut short still has whole seeds."""
    out = []
    for seed in RECALL_SEEDS[:1 if quick else None]:
        at = lambda flags: [f.replace("{seed}", str(seed)) for f in flags]  # noqa: E731
        out += [Run(f"{n}_s{seed}", script, at(f + ([f"--seed={seed}"] if script == "train_lm.py" else [])),
                    data=False) for n, script, f, *_ in RECALL_RUNS]
        out += [Run(f"{n}_s{seed}", "eval_lm.py", [f"--out_dir={{dir}}/{ckpt}_s{seed}", *f, "--stream_tokens=3100"],
                    data=False) for n, ckpt, f, _ in CACHES]        # 100 episodes of 31 tokens
    if not quick:
        out += [Run(f"{n}_s{seed}", "train_lm.py", f + [f"--seed={seed}"], data=False)
                for seed in RECALL_SEEDS[:2] for n, f, _ in RECALL_SWEEP]
    return out


def recall_show(S, quick):
    """The rows over the seeds whose full attention learnt the task (answer accuracy >= 0.9): only there does the
    comparison mean something; the other seeds are shown apart."""
    seeds = RECALL_SEEDS[:1 if quick else None]
    learnt = [s for s in seeds if (get(S, f"full_s{s}", "val_answer_acc") or 0) >= 0.9]
    for group in (learnt, [s for s in seeds if s not in learnt and get(S, f"full_s{s}")]):
        if not group:
            continue
        mean = lambda n, *k: pm([get(S, f"{n}_s{s}", *k) for s in group])  # noqa: E731
        print(f"\nSeeds {', '.join(map(str, group))}" + (" (full attention learnt the task)" if group == learnt else
                                                       " (full attention did NOT learn the task)") +
              ": mean ± half the spread. Far: the value lies >= 8 tokens back, beyond every window compared.")
        md(["run", "kept", "answer acc", "far", "1st query", "4th query", "README acc / far"],
           [(label, mean(n, "kept_fraction"), mean(n, "val_answer_acc"), mean(n, "val_answer_acc_far"),
             mean(n, "val_answer_acc_by_query", 0), mean(n, "val_answer_acc_by_query", -1), readme)
            for n, _, _, label, readme in RECALL_RUNS])
        md(["streaming: 100 episodes as one stream", "average KV", "answer acc"],
           [(label, mean(n, "average_kv"), mean(n, "answer_acc")) for n, _, _, label in CACHES])
    if not quick:
        mean = lambda n, *k: pm([get(S, f"{n}_s{s}", *k) for s in RECALL_SEEDS[:2]])  # noqa: E731
        print(f"\nSepLLM from scratch at other learning rates, seeds {RECALL_SEEDS[0]} and {RECALL_SEEDS[1]}:")
        md(["run", "answer acc", "far"], [(label, mean(n, "val_answer_acc"), mean(n, "val_answer_acc_far"))
                                          for n, _, label in RECALL_SWEEP])
    print("\nNo recall: a random value 0.125; a value of the context about 0.35-0.41.")


# ----------------------------------------------------------------------------- recommender tables (train_rec.py)

def lightgcn_runs(quick):
    return [Run("ml-latest-small", "train_rec.py", ["--epochs=10", "--eval_every=10"] if quick else []),
            Run("ml-1m", "train_rec.py", ["--dataset=ml-1m", f"--epochs={1 if quick else 100}",
                                          f"--eval_every={1 if quick else 10}"]),
            Run("bench", "bench_rec.py", ["--dataset=ml-1m"] + (["--share=0.1"] if quick else []))]


LIGHTGCN_QUICK = (("ml-latest-small", "test/recall@20", 0.1211, 0.0002), ("ml-latest-small", "test/ndcg@20", 0.1786,
                  0.0033), ("ml-1m", "test/recall@20", 0.1092, 0.0000), ("ml-1m", "test/ndcg@20", 0.1751, 0.0000))


def lightgcn_show(S, quick):
    md(["data", "best val epoch", "val Recall@20", "val NDCG@20", "test Recall@20", "test NDCG@20", "README test"],
       [(n, fmt(get(S, n, "best_epoch"), "d"), *(fmt(get(S, n, sp, m)) for sp in ("val", "test")
                                                 for m in ("recall@20", "ndcg@20")), readme)
        for n, readme in (("ml-latest-small", "0.1978 / 0.2774"), ("ml-1m", "0.2182 / 0.3169"))])
    print("\nWhere an epoch's time goes (README, ml-1m: sampling 5.1x, train steps 7.7x, whole epoch 7.5x faster):\n")
    print(get(S, "bench", "output") or "—")


BASE = ["--batch_size=8192", "--lr=0.01", "--epochs=10", "--eval_every=5", "--patience=3"]
UNLEARN = ["--method=unlearnrec", "--batch_size=8192", "--lr=0.005", "--pre_epochs=4", "--redraw_every=2",
           "--finetune_epochs=2", "--forget=0.01"]
UL_SEEDS = (2020, 2021, 2022)   # each: the validation split, the base, the request, pre-training, fine-tuning
UL_VARIANTS = (  # name, base model, flags on top of UNLEARN, seeds, what it changes (the base of the same seed;
    # retraining, where a variant does not retrain: the main run's of the same seed, same request and settings)
    ("ctrl", "lightgcn", ["--pretrain_control", "--retrain=false"], 2,
     "fine-tune-only also pre-trained like the encoder (--pretrain_control)"),
    ("pre10", "lightgcn", ["--pre_epochs=10", "--redraw_every=1", "--lambda_ssl=1e-3"], 2,
     "a richer pre-training: 10 random requests (one an epoch) and the SSL term at the paper's 1e-3"),
    ("h0req", "lightgcn", ["--h0_all=false"], 1, "H0 on the request's neighbourhood only (--h0_all=false)"),
    ("ssl", "lightgcn", ["--lambda_ssl=1e-3"], 1, "the SSL term at the paper's 1e-3"),
    ("lr0.001", "lightgcn", ["--lr=0.001", "--retrain=false"], 3, "pre-training and fine-tuning at lr 1e-3"),
    ("lr0.02", "lightgcn", ["--lr=0.02", "--retrain=false"], 1, "pre-training and fine-tuning at lr 2e-2"),
    ("lr0.001", "mf", ["--lr=0.001", "--retrain=false"], 2, "pre-training and fine-tuning at lr 1e-3"),
    ("lr0.02", "mf", ["--lr=0.02", "--retrain=false"], 1, "pre-training and fine-tuning at lr 2e-2"),
    ("q4", "lightgcn", ["--snapshots_per_epoch=4", "--retrain=false"], 1, "scored every quarter epoch"),
    ("q4", "mf", ["--snapshots_per_epoch=4", "--retrain=false"], 1, "scored every quarter epoch"),
    ("lr0.001_q4", "mf", ["--lr=0.001", "--snapshots_per_epoch=4", "--retrain=false"], 1,
     "lr 1e-3, scored every quarter epoch"))


def unlearnrec_runs(quick):
    data, seeds = [f"--dataset={'ml-latest-small' if quick else 'ml-1m'}"], UL_SEEDS[:1 if quick else 3]
    ul = lambda name, base, s, more=(): Run(name, "train_rec.py", merge(  # noqa: E731
        data + UNLEARN, [f"--base={{dir}}/{base}/ckpt_best.pt", f"--seed={s}", *more]))
    runs = [r for model in ("lightgcn", "mf") for s in seeds for r in (
        Run(f"base_{model}_s{s}", "train_rec.py", data + BASE + [f"--model={model}", f"--seed={s}"]),
        ul(f"ul_{model}_s{s}", f"base_{model}_s{s}", s))]
    runs += [ul(f"ul_{model}_{v}_s{s}", f"base_{model}_s{s}", s, more) for v, model, more, n, _ in UL_VARIANTS
             for s in seeds[:n]]
    if not quick:    # a base trained to validation early stopping (so is its retraining); 5 fine-tuning epochs
        runs += [r for s in UL_SEEDS[:2] for r in (
            Run(f"base_conv_s{s}", "train_rec.py", data + merge(BASE, ["--epochs=100", f"--seed={s}"])),
            ul(f"ul_conv_s{s}", f"base_conv_s{s}", s, ["--finetune_epochs=5"]))]
        # seed 2020 again, scored every quarter epoch, alone on the machine: its seconds per epoch compare
        runs += [ul("ul_conv_q4_s2020", "base_conv_s2020", 2020, ["--finetune_epochs=5", "--snapshots_per_epoch=4"])]
    return runs


def ul_table(S, title, names, reference=None):
    """The rows of runs `names` (one per seed), mean ± half the spread; retraining from `reference` runs (the same
    seeds) where the runs did not retrain; the membership AUC's distance to the same seed's retraining."""
    runs = [{r["model"]: r for r in get(S, n, "steps", 0, "rows") or []} for n in names]
    for run, ref in zip(runs, reference or names):
        run.setdefault("retrained", {r["model"]: r for r in get(S, ref, "steps", 0, "rows") or []}.get("retrained"))
    runs = [r for r in runs if len(r) > 1]
    models = list(dict.fromkeys(m for r in runs for m in r if r[m] is not None))
    print(f"\n{title}: {len(runs)} seed(s), a 1 % random request of "
          f"{get(S, names[0], 'steps', 0, 'requests') or '?'} edges")
    rows = []
    for m in models:
        got = [r[m] for r in runs if r.get(m)]
        dist = [abs(r[m]["mia_auc"] - r["retrained"]["mia_auc"]) for r in runs if r.get(m) and r.get("retrained")]
        rows.append((m, pm([get(r, "test", "recall@20") for r in got]), pm([r["mia_auc"] for r in got], ".3f"),
                     pm(dist, ".3f") if m != "retrained" else "", fmt(sum(r["mia_null_sd"] for r in got) / len(got)),
                     pm([get(r, "forgotten", "mean") for r in got], ".2f"), pm([r["seconds"] for r in got], ".1f")))
    md(["model @ fine-tuning budget", "test Recall@20", "membership AUC", "|AUC − retrained AUC|, same seed",
        "null SD of the AUC", "forgotten score (mean)", "train s"], rows)
    print("pre-training s: " + pm([get(S, n, "times", "pretrain_seconds") for n in names], ".1f"))


def unlearnrec_show(S, quick):
    seeds = UL_SEEDS[:1 if quick else 3]
    for model in ("lightgcn", "mf"):
        ul_table(S, f"{model} base (10 epochs)", [f"ul_{model}_s{s}" for s in seeds])
    for v, model, _, n, about in UL_VARIANTS:
        ul_table(S, f"{model} base, {about}", [f"ul_{model}_{v}_s{s}" for s in seeds[:n]],
                 [f"ul_{model}_s{s}" for s in seeds[:n]])
    if not quick:
        ul_table(S, "lightgcn base trained to early stopping, retraining too", [f"ul_conv_s{s}" for s in UL_SEEDS[:2]])
        ul_table(S, "the same, seed 2020, every quarter epoch, run alone", ["ul_conv_q4_s2020"])


STAGES = ["--teacher={dir}/stages/teacher/ckpt_best.pt", "--intermediate={dir}/stages/intermediate/ckpt_best.pt"]
QUICK_ROUNDS = ["--rounds=2", "--rho=0.56", "--rho_emb=0.67", "--round_epochs=2", "--eval_every=1", "--kd_nodes=256",
                "--kd_triples=10000"]      # latest-small: 2 rounds to about 20 % / 10 %, cheaper KD
ML1M = ["--dataset=ml-1m", "--method=lightgnn", "--teacher={dir}/teacher/ckpt_best.pt", "--mid_epochs=5",
        "--rounds=3", "--rho=0.42", "--rho_emb=0.54", "--round_epochs=2", "--eval_every=1", "--patience=3"]
CONTROLS = (("random", ["--prune=random"]), ("no_kd", ["--kd_pred=0", "--kd_emb=0", "--uni=0", "--sub=0"]))


def lightgnn_runs(quick):
    if not quick:   # ml-1m: an 8-layer teacher to early stopping, the pipeline, the controls on its intermediate
        teacher = ["--dataset=ml-1m", "--n_layers=8", "--self_loops", "--combine=sum", "--batch_size=8192",
                   "--lr=0.003", "--epochs=80", "--eval_every=2", "--patience=4"]
        return [Run("teacher", "train_rec.py", teacher), Run("learned", "train_rec.py", ML1M,
                                                             done=lambda s: len(s["rounds"]) == 6)] + [
            Run(name, "train_rec.py", ML1M + ["--intermediate={dir}/learned/intermediate/ckpt_best.pt"] + extra,
                done=lambda s: len(s["rounds"]) == 6) for name, extra in CONTROLS]
    # latest-small: the first run trains the stages the others reuse (its own student is one epoch, not shown)
    first = ["--method=lightgnn", "--epochs=5", "--mid_epochs=5", "--eval_every=1", "--rounds=0", "--round_epochs=1",
             "--kd_nodes=256", "--kd_triples=10000"]
    return [Run("stages", "train_rec.py", first, done=lambda s: len(s["rounds"]) == 3)] + [
        Run(name, "train_rec.py", ["--method=lightgnn"] + STAGES + QUICK_ROUNDS + extra,
            done=lambda s: len(s["rounds"]) == 5) for name, extra in (("learned", []),) + CONTROLS]


def lightgnn_show(S, quick):
    rows = [(r["model"], r) for r in get(S, "learned", "rounds") or []]
    rows += [(f"control: {c}, last round", get(S, run, "rounds", -1) or {})
             for run, c in (("random", "random pruning"), ("no_kd", "learned pruning, no distillation"))]
    teacher = get(S, "learned", "rounds", 0, "test", "recall@20")
    md(["model", "edges kept", "entries kept", "propagation cost", "val Recall@20", "test Recall@20",
        "of the teacher's", "test NDCG@20", "train min"],
       [(name, *(fmt(r.get(k), ".3f") for k in ("edges_kept", "entries_kept", "cost")),
         fmt(get(r, "val", "recall@20")), fmt(get(r, "test", "recall@20")),
         fmt(teacher and get(r, "test", "recall@20") and get(r, "test", "recall@20") / teacher, ".1%"),
         fmt(get(r, "test", "ndcg@20")), fmt(r["train_seconds"] / 60 if r else None, ".1f")) for name, r in rows])
    print("README, round 3 (0.195 of the edges, 0.097 of the entries): "
          "test Recall@20 0.1553 = 75.0 % of the teacher's 0.2072; random pruning 0.0555; no distillation 0.1153")
    if quick:
        print("At this budget the distilled students have not started to learn (the uniformity terms slow the start,"
              " and the KD terms here use 256 nodes and 10,000 triples): it runs the pipeline, the effect needs the "
              "README's budget.")


def kernels_runs(quick):
    budget = ["--reps=2", "--iters=20", "--experts=16"] if quick else ["--reps=5", "--iters=100"]
    return [Run("moe", "bench_kernels.py", ["--part=moe"] + budget, data=False),
            Run("attention", "bench_kernels.py", ["--part=attention"] + (["--reps=2"] if quick else []), data=False)]


def kernels_show(S, quick):
    print(get(S, "moe", "output") or "—")
    print("README (quiet, 2 threads): E=16 top-1 142.7 ms with _grouped_mm, 1.19x dense; an iteration dense 47.3 ms "
          "vs UniPool 58.9 ms (1.25x)\n")
    print(get(S, "attention", "output") or "—")
    print("README (quiet, 2 threads): T=4096 forward+backward 53.5 vs 308.5 ms (5.77x); T=8192 8.73x")


TABLES = {
    "backbone": Table("LM backbone row: `python train_lm.py` (char-level Tiny Shakespeare)", "2 min", "0.5 min",
                      lambda quick: [Run("default", "train_lm.py", LM_QUICK if quick else [])], backbone_show,
                      "nanoGPT's CPU config reaches val 1.886 in 2000 iterations", BACKBONE_QUICK),
    "unipool": Table("UniPool vs vanilla MoE vs dense, reduced pool, ablations, 2 seeds; routing probe", "1.5 h",
                     "5 min", unipool_runs, unipool_show, "a shared pool lowers val loss by 0.029 at 182M (up to "
                     "0.039); 41.6–66.7 % of the expert budget matches or beats vanilla"),
    "sa_softmax": Table("SA-Softmax: softmax vs SA-1 vs SA-2, 2 seeds", "1 h", "1.5 min",
                        lambda quick: seeded(SA, quick), sa_show,
                        "x·softmax(x) trains better than softmax (up to 2.7B; its tables were not available)",
                        SA_QUICK),
    "sepllm": Table("SepLLM on GPT-2 BPE Shakespeare: trained, training-free, streaming (SepCache / SinkCache)",
                    "1.5 h", "2.5 min", sepllm_runs, sepllm_show, "separators carry their segment: SepLLM matches "
                    "full attention with less KV and beats StreamingLLM", SEPLLM_QUICK),
    "recall": Table("SepLLM on the associative-recall task: post-training, from scratch, FixLLM, SA-1/SA-2, "
                    "training-free, streaming, 4 seeds", "1.9 h", "17 min", recall_runs, recall_show,
                    "a segment's information is compressed into its separator"),
    "lightgcn": Table("LightGCN: latest-small and ml-1m runs, epoch benchmark vs the reference's way", "40 min",
                      "1.3 min", lightgcn_runs, lightgcn_show, "the reference code spends most of an epoch sampling "
                      "in Python", LIGHTGCN_QUICK),
    "lightgnn": Table("LightGNN on ml-1m (quick: latest-small): teacher, intermediate, pruned student; controls",
                      "2 h", "2.5 min", lightgnn_runs, lightgnn_show, "80 % fewer edges and 90 % fewer embedding "
                      "entries at the teacher's accuracy"),
    "unlearnrec": Table("UnlearnRec on ml-1m (quick: latest-small): 1 % requests, fine-tuning budgets 0 steps to 2 "
                        "epochs, paired with fine-tune-only; LightGCN and MF bases, 3 seeds; variants", "2.6 h", "5 min",
                        unlearnrec_runs, unlearnrec_show, "> 10x faster than retraining, with retraining's accuracy"),
    "kernels": Table("MoE dispatch and SepLLM attention benchmarks (bench_kernels.py)", "5 min", "0.7 min",
                     kernels_runs, kernels_show, "(none: this project's kernels against PyTorch)"),
}


# ----------------------------------------------------------------------------- running

def check_quick(table, S):
    """Each quick number beside the value expected at the quick budget, so a student can tell a quick run came
    out right: inside mean ± half the spread of two seeds (on another machine, the last digits may differ)."""
    if not table.expected:
        return print("\nThis table has no expected values at the quick budget yet.")
    print("\nThe quick run against its expected values (mean ± half the spread of --seed=0 and --seed=1, 2-core CPU):")
    got = [get(S, run, *key.split("/")) for run, key, *_ in table.expected]
    md(["run", "value", "this run", "expected", "inside"],
       [(run, key, fmt(g), f"{m:.4f} ± {sp:.4f}", "—" if g is None else "yes" if abs(g - m) <= sp + 1e-4 else "no")
        for g, (run, key, m, sp) in zip(got, table.expected)])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["list"]:
        print("python experiments.py TABLE [--quick] [--out_dir=runs] [--data_dir=DIR] [--dry_run] [--seed=S]\n\n"
              f"{'table':11s} {'full':>6s} {'quick':>7s}  reproduces")
        for name, t in TABLES.items():
            print(f"{name:11s} {t.full:>6s} {t.quick:>7s}  {t.about}")
        return print("\nTimes on the 2-core CPU, 1 thread per run, other jobs beside (load average 2-4): full from "
                     "the README's runs, quick measured")
    if not argv or argv[0] not in TABLES:
        raise UserError((f"unknown table {argv[0]!r}" if argv and not argv[0].startswith("-") else "name a table") +
                        f"; the tables are {', '.join(TABLES)} (python experiments.py list)")
    name, table, cfg = argv[0], TABLES[argv[0]], parse_flags(Flags, argv[1:])
    table_dir = os.path.join(cfg.out_dir, name + "-quick" * cfg.quick + (f"-seed{cfg.seed}" if cfg.seed else ""))
    runs = table.runs(cfg.quick)
    cmds = [command(r, table_dir, cfg.data_dir, cfg.seed) for r in runs]
    if cfg.dry_run:
        return print("\n".join("python " + shlex.join(argv_) for argv_ in cmds))
    check_data(cmds, cfg.data_dir)
    t0, summaries = time.time(), {}
    for run, argv_ in zip(runs, cmds):
        run_dir = os.path.join(table_dir, run.name)
        if load_summary(run, run_dir) is None:
            print(f"\n== {name}/{run.name}: python {shlex.join(argv_)}", flush=True)
            execute(run, argv_, run_dir)
        else:
            print(f"== {name}/{run.name}: done before (its summary.json exists), not run again")
        summaries[run.name] = load_summary(run, run_dir)
    print(f"\n## {name}: {table.about}" + "\nquick budget: numbers are not the README's (see the end)" * cfg.quick)
    print(f"The paper: {table.claim}.")
    table.show(summaries, cfg.quick)
    if cfg.quick:
        check_quick(table, summaries)
    print(f"\n{len(runs)} runs in {table_dir}; this command took {fmt_seconds(time.time() - t0)}")


if __name__ == "__main__":
    run_main(main)
