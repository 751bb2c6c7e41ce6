"""Durable, atomic writes: a file or a checkpoint is either complete or not there.

A checkpoint is written into ``iter_N.tmp/`` and published by :func:`publish_checkpoint`:
its files fsynced, the directory renamed to ``iter_N/``, and only then the tracker rewritten
(write + fsync + rename). A crash at any point leaves the tracker naming the previous complete
checkpoint. Single files are written next to their destination and renamed onto it
(:func:`atomic_write`).
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

from ..utils.files import apply_umask
from .format import TMP_SUFFIX, TRACKER, iter_dir

__all__ = ["fsync_file", "fsync_dir", "atomic_write", "publish_checkpoint"]


def fsync_file(path: str) -> None:
    """Flush the file at ``path`` to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """Flush the directory entries of ``path`` (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)``, fsync, then rename onto ``path`` (with the process umask's
    permissions: some writers create files private to their owner)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + TMP_SUFFIX
    try:
        write(tmp)
        apply_umask(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(parent)


def publish_checkpoint(root: str, step: int) -> str:
    """Make the fully written ``iter_N.tmp/`` the checkpoint of ``step``: fsync its files,
    rename it to ``iter_N/`` and then atomically rewrite the tracker. A crash at any point
    leaves the tracker naming the previous complete checkpoint. Returns the final dir."""
    final, tmp = iter_dir(root, step), iter_dir(root, step) + TMP_SUFFIX
    for fn in os.listdir(tmp):
        fsync_file(os.path.join(tmp, fn))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    tracker_tmp = os.path.join(root, TRACKER + TMP_SUFFIX)
    with open(tracker_tmp, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    fsync_dir(root)
    return final
