"""The errors of the checkpoint package (torch-free): each names the file, key or checkpoint."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from ..errors import UserError

__all__ = ["CheckpointError", "IntegrityError", "ConversionError", "UnsafeCheckpointError",
           "StateDictKeyError", "first_few"]


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used as asked (another model, missing weights, a broken tracker);
    the message names the checkpoint."""


class IntegrityError(UserError, ValueError):
    """A tensor file is corrupt (a checksum differs), truncated or not a safetensors file; the
    message names the file (and the tensor)."""


class ConversionError(UserError, ValueError):
    """A checkpoint cannot be read or written as asked; the message names the file."""


class UnsafeCheckpointError(ConversionError):
    """A pickled checkpoint needs more than tensors and plain containers to load.

    Attributes:
        path: the refused file.
        refused_global: the ``module.name`` the restricted unpickler refused, when it said.
    """

    def __init__(self, path: str, refused_global: Optional[str], reason: str):
        self.path = path
        self.refused_global = refused_global
        what = (f"it references the global {refused_global!r}" if refused_global
                else f"the restricted unpickler stopped: {reason}")
        super().__init__(
            f"{path}: refused to load: {what}. Only plain tensors and containers (dict, list, "
            f"tuple, numbers, strings) are accepted from pickled checkpoints; nothing in the file "
            f"was executed. Convert it to .safetensors, or re-save a plain state dict, in an "
            f"environment you trust.")


class StateDictKeyError(UserError, KeyError):
    """Keys are missing from, or unknown to, a state dict being converted.

    ``missing`` and ``unexpected`` hold the full sorted lists; the message names the first few.
    """

    def __init__(self, what: str, missing: Iterable[str] = (), unexpected: Iterable[str] = ()):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {first_few(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): "
                         f"{first_few(self.unexpected)}")
        self.message = f"{what}: " + "; ".join(parts)
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message (quotes, escaped newlines)
        return self.message


def first_few(keys: Sequence[str], n: int = 8) -> str:
    """``keys[:n]`` joined, with the count of the rest: how messages name long lists."""
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")
