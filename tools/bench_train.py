#!/usr/bin/env python3
"""Training throughput on CPU: our megatron-core path against a plain PyTorch M2-Encoder.

Three measurements, all on the synthetic image-text set, same flavor, global batch and
micro-batch, median step time over ``--iters`` steps after ``--warmup`` steps:

1. **ours vs plain** (one process, ``--threads`` threads): ours is the full ``m2-pretrain`` step
   through :class:`megatron_m2.training.trainer.Trainer` (megatron DDP, megatron optimizer and
   LR schedule, the forward/backward schedule, TP=1 in a gloo world of one). *plain* is
   :class:`megatron_m2.model.reference.ReferenceM2`, the same model written the way a user would
   without megatron (batch-first, one tower call per modality), trained by :class:`PlainTrainer`
   (``torch.optim.AdamW``, ``clip_grad_norm_``) with the same hyper-parameters and loss
   (:func:`megatron_m2.loss.itc_loss`, ``group=None``). Target: ours ≥ 0.9x plain.
2. **plain + CPU compatibility layer**: the plain model again with
   :mod:`megatron_m2.parallel.cpu_compat` (a ``TorchFunctionMode`` that every torch call made
   from Python goes through) switched on, i.e. what the layer alone costs ours.
3. **TP=2 vs TP=1** on the same cores: ours at TP=2 over 2 gloo processes × ``threads / 2``
   threads against ours at TP=1, DP=1 in 1 process × ``threads`` threads (measurement 1).
4. with ``--image-mask-ratio R``: **patch dropout** (FLIP), ours at ``--image-mask-ratio R``
   (each image keeps [CLS] and ``round((1 - R)·P)`` patches) side by side with ours at R = 0,
   a fourth variant interleaved with the others in the same process.

The three single-process variants run in one process, interleaved step by step (the order
rotates every round), so that load from elsewhere on the machine hits them alike; the layer is
suspended or not around each step (ours always runs with it, as ``m2-pretrain`` does on CPU).
The plain model starts from our model's initial weights
(:meth:`~megatron_m2.model.reference.ReferenceM2.load_megatron_state_dict`); ``--check``
verifies that the first step's loss (and gradient norm) of the two agree. ``--profile`` adds a
cProfile of three steps of each.

Examples::

    python tools/bench_train.py
    python tools/bench_train.py --check --skip-tp --json
    python tools/bench_train.py --flavor 0.4b --image-mask-ratio 0.5 --skip-tp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

CHECK_ATOL = 1e-4
"""Largest first-step loss difference ``--check`` accepts (float32 through both models)."""
CHECK_GRAD_RTOL = 1e-4
"""Largest relative first-step gradient-norm difference ``--check`` accepts."""


# == the plain training loop ======================================================================
class PlainTrainer:
    """The training loop a user would write: AdamW, cosine LR, gradient accumulation, clipping.

    ``targs`` are ``m2-pretrain`` arguments, so that hyper-parameters, data and schedule are the
    ones our :class:`~megatron_m2.training.trainer.Trainer` uses.
    """

    def __init__(self, cfg, targs):
        from megatron_m2.model.reference import ReferenceM2  # imports megatron-core: lazily
        from megatron_m2.training.synthetic import SyntheticImageText
        from megatron_m2.training.trainer import no_weight_decay

        self.args = targs
        self.model = ReferenceM2(cfg)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if no_weight_decay(p, name) else decay).append(p)
        self.params = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": targs.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=targs.lr, betas=(targs.adam_beta1, targs.adam_beta2), eps=targs.adam_eps)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=targs.train_iters, eta_min=targs.min_lr)
        self.dataset = SyntheticImageText(
            cfg, targs.synthetic_num_samples or targs.global_batch_size, seed=targs.seed)
        self.step = 0

    def train_step(self):
        from megatron_m2.loss import itc_loss
        from megatron_m2.training.synthetic import microbatches

        a = self.args
        self.optimizer.zero_grad(set_to_none=True)
        batches = list(microbatches(self.dataset, self.step, a.global_batch_size,
                                    a.micro_batch_size, 0, 1))
        total = 0.0
        for batch in batches:
            loss, _ = itc_loss(self.model(**batch), group=None)
            (loss / len(batches)).backward()  # mean over micro-batches, as megatron's schedule
            total += float(loss.detach())
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, a.clip_grad)
                     if a.clip_grad > 0 else torch.tensor(float("nan")))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"loss": total / len(batches), "grad_norm": float(grad_norm)}


# == the measurements =============================================================================
def trainer_args(a, tp: int, image_mask_ratio: float = 0.0):
    """``m2-pretrain`` arguments of a benchmark run (the LR schedule outlasts every step run)."""
    from megatron_m2.training.arguments import parse_args

    return parse_args(["--synthetic", "--flavor", a.flavor,
                       "--global-batch-size", str(a.global_batch_size),
                       "--micro-batch-size", str(a.micro_batch_size),
                       "--tensor-model-parallel-size", str(tp),
                       "--image-mask-ratio", str(image_mask_ratio),
                       "--train-iters", str(3 * (a.warmup + a.iters) + 4)])


def _dropout_key(ratio: float) -> str:
    return f"ours r={ratio:g}"


def _quiet() -> None:
    # megatron-core warns at import that TE/Apex are missing: the expected state on CPU.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")


def _init_rank(rank: int, world: int, port: int, threads: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    _quiet()
    from megatron_m2.parallel.distributed import init_distributed

    init_distributed(timeout_s=600)  # gloo, and the CPU compatibility layer


def _check(trainer, plain) -> dict:
    """First step of both models from the same weights on the same batch.

    Ours' loss is recomputed with a forward of the model the Trainer trains: the Trainer's
    step record cannot serve, because megatron's schedule divides the loss tensor in place
    (``output_tensor /= num_microbatches``) after ``_loss_step`` stored ``loss.detach()``,
    which shares its storage, so the record reads loss / M. The gradient norm does come from
    the Trainer's real step (megatron's backward, DDP buffers and grad-norm code).
    """
    from megatron_m2.loss import itc_loss
    from megatron_m2.training.synthetic import microbatches

    a = trainer.args
    batches = list(microbatches(trainer.dataset, 0, a.global_batch_size, a.micro_batch_size,
                                0, 1))
    with torch.no_grad():
        losses = [float(itc_loss(trainer.model(b["images"], b["text_ids"],
                                               b["text_pad_mask"]))[0]) for b in batches]
    ours_loss = sum(losses) / len(losses)
    ours, ref = trainer.train_step(), plain.train_step()
    diff = abs(ours_loss - ref["loss"])
    gn = abs(ours["grad_norm"] - ref["grad_norm"]) / max(ref["grad_norm"], 1e-12)
    return {"ours_loss": ours_loss, "plain_loss": ref["loss"], "loss_abs_diff": diff,
            "ours_grad_norm": ours["grad_norm"], "plain_grad_norm": ref["grad_norm"],
            "grad_norm_rel_diff": gn, "trainer_record_loss": ours["loss"],
            "micro_batches": len(batches),
            "ok": diff <= CHECK_ATOL and gn <= CHECK_GRAD_RTOL}


def _profile(step, steps: int = 3, top: int = 20) -> str:
    """cProfile of ``steps`` calls of ``step``, the ``top`` functions by own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def _single_worker(a, port, q) -> None:
    """Ours, plain and plain + layer in one process, interleaved step by step."""
    try:
        _init_rank(0, 1, port, a.threads)
        from megatron_m2.parallel import cpu_compat
        from megatron_m2.training.trainer import Trainer

        targs = trainer_args(a, tp=1)
        trainer = Trainer(targs)
        plain = PlainTrainer(trainer.cfg, targs)
        plain.model.load_megatron_state_dict(trainer.model.state_dict())
        result = {"check": _check(trainer, plain) if a.check else None,
                  "params": sum(p.numel() for p in trainer.model.parameters())}

        # name: (step, whether the compatibility layer is on). The plain variants share one
        # model and optimizer: the weights' values do not change the cost of a step.
        variants = {"ours": (trainer.train_step, True), "plain": (plain.train_step, False),
                    "plain+layer": (plain.train_step, True)}
        ratio = getattr(a, "image_mask_ratio", 0.0)
        if ratio:  # a second Trainer: the same model and data, patch dropout on
            dropped = Trainer(trainer_args(a, tp=1, image_mask_ratio=ratio))
            batch = dropped._microbatches()
            result["vision_seq_len"] = [dropped.cfg.vision_seq_len,
                                        dropped.objective.vision_len(batch[0])]
            variants[_dropout_key(ratio)] = (dropped.train_step, True)

        def run(name):
            step, layer = variants[name]
            # init_distributed left the layer on for the process; "plain" runs it suspended.
            with cpu_compat.active() if layer else cpu_compat.suspended():
                t0 = time.perf_counter()
                step()
                return time.perf_counter() - t0

        names = list(variants)
        for _ in range(a.warmup):
            for name in names:
                run(name)
        times = {name: [] for name in names}
        for r in range(a.iters):
            k = r % len(names)  # rotate the order: no variant always runs first
            for name in names[k:] + names[:k]:
                times[name].append(run(name))
        result["median_s"] = {name: statistics.median(t) for name, t in times.items()}
        result["min_s"] = {name: min(t) for name, t in times.items()}
        if a.profile:
            with cpu_compat.active():
                result["profile"] = {"ours": _profile(trainer.train_step)}
            with cpu_compat.suspended():
                result["profile"]["plain"] = _profile(plain.train_step)
        q.put(("ok", result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put(("error", traceback.format_exc()))


def _tp_worker(rank, world, port, a, q) -> None:
    """Ours at TP=world; rank 0 reports the median of the slowest rank's step times."""
    try:
        threads = max(1, a.threads // world)
        _init_rank(rank, world, port, threads)
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from megatron_m2.training.trainer import Trainer

        trainer = Trainer(trainer_args(a, tp=world))
        for _ in range(a.warmup):
            trainer.train_step()
        # Count the collectives on the TP group over one step: megatron's TP mappings and our
        # Sub-LN statistics both go through torch.distributed.all_reduce.
        tp_group, calls, all_reduce = ps.get_tensor_model_parallel_group(), [0], dist.all_reduce

        def counting(tensor, *args, **kwargs):
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            calls[0] += group is tp_group
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting
        try:
            trainer.train_step()
        finally:
            dist.all_reduce = all_reduce
        times = []
        for _ in range(a.iters):
            dist.barrier()  # start together: a step is as slow as its slowest rank
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            q.put(("ok", {"median_s": statistics.median(slowest.tolist()),
                          "min_s": min(slowest.tolist()),
                          "threads_per_process": threads, "tp_all_reduces_per_step": calls[0]}))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def _spawn(target, world: int, a, timeout: float = 900):
    """Run ``target`` on ``world`` fresh processes; return what rank 0 reports."""
    from megatron_m2.parallel.launch_env import _free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    if world == 1:
        procs = [ctx.Process(target=target, args=(a, port, q))]
    else:
        procs = [ctx.Process(target=target, args=(r, world, port, a, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        status, payload = q.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
                p.join()
    if status != "ok":
        raise RuntimeError(f"benchmark worker failed:\n{payload}")
    return payload


def measure(a) -> dict:
    """Run every measurement; returns the figures (the JSON object of ``--json``)."""
    load_before = os.getloadavg()[0]
    single = _spawn(_single_worker, 1, a)
    g = a.global_batch_size
    sps = {name: g / t for name, t in single["median_s"].items()}
    out = {
        "flavor": a.flavor, "params": single["params"], "global_batch_size": g,
        "micro_batch_size": a.micro_batch_size, "iters": a.iters, "warmup": a.warmup,
        "threads": a.threads,
        "step_ms": {name: round(t * 1e3, 2) for name, t in single["median_s"].items()},
        # The fastest step: what each variant costs when nothing else gets in its way.
        "best_step_ms": {name: round(t * 1e3, 2) for name, t in single["min_s"].items()},
        "samples_per_s": {name: round(v, 3) for name, v in sps.items()},
        "ours_over_plain": round(sps["ours"] / sps["plain"], 4),
        "plain_layer_over_plain": round(sps["plain+layer"] / sps["plain"], 4),
        "check": single["check"],
        "tp": None,
        "patch_dropout": None,
    }
    ratio = getattr(a, "image_mask_ratio", 0.0)
    if ratio:
        key = _dropout_key(ratio)
        out["patch_dropout"] = {
            "ratio": ratio, "vision_seq_len": {"r=0": single["vision_seq_len"][0],
                                               f"r={ratio:g}": single["vision_seq_len"][1]},
            "step_ms": {"r=0": out["step_ms"]["ours"], f"r={ratio:g}": out["step_ms"][key]},
            "best_step_ms": {"r=0": out["best_step_ms"]["ours"],
                             f"r={ratio:g}": out["best_step_ms"][key]},
            "samples_per_s": {"r=0": out["samples_per_s"]["ours"],
                              f"r={ratio:g}": out["samples_per_s"][key]},
            "speedup": round(sps[key] / sps["ours"], 4)}
    if not a.skip_tp:
        tp2 = _spawn(_tp_worker, 2, a)
        tp2_sps = g / tp2["median_s"]
        out["tp"] = {
            "tp1": {"processes": 1, "threads_per_process": a.threads,
                    "step_ms": out["step_ms"]["ours"],
                    "best_step_ms": out["best_step_ms"]["ours"],
                    "samples_per_s": out["samples_per_s"]["ours"]},
            "tp2": {"processes": 2, "threads_per_process": tp2["threads_per_process"],
                    "step_ms": round(tp2["median_s"] * 1e3, 2),
                    "best_step_ms": round(tp2["min_s"] * 1e3, 2),
                    "samples_per_s": round(tp2_sps, 3),
                    "tp_all_reduces_per_step": tp2["tp_all_reduces_per_step"]},
            "tp2_over_tp1": round(tp2_sps / sps["ours"], 4),
        }
    # Other work on the machine slows every variant; interleaving keeps the ratios fair, but
    # the absolute figures are only meaningful on an idle machine.
    out["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    out["cpu_count"] = os.cpu_count()
    if "profile" in single:
        out["profile"] = single["profile"]
    return out


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def print_table(r: dict) -> None:
    """The human-readable report of :func:`measure`'s figures."""
    g, mb = r["global_batch_size"], r["micro_batch_size"]
    print(f"M2-Encoder training step, flavor {r['flavor']} ({r['params'] / 1e6:.2f}M params), "
          f"global batch {g} = {g // mb} x micro-batch {mb}, synthetic data")
    print(f"{_n(r['threads'], 'thread')}, median (and best) of {r['iters']} steps after "
          f"{r['warmup']} warm-up steps, the {len(r['step_ms'])} variants interleaved in one "
          f"process; samples/s and ratios from the medians")
    load = r["load_average"]
    if max(load) > r["cpu_count"]:
        print(f"note: load average {load[0]:.1f} -> {load[1]:.1f} on {r['cpu_count']} CPUs: "
              f"other work shares the cores; compare ratios, not absolute figures, and with "
              f"more than one thread expect OpenMP barrier stalls (--threads 1 is steadier)")
    print(f"\n{'':<46}{'step ms':>10}{'best ms':>9}{'samples/s':>11}{'vs plain':>10}")
    rows = [("plain", "plain PyTorch (AdamW, no megatron)"),
            ("plain+layer", "plain + CPU compat layer (TorchFunctionMode)"),
            ("ours", "ours: Trainer, megatron-core, TP=1")]
    for key, label in rows:
        ratio = r["samples_per_s"][key] / r["samples_per_s"]["plain"]
        print(f"{label:<46}{r['step_ms'][key]:>10.1f}{r['best_step_ms'][key]:>9.1f}"
              f"{r['samples_per_s'][key]:>11.1f}{ratio:>9.3f}x")
    verdict = "meets" if r["ours_over_plain"] >= 0.9 else "BELOW"
    print(f"\nours / plain = {r['ours_over_plain']:.3f} ({verdict} the 0.9 target). The compat "
          f"layer alone changes the plain model's throughput by "
          f"{(r['plain_layer_over_plain'] - 1) * 100:+.1f}%.")
    c = r["check"]
    if c:
        print(f"check: first-step loss ours {c['ours_loss']:.6f} vs plain {c['plain_loss']:.6f} "
              f"(|diff| {c['loss_abs_diff']:.1e}, tolerance {CHECK_ATOL:g}); gradient norm "
              f"{c['ours_grad_norm']:.6f} vs {c['plain_grad_norm']:.6f} (relative diff "
              f"{c['grad_norm_rel_diff']:.1e}): {'OK' if c['ok'] else 'FAILED'}")
        if abs(c["trainer_record_loss"] - c["ours_loss"]) > CHECK_ATOL:
            print(f"  note: the Trainer's step record says loss {c['trainer_record_loss']:.6f}, "
                  f"i.e. the loss / {c['micro_batches']} micro-batches (megatron's schedule "
                  f"divides the loss tensor in place after _loss_step kept a view of it)")
    d = r.get("patch_dropout")
    if d:
        (k0, s0), (k1, s1) = d["vision_seq_len"].items()
        print("\nPatch dropout (FLIP), ours, interleaved with the rows above:")
        print(f"{'':<46}{'step ms':>10}{'best ms':>9}{'samples/s':>11}{'vs r=0':>10}")
        for label, key, ratio in ((f"{k0}: {s0} vision rows", k0, 1.0),
                                  (f"{k1}: {s1} vision rows ([CLS] + kept)", k1, d["speedup"])):
            print(f"{label:<46}{d['step_ms'][key]:>10.1f}{d['best_step_ms'][key]:>9.1f}"
                  f"{d['samples_per_s'][key]:>11.1f}{ratio:>9.3f}x")
    t = r["tp"]
    if t:
        t1, t2 = t["tp1"], t["tp2"]
        print(f"\nTensor parallelism, ours, same global batch on the same "
              f"{_n(r['threads'], 'core')}:")
        print(f"{'':<46}{'step ms':>10}{'best ms':>9}{'samples/s':>11}{'vs TP=1':>10}")
        for label, row, ratio in (
                (f"TP=1, DP=1: 1 process x {_n(t1['threads_per_process'], 'thread')}", t1, 1.0),
                (f"TP=2 (gloo): 2 processes x {_n(t2['threads_per_process'], 'thread')}", t2,
                 t["tp2_over_tp1"])):
            print(f"{label:<46}{row['step_ms']:>10.1f}{row['best_step_ms']:>9.1f}"
                  f"{row['samples_per_s']:>11.1f}{ratio:>9.3f}x")
        print(f"TP=2 issues {t2['tp_all_reduces_per_step']} all-reduces per step on the TP "
              f"group: the row-parallel outputs (attention out, FC2) and the Sub-LN statistics "
              f"in the forward, the column-parallel input gradients (Q, K, V, FC1) and the "
              f"Sub-LN statistics in the backward, per branch and layer. On CPU/gloo each one "
              f"is a blocking round trip through TCP loopback, with no NVLink to make it cheap, "
              f"and each rank's half-size matmuls keep its core less busy. TP exists to fit "
              f"models too large for one device; its speed belongs to GPUs joined by NVLink.")
        if t["tp2_over_tp1"] >= 1.0:
            print("Here TP=2 came out ahead: with the cores oversubscribed, the 1-thread ranks "
                  "escape the OpenMP barriers that stall a 2-thread process whenever one of "
                  "its threads is descheduled; rerun on an idle machine for the TP cost.")
    for name, text in r.get("profile", {}).items():
        print(f"\ncProfile of 3 steps, {name}, by own time:\n{text}")


def main(argv=None) -> int:
    from megatron_m2.flavors import FLAVORS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--flavor", default="tiny", choices=sorted(FLAVORS))
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=15, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of the single-process runs (TP=2: threads/2 per rank)")
    p.add_argument("--skip-tp", action="store_true", help="skip the TP=2 vs TP=1 measurement")
    p.add_argument("--image-mask-ratio", type=float, default=0.0, metavar="R",
                   help="also measure ours with patch dropout at R (0 < R < 1), interleaved "
                        "with the r=0 run, and report both side by side")
    p.add_argument("--check", action="store_true",
                   help=f"verify that the plain model's first-step loss matches ours within "
                        f"{CHECK_ATOL:g} (and the gradient norm within {CHECK_GRAD_RTOL:g} "
                        f"relative); exit 1 otherwise")
    p.add_argument("--profile", action="store_true",
                   help="also print a cProfile of 3 steps of ours and of plain")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if a.iters < 1 or a.warmup < 0 or a.threads < 1:
        p.error("--iters and --threads must be >= 1, --warmup >= 0")

    from megatron_m2.config import ConfigError
    from megatron_m2.training.validation import validate_args

    try:
        validate_args(trainer_args(a, 1), 1)
        validate_args(trainer_args(a, 1, a.image_mask_ratio), 1)
        if not a.skip_tp:
            validate_args(trainer_args(a, 2), 2)
    except ConfigError as e:
        p.error(str(e))
    result = measure(a)
    if a.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 1 if result["check"] and not result["check"]["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
