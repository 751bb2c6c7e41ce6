"""``m2-pretrain`` front end: parse and validate before anything heavy is imported.

A wrong configuration is reported by every rank in a fraction of a second, with one line
(``m2-pretrain: error: ...``, exit status 2), and no rank reaches ``torch.distributed``
initialisation (so none can wait in a rendezvous or a collective for a peer that has already
exited). Errors found later (a checkpoint or dataset that does not fit, a non-finite loss, a
peer that died) are one line as well; see :func:`megatron_m2.training.trainer.run`.
"""

from __future__ import annotations

import sys
from typing import List, NoReturn, Optional

from ..errors import report_error, run_cli
from ..parallel.launch_env import discover_env
from .arguments import parse_args, validate_args

__all__ = ["main", "fail", "PROG"]

PROG = "m2-pretrain"


def fail(msg, status: int = 2) -> NoReturn:
    """Print the one-line error this rank reports (a message or an exception) and exit with
    ``status``."""
    report_error(PROG, msg)
    raise SystemExit(status)


def _main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    validate_args(args, discover_env().world_size)
    from .trainer import run  # heavy: torch, megatron-core

    run(args)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``m2-pretrain`` / ``python -m megatron_m2.pretrain``."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
