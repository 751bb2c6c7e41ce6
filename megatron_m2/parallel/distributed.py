"""Process start-up: rank discovery (torchrun or Slurm), backend choice, model-parallel groups.

* torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``;
* under ``srun`` without torchrun, ranks come from ``SLURM_PROCID``/``SLURM_NTASKS``/
  ``SLURM_LOCALID`` and the master address is the first host of ``SLURM_JOB_NODELIST``;
* with neither, the process is a world of one (handy for notebooks and inference).

NCCL is used when CUDA is available, gloo otherwise; on CPU the megatron-core compatibility
layer (:mod:`megatron_m2.parallel.cpu_compat`) is switched on.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
import socket
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import cpu_compat

logger = logging.getLogger(__name__)

__all__ = ["DistEnv", "discover_env", "expand_nodelist", "init_distributed",
           "initialize_model_parallel", "set_seed", "destroy"]


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


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
                       "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        master = env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0]
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = int(env.get("MASTER_PORT", 20000 + job % 20000))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)), master, port, "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(),
                   "single")


def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0) -> DistEnv:
    """Initialise ``torch.distributed`` (idempotent) and, on CPU, the compatibility layer.

    ``timeout_s`` bounds every collective: a dead peer makes the job fail instead of hanging.
    """
    env = discover_env()
    use_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        cpu_compat.enable()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        logger.info("rank %d/%d initialised (%s, %s)", env.rank, env.world_size, backend,
                    env.launcher)
    return env


def initialize_model_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1,
                              **kwargs) -> None:
    """Create megatron-core's TP/PP/DP groups after checking that the world can hold them."""
    from megatron.core import parallel_state

    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not divisible by tensor-model-parallel-size "
            f"({tensor_parallel}) × pipeline-model-parallel-size ({pipeline_parallel})")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel, **kwargs)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch identically on every rank of a model replica.

    Weights do not depend on this (see :mod:`megatron_m2.model.init`); it drives data order and
    augmentation. On GPUs megatron's TP-aware CUDA RNG tracker is seeded too.
    """
    from megatron.core import parallel_state, tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available() and parallel_state.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down model-parallel groups and the process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
