#!/usr/bin/env python3
"""GBA-ITC group-size study: train the tiny flavor on the emoji demo set with N data-parallel
CPU ranks under four contrastive configurations and report held-out retrieval, ITC traffic,
step time and loss memory, plus the planner's projection of the same group sizes to a cluster.

Configurations (same seed, data order, step budget, micro-batch b and global batch, so the same
samples and optimizer batch; M = global / (b·N) micro-batches per step):

* ``global``: ``--itc-group-size -1`` (k = N), N·b pairs per contrastive batch;
* ``k2``: ``--itc-group-size 2``, 2·b pairs;
* ``k1``: ``--itc-group-size 1``, b pairs (no communication);
* ``k2-acc2``: ``--itc-group-size 2 --itc-accumulate-features``, 2·M·b pairs (= N·b at the
  defaults: global ITC's negatives over k = 2).

Per run (``OUT/<config>_s<seed>/``): ``python -m torch.distributed.run --nproc-per-node N -m
megatron_m2.pretrain`` with :data:`RECIPE` (mirrors ``examples/local/demo_cpu.sh``) and
``--extra-args``, then ``m2-eval --task retrieval`` on the test split (``eval.json``); the run's
record, ``result.json`` (written last: a run without it is incomplete), holds the retrieval per
language, the median seconds per step from ``log.jsonl`` (global batch / ``samples_per_s``,
logged every step, the first step left out) and the loss's ITC bytes per rank per step and peak
loss memory, measured on the loss alone over N gloo processes with the run's k, b, D, M and
heads (:mod:`megatron_m2.loss_measure`, as ``tools/bench_itc.py``) next to the planner's figures
for the same layout.

Then: ``OUT/study.json`` (every run, the per-config aggregate over seeds, the chance row, the
projection), the plot (``--plot``) and the generated section of ``--results-md`` between
``<!-- gba-study:begin -->`` and ``<!-- gba-study:end -->`` (the rest of the file, the
``<!-- gba-study:discussion -->`` paragraph included, is kept). The projection is
:func:`megatron_m2.planner.make_plan` for 0.4b on 32 nodes × 8 GPUs, TP1 PP1 DP256, the
planner's default micro-batch and M as in the study, for k = 256, 8, 2, 1 and 2 with feature
accumulation.

Examples::

    bash examples/studies/gba_group_size.sh                   # the study: 4 configs x 2 seeds
    python tools/study_gba.py --iters 10 --seeds 1234 --configs global k2-acc2 \\
        --out-dir runs/study_gba_smoke --plot runs/study_gba_smoke/gba_study.png \\
        --results-md runs/study_gba_smoke/results.md          # a smoke
    python tools/study_gba.py --resume                        # continue an interrupted study
    python tools/study_gba.py --report-only                   # re-aggregate the finished runs
    python tools/study_gba.py --extra-args="--lr 2e-3 --lr-warmup-iters 20"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# -- the recipe ------------------------------------------------------------------------------------
RECIPE = [
    # The demo's recipe (examples/local/demo_cpu.sh: model, data and optimizer flags) for runs a
    # fifth its length: the batch sizes and iterations are the study's, and the warm-up is 50
    # steps instead of the demo's 100. --extra-args adds to it.
    "--flavor", "tiny",
    "--caption-lang", "balanced", "--randaugment", "none", "--num-workers", "1",
    "--lr", "1e-3", "--lr-warmup-iters", "50", "--lr-decay-style", "cosine",
    "--weight-decay", "0.05", "--clip-grad", "1.0",
]
"""The training recipe shared by every configuration."""

CONFIGS = {
    "global": {"k": -1, "accumulate": False},
    "k2": {"k": 2, "accumulate": False},
    "k1": {"k": 1, "accumulate": False},
    "k2-acc2": {"k": 2, "accumulate": True},
}
"""The configurations: ITC group size k (-1: all DP ranks) and feature accumulation."""

STUDY_FLAGS = {"--micro-batch-size", "--global-batch-size", "--train-iters", "--seed",
               "--itc-group-size", "--itc-aggregate-nodes", "--itc-accumulate-features",
               "--save", "--load", "--log-json", "--data-path", "--tokenizer-model",
               "--tensor-model-parallel-size", "--pipeline-model-parallel-size"}
"""m2-pretrain flags the study sets itself (refused in ``--extra-args``)."""

DEFAULT_SEEDS = (1234, 1)
BEGIN, END = "<!-- gba-study:begin -->", "<!-- gba-study:end -->"
DISCUSSION = "<!-- gba-study:discussion -->"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--iters", type=int, default=200,
                   help="training steps per run (default: 4 configs x 2 seeds in about 40 min "
                        "on a 2-core CPU box)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="configurations to run (default: all)")
    p.add_argument("--out-dir", default="runs/study_gba", help="run folders and study.json")
    p.add_argument("--resume", action="store_true",
                   help="skip runs whose result.json exists with the same training command")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: aggregate and report the finished runs")
    p.add_argument("--extra-args", default="",
                   help="more m2-pretrain flags for every run (one string, shell-quoted)")
    p.add_argument("--nproc", type=int, default=4, help="data-parallel CPU ranks (N)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="b")
    p.add_argument("--global-batch-size", type=int, default=64)
    p.add_argument("--data", default="data/emoji_demo",
                   help="dataset folder: train, test and tokenizer.model")
    p.add_argument("--python", default=sys.executable, help="interpreter for the runs")
    p.add_argument("--json", dest="json_path", default=None,
                   help="the study's JSON (default: OUT/study.json)")
    p.add_argument("--plot", default="docs/img/gba_study.png")
    p.add_argument("--results-md", default="docs/results.md")
    p.add_argument("--loss-iters", type=int, default=5,
                   help="timed repetitions of the loss-alone measurement")
    args = p.parse_args(argv)
    bad = [c for c in args.configs if CONFIGS[c]["k"] > 0 and args.nproc % CONFIGS[c]["k"]]
    if bad:
        p.error(f"--nproc {args.nproc} is not divisible by the k of {bad}")
    if args.global_batch_size % (args.micro_batch_size * args.nproc):
        p.error("--global-batch-size must be a multiple of --micro-batch-size x --nproc")
    owned = sorted({a.split("=", 1)[0] for a in shlex.split(args.extra_args)} & STUDY_FLAGS)
    if owned:
        p.error(f"--extra-args may not set {', '.join(owned)}: the study sets them (use its own "
                "options: --iters, --seeds, --micro-batch-size, --global-batch-size, --nproc)")
    args.json_path = args.json_path or os.path.join(args.out_dir, "study.json")
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return args


# -- settings --------------------------------------------------------------------------------------
def flag_value(argv, flag, default=None):
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``argv``."""
    value = default
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def study_settings(args):
    """What every run shares: sizes, recipe, the model's embedding width and ITC heads."""
    from megatron_m2.flavors import get_flavor

    recipe = RECIPE + shlex.split(args.extra_args)
    flavor = flag_value(recipe, "--flavor", "tiny")
    n, b, gbs = args.nproc, args.micro_batch_size, args.global_batch_size
    return {"nproc": n, "micro_batch": b, "global_batch": gbs, "micro_batches": gbs // (b * n),
            "iters": args.iters, "seeds": list(args.seeds), "flavor": flavor,
            "embed_dim": get_flavor(flavor).embed_dim,
            "heads": flag_value(recipe, "--itc-heads", "both"), "data": args.data,
            "recipe": list(RECIPE), "extra_args": shlex.split(args.extra_args)}


