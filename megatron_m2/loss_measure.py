"""Measured cost of the contrastive loss alone, over real process groups (gloo on CPU).

What ``tools/bench_itc.py`` and ``tools/study_gba.py`` report, measured in one place: for a
:class:`LossCase` — which loss, the ITC group size k, the local rows b, the embedding width D,
the step's M micro-batches and feature accumulation — every rank runs the loss's forward and
backward on random normalised embeddings and reports

* ``bytes_per_rank``: bytes this rank sends in the loss's collectives during one **step** (M
  contrastive batches, or one of M·b rows with feature accumulation), counted where each
  collective is issued (:func:`megatron_m2.loss.count_communication`; ring algorithm);
* ``peak_loss_bytes``: the high-water mark of tensor memory allocated by the step's loss
  forward+backward, its inputs' copies included
  (:class:`megatron_m2.utils.memory.PeakTensorMemory`, rank 0's);
* ``ms``: the step's loss wall time, median over ``iters`` runs, slowest rank.

:func:`measure_loss_cases` spawns ``nproc`` gloo processes, creates the ITC groups of k
consecutive ranks for every k the cases need (DP = the world: no TP/PP), measures every case in
order and returns rank 0's rows. :func:`measure_step` is the measuring core for a caller that
already runs inside a process group.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["LossCase", "divisors", "itc_group_map", "measure_step", "case_step",
           "measure_loss_cases"]

_SCALE = 2.659  # log(1 / 0.07): CLIP's initial log-temperature


@dataclass(frozen=True)
class LossCase:
    """One loss configuration to measure.

    ``method``: ``"local"`` (:func:`~megatron_m2.loss.local_contrastive_loss` on one
    image/text pair: global ITC with k = N, GBA-ITC with k < N), ``"naive"``
    (:func:`~megatron_m2.loss.naive_global_loss`) or ``"itc"`` (the trainer's loss,
    :func:`~megatron_m2.loss.itc_loss` with ``heads``, or with ``accumulate``
    :func:`~megatron_m2.loss.cached_feature_loss` over the step's ``micro_batches``).
    ``k``: ITC group size in ranks (``-1``: the world). ``batch``: local rows per micro-batch
    (b); ``dim``: embedding width (D).
    """

    method: str
    k: int
    batch: int
    dim: int
    micro_batches: int = 1
    accumulate: bool = False
    heads: str = "both"

    def __post_init__(self):
        if self.method not in ("local", "naive", "itc"):
            raise ValueError(f"method must be local, naive or itc, got {self.method!r}")
        if self.accumulate and self.method != "itc":
            raise ValueError("feature accumulation is measured with method 'itc' only")
        if self.micro_batches < 1 or self.batch < 1 or self.dim < 1:
            raise ValueError(f"micro_batches, batch and dim must be >= 1: {self}")

    def group_size(self, world: int) -> int:
        return world if self.k == -1 else self.k


def divisors(n: int) -> List[int]:
    """The divisors of ``n`` in increasing order."""
    return [k for k in range(1, n + 1) if n % k == 0]


def itc_group_map(sizes: Sequence[int]) -> Dict[int, object]:
    """``{k: this rank's group of k consecutive ranks}`` for every k in ``sizes`` (``None`` for
    k = 1). Collective: every rank calls it with the same sizes (each must divide the world)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = {}
    for k in sorted(set(sizes)):
        if world % k:
            raise ValueError(f"ITC group size {k} does not divide the world size {world}")
        for start in range(0, world, k):
            g = dist.new_group(list(range(start, start + k))) if k > 1 else None
            if start <= rank < start + k:
                groups[k] = g
    return groups


def _normalised(generator: torch.Generator, batch: int, dim: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1)


def case_step(case: LossCase, group, generator: torch.Generator) -> Callable[[], None]:
    """A closure running one step of ``case``'s loss (forward and backward) over ``group``.

    The embeddings are drawn once from ``generator`` (image then text, per micro-batch and
    head); each call copies them into fresh leaves, so the copies count as the loss's inputs.
    """
    from .loss import (
        HEAD_KEYS,
        cached_feature_loss,
        itc_loss,
        local_contrastive_loss,
        naive_global_loss,
    )

    if case.method in ("local", "naive"):
        pairs = [(_normalised(generator, case.batch, case.dim),
                  _normalised(generator, case.batch, case.dim))
                 for _ in range(case.micro_batches)]
        fn = naive_global_loss if case.method == "naive" else local_contrastive_loss

        def step():
            for image, text in pairs:
                img = image.clone().requires_grad_(True)
                txt = text.clone().requires_grad_(True)
                scale = torch.tensor(_SCALE, requires_grad=True)
                loss, _ = fn(img, txt, scale, group)
                loss.backward()
                del img, txt, scale, loss  # one micro-batch's loss alive at a time

        return step

    names = ["vl"] if case.heads == "vl" else ["backbone", "vl"]
    keys = [key for name in names for key in HEAD_KEYS[name][:2]]
    micro = [{key: _normalised(generator, case.batch, case.dim) for key in keys}
             for _ in range(case.micro_batches)]

    def scales():
        return {HEAD_KEYS[name][2]: torch.tensor(_SCALE, requires_grad=True)
                for name in ("backbone", "vl")}

    if case.accumulate:
        def step():
            cached = [{key: t.clone() for key, t in out.items()} for out in micro]
            cached_feature_loss(cached, scales(), group=group, heads=case.heads)
    else:
        def step():
            for out in micro:
                leaves = {key: t.clone().requires_grad_(True) for key, t in out.items()}
                loss, _ = itc_loss({**leaves, **scales()}, group=group, heads=case.heads)
                loss.backward()
                del leaves, loss
    return step


def measure_step(step: Callable[[], None], iters: int = 0) -> Dict[str, float]:
    """Run ``step`` once to warm up, once counting its collectives and peak tensor memory, then
    ``iters`` times timed. Returns ``bytes_per_rank``, ``peak_loss_bytes`` and ``ms`` (median,
    the slowest rank's; 0.0 without ``iters``). Collective when ``step`` is."""
    from .loss import count_communication
    from .utils.memory import PeakTensorMemory

    step()
    with count_communication() as comm, PeakTensorMemory() as mem:
        step()
    times = []
    for _ in range(iters):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    ms = torch.tensor(statistics.median(times) if times else 0.0)
    if dist.is_initialized():
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return {"bytes_per_rank": comm.sent, "peak_loss_bytes": mem.peak_bytes,
            "ms": round(float(ms), 3)}


def _worker(rank: int, world: int, port: int, cases: List[LossCase], iters: int, q) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from .parallel.distributed import init_distributed

    try:
        init_distributed(timeout_s=300)
        groups = itc_group_map([c.group_size(world) for c in cases])
        rows = []
        for case in cases:
            k = case.group_size(world)
            generator = torch.Generator().manual_seed(rank)
            row = measure_step(case_step(case, groups[k], generator), iters)
            rows.append({**asdict(case), "k": k, "nproc": world, **row})
        if rank == 0:
            q.put(("ok", rows))
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        q.put(("error", f"rank {rank}: {type(e).__name__}: {e}"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure_loss_cases(nproc: int, cases: Sequence[LossCase], iters: int = 0,
                       timeout_s: float = 900.0) -> List[Dict[str, object]]:
    """Measure ``cases`` over ``nproc`` spawned gloo processes (one thread each); returns one
    row per case: the case's fields (``k`` resolved), ``nproc`` and :func:`measure_step`'s
    figures (rank 0's memory; bytes are the same on every rank of a symmetric case)."""
    import torch.multiprocessing as mp

    from .parallel.launch_env import _free_port

    cases = list(cases)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, cases, iters, q))
             for r in range(nproc)]
    for proc in procs:
        proc.start()
    result: Optional[tuple] = None
    try:
        result = q.get(timeout=timeout_s)
    finally:
        for proc in procs:
            proc.join(timeout=60 if result and result[0] == "ok" else 5)
            if proc.is_alive():
                proc.terminate()
    if result[0] != "ok":
        raise RuntimeError(f"loss measurement failed: {result[1]}")
    return result[1]
