"""Running ``m2-pretrain`` in this process: the distributed runtime around the
:class:`~megatron_m2.training.trainer.Trainer`, and how its failures end the process.

Errors end this rank with one line, not a traceback: the user's (a checkpoint or dataset that
does not fit: exit 2), a non-finite loss (exit 1), and a collective that failed because another
rank died or stopped (exit 1, saying so, so that the real error, reported by that rank, is not
buried under this rank's). Anything else keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Dict, List

import torch.distributed as dist

from .run_state import PHASE
from .trainer import Trainer

__all__ = ["run"]


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    # megatron-core logs its full configs and bucket layouts at INFO; keep its warnings only.
    logging.getLogger("megatron").setLevel(logging.WARNING)


def run(args) -> List[Dict[str, float]]:
    """Start the distributed runtime and train ``args`` (already validated by
    :func:`.validation.validate_args`); returns the per-step records.

    Errors end this rank with one line, not a traceback: the user's (a checkpoint or dataset
    that does not fit: exit 2), a non-finite loss (exit 1), and a collective that failed because
    another rank died or stopped (exit 1, saying so, so that the real error, reported by that
    rank, is not buried under this rank's). Anything else keeps its traceback.
    """
    from ..errors import fail, is_user_error
    from ..parallel.distributed import destroy, init_distributed

    PROG = "m2-pretrain"  # the console script these one-line errors belong to

    _exit_with_launcher()
    env = init_distributed(timeout_s=args.distributed_timeout_minutes * 60)
    _setup_logging(env.rank)
    trainer = None
    try:
        trainer = Trainer(args)
        return trainer.train()
    except Exception as exc:  # noqa: BLE001 - sorted below; bugs keep their traceback
        if is_user_error(exc):
            fail(PROG, exc)
        if isinstance(exc, FloatingPointError):
            fail(PROG, exc, status=1)
        if _peer_lost(exc):
            # gloo/NCCL messages start with their source location: keep what they say.
            first = re.sub(r"^\[[^\]]*\]\s*", "", (str(exc).strip() or type(exc).__name__)
                           .splitlines()[0])
            fail(PROG, f"rank {env.rank}: a collective failed or timed out during {PHASE[0]} "
                 f"({first[:120]}{'...' if len(first) > 120 else ''}): another rank failed, "
                 f"hung or was stopped first (its own error, if any, is the one to read)",
                 status=1)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        destroy()


def _exit_with_launcher() -> None:
    """Under torchrun, let the kernel send this process SIGTERM when torchrun's agent dies: the
    agent starts workers in sessions of their own, so an agent killed with SIGKILL would
    otherwise leave them training (and writing checkpoints) as orphans next to the job that
    replaces it. (srun keeps its tasks in its own process tracking.) Linux only."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PEER_LOST_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                      "timed out", "connection refused")


def _peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective or store failing because a peer went away (torch's
    distributed errors; older torch raises a RuntimeError that says so)."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _PEER_LOST_MARKERS)
