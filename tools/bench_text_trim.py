#!/usr/bin/env python3
"""Training throughput with and without ``--trim-text-padding`` on a real caption set.

Two :class:`~megatron_m2.training.trainer.Trainer` instances in one process (a gloo world of
one), the same flavor, data, seed and batch, one padding captions to the model's
``max_text_len`` and one cutting each step to its longest caption; their steps run interleaved
(the order alternates every round) so that load from elsewhere on the machine hits both alike.
Reports the median (and best) step time, samples/s, the speed-up and the text rows per step.
Synthetic captions are uniformly long, so this needs a real indexed dataset: the bundled demo
set by default.

    python tools/bench_text_trim.py                       # tiny flavor on data/emoji_demo
    python tools/bench_text_trim.py --data-path PREFIX --tokenizer-model M --json
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

DEMO = Path(__file__).resolve().parents[1] / "data" / "emoji_demo"
VARIANTS = ("padded", "trimmed")


def _trainer(a, trim: bool):
    from megatron_m2.training.arguments import parse_args
    from megatron_m2.training.trainer import Trainer

    argv = ["--flavor", a.flavor, "--data-path", a.data_path, "--tokenizer-model",
            a.tokenizer_model, "--num-workers", "0", "--randaugment", "none",
            "--global-batch-size", str(a.global_batch_size),
            "--micro-batch-size", str(a.micro_batch_size),
            "--train-iters", str(a.warmup + a.iters + 2)]
    return Trainer(parse_args(argv + (["--trim-text-padding"] if trim else [])))


def _worker(a, port: int, q) -> None:
    try:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          OMP_NUM_THREADS=str(a.threads))
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
        import torch

        torch.set_num_threads(a.threads)
        from megatron_m2.parallel import distributed

        distributed.init_distributed(timeout_s=300)
        trainers = {name: _trainer(a, name == "trimmed") for name in VARIANTS}
        rows = {name: [] for name in VARIANTS}
        for name, t in trainers.items():  # the text rows each variant's steps run at
            prepare = t._prepare

            def counting(batches, _prepare=prepare, _rows=rows[name]):
                out = _prepare(batches)
                _rows.append(int(out[0]["text_ids"].shape[1]))
                return out

            t._prepare = counting
        times = {name: [] for name in VARIANTS}
        for r in range(a.warmup + a.iters):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for name in order:
                t0 = time.perf_counter()
                trainers[name].train_step()
                if r >= a.warmup:
                    times[name].append(time.perf_counter() - t0)
        q.put(("ok", {"times": times, "rows": rows,
                      "max_text_len": trainers["padded"].cfg.max_text_len}))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put(("error", traceback.format_exc()))


def measure(a) -> dict:
    """Run both variants in a spawned process; returns the figures (the ``--json`` object)."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(a, port, q))
    p.start()
    status, payload = q.get(timeout=1800)
    p.join()
    if status != "ok":
        raise RuntimeError(f"benchmark worker failed:\n{payload}")
    g = a.global_batch_size
    med = {k: statistics.median(v) for k, v in payload["times"].items()}
    return {
        "flavor": a.flavor, "data_path": a.data_path, "global_batch_size": g,
        "micro_batch_size": a.micro_batch_size, "iters": a.iters, "warmup": a.warmup,
        "threads": a.threads, "max_text_len": payload["max_text_len"],
        "mean_text_rows": {k: round(statistics.mean(v), 2) for k, v in payload["rows"].items()},
        "step_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
        "best_step_ms": {k: round(min(v) * 1e3, 2) for k, v in payload["times"].items()},
        "samples_per_s": {k: round(g / v, 2) for k, v in med.items()},
        "speedup": round(med["padded"] / med["trimmed"], 4),
        "load_average": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
    }


def print_table(r: dict) -> None:
    print(f"flavor {r['flavor']}, {r['data_path']}, global batch {r['global_batch_size']} "
          f"(micro-batch {r['micro_batch_size']}), {r['threads']} thread(s), median (best) of "
          f"{r['iters']} interleaved steps after {r['warmup']} warm-up steps")
    print(f"\n{'':<34}{'text rows':>10}{'step ms':>10}{'best ms':>9}{'samples/s':>11}")
    for k, label in (("padded", "padded to max_text_len"), ("trimmed", "--trim-text-padding")):
        print(f"{label:<34}{r['mean_text_rows'][k]:>10.1f}{r['step_ms'][k]:>10.1f}"
              f"{r['best_step_ms'][k]:>9.1f}{r['samples_per_s'][k]:>11.1f}")
    print(f"\nspeed-up {r['speedup']:.3f}x (load average {r['load_average']:.1f} on "
          f"{r['cpu_count']} CPUs: other work slows both variants alike)")


def main(argv=None) -> int:
    from megatron_m2.flavors import FLAVORS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--flavor", default="tiny", choices=sorted(FLAVORS))
    p.add_argument("--data-path", default=str(DEMO / "train"), help="indexed dataset prefix")
    p.add_argument("--tokenizer-model", default=str(DEMO / "tokenizer.model"))
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if a.iters < 1 or a.warmup < 0 or a.threads < 1:
        p.error("--iters and --threads must be >= 1, --warmup >= 0")
    for path in (a.data_path + ".bin", a.data_path + ".idx", a.tokenizer_model):
        if not os.path.isfile(path):
            p.error(f"{path} does not exist")
    r = measure(a)
    if a.json:
        print(json.dumps(r))
    else:
        print_table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
