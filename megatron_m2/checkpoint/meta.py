"""Where a checkpoint is and what its ``meta.json`` says, without importing torch.

Argument validation reads a ``--load`` checkpoint's meta (model config, LR schedule, arguments)
before anything heavy is imported, so that a mismatch fails on every rank in a fraction of a
second; :mod:`megatron_m2.checkpoint.distributed` builds on the same functions. File names
come from :mod:`megatron_m2.checkpoint.format`.

The tracker (``latest_checkpointed_iteration.txt``) is the commit point of a save. A save folder
whose tracker is missing or unreadable but which holds complete ``iter_N`` checkpoints (renamed
into place, so fully written) is never taken for an empty one: the newest of them is used, with
a warning saying so.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Tuple

from .errors import CheckpointError
from .format import META_FILE, TRACKER, iter_dir, iter_step

__all__ = ["TRACKER", "iter_dir", "latest_iteration", "resolve_checkpoint", "holds_checkpoint",
           "complete_iterations", "check_tensor_file", "CheckpointError"]

logger = logging.getLogger(__name__)


def complete_iterations(root: str) -> List[int]:
    """Steps of the complete checkpoints under ``root``: ``iter_N`` directories holding a
    ``meta.json`` (a save writes into ``iter_N.tmp`` and renames it when done), ascending."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        step = iter_step(name)
        if step is not None and os.path.isfile(os.path.join(root, name, META_FILE)):
            steps.append(step)
    return sorted(steps)


def latest_iteration(root: str) -> Optional[int]:
    """The step of the newest complete checkpoint under ``root`` (None if there is none).

    The tracker names it. Without a readable tracker (lost, truncated, naming a missing
    directory) the newest complete ``iter_N`` directory is taken, with a warning; only a folder
    without any is empty.
    """
    path = os.path.join(root, TRACKER)
    problem = None
    if not os.path.exists(path):
        problem = "is missing"
    else:
        with open(path, errors="replace") as f:
            text = f.read().strip()
        try:
            step = int(text)
        except ValueError:
            problem = f"does not hold an iteration number ({text[:40]!r})"
        else:
            if os.path.isfile(os.path.join(iter_dir(root, step), META_FILE)):
                return step
            problem = f"names iteration {step}, but {iter_dir(root, step)} is not a checkpoint"
    steps = complete_iterations(root)
    if not steps:
        if problem == "is missing":
            return None
        raise CheckpointError(f"{path} {problem}, and {root} holds no complete checkpoint")
    logger.warning("%s %s: using %s, the newest complete checkpoint there (the next save "
                   "rewrites the tracker)", path, problem, iter_dir(root, steps[-1]))
    return steps[-1]


def holds_checkpoint(path: str) -> bool:
    """Whether ``path`` is a checkpoint directory or a save root holding one (with or without
    a readable tracker)."""
    return (os.path.exists(os.path.join(path, TRACKER))
            or os.path.exists(os.path.join(path, META_FILE))
            or bool(complete_iterations(path)))


def resolve_checkpoint(path: str) -> Tuple[str, Dict]:
    """``(directory, meta)`` of the checkpoint at ``path``: an ``iter_N`` directory, or a save
    root whose tracker names one. Raises FileNotFoundError when there is no ``meta.json``."""
    directory = path
    if not os.path.exists(os.path.join(path, META_FILE)):
        step = latest_iteration(path)
        if step is not None:
            directory = iter_dir(path, step)
    meta_path = os.path.join(directory, META_FILE)
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


def check_tensor_file(path: str) -> None:
    """Check a safetensors file's framing without torch (for argument validation): an 8-byte
    header length, a JSON header, every tensor's byte range inside the file and the data
    section exactly covered. A truncated or garbled file raises :class:`CheckpointError`
    naming it; the tensors' checksums are verified when they are loaded."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (header of "
                                  f"{n} bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: garbled safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: garbled safetensors header (not a JSON object)")
    data = size - 8 - n
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: garbled safetensors header (entry {name!r})") \
                from None
        if not 0 <= begin <= end <= data:
            raise CheckpointError(f"{path}: tensor {name!r} lies beyond the end of the file "
                                  f"(bytes {begin}-{end} of {data}): truncated")
        ends.append(end)
    if max(ends, default=0) != data:
        raise CheckpointError(f"{path}: {data} data bytes, but its tensors end at "
                              f"{max(ends, default=0)}: truncated or extended")
