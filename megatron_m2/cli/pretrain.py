"""``m2-pretrain`` front end: parse and validate before anything heavy is imported.

A wrong configuration is reported by every rank in a fraction of a second, with one line
(``m2-pretrain: error: ...``, exit status 2), and no rank reaches ``torch.distributed``
initialisation (so none can wait in a rendezvous or a collective for a peer that has already
exited). Errors found later (a checkpoint or dataset that does not fit, a non-finite loss, a
peer that died) are one line as well; see :func:`megatron_m2.training.run.run`.

``python -m megatron_m2.pretrain`` (what ``torchrun -m`` and the Slurm recipes start) is an
alias of :func:`main`. The flags are defined in :mod:`megatron_m2.training.arguments`.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from ..errors import run_cli
from ..parallel.launch_env import discover_env
from ..training.arguments import build_parser, parse_args
from ..training.validation import validate_args

__all__ = ["main", "build_parser", "PROG"]

PROG = "m2-pretrain"


def _main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    env = discover_env()
    # The node size (torchrun's LOCAL_WORLD_SIZE) lets the layout rules that depend on nodes
    # (TP inside a node, the default ITC group of one node's DP ranks) fail here, on every rank.
    validate_args(args, env.world_size, env.local_world_size)
    from ..training.run import run  # heavy: torch, megatron-core

    run(args)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``m2-pretrain`` / ``python -m megatron_m2.pretrain``."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
