#!/usr/bin/env python3
"""Benchmark the contrastive loss variants over N gloo processes on this machine.

For each method — ``naive`` (full (N·b)² logits on every rank), ``global`` (local loss +
gather-with-grad over all N ranks) and ``gba`` with every ITC group size k < N that divides N —
it runs the loss's forward and backward on local image and text embeddings of b × D and reports,
per rank:

* ``bytes_per_rank``: bytes this rank sends in the loss's collectives, counted where each
  collective is issued (ring algorithm: (k − 1) × shard bytes per all-gather/reduce-scatter);
* ``peak_loss_bytes``: peak tensor memory allocated by the loss's forward+backward (measured
  with a dispatch-mode storage tracker, see ``megatron_m2.utils.memory``);
* ``ms``: forward+backward wall time (median over ``--iters``, slowest rank).

Then the analytic figures for a cluster (``--cluster-nodes``, ``--gpus-per-node``): bytes per
rank per step of global ITC vs GBA-ITC with k = one node, and where they travel.

Examples::

    python tools/bench_itc.py --nproc 4
    python tools/bench_itc.py --nproc 8 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]


def _worker(rank, world, port, args, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_m2.loss import count_communication, local_contrastive_loss, naive_global_loss
    from megatron_m2.parallel.distributed import init_distributed
    from megatron_m2.utils.memory import PeakTensorMemory

    init_distributed(timeout_s=300)
    # ITC groups of k consecutive ranks (the bench has no TP/PP: DP = the world).
    groups = {}
    for k in _divisors(world):
        for start in range(0, world, k):
            g = dist.new_group(list(range(start, start + k))) if k > 1 else None
            if start <= rank < start + k:
                groups[k] = g
    methods = [("naive", world), ("global", world)] + [("gba", k) for k in _divisors(world)
                                                      if k < world]
    g = torch.Generator().manual_seed(rank)
    image = torch.nn.functional.normalize(torch.randn(args.batch, args.dim, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(args.batch, args.dim, generator=g), dim=-1)
    rows = []
    for method, k in methods:
        fn = naive_global_loss if method == "naive" else local_contrastive_loss

        def step():
            img = image.clone().requires_grad_(True)
            txt = text.clone().requires_grad_(True)
            scale = torch.tensor(2.659, requires_grad=True)
            loss, _ = fn(img, txt, scale, groups[k])
            loss.backward()

        step()  # warm-up
        with count_communication() as comm, PeakTensorMemory() as mem:
            step()
        times = []
        for _ in range(args.iters):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        ms = torch.tensor(statistics.median(times))
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        rows.append({"method": method, "k": k, "nproc": world, "bytes_per_rank": comm.sent,
                     "peak_loss_bytes": mem.peak_bytes, "ms": round(float(ms), 3)})
    dist.destroy_process_group()
    if rank == 0:
        q.put(rows)


def analytic(nodes, gpus_per_node, batch, dim, bytes_per_el=2):
    """Per-rank loss-side traffic and logit memory of one step on a cluster (both embeddings,
    forward gather + backward reduce-scatter; bf16). The byte formula is the planner's
    (:func:`megatron_m2.planner.itc_bytes_per_rank`)."""
    from megatron_m2.planner import itc_bytes_per_rank

    n, k = nodes * gpus_per_node, gpus_per_node
    return {
        "nodes": nodes, "gpus_per_node": gpus_per_node, "N": n, "k": k, "batch": batch,
        "dim": dim,
        "global_bytes_per_rank": itc_bytes_per_rank(n, batch, dim, bytes_per_el, embeddings=2),
        "gba_bytes_per_rank": itc_bytes_per_rank(k, batch, dim, bytes_per_el, embeddings=2),
        "reduction": (n - 1) / (k - 1),
        "gba_inter_node_bytes": 0,
        "global_logits_bytes": batch * n * batch * 4,
        "gba_logits_bytes": batch * k * batch * 4,
        "naive_logits_bytes": (n * batch) ** 2 * 4,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=4, help="gloo processes (N)")
    p.add_argument("--batch", type=int, default=128, help="local pairs per rank (b)")
    p.add_argument("--dim", type=int, default=256, help="embedding width (D)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--cluster-nodes", type=int, default=32)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cluster-batch", type=int, default=64, help="per-GPU pairs on the cluster")
    p.add_argument("--cluster-dim", type=int, default=1024)
    p.add_argument("--json", action="store_true", help="print the measured rows as JSON only")
    args = p.parse_args(argv)

    from megatron_m2.parallel.launch_env import _free_port as free_port
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.nproc, port, args, q))
             for r in range(args.nproc)]
    for proc in procs:
        proc.start()
    rows = q.get(timeout=900)
    for proc in procs:
        proc.join()
    if args.json:
        print(json.dumps(rows))
        return 0
    glob = next(r for r in rows if r["method"] == "global")
    print(f"N={args.nproc} gloo ranks, local b={args.batch}, D={args.dim} (fp32)")
    print(f"{'method':<8}{'k':>4}{'bytes/rank':>14}{'vs global':>11}{'(k-1)/(N-1)':>13}"
          f"{'peak loss MB':>14}{'ms':>9}")
    for r in rows:
        ratio = r["bytes_per_rank"] / glob["bytes_per_rank"]
        expect = (r["k"] - 1) / (args.nproc - 1)
        print(f"{r['method']:<8}{r['k']:>4}{r['bytes_per_rank']:>14,}{ratio:>11.4f}"
              f"{expect:>13.4f}{r['peak_loss_bytes'] / 2**20:>14.2f}{r['ms']:>9.2f}")
    a = analytic(args.cluster_nodes, args.gpus_per_node, args.cluster_batch, args.cluster_dim)
    print(f"\nAnalytic, {a['nodes']} nodes x {a['gpus_per_node']} GPUs (N={a['N']}), "
          f"b={a['batch']}, D={a['dim']}, bf16, per rank per step:")
    print(f"  global ITC: {a['global_bytes_per_rank'] / 2**20:,.1f} MiB, mostly inter-node; "
          f"logits {a['global_logits_bytes'] / 2**20:,.1f} MiB "
          f"(naive full matrix {a['naive_logits_bytes'] / 2**30:,.2f} GiB)")
    print(f"  GBA-ITC k={a['k']}: {a['gba_bytes_per_rank'] / 2**20:,.1f} MiB, all intra-node; "
          f"logits {a['gba_logits_bytes'] / 2**20:,.2f} MiB -> {a['reduction']:.1f}x less traffic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