def config_facts(name, s):
    """k (resolved), M, the contrastive batch and negatives per sample of a configuration."""
    c = CONFIGS[name]
    k = s["nproc"] if c["k"] == -1 else c["k"]
    pairs = k * s["micro_batch"] * (s["micro_batches"] if c["accumulate"] else 1)
    return {"config": name, "k": k, "itc_group_size_flag": c["k"], "accumulate": c["accumulate"],
            "micro_batches": s["micro_batches"], "contrastive_batch": pairs,
            "negatives_per_sample": pairs - 1}


def train_command(args, s, name, seed, run_dir):
    c = CONFIGS[name]
    cmd = [args.python, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(s["nproc"]), "-m", "megatron_m2.pretrain",
           "--data-path", f"{args.data}/train",
           "--tokenizer-model", f"{args.data}/tokenizer.model",
           *s["recipe"],
           "--micro-batch-size", str(s["micro_batch"]),
           "--global-batch-size", str(s["global_batch"]), "--train-iters", str(args.iters),
           "--seed", str(seed), "--itc-group-size", str(c["k"])]
    if c["accumulate"]:
        cmd.append("--itc-accumulate-features")
    cmd += ["--log-interval", "1", "--save", run_dir,
            "--log-json", os.path.join(run_dir, "log.jsonl"), *s["extra_args"]]
    return cmd


