"""The save folder's lock (torch-free): one run at a time, stale locks taken over."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from megatron_m2.checkpoint import LOCK_NAME, SaveLock, SaveLockError


def _write_lock(folder, host, pid, age_s=0.0):
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"run_id": "other", "host": host, "pid": pid, "started": 0}))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_second_run_is_refused_and_the_lock_released(tmp_path):
    lock = SaveLock.acquire(str(tmp_path), "run-a")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "run-a"
    with pytest.raises(SaveLockError, match=r"is in use by run run-a \(host .*, pid "
                                            rf"{os.getpid()}, last seen \d+ s ago\)"):
        SaveLock.acquire(str(tmp_path), "run-b")
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    SaveLock.acquire(str(tmp_path), "run-b").release()


def test_live_holder_on_another_host_is_respected(tmp_path):
    _write_lock(tmp_path, "some-other-host", 1, age_s=60)
    with pytest.raises(SaveLockError, match="in use by run other .host some-other-host"):
        SaveLock.acquire(str(tmp_path), "mine")


@pytest.mark.parametrize("host_pid_age,why", [
    ("dead_here", "on this host is gone"),
    ("silent_elsewhere", "heartbeat is 20 min old"),
])
def test_stale_locks_are_taken_over(tmp_path, caplog, host_pid_age, why):
    if host_pid_age == "dead_here":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        _write_lock(tmp_path, socket.gethostname(), gone.pid)
    else:
        _write_lock(tmp_path, "some-other-host", 1, age_s=20 * 60)
    with caplog.at_level(logging.WARNING):
        lock = SaveLock.acquire(str(tmp_path), "mine")
    assert "taking over the lock" in caplog.text and why in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "mine"
    lock.release()


def test_release_leaves_a_lock_taken_over_by_another_run(tmp_path):
    lock = SaveLock.acquire(str(tmp_path), "mine")
    _write_lock(tmp_path, "elsewhere", 7)  # someone broke it and took it
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "other"
