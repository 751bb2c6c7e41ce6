"""Run a function on N real processes over gloo (no mocks) and collect what each rank returns.

``run_distributed(fn, world_size, **kwargs)`` spawns ``world_size`` processes with torchrun-style
environment variables, initialises ``torch.distributed`` through the project's own
:func:`megatron_m2.parallel.distributed.init_distributed` (gloo + CPU compatibility layer), calls
``fn(**kwargs)`` on every rank and returns the list of results by rank. The first exception on
any rank fails the test with that rank's traceback and stops the others, so a failing rank never
leaves its peers hanging in a collective.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, q, kwargs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    from megatron_m2.parallel import distributed as d

    try:
        d.init_distributed(timeout_s=120)
        result = fn(**kwargs)
        q.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            d.destroy()
        except Exception:
            pass


def run_distributed(fn: Callable[..., Any], world_size: int, timeout: float = 300,
                    **kwargs) -> List[Any]:
    """Run ``fn(**kwargs)`` on ``world_size`` gloo ranks; return results ordered by rank."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, q, kwargs))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    try:
        while len(results) < world_size:
            try:
                rank, status, payload = q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"distributed test timed out after {timeout}s; "
                                     f"ranks that finished: {sorted(results)}") from None
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=30 if len(results) == world_size else 1)
            if p.is_alive():
                p.terminate()
                p.join()
    return [results[r] for r in range(world_size)]
