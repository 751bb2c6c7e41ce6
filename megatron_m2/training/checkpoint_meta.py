"""Where a checkpoint is and what its ``meta.json`` says, without importing torch.

Argument validation reads a ``--load`` checkpoint's meta (model config, LR schedule, arguments)
before anything heavy is imported, so that a mismatch fails on every rank in a fraction of a
second; :mod:`megatron_m2.training.checkpointing` builds on the same functions.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

from ..errors import UserError

__all__ = ["TRACKER", "iter_dir", "latest_iteration", "resolve_checkpoint", "holds_checkpoint",
           "CheckpointError"]

class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used as asked (another model, missing weights, a broken tracker);
    the message names the checkpoint."""


TRACKER = "latest_checkpointed_iteration.txt"
"""The tracker file of a save root: the step of its newest complete checkpoint."""


def iter_dir(root: str, step: int) -> str:
    """``root/iter_NNNNNNN``: the directory of the checkpoint of ``step``."""
    return os.path.join(root, f"iter_{step:07d}")


def latest_iteration(root: str) -> Optional[int]:
    """The step of the newest complete checkpoint under ``root`` (None if there is none)."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        step = int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None
    if not os.path.isdir(iter_dir(root, step)):
        raise FileNotFoundError(f"{path} names iteration {step} but {iter_dir(root, step)} "
                                f"is missing")
    return step


def holds_checkpoint(path: str) -> bool:
    """Whether ``path`` is a save root with a tracker or a checkpoint directory."""
    return (os.path.exists(os.path.join(path, TRACKER))
            or os.path.exists(os.path.join(path, "meta.json")))


def resolve_checkpoint(path: str) -> Tuple[str, Dict]:
    """``(directory, meta)`` of the checkpoint at ``path``: an ``iter_N`` directory, or a save
    root whose tracker names one. Raises FileNotFoundError when there is no ``meta.json``."""
    directory = path
    if os.path.exists(os.path.join(path, TRACKER)):
        directory = iter_dir(path, latest_iteration(path))
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{directory} is not a checkpoint (no meta.json, no {TRACKER})")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON (truncated or corrupt?): {e}") \
            from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object")
    return directory, meta
