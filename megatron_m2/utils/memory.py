"""Measure the peak tensor memory of a piece of code on any device (CPU included).

:class:`PeakTensorMemory` is a ``TorchDispatchMode`` that sees every tensor an operator returns
(forward and autograd backward alike), counts its storage once, and subtracts it when the
storage is freed (storages keep their Python object alive as long as the C++ storage lives, so a
weak reference dies exactly when the memory is released). ``peak_bytes`` is the high-water mark
of memory allocated inside the context, not counting what existed before it.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PeakTensorMemory"]


class PeakTensorMemory(TorchDispatchMode):
    """``with PeakTensorMemory() as m: ...`` then ``m.peak_bytes``."""

    def __init__(self):
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._refs = {}

    def _release(self, key: int, nbytes: int) -> None:
        self.current_bytes -= nbytes
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._refs:
                continue  # a view of, or in-place result on, a storage already counted
            nbytes = storage.nbytes()
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            self._refs[key] = weakref.ref(storage,
                                          lambda _, k=key, n=nbytes: self._release(k, n))
        return out
