#!/usr/bin/env python3
"""Measure the memory and time of retrieval evaluation on a synthetic test set.

Builds ``--images`` random L2-normalised image embeddings and ``--captions`` caption embeddings
(each caption a noisy copy of its image, captions spread evenly over the images, so the recalls
are not trivially zero) and runs :func:`megatron_m2.eval.retrieval_metrics` once with the given
chunking. Reports:

* ``peak_tensor_bytes``: peak tensor memory allocated by the evaluation (dispatch-mode storage
  tracker, :class:`megatron_m2.utils.memory.PeakTensorMemory`), above the inputs;
* ``rss_delta_bytes``: growth of the process's peak resident set size (``ru_maxrss``) across the
  evaluation: everything the evaluation added on top of the inputs, allocator slack included;
* ``full_matrix_bytes``: what a single float32 Ni × Nt similarity matrix would take;
* ``seconds``: wall time of the evaluation, and the metrics themselves.

The embeddings are built chunk by chunk so that building them does not raise the peak RSS above
what they occupy, which keeps the before/after ``ru_maxrss`` difference meaningful. Run it as its
own process (the peak RSS is per process).

Examples::

    python tools/bench_retrieval.py --images 20000 --captions 100000 --dim 256
    python tools/bench_retrieval.py --images 2000 --captions 10000 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def make_embeddings(n_images, n_captions, dim, noise=6.0, seed=0, block=8192):
    """Normalised image and caption embeddings plus each caption's image index."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n_images, dim, generator=g)
    image.div_(image.norm(dim=1, keepdim=True))
    text_to_image = torch.arange(n_captions) % n_images
    text_to_image = text_to_image[torch.randperm(n_captions, generator=g)]
    text = torch.empty(n_captions, dim)
    for s in range(0, n_captions, block):
        rows = text[s:s + block]
        rows.normal_(generator=g).mul_(noise / dim ** 0.5).add_(image[text_to_image[s:s + block]])
        rows.div_(rows.norm(dim=1, keepdim=True))
    return image, text, text_to_image


def _maxrss_bytes():
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def measure(n_images, n_captions, dim, chunk_size=4096, threads=None):
    """Run the evaluation once and return the figures as a dict."""
    from megatron_m2.eval import retrieval_metrics
    from megatron_m2.utils.memory import PeakTensorMemory

    if threads:
        torch.set_num_threads(threads)
    with PeakTensorMemory() as mem:
        # The inputs are built under the tracker so that it knows their storages: a slice of a
        # storage it has not seen would be counted as a new allocation of the whole storage.
        image, text, text_to_image = make_embeddings(n_images, n_captions, dim)
        inputs_bytes = mem.current_bytes
        mem.peak_bytes = inputs_bytes
        rss_before = _maxrss_bytes()
        t0 = time.perf_counter()
        metrics = retrieval_metrics(image, text, text_to_image, chunk_size=chunk_size)
        seconds = time.perf_counter() - t0
        rss_after = _maxrss_bytes()
    return {"images": n_images, "captions": n_captions, "dim": dim, "chunk_size": chunk_size,
            "threads": torch.get_num_threads(), "peak_tensor_bytes": mem.peak_bytes - inputs_bytes,
            "inputs_bytes": inputs_bytes,
            "rss_before_bytes": rss_before, "rss_delta_bytes": rss_after - rss_before,
            "full_matrix_bytes": n_images * n_captions * 4, "seconds": round(seconds, 3),
            "metrics": {k: round(v, 4) for k, v in metrics.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--captions", type=int, default=100000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = p.parse_args(argv)
    if args.captions < args.images:
        p.error("every image needs a caption: --captions must be >= --images")
    row = measure(args.images, args.captions, args.dim, args.chunk_size, args.threads)
    if args.json:
        print(json.dumps(row))
        return 0
    mib = 2 ** 20
    print(f"retrieval {row['images']} images x {row['captions']} captions, D={row['dim']}, "
          f"chunk {row['chunk_size']}, {row['threads']} threads")
    print(f"  peak tensor memory : {row['peak_tensor_bytes'] / mib:10.1f} MiB "
          f"(inputs, not counted: {row['inputs_bytes'] / mib:.1f} MiB)")
    print(f"  peak RSS delta     : {row['rss_delta_bytes'] / mib:10.1f} MiB "
          f"(inputs + runtime before: {row['rss_before_bytes'] / mib:.1f} MiB)")
    print(f"  full Ni x Nt matrix: {row['full_matrix_bytes'] / mib:10.1f} MiB (not built)")
    print(f"  wall time          : {row['seconds']:10.2f} s")
    from megatron_m2.eval import format_table

    print(format_table({"synthetic": row["metrics"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
