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
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from . import cpu_compat
from .launch_env import DistEnv, discover_env, expand_nodelist

logger = logging.getLogger(__name__)

__all__ = ["DistEnv", "discover_env", "expand_nodelist", "init_distributed",
           "initialize_model_parallel", "collective_timeout", "set_seed", "destroy"]

_DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
_timeout: Optional[datetime.timedelta] = None


def collective_timeout() -> datetime.timedelta:
    """The collective timeout of this job (``init_distributed``'s), which every process group
    created afterwards gets too: megatron-core's TP/PP/DP groups and the ITC groups."""
    return _timeout or _DEFAULT_TIMEOUT


def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0) -> DistEnv:
    """Initialise ``torch.distributed`` (idempotent) and, on CPU, the compatibility layer.

    ``timeout_s`` bounds every collective, on the world group and (through
    :func:`collective_timeout`) on every group created later: a dead or hung peer makes the job
    fail instead of hanging.
    """
    global _timeout
    env = discover_env()
    use_cuda = torch.cuda.is_available()
    # On GPUs: NCCL for CUDA tensors and gloo for the few CPU tensors that bookkeeping
    # collectives use (loss flags, checkpoint assembly, evaluation counts).
    backend = backend or ("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        cpu_compat.enable()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        _timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                timeout=_timeout)
        logger.info("rank %d/%d initialised (%s, %s)", env.rank, env.world_size, backend,
                    env.launcher)
    return env


def initialize_model_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1,
                              **kwargs) -> None:
    """Create megatron-core's TP/PP/DP groups after checking that the world can hold them, with
    this job's collective timeout (megatron-core's own default is 30 minutes)."""
    from megatron.core import parallel_state

    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not divisible by tensor-model-parallel-size "
            f"({tensor_parallel}) × pipeline-model-parallel-size ({pipeline_parallel})")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    kwargs.setdefault("distributed_timeout_minutes",
                      collective_timeout().total_seconds() / 60.0)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel, **kwargs)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch identically on every rank of a model replica.

    Weights do not depend on this (see :mod:`megatron_m2.model.init`); it drives data order and
    augmentation. Megatron's TP-aware "CUDA" RNG tracker is seeded too, on GPUs and under the
    CPU compatibility layer (whose "CUDA" generator is the CPU one): sequence parallelism runs
    the transformer block inside the tracker's ``fork()``, as in megatron.
    """
    from megatron.core import parallel_state, tensor_parallel

    from . import cpu_compat

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if parallel_state.model_parallel_is_initialized() and (
            torch.cuda.is_available() or cpu_compat.is_enabled()):
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down model-parallel groups and the process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
