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
* megatron's sequence-parallel collectives and the linears that gather along the sequence run
  with the layer on wherever they are reached: the autograd engine runs backward functions
  without the caller's torch-function modes, so a mode alone would not cover their backward;
* the "CUDA" random generator mapped onto the CPU one (the generator that random ops rewritten
  to CPU draw from): ``torch.cuda.get_rng_state`` / ``set_rng_state`` / ``manual_seed`` and
  megatron's private ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``, which its RNG tracker and
  activation recomputation (``tensor_parallel.checkpoint``) use to replay a forward pass with the
  random state it first ran with. Without them the getter raises (no CUDA) and megatron's setter
  silently queues a callback that never runs.

It is never installed on a machine with a usable CUDA device (every entry point below is then a
no-op). ``tools/bench_train.py`` measures its cost.

One context API
---------------
* :func:`active` — the layer is on inside the block and back to what it was after; blocks nest
  (an inner one changes nothing if the layer is already on). This is the primitive.
* :func:`suspended` — the layer is off inside the block (for hot code that never asks for a CUDA
  device — the model's forward — so that it does not pay one Python call per torch call), back
  on after; a no-op where it is not on.
* :func:`exempt_optimizer` — a torch optimizer whose ``step()`` runs suspended. megatron's
  optimizer calls its inner torch optimizer's ``step()`` itself, in the middle of its own step
  (buffers and gradient clipping around it need the layer), so no block of ours encloses exactly
  that call; torch's own step hooks do (``register_step_pre_hook`` /
  ``register_step_post_hook``), and nothing is assigned over ``optimizer.step``.
* :func:`enable` / :func:`disable` — the layer for the rest of the process (launch:
  :func:`megatron_m2.parallel.distributed.init_distributed`), i.e. an :func:`active` block that
  stays open until :func:`disable`.