def eval_command(args, run_dir):
    return [args.python, "-m", "megatron_m2.cli.evaluate", "--load", run_dir,
            "--task", "retrieval", "--data", f"{args.data}/test", "--device", "cpu", "--json",
            "--output", os.path.join(run_dir, "eval.json"), "--no-progress"]


def run_name(name, seed):
    return f"{name}_s{seed}"


# -- measuring -------------------------------------------------------------------------------------
def measure_itc(s, names, iters=5):
    """``{config: ITC figures}``: the loss alone over N gloo processes with the configuration's
    k, b, D, M and heads (:func:`megatron_m2.loss_measure.measure_loss_cases`), and the
    planner's figures for the same layout (the flavor on one node of N)."""
    from megatron_m2.flavors import get_flavor
    from megatron_m2.loss_measure import LossCase, measure_loss_cases
    from megatron_m2.planner import Cluster, Layout, make_plan

    cases = [LossCase("itc", CONFIGS[n]["k"], s["micro_batch"], s["embed_dim"],
                      s["micro_batches"], CONFIGS[n]["accumulate"], s["heads"]) for n in names]
    rows = measure_loss_cases(s["nproc"], cases, iters)
    out = {}
    for name, row in zip(names, rows):
        plan = make_plan(get_flavor(s["flavor"]),
                         Layout(micro_batch=s["micro_batch"], global_batch=s["global_batch"],
                                itc_group_size=CONFIGS[name]["k"], itc_heads=s["heads"],
                                itc_accumulate_features=CONFIGS[name]["accumulate"]),
                         Cluster(nodes=1, gpus_per_node=s["nproc"]), model_name=s["flavor"])
        out[name] = {"bytes_per_rank_per_step": row["bytes_per_rank"],
                     "peak_loss_bytes": row["peak_loss_bytes"], "loss_ms": row["ms"],
                     "planned_bytes_per_rank_per_step":
                         plan.communication["itc"]["gba"]["bytes_sent_per_step"],
                     "planned_loss_bytes": plan.memory["per_stage"][-1]["loss_bytes"]}
    return out


def step_time(log_path, global_batch):
    """Median seconds per step from a run's ``log.jsonl``: global batch / ``samples_per_s``
    of every logged record (the first, which carries the start-up, left out when 3 or more)."""
    recs = []
    with open(log_path) as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                if rec.get("samples_per_s"):
                    recs.append(global_batch / rec["samples_per_s"])
    if not recs:
        raise ValueError(f"{log_path}: no record with samples_per_s")
    if len(recs) >= 3:
        recs = recs[1:]
    recs.sort()
    mid = len(recs) // 2
    median = recs[mid] if len(recs) % 2 else 0.5 * (recs[mid - 1] + recs[mid])
    return {"median_s": median, "records": len(recs)}


def retrieval_summary(eval_json):
    """Per language: mean recall, R@1/5/10 averaged over both directions, and the raw row."""
    with open(eval_json) as f:
        results = json.load(f)["results"]
    out = {}
    for lang, row in results.items():
        if not isinstance(row, dict) or "mean_recall" not in row:
            continue
        summary = {"mean_recall": row["mean_recall"]}
        for k in (1, 5, 10):
            summary[f"r{k}"] = 0.5 * (row[f"i2t_r{k}"] + row[f"t2i_r{k}"])
        out[lang] = {**summary, "raw": row}
    return out


# -- runs ------------------------------------------------------------------------------------------
def _read_json(path):
    with open(path) as f:
        return json.load(f)


