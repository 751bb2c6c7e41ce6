"""Where this process sits in the job, from the launcher's environment (torch-free, so that a
wrong configuration is reported before any heavy import)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import List, Optional

__all__ = ["DistEnv", "discover_env", "expand_nodelist"]


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"
    local_world_size: Optional[int] = None
    """Ranks on this node (torchrun's ``LOCAL_WORLD_SIZE``, Slurm's ``SLURM_NTASKS_PER_NODE``);
    ``None`` when the launcher does not say."""


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand a Slurm compressed host list, e.g. ``gpu[01-03,07],login1`` →
    ``[gpu01, gpu02, gpu03, gpu07, login1]`` (zero padding preserved)."""
    hosts: List[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{i:0{width}d}{suffix}")
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover_env(environ=None) -> DistEnv:
    """Read the launcher's environment (torchrun first, then Slurm, else a single process)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                       "torchrun", _int_or_none(env.get("LOCAL_WORLD_SIZE")))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        master = env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0]
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = int(env.get("MASTER_PORT", 20000 + job % 20000))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)), master, port, "slurm",
                       _int_or_none(env.get("SLURM_NTASKS_PER_NODE")))
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(),
                   "single", 1)


def _int_or_none(value: Optional[str]) -> Optional[int]:
    """An integer environment value; ``None`` when absent or not a plain integer (Slurm writes
    e.g. ``8(x4)`` for heterogeneous layouts)."""
    try:
        return int(value) if value else None
    except ValueError:
        return None
