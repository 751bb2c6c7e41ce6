"""One run per save folder: a lock file naming its holder, with a heartbeat and a stale rule.

Two runs writing into one ``--save`` folder would remove each other's in-progress saves and
publish checkpoints mixing one run's weights with the other's optimizer state. So a run takes
``SAVE/.m2-save.lock`` before it writes anything there (global rank 0, created atomically with
``O_EXCL``), holding ``{"run_id", "host", "pid", "started"}``, and refreshes its modification time
every :data:`HEARTBEAT_S` seconds from a background thread. A second run finds the lock and
refuses to start, naming the holder. A lock is *stale*, and taken over with a warning, when its
holder is on this host and its process is gone, or when its heartbeat is older than
``stale_after`` seconds (a holder on another host that died). The lock is removed when the run
ends; a run that was killed leaves it behind, stale.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Dict, Optional

from .errors import CheckpointError

__all__ = ["LOCK_NAME", "HEARTBEAT_S", "STALE_AFTER_S", "SaveLock", "SaveLockError"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".m2-save.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class SaveLockError(CheckpointError):
    """The save folder is in use by another run (the message names it)."""


def _read(path: str) -> Optional[Dict]:
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class SaveLock:
    """The lock of one save folder, held by this process (see the module docstring)."""

    def __init__(self, path: str, info: Dict):
        self.path, self.info = path, info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="m2-save-lock", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, save_dir: str, run_id: str,
                stale_after: float = STALE_AFTER_S) -> "SaveLock":
        """Take the lock of ``save_dir`` for ``run_id``.

        Raises:
            SaveLockError: another live run holds it.
        """
        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, LOCK_NAME)
        info = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "started": time.time()}
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                cls._break_if_stale(path, save_dir, stale_after)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            return cls(path, info)
        raise SaveLockError(f"--save {save_dir}: could not take its lock {path} (other runs "
                            "keep taking it)")

    @staticmethod
    def _break_if_stale(path: str, save_dir: str, stale_after: float) -> None:
        try:
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        holder = _read(path)
        if holder is None:
            if age < 10:  # being written right now
                time.sleep(0.5)
                return
            why = "it is unreadable"
        elif holder.get("host") == socket.gethostname() and not _pid_alive(
                int(holder.get("pid", -1))):
            why = f"its process {holder.get('pid')} on this host is gone"
        elif age > stale_after:
            why = f"its heartbeat is {age / 60:.0f} min old"
        else:
            raise SaveLockError(
                f"--save {save_dir} is in use by run {holder.get('run_id')} (host "
                f"{holder.get('host')}, pid {holder.get('pid')}, last seen {age:.0f} s ago): two "
                f"runs writing into one save folder would mix their checkpoints. Wait for it to "
                f"end, save elsewhere, or, if that run is gone, remove {path}")
        logger.warning("taking over the lock of %s from run %s: %s", save_dir,
                       (holder or {}).get("run_id"), why)
        # Rename before removing, so that of two runs taking over at once only one succeeds.
        grave = f"{path}.stale.{os.getpid()}"
        try:
            os.rename(path, grave)
            os.remove(grave)
        except FileNotFoundError:
            pass

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if (_read(self.path) or {}).get("run_id") != self.info["run_id"]:
                logger.error("the lock %s no longer names this run (%s): another run took it "
                             "over", self.path, self.info["run_id"])
                return
            try:
                os.utime(self.path)
            except OSError as e:
                logger.warning("cannot refresh the lock %s: %s", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it still names this run."""
        self._stop.set()
        if (_read(self.path) or {}).get("run_id") == self.info["run_id"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