def load_result(run_dir):
    path = os.path.join(run_dir, "result.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def pending_runs(args, s):
    """``[(config, seed, run_dir, train command)]`` still to run: all of them, or with
    ``--resume`` those without a result.json made by the same training command."""
    todo = []
    for seed in args.seeds:
        for name in args.configs:
            run_dir = os.path.join(args.out_dir, run_name(name, seed))
            cmd = train_command(args, s, name, seed, run_dir)
            done = load_result(run_dir)
            if args.resume and done is not None:
                if done.get("train_command") == cmd[1:]:
                    continue
                print(f"{run_name(name, seed)}: result.json is from another command; rerunning")
            todo.append((name, seed, run_dir, cmd))
    return todo


def run_logged(cmd, log_path):
    """Run ``cmd`` with its output in ``log_path``; one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=ROOT).returncode


def _tail(path, n=30):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def git_state():
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    return {"commit": commit, "dirty": dirty}


def machine():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "cpu": platform.processor() or platform.machine(),
            "system": platform.system(), "python": platform.python_version()}


def run_one(args, s, name, seed, run_dir, cmd, itc, runner=run_logged):
    """Train, evaluate and write ``result.json`` for one run; returns the record."""
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    t0 = time.time()
    if runner(cmd, os.path.join(run_dir, "train.log")):
        raise RuntimeError(f"training {run_name(name, seed)} failed; the end of "
                           f"{run_dir}/train.log:\n{_tail(os.path.join(run_dir, 'train.log'))}")
    t1 = time.time()
    if runner(eval_command(args, run_dir), os.path.join(run_dir, "eval.log")):
        raise RuntimeError(f"evaluating {run_name(name, seed)} failed; the end of "
                           f"{run_dir}/eval.log:\n{_tail(os.path.join(run_dir, 'eval.log'))}")
    rec = {**config_facts(name, s), "seed": seed, "iters": args.iters,
           "train_command": cmd[1:], "study_command": study_command(args),
           "settings": {k: v for k, v in s.items() if k != "seeds"}, "machine": machine(),
           **git_state(),
           "finished": datetime.datetime.now().isoformat(timespec="seconds"),
           "train_wall_s": round(t1 - t0, 1), "eval_wall_s": round(time.time() - t1, 1),
           "retrieval": retrieval_summary(os.path.join(run_dir, "eval.json")),
           "eval_extra": {k: v for k, v in _read_json(os.path.join(run_dir, "eval.json")).items()
                          if k not in ("results", "load", "data", "task")},
           "step_time": step_time(os.path.join(run_dir, "log.jsonl"), s["global_batch"]),
           "itc": itc[name]}
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump(rec, f, indent=1)
    return rec


# -- aggregation -----------------------------------------------------------------------------------
def stat(values):
    """mean, sample standard deviation (0 for one value), min, max and the values."""
    import statistics

    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def languages(records):
    return list(records[0]["retrieval"]) if records else []


def run_metrics(rec):
    """The per-run figures aggregated over seeds, flat: ``en.mean_recall``, ``en.r1``, ...,
    ``r1``/``r5``/``r10`` (mean over languages and directions), step and ITC figures."""
    out = {}
    langs = list(rec["retrieval"])
    for lang in langs:
        for key in ("mean_recall", "r1", "r5", "r10"):
            out[f"{lang}.{key}"] = rec["retrieval"][lang][key]
    for key in ("mean_recall", "r1", "r5", "r10"):
        out[key] = sum(rec["retrieval"][lang][key] for lang in langs) / len(langs)
    out["step_s"] = rec["step_time"]["median_s"]
    out["itc_bytes_per_rank_per_step"] = rec["itc"]["bytes_per_rank_per_step"]
    out["peak_loss_bytes"] = rec["itc"]["peak_loss_bytes"]
    out["loss_ms"] = rec["itc"]["loss_ms"]
    return out


def aggregate(records, names):
    """``{config: {facts..., seeds, metrics: {name: stat}}}`` over the seeds of each config, in
    the order of ``names`` (configs without a finished run are left out)."""
    out = {}
    for name in names:
        recs = [r for r in records if r["config"] == name]
        if not recs:
            continue
        per_run = [run_metrics(r) for r in recs]
        keys = [k for k in per_run[0] if all(k in m for m in per_run)]
        facts = {k: recs[0][k] for k in ("k", "accumulate", "micro_batches",
                                         "contrastive_batch", "negatives_per_sample")}
        out[name] = {**facts, "seeds": [r["seed"] for r in recs],
                     "metrics": {k: stat([m[k] for m in per_run]) for k in keys},
                     "itc_matches_planner": all(
                         r["itc"]["bytes_per_rank_per_step"]
                         == r["itc"]["planned_bytes_per_rank_per_step"] for r in recs)}
    return out


def chance_rows(records):
    """The retrieval of a random ranking per language
    (:func:`megatron_m2.eval.retrieval.chance_recall` of the test images), with R@k averaged
    over the two directions like the runs'."""
    from megatron_m2.eval.retrieval import chance_recall

    out = {}
    for lang in languages(records):
        raw = records[0]["retrieval"][lang]["raw"]
        row = chance_recall(int(raw["images"]))
        out[lang] = {"mean_recall": row["mean_recall"], "images": int(raw["images"]),
                     "captions": int(raw.get("captions", raw["images"])),
                     **{f"r{k}": 0.5 * (row[f"i2t_r{k}"] + row[f"t2i_r{k}"]) for k in (1, 5, 10)}}
    return out


# -- the planner's projection ----------------------------------------------------------------------
PROJECTION = {
    "flavor": "0.4b", "nodes": 32, "gpus_per_node": 8, "tp": 1, "pp": 1, "micro_batches": 2,
    "rows": [("global", -1, False), ("k8 (one node)", 8, False), ("k2", 2, False),
             ("k1", 1, False), ("k2-acc2", 2, True)],
}
"""The cluster projection: flavor, cluster, layout (micro-batch: the planner's default; global
batch = micro-batch x DP x micro_batches) and ``(label, --itc-group-size, accumulate)`` rows."""


def projection(spec=None):
    """The planner's figures (:func:`megatron_m2.planner.make_plan`) for each row of ``spec``
    (default :data:`PROJECTION`): nothing is re-derived here."""
    from megatron_m2.flavors import get_flavor
    from megatron_m2.planner import Cluster, Layout, make_plan

    spec = spec or PROJECTION
    cluster = Cluster(nodes=spec["nodes"], gpus_per_node=spec["gpus_per_node"])
    b = Layout().micro_batch
    dp = cluster.world_size // (spec["tp"] * spec["pp"])
    gbs = b * dp * spec["micro_batches"]
    rows = []
    for label, k, acc in spec["rows"]:
        plan = make_plan(get_flavor(spec["flavor"]),
                         Layout(tp=spec["tp"], pp=spec["pp"], micro_batch=b, global_batch=gbs,
                                itc_group_size=k, itc_accumulate_features=acc),
                         cluster, model_name=spec["flavor"])
        if not plan.valid:
            raise ValueError(f"projection {label}: {plan.errors}")
        itc, t = plan.communication["itc"], plan.time
        rows.append({
            "config": label, "k": plan.derived["itc_group_size"],
            "micro_batches": plan.derived["num_micro_batches"], "accumulate": acc,
            "negatives_per_sample": itc["gba"]["negatives_per_sample"],
            "itc_bytes_per_rank_per_step": itc["gba"]["bytes_sent_per_step"],
            "link": itc["gba"]["link"],
            "inter_node_bytes_per_step": itc["gba_inter_node_bytes_per_step"],
            "itc_time_s": t["itc_s"], "step_time_s": t["step_time_s"],
            "itc_share_of_step": t["itc_s"] / t["step_time_s"],
            "peak_loss_bytes": plan.memory["per_stage"][-1]["loss_bytes"],
            "peak_memory_bytes": plan.memory["peak_bytes"], "fits": plan.fits,
            "training_args": plan.training_args()})
    return {"flavor": spec["flavor"], "nodes": spec["nodes"],
            "gpus_per_node": spec["gpus_per_node"], "tp": spec["tp"], "pp": spec["pp"],
            "dp": dp, "micro_batch": b, "global_batch": gbs, "rows": rows}


# -- report ----------------------------------------------------------------------------------------
def fmt_stat(st, digits=2, scale=1.0):
    """``mean`` (one seed), ``mean (min–max)`` (two) or ``mean ± std`` (three or more)."""
    m = st["mean"] * scale
    if st["n"] == 1:
        return f"{m:.{digits}f}"
    if st["n"] == 2:
        return f"{m:.{digits}f} ({st['min'] * scale:.{digits}f}–{st['max'] * scale:.{digits}f})"
    return f"{m:.{digits}f} ± {st['std'] * scale:.{digits}f}"


def fmt_bytes(n):
    n = float(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def _m_label(m, accumulate):
    return f"{m} (acc)" if accumulate else str(m)


def table_rows(study):
    """Header and rows of the results table (also the chance row), as strings."""
    langs = languages(study["runs"])
    head = (["config", "k", "M", "pairs (negatives)"] + [f"{lang} MR" for lang in langs]
            + ["R@1 / R@5 / R@10", "ITC bytes/rank/step", "step time (s)", "peak loss memory"])
    rows = []
    for name, a in study["aggregate"].items():
        m = a["metrics"]
        rows.append([name, str(a["k"]), _m_label(a["micro_batches"], a["accumulate"]),
                     f"{a['contrastive_batch']} ({a['negatives_per_sample']})"]
                    + [fmt_stat(m[f"{lang}.mean_recall"]) for lang in langs]
                    + [" / ".join(f"{m[k]['mean']:.1f}" for k in ("r1", "r5", "r10")),
                       fmt_bytes(m["itc_bytes_per_rank_per_step"]["mean"]),
                       fmt_stat(m["step_s"], 3), fmt_bytes(m["peak_loss_bytes"]["mean"])])
    chance = chance_rows(study["runs"])
    if chance:
        recalls = [sum(chance[lang][k] for lang in langs) / len(langs) for k in ("r1", "r5", "r10")]
        rows.append(["chance", "", "", ""]
                    + [f"{chance[lang]['mean_recall']:.2f}" for lang in langs]
                    + [" / ".join(f"{r:.1f}" for r in recalls), "", "", ""])
    return head, rows


def format_table(study):
    head, rows = table_rows(study)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = "  ".join
    return "\n".join([line(h.ljust(w) for h, w in zip(head, widths))]
                     + [line(c.ljust(w) for c, w in zip(r, widths)) for r in rows])


def _md_table(head, rows):
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def projection_table(proj):
    head = ["config", "k", "M", "negatives/sample", "ITC bytes/rank/step", "link",
            "inter-node bytes", "ITC time (ms)", "share of step", "peak loss memory",
            "step (ms)"]
    rows = [[r["config"], str(r["k"]), _m_label(r["micro_batches"], r["accumulate"]),
             str(r["negatives_per_sample"]), fmt_bytes(r["itc_bytes_per_rank_per_step"]),
             r["link"] or "none", fmt_bytes(r["inter_node_bytes_per_step"]),
             f"{r['itc_time_s'] * 1e3:.3f}", f"{100 * r['itc_share_of_step']:.2f} %",
             fmt_bytes(r["peak_loss_bytes"]), f"{r['step_time_s'] * 1e3:.1f}"]
            for r in proj["rows"]]
    return _md_table(head, rows)


def render_section(study, plot_path, md_path):
    """The generated Markdown section, markers included."""
    s, m = study["settings"], study["machine"]
    commits = ", ".join(f"`{c}`{' (dirty)' if d else ''}" for c, d in study["git"])
    head, rows = table_rows(study)
    matches = all(a["itc_matches_planner"] for a in study["aggregate"].values())
    proj = study["projection"]
    img = os.path.relpath(os.path.abspath(plot_path), os.path.dirname(os.path.abspath(md_path)))
    seeds = ", ".join(str(x) for x in s["seeds"])
    lines = [
        BEGIN,
        "<!-- generated by tools/study_gba.py: edits between these markers are overwritten -->",
        "",
        "## GBA-ITC group size on the demo set",
        "",
        f"Command: `{study['command']}`  ",
        f"Commit: {commits}; date {study['date']}; machine: {m['cores']} CPU cores "
        f"({m['cpu']}, {m['system']}, Python {m['python']}).",
        "",
        f"The {s['flavor']} flavor on `{s['data']}/train`, N = {s['nproc']} data-parallel gloo "
        f"ranks, micro-batch b = {s['micro_batch']}, global batch {s['global_batch']} "
        f"(M = {s['micro_batches']} micro-batches per step), {s['iters']} steps, seeds {seeds}; "
        f"recipe `{' '.join(s['recipe'] + s['extra_args'])}`. Held-out retrieval on "
        f"`{s['data']}/test` (m2-eval, VL head), mean recall (MR, %) per language and "
        "R@1/5/10 averaged over languages and both directions; "
        + ("mean (min–max) over the two seeds. " if len(s["seeds"]) == 2 else
           "mean ± std over the seeds. " if len(s["seeds"]) > 2 else "one seed. ")
        + "ITC bytes per rank per step and peak loss memory are measured on the loss alone "
        f"(forward + backward over {s['nproc']} gloo processes, k, b, D = {s['embed_dim']}, M "
        f"and {s['heads']} heads as in the run; `megatron_m2.loss_measure`); the bytes "
        + ("equal" if matches else "**differ from**")
        + " the planner's for the same layout. Step time: median seconds per step "
        "of the run's log.",
        "",
        _md_table(head, rows),
        "",
        f"![GBA-ITC group-size study]({img})",
        "",
        f"### Projection: {proj['flavor']} on {proj['nodes']} nodes × {proj['gpus_per_node']} "
        "GPUs (planner)",
        "",
        f"`megatron_m2.planner.make_plan`, TP{proj['tp']} PP{proj['pp']} DP{proj['dp']}, "
        f"micro-batch {proj['micro_batch']} (the planner's default), global batch "
        f"{proj['global_batch']} (M = {proj['rows'][0]['micro_batches']} as in the study), "
        "bf16, default cluster bandwidths; the planner's own figures (ITC time: the loss's "
        "gathers, its share of the planned step time; peak loss memory: its last-stage "
        "`loss_bytes`).",
        "",
        projection_table(proj),
        "",
        END,
    ]
    return "\n".join(lines)


def update_results_md(path, section):
    """Replace the generated section of ``path`` (or append it; create the file), keeping
    everything else, and add the discussion placeholder when the file has none."""
    text = Path(path).read_text() if os.path.isfile(path) else "# Results\n"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    if DISCUSSION not in text:
        text = (text.rstrip("\n") + "\n\n### What the numbers say\n\n" + DISCUSSION
                + "\n_To be written: what the table and the projection show._\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Path(path).write_text(text)
    return text


def plot(study, path):
    """Mean recall per language and config (error bars: min–max or std over seeds, chance
    dashed), and ITC bytes per rank per step with the step time on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = study["aggregate"]
    names, langs = list(agg), languages(study["runs"])
    chance = chance_rows(study["runs"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    width = 0.8 / max(1, len(langs))
    colors = ["tab:orange", "tab:red", "tab:purple", "tab:brown"]

    def err(st):
        if st["n"] == 2:
            return [st["mean"] - st["min"]], [st["max"] - st["mean"]]
        return [st["std"]], [st["std"]]

    for j, lang in enumerate(langs):
        for i, name in enumerate(names):
            st = agg[name]["metrics"][f"{lang}.mean_recall"]
            lo, hi = err(st)
            ax.bar(i + (j - (len(langs) - 1) / 2) * width, st["mean"], width,
                   yerr=[lo, hi], capsize=3, color=colors[j % len(colors)],
                   label=lang if i == 0 else None)
        if lang in chance:
            ax.axhline(chance[lang]["mean_recall"], color=colors[j % len(colors)], ls="--",
                       lw=1, label=f"chance ({lang})")
    ax.set_xticks(range(len(names)), [f"{n}\n{agg[n]['contrastive_batch']} pairs" for n in names])
    ax.set_ylabel("held-out mean recall (%)")
    ax.set_title(f"retrieval ({len(study['settings']['seeds'])} seed(s))")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    kib = [agg[n]["metrics"]["itc_bytes_per_rank_per_step"]["mean"] / 2**10 for n in names]
    bx.bar(range(len(names)), kib, 0.6, color="tab:blue", label="ITC bytes/rank/step")
    bx.set_xticks(range(len(names)), names)
    bx.set_ylabel("ITC KiB per rank per step", color="tab:blue")
    cx = bx.twinx()
    steps = [agg[n]["metrics"]["step_s"] for n in names]
    lo_hi = [err(st) for st in steps]
    cx.errorbar(range(len(names)), [st["mean"] for st in steps],
                yerr=[[e[0][0] for e in lo_hi], [e[1][0] for e in lo_hi]], fmt="o",
                color="tab:green", capsize=3)
    cx.set_ylabel("step time (s)", color="tab:green")
    cx.set_ylim(bottom=0)
    s = study["settings"]
    bx.set_title(f"cost (N={s['nproc']}, b={s['micro_batch']}, M={s['micro_batches']})")
    fig.suptitle(f"GBA-ITC group size: {s['flavor']} on the demo set, {s['iters']} steps")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def study_command(args):
    return shlex.join(["bash", "examples/studies/gba_group_size.sh", *args.argv])


def _distinct(values):
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def run_study(args, runner=run_logged, measure=measure_itc):
    """Run what is pending, then aggregate and report. Returns the study dict."""
    s = study_settings(args)
    todo = [] if args.report_only else pending_runs(args, s)
    total = len(args.configs) * len(args.seeds)
    if todo:
        print(f"{len(todo)} of {total} runs to do in {args.out_dir}; measuring the loss alone "
              f"over {s['nproc']} gloo processes ...", flush=True)
        itc = measure(s, sorted({t[0] for t in todo}, key=list(CONFIGS).index), args.loss_iters)
    durations = []
    for i, (name, seed, run_dir, cmd) in enumerate(todo):
        eta = (f"ETA {sum(durations) / len(durations) * (len(todo) - i) / 60:.1f} min"
               if durations else "ETA after the first run")
        print(f"[{i + 1}/{len(todo)}] {run_name(name, seed)}: training {args.iters} steps and "
              f"evaluating ({eta})", flush=True)
        t0 = time.time()
        rec = run_one(args, s, name, seed, run_dir, cmd, itc, runner)
        durations.append(time.time() - t0)
        print(f"    done in {durations[-1]:.0f} s: {rec['step_time']['median_s']:.3f} s/step, "
              + ", ".join(f"{lang} mean recall {r['mean_recall']:.2f}"
                          for lang, r in rec["retrieval"].items()), flush=True)
    records = [r for seed in args.seeds for name in args.configs
               if (r := load_result(os.path.join(args.out_dir, run_name(name, seed))))]
    if not records:
        raise SystemExit(f"no finished run in {args.out_dir}")
    # What the runs were made with (a --report-only call may have other flags than the study).
    settings = _distinct(r.get("settings") or {**{k: v for k, v in s.items() if k != "seeds"},
                                               "iters": r["iters"]} for r in records)
    machines = _distinct(r.get("machine") or machine() for r in records)
    if len(settings) > 1 or len(machines) > 1:
        print("warning: the runs differ in their settings or machine; the report states the "
              "first run's (study.json has each run's)")
    s = {**settings[0], "seeds": _distinct(r["seed"] for r in records)}
    study = {
        "study": "gba_group_size",
        "command": "; ".join(_distinct(r.get("study_command") or study_command(args)
                                       for r in records)),
        "git": sorted({(r["commit"], r["dirty"]) for r in records}),
        "date": max(r["finished"] for r in records),
        "machine": machines[0], "settings": s,
        "configs": {n: config_facts(n, s) for n in args.configs},
        "runs": records, "aggregate": aggregate(records, list(args.configs)),
        "projection": projection(),
    }
    study["chance"] = chance_rows(records)
    os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
    with open(args.json_path, "w") as f:
        json.dump(study, f, indent=1)
    plot(study, args.plot)
    update_results_md(args.results_md, render_section(study, args.plot, args.results_md))
    print(format_table(study))
    print(f"\nwritten: {args.json_path}, {args.plot}, {args.results_md}")
    return study


def main(argv=None):
    run_study(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
