"""Run megatron-core's CUDA-bound code paths on CPU.

megatron-core hard-codes CUDA in a handful of places that the training path goes through
(pipeline schedules, p2p receive buffers, the DDP gradient buffers, the optimizer's scalar
buffers, gradient clipping). On a CPU-only machine (development boxes, CI) we want to run those
exact code paths, not a parallel CPU-only re-implementation, so this module installs a small,
explicit compatibility layer:

* a :class:`torch.overrides.TorchFunctionMode` that rewrites CUDA ``device`` arguments
  (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")`` and bare integers, which PyTorch reads as
  CUDA ordinals) to ``"cpu"``, turns ``Tensor.cuda()`` into a no-op and makes the
  argument-less ``Tensor.type()`` report ``torch.cuda.*Tensor`` names, which megatron's optimizer
  and gradient clipping assert on;
* stubs for ``torch.cuda.current_device``, ``synchronize``, ``empty_cache``, ``default_stream`` and
  ``Stream`` so that bookkeeping calls succeed;
* the "CUDA" random generator mapped onto the CPU one (the generator that random ops rewritten
  to CPU draw from): ``torch.cuda.get_rng_state`` / ``set_rng_state`` / ``manual_seed`` and
  megatron's private ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``, which its RNG tracker and
  activation recomputation (``tensor_parallel.checkpoint``) use to replay a forward pass with the
  random state it first ran with. Without them the getter raises (no CUDA) and megatron's setter
  silently queues a callback that never runs.

The layer is only ever activated by :func:`enable` when the process has no usable CUDA device and
the backend is gloo; on GPUs it is never installed. ``tools/bench_train.py`` measures its cost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_state = threading.local()
_GLOBAL = {"enabled": False, "mode": None, "saved": []}

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, bool):  # bool is an int subclass; never a device
        return False
    if isinstance(dev, int):
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement requests to CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream`` on CPU: every operation is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        return None

    def synchronize(self):
        return None

    def record_event(self, *args, **kwargs):
        return None


def _cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    """``torch.cuda.get_rng_state`` / megatron's ``_get_cuda_rng_state`` on CPU (any device
    argument): the CPU generator's state."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    """``torch.cuda.set_rng_state`` / megatron's ``_set_cuda_rng_state`` on CPU."""
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    """``torch.cuda.manual_seed`` on CPU: seeds the generator the "CUDA" state stands for."""
    torch.manual_seed(seed)


def _patch(module, stubs, saved) -> None:
    for name, stub in stubs.items():
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, stub)


def _stub_cuda_functions():
    with warnings.catch_warnings():
        # megatron-core warns at import that TE/Apex are missing: the expected state on CPU.
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        from megatron.core.tensor_parallel import random as mcore_random

    saved = []
    rng = {"get_rng_state": _cpu_rng_state, "set_rng_state": _set_cpu_rng_state,
           "manual_seed": _cpu_manual_seed}
    _patch(torch.cuda, {
        "current_device": lambda: 0,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "default_stream": lambda *a, **k: _NullStream(),
        "current_stream": lambda *a, **k: _NullStream(),
        "Stream": _NullStream,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        **rng,
    }, saved)
    _patch(torch.cuda.random, rng, saved)
    _patch(mcore_random, {"_get_cuda_rng_state": _cpu_rng_state,
                          "_set_cuda_rng_state": _set_cpu_rng_state}, saved)
    return saved


def enable() -> bool:
    """Install the CPU compatibility layer for this process.

    Returns ``True`` if it was installed, ``False`` if CUDA is available (then nothing happens).
    Idempotent.
    """
    if torch.cuda.is_available():
        return False
    if _GLOBAL["enabled"]:
        return True
    _GLOBAL["saved"] = _stub_cuda_functions()
    mode = _CudaToCpuMode()
    mode.__enter__()
    _GLOBAL["mode"] = mode
    _GLOBAL["enabled"] = True
    logger.info("CPU compatibility layer for megatron-core enabled (no CUDA device found)")
    return True


def disable() -> None:
    """Remove the layer installed by :func:`enable` (used by tests)."""
    if not _GLOBAL["enabled"]:
        return
    _GLOBAL["mode"].__exit__(None, None, None)
    for module, name, fn in reversed(_GLOBAL["saved"]):
        setattr(module, name, fn)
    _GLOBAL.update(enabled=False, mode=None, saved=[])


@contextlib.contextmanager
def suspended():
    """Run a block without the layer (no-op when it is not enabled).

    For hot code that never asks for a CUDA device — the model's forward, the inner torch
    optimizer step — so that it does not pay one Python call per torch call.
    """
    mode = _GLOBAL["mode"]
    if mode is None:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


def exempt(fn):
    """``fn`` wrapped to run under :func:`suspended`."""
    def wrapper(*args, **kwargs):
        with suspended():
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


def is_enabled() -> bool:
    """Whether the CPU compatibility layer is active in this process."""
    return _GLOBAL["enabled"]