The stubs are process-wide; the ``TorchFunctionMode`` is on the torch-function mode stack of the
thread that entered the block (torch keeps one stack per thread). Each block records what it
asked for, and the mode is on the stack exactly when the innermost open block of the thread
asks for it, so blocks may also be closed out of order (``disable()`` inside an ``active()``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_lock = threading.RLock()
_stubs = {"users": 0, "saved": []}  # process-wide: how many on-blocks are open, what was patched
_tls = threading.local()  # per thread: its open blocks (innermost last) and its mode instance
_process_block: list = []  # the block opened by enable() (at most one)

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


def _on_layer(fn, when=None):
    """``fn`` run with the layer on (for megatron code reached where the mode is not: the
    autograd engine runs backward functions without the caller's torch-function modes, and the
    model's forward runs :func:`suspended`). ``when(*args)``: only for the calls it accepts
    (the others keep their cost: one Python call per torch call inside is what
    :func:`suspended` exists to avoid)."""

    def wrapped(*args, **kwargs):
        if when is not None and not when(*args):
            return fn(*args, **kwargs)
        with active():
            return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn
    return wrapped


def _patch_static(cls, conditions, saved) -> None:
    """Wrap static methods of ``cls`` (``{name: when}``) with :func:`_on_layer` (restored as
    they were)."""
    for name, when in conditions.items():
        raw = cls.__dict__[name]
        saved.append((cls, name, raw))
        setattr(cls, name, staticmethod(_on_layer(raw.__func__, when)))


def _stub_cuda_functions():
    with warnings.catch_warnings():
        # megatron-core warns at import that TE/Apex are missing: the expected state on CPU.
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        from megatron.core.tensor_parallel import layers as mcore_layers
        from megatron.core.tensor_parallel import mappings as mcore_mappings
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
    # Sequence parallelism's collectives allocate their outputs (and the linears their gather
    # buffer) on the "current CUDA device", in forward and backward alike.
    _patch(mcore_mappings, {
        name: _on_layer(getattr(mcore_mappings, name))
        for name in ("_gather_along_first_dim", "_reduce_scatter_along_first_dim")}, saved)
    # The linears only where they gather along the sequence (forward(ctx, input, weight, bias,
    # gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, ...)).
    _patch_static(mcore_layers.LinearWithGradAccumulationAndAsyncCommunication,
                  {"forward": lambda *a: bool(a[6]),
                   "backward": lambda ctx, *a: bool(ctx.sequence_parallel)}, saved)
    return saved


class _Block:
    """One open block: whether it wants the layer on, and the thread list it sits in."""

    __slots__ = ("on", "owner")

    def __init__(self, on: bool, owner: list):
        self.on, self.owner = on, owner


def _blocks() -> list:
    blocks = getattr(_tls, "blocks", None)
    if blocks is None:
        blocks = _tls.blocks = []
    return blocks


def _thread_mode() -> _CudaToCpuMode:
    mode = getattr(_tls, "mode", None)
    if mode is None:
        mode = _tls.mode = _CudaToCpuMode()
    return mode


def _mode_index(mode) -> Optional[int]:
    for i in range(torch._C._len_torch_function_stack()):
        if torch._C._get_function_stack_at(i) is mode:
            return i
    return None


def _sync() -> None:
    """Put this thread's mode on or off its torch-function mode stack, as the innermost open
    block of the thread asks.

    A mode lifted by a :func:`suspended` block goes back where it was (other modes entered in
    the meantime stay above it, so that their own exits pop them, not ours); a fresh one goes on
    top.
    """
    blocks = _blocks()
    want = bool(blocks) and blocks[-1].on
    mode = _thread_mode()
    index = _mode_index(mode)
    if want and index is None:
        at = getattr(_tls, "lifted_at", None)
        depth = torch._C._len_torch_function_stack()
        at = depth if at is None else min(at, depth)
        above = [torch._C._pop_torch_function_stack() for _ in range(depth - at)]
        torch._C._push_on_torch_function_stack(mode)
        for m in reversed(above):
            torch._C._push_on_torch_function_stack(m)
        _tls.lifted_at = None
    elif not want and index is not None:
        above = [torch._C._pop_torch_function_stack()
                 for _ in range(torch._C._len_torch_function_stack() - index - 1)]
        torch._C._pop_torch_function_stack()  # ours
        for m in reversed(above):
            torch._C._push_on_torch_function_stack(m)
        _tls.lifted_at = index if blocks else None


def _open(on: bool) -> _Block:
    if on:
        with _lock:
            if _stubs["users"] == 0:
                _stubs["saved"] = _stub_cuda_functions()
                logger.info("CPU compatibility layer for megatron-core enabled (no CUDA device)")
            _stubs["users"] += 1
    block = _Block(on, _blocks())
    block.owner.append(block)
    _sync()
    return block


def _close(block: _Block) -> None:
    if not any(b is block for b in block.owner):
        return  # already closed
    block.owner[:] = [b for b in block.owner if b is not block]
    _sync()
    if block.on:
        with _lock:
            _stubs["users"] -= 1
            if _stubs["users"] == 0:
                for module, name, fn in reversed(_stubs["saved"]):
                    setattr(module, name, fn)
                _stubs["saved"] = []


@contextlib.contextmanager
def active():
    """The layer on for the block (nesting-safe; what it was is restored on exit).

    Yields whether the layer is in effect: ``False`` on a machine with a usable CUDA device, where
    nothing is installed.
    """
    if torch.cuda.is_available():
        yield False
        return
    block = _open(True)
    try:
        yield True
    finally:
        _close(block)


@contextlib.contextmanager
def suspended():
    """The layer off for the block on this thread, back to what it was after (a no-op where it
    is not on). The stubs stay: only the per-call rewriting, the cost, is lifted."""
    if not _blocks():  # nothing open on this thread: the layer is not on here
        yield
        return
    block = _open(False)
    try:
        yield
    finally:
        _close(block)


class _OptimizerExemption:
    """Handle of :func:`exempt_optimizer`; :meth:`remove` undoes it."""

    def __init__(self, optimizer):
        self._pending: list = []
        self._handles = [optimizer.register_step_pre_hook(self._pre),
                         optimizer.register_step_post_hook(self._post)]

    def _pre(self, optimizer, args, kwargs):
        # A step that raised never ran its post-hook: close its block first.
        while self._pending:
            _close(self._pending.pop())
        if _blocks():  # else the layer is not on in this thread: nothing to lift
            self._pending.append(_open(False))

    def _post(self, optimizer, args, kwargs):
        while self._pending:
            _close(self._pending.pop())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._post(None, (), {})


def exempt_optimizer(optimizer) -> Optional[_OptimizerExemption]:
    """Make ``optimizer.step()`` (a ``torch.optim.Optimizer``) run :func:`suspended`.

    For the inner torch optimizer that megatron's optimizer steps itself: its per-parameter
    arithmetic places every tensor by its parameter's device and never asks for a CUDA device,
    while megatron's code around it does and keeps the layer. Done with torch's step hooks (a
    pre-hook opens a :func:`suspended` block, the post-hook closes it), so the optimizer's
    ``step`` is not replaced. If a step raises, its block stays open on that thread until the
    optimizer's next step or :meth:`~_OptimizerExemption.remove`.

    Returns a handle whose ``remove()`` undoes it; ``None`` (nothing registered) on a machine
    with a usable CUDA device.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"exempt_optimizer needs a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if torch.cuda.is_available():
        return None
    return _OptimizerExemption(optimizer)


def enable() -> bool:
    """The layer on for the rest of the process (until :func:`disable`): an :func:`active`
    block left open, for launch code (``init_distributed``). Idempotent.

    Returns ``True`` if the layer is in effect, ``False`` if CUDA is available (then nothing
    happens).
    """
    if torch.cuda.is_available():
        return False
    with _lock:
        if not _process_block:
            _process_block.append(_open(True))
    return True


def disable() -> None:
    """Close the block :func:`enable` opened (a no-op if none is open). The layer stays on
    inside any :func:`active` block still open."""
    with _lock:
        block = _process_block.pop() if _process_block else None
    if block is not None:
        _close(block)


def is_enabled() -> bool:
    """Whether the layer is installed in this process (an :func:`active` block or
    :func:`enable` is open), suspended or not."""
    return _stubs["users"] > 0
