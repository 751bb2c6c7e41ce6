"""``m2-pretrain`` front end: parse and validate before anything heavy is imported.

A wrong configuration is reported by every rank in a fraction of a second, with one line, and
no rank reaches ``torch.distributed`` initialisation (so none can wait in a rendezvous or a
collective for a peer that has already exited).
"""

from __future__ import annotations

import sys
from typing import List, Optional

from ..config import ConfigError
from ..parallel.launch_env import discover_env
from .arguments import parse_args, validate_args

__all__ = ["main"]


def fail(msg: str) -> None:
    """Print the one-line error every rank reports and exit with status 2."""
    sys.stderr.write(f"m2-pretrain: error: {msg}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``m2-pretrain`` / ``python -m megatron_m2.pretrain``."""
    args = parse_args(argv)
    try:
        validate_args(args, discover_env().world_size)
    except (ConfigError, KeyError) as e:
        fail(str(e).strip("'\""))
    from .trainer import run  # heavy: torch, megatron-core

    run(args)
    return 0
