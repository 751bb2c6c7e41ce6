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

The measuring is :mod:`megatron_m2.loss_measure`'s (shared with ``tools/study_gba.py``).

Then the analytic figures for a cluster (``--cluster-nodes``, ``--gpus-per-node``): bytes per
rank per step of global ITC vs GBA-ITC with k = one node, and where they travel.

Examples::

    python tools/bench_itc.py --nproc 4
    python tools/bench_itc.py --nproc 8 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_m2.loss_measure import LossCase, divisors, measure_loss_cases  # noqa: E402


def cases(nproc, batch, dim):
    """``(method name, case)``: naive and global over all N ranks, GBA-ITC for every k < N that
    divides N (one image/text pair, one contrastive batch)."""
    out = [("naive", LossCase("naive", nproc, batch, dim)),
           ("global", LossCase("local", nproc, batch, dim))]
    return out + [("gba", LossCase("local", k, batch, dim)) for k in divisors(nproc) if k < nproc]


def measure(nproc, batch, dim, iters):
    """The measured rows (``method``, ``k``, ``nproc``, ``bytes_per_rank``,
    ``peak_loss_bytes``, ``ms``), by :func:`megatron_m2.loss_measure.measure_loss_cases`."""
    named = cases(nproc, batch, dim)
    rows = measure_loss_cases(nproc, [c for _, c in named], iters)
    keys = ("k", "nproc", "bytes_per_rank", "peak_loss_bytes", "ms")
    return [{"method": name, **{key: row[key] for key in keys}}
            for (name, _), row in zip(named, rows)]


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

    rows = measure(args.nproc, args.batch, args.dim, args.iters)
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
