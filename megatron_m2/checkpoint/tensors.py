"""Safetensors files with a checksum per tensor, and errors that name the file.

Every safetensors file the project writes (checkpoint shards, optimizer and RNG states, serving
exports) records the SHA-256 of each tensor's bytes in its metadata (``m2_sha256``: a JSON
object ``{tensor name: hex digest}``), and every read verifies them: a flipped byte in a weight
is an :class:`IntegrityError` naming the file and the tensor, not a model that silently computes
nonsense. A truncated or garbled file, or a header that is not safetensors, is an
:class:`IntegrityError` naming the file too. Files without the entry (written by older versions
or other tools) are read unverified. ``verify=False`` skips the hashing (for speed, at your risk).

Hashes are computed on the tensors' raw bytes, so they do not depend on where safetensors puts a
tensor in the file; large tensors are hashed in threads (``hashlib`` releases the GIL).
:func:`standalone` and :func:`parse_dtype` prepare tensors for the files exports write.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, Mapping, Optional, Union

import torch

from ..utils.files import apply_umask
from .errors import ConversionError, IntegrityError

__all__ = ["CHECKSUM_KEY", "IntegrityError", "tensor_digest", "tensor_digests", "save_tensors",
           "TensorFile", "load_tensors", "standalone", "parse_dtype"]

CHECKSUM_KEY = "m2_sha256"
_THREADS = min(8, os.cpu_count() or 1)
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of the tensor's raw bytes (CPU, contiguous, any dtype)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return hashlib.sha256(memoryview(data)).hexdigest()


def tensor_digests(tensors: Mapping[str, torch.Tensor]) -> Dict[str, str]:
    """:func:`tensor_digest` of every tensor (in threads)."""
    names = list(tensors)
    with ThreadPoolExecutor(_THREADS) as pool:
        return dict(zip(names, pool.map(lambda n: tensor_digest(tensors[n]), names)))


def save_tensors(path: str, tensors: Mapping[str, torch.Tensor],
                 metadata: Optional[Mapping[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` with the per-tensor checksums in the metadata and the
    process umask's permissions (safetensors alone creates 0600 files)."""
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    meta[CHECKSUM_KEY] = json.dumps(tensor_digests(tensors), sort_keys=True)
    save_file(dict(tensors), path, metadata=meta)
    apply_umask(path)


class TensorFile:
    """A safetensors file opened lazily: :meth:`get` returns a tensor, verified against the
    checksum recorded for it (unless ``verify`` is False).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IntegrityError: not a readable safetensors file, or invalid checksum metadata.
    """

    def __init__(self, path: str, verify: bool = True):
        from safetensors import SafetensorError, safe_open

        self.path, self.verify = path, verify
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        try:
            self._handle = safe_open(path, framework="pt")
            self._metadata = dict(self._handle.metadata() or {})
            self._keys = list(self._handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise IntegrityError(f"{path}: not a readable safetensors file (truncated or "
                                 f"corrupt?): {e}") from None
        self.digests: Optional[Dict[str, str]] = None
        if CHECKSUM_KEY in self._metadata:
            try:
                self.digests = json.loads(self._metadata[CHECKSUM_KEY])
            except json.JSONDecodeError as e:
                raise IntegrityError(f"{path}: corrupt checksum metadata ({e})") from None
            if not isinstance(self.digests, dict) or set(self.digests) != set(self._keys):
                raise IntegrityError(f"{path}: its checksum list does not name exactly its "
                                     "tensors (the file is corrupt)")

    def keys(self) -> Iterable[str]:
        return list(self._keys)

    def metadata(self) -> Dict[str, str]:
        """The file's metadata, without the checksum entry."""
        return {k: v for k, v in self._metadata.items() if k != CHECKSUM_KEY}

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def get(self, name: str, verify: Optional[bool] = None) -> torch.Tensor:
        """The tensor ``name``, checked against its checksum unless ``verify`` (default: the
        file's setting) is False."""
        from safetensors import SafetensorError

        try:
            t = self._handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise IntegrityError(f"{self.path}: cannot read tensor {name!r} (truncated or "
                                 f"corrupt?): {e}") from None
        if (self.verify if verify is None else verify) and self.digests is not None:
            self._check(name, t)
        return t

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def _check(self, name: str, t: torch.Tensor) -> None:
        if tensor_digest(t) != self.digests[name]:
            raise IntegrityError(
                f"{self.path}: tensor {name!r} does not match the checksum recorded when it was "
                "written: the file is corrupt (copy it again, or use another checkpoint; "
                "--no-verify-checksums skips this check)")

    def load_all(self) -> Dict[str, torch.Tensor]:
        """Every tensor, verified (hashing in threads)."""
        tensors = {name: self.get(name, verify=False) for name in self._keys}
        if self.verify and self.digests is not None:
            with ThreadPoolExecutor(_THREADS) as pool:
                list(pool.map(lambda n: self._check(n, tensors[n]), self._keys))
        return tensors


def load_tensors(path: str, verify: bool = True) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, verified against its recorded checksums."""
    return TensorFile(path, verify).load_all()


def standalone(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``t`` (cast to ``dtype``) as a contiguous tensor owning its storage, so that it is
    written alone (no shared or oversized storage reaches the file)."""
    t = t.detach().to("cpu")
    if dtype is not None:
        t = t.to(dtype)
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


def parse_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    """A storage dtype of exports: fp32 (None), bf16 or fp16, by name or as a torch dtype.

    Raises:
        ConversionError: any other dtype.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConversionError(f"unsupported dtype {dtype!r}; choose fp32, bf16 or fp16")
