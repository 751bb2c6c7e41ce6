"""File permissions: what the project writes is readable as the process umask says.

Some writers (safetensors' ``save_file``, temporary-file helpers) create files with mode 0600
whatever the umask; checkpoints and exports are meant to be shared (a team's evaluation jobs, a
serving host), so every such file gets ``0o666 & ~umask``, as ``open()`` would give it.
"""

from __future__ import annotations

import os
import threading

__all__ = ["umask", "apply_umask"]

_lock = threading.Lock()
_umask = None


def umask() -> int:
    """The process umask (read once: reading it means setting it, so it is cached)."""
    global _umask
    if _umask is None:
        with _lock:
            if _umask is None:
                current = os.umask(0o022)
                os.umask(current)
                _umask = current
    return _umask


def apply_umask(path: str) -> None:
    """Give the file at ``path`` the permissions ``open()`` would have given it."""
    os.chmod(path, 0o666 & ~umask())
