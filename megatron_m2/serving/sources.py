"""The corpora ``m2-embed`` embeds: a *source* lists the items to embed, in a fixed order.

* :class:`ImageFolderSource`: the images under a folder (recursive; sorted relative POSIX
  paths; the id is that path), items ``{"id", "path"}``;
* :class:`DatasetSource`: an indexed dataset's images (``field="image"``) or its captions in
  one language (``field="text"``, the first caption of that language of each sample, embedded
  from its stored token ids), items ``{"id", "index", "caption"}`` with the sample number as id;
* :class:`TextFileSource`: a UTF-8 file, one caption a line (either language), items
  ``{"id", "line", "text"}`` with the 1-based line number as id.

An item that cannot be embedded raises :class:`Rejected` with its reason; a source that cannot
be read at all raises :class:`EmbedError`. The job that embeds a source chunk by chunk is
:mod:`megatron_m2.serving.embed`.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "EmbedError", "Rejected", "Source", "ImageFolderSource",
           "DatasetSource", "TextFileSource"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""File name endings (any case) that :class:`ImageFolderSource` embeds."""


class EmbedError(UserError, ValueError):
    """A source, output directory or job that cannot be embedded as asked (the message names
    the file, line or option and what to do)."""


class Rejected(Exception):
    """Raised by :meth:`Source.get` for an item that cannot be embedded; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _read_image(open_arg, encoder) -> torch.Tensor:
    """The encoder's preprocessed ``[3, S, S]`` tensor of an image file or bytes buffer;
    any decoding failure becomes :class:`Rejected`."""
    from PIL import Image

    try:
        with Image.open(open_arg) as im:
            return encoder.transform(im)
    except Exception as e:  # noqa: BLE001 - whatever the decoder raises rejects the item only
        msg = " ".join(str(e).split()) or type(e).__name__
        raise Rejected(f"cannot read image: {msg}") from None


# -- sources ------------------------------------------------------------------------------------
class Source:
    """The items of a corpus in a fixed order (subclasses below).

    Attributes: ``type`` (``"folder"``, ``"dataset"`` or ``"text"``, the store's
    ``source.type``) and ``kind`` (``"image"`` or ``"text"``, the store's ``kind``).
    """

    type: str = ""
    kind: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self) -> Dict[str, Any]:
        """The store's ``source`` record: ``type``, absolute ``path`` and a fingerprint of the
        content (a job resumes only on the same fingerprint)."""
        raise NotImplementedError

    def item_id(self, i: int) -> str:
        """The id of item ``i``."""
        raise NotImplementedError

    def get(self, i: int, encoder) -> Tuple[Dict[str, Any], Any]:
        """``(item record, model input)`` of item ``i``; :class:`Rejected` if it cannot be
        embedded."""
        raise NotImplementedError

    def encode(self, encoder, inputs: Sequence[Any]) -> torch.Tensor:
        """Embeddings ``[len(inputs), D]`` of inputs returned by :meth:`get`, in one batch."""
        raise NotImplementedError

    def check(self, encoder) -> None:
        """Raise :class:`EmbedError` if ``encoder`` cannot embed this source."""
        if self.kind == "text" and encoder.tokenizer is None:
            raise EmbedError(f"{self.record()['path']}: embedding text needs a tokenizer, and "
                             "the checkpoint carries none")


class ImageFolderSource(Source):
    """Every image (``IMAGE_EXTENSIONS``, any case) under ``root``, recursively, in sorted order
    of their relative POSIX paths, which are the ids. Hidden files and folders (names starting
    with ``.``) and the folder ``exclude`` (e.g. an output directory inside ``root``) are
    skipped. The fingerprint hashes every path with its size and modification time."""

    type, kind = "folder", "image"

    def __init__(self, root: Union[str, os.PathLike],
                 exclude: Optional[Union[str, os.PathLike]] = None):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise EmbedError(f"--images {root}: no such directory")
        skip = Path(exclude).resolve() if exclude is not None else None
        paths: List[str] = []
        h = hashlib.sha256()

        def fail(err: OSError):
            raise EmbedError(f"--images {root}: cannot list {err.filename}: {err.strerror}")

        for dirpath, dirnames, filenames in os.walk(self.root, onerror=fail):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames
                           if not d.startswith(".") and (skip is None or here / d != skip)]
            for name in filenames:
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append((here / name).relative_to(self.root).as_posix())
        paths.sort()
        for rel in paths:
            try:
                st = (self.root / rel).stat()
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:  # a dangling link: listed, rejected when read
                h.update(f"{rel}\0?\n".encode())
        if not paths:
            raise EmbedError(f"--images {root}: no images there (looked for "
                             f"{', '.join(IMAGE_EXTENSIONS)} files)")
        self.paths = paths
        self._sha = h.hexdigest()

    def __len__(self) -> int:
        return len(self.paths)

    def record(self) -> Dict[str, Any]:
        return {"type": self.type, "path": str(self.root), "files": len(self.paths),
                "listing_sha256": self._sha}

    def item_id(self, i: int) -> str:
        return self.paths[i]

    def get(self, i: int, encoder) -> Tuple[Dict[str, Any], Any]:
        rel = self.paths[i]
        return {"id": rel, "path": rel}, _read_image(self.root / rel, encoder)

    def encode(self, encoder, inputs: Sequence[Any]) -> torch.Tensor:
        return encoder.encode_image(torch.stack(list(inputs)), batch_size=len(inputs))


class DatasetSource(Source):
    """An indexed dataset (:mod:`megatron_m2.data.indexed`): its images (``field="image"``,
    items carry the first caption, decoded with ``tokenizer`` when given) or, with
    ``field="text"``, each sample's first caption in ``lang`` as stored (token ids; samples
    without one are rejected). Ids are sample numbers. The fingerprint is the ``.idx`` file's
    SHA-256 and the ``.bin`` file's size."""

    type = "dataset"

    def __init__(self, prefix: str, field: str = "image", lang: Optional[str] = None,
                 tokenizer=None):
        from ..data.indexed import LANG_TO_MODE, ImageTextIndexedDataset

        if field not in ("image", "text"):
            raise EmbedError(f"--field must be image or text, got {field!r}")
        if field == "text" and lang not in LANG_TO_MODE:
            raise EmbedError(f"--field text needs --lang {' or '.join(LANG_TO_MODE)}, got "
                             f"{lang!r}")
        self.prefix = os.path.abspath(prefix)
        self.reader = ImageTextIndexedDataset(self.prefix)
        self.field, self.lang, self.tokenizer = field, lang if field == "text" else None, tokenizer
        self.kind = field
        if len(self.reader) == 0:
            raise EmbedError(f"--dataset {prefix}: {prefix}.idx holds no samples")
        h = hashlib.sha256()
        with open(self.prefix + ".idx", "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        self._idx_sha = h.hexdigest()
        self._bin_bytes = os.path.getsize(self.prefix + ".bin")

    def __len__(self) -> int:
        return len(self.reader)

    def record(self) -> Dict[str, Any]:
        rec = {"type": self.type, "path": self.prefix, "field": self.field,
               "samples": len(self.reader), "idx_sha256": self._idx_sha,
               "bin_bytes": self._bin_bytes}
        if self.lang is not None:
            rec["lang"] = self.lang
        return rec

    def item_id(self, i: int) -> str:
        return str(i)

    def _decode(self, ids) -> Optional[str]:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None

    def get(self, i: int, encoder) -> Tuple[Dict[str, Any], Any]:
        try:
            sample = self.reader[i]
        except ValueError as e:
            raise Rejected(f"cannot read sample: {e}") from None
        if self.field == "text":
            ids = next((ids for lang, ids in sample.captions if lang == self.lang), None)
            if ids is None:
                have = ", ".join(sorted({lang for lang, _ in sample.captions})) or "none"
                raise Rejected(f"no {self.lang} caption (the sample has: {have})")
            return ({"id": str(i), "index": i, "caption": self._decode(ids)},
                    [int(t) for t in ids])
        caption = self._decode(sample.captions[0][1]) if sample.captions else None
        return ({"id": str(i), "index": i, "caption": caption},
                _read_image(io.BytesIO(sample.image), encoder))

    def encode(self, encoder, inputs: Sequence[Any]) -> torch.Tensor:
        if self.field == "text":
            return encoder.encode_tokens(list(inputs), batch_size=len(inputs))
        return encoder.encode_image(torch.stack(list(inputs)), batch_size=len(inputs))


class TextFileSource(Source):
    """A UTF-8 text file, one caption a line (English, Chinese or mixed; a UTF-8 byte-order mark
    and ``\\r\\n`` line ends are accepted). Ids are 1-based line numbers. Blank lines and lines
    that are not valid UTF-8 are rejected with the reason. The fingerprint is the file's
    SHA-256."""

    type, kind = "text", "text"

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path).resolve()
        try:
            data = self.path.read_bytes()
        except IsADirectoryError:
            raise EmbedError(f"--texts {path}: a directory, expected a text file") from None
        self._sha = hashlib.sha256(data).hexdigest()
        raw = data.split(b"\n")
        if raw and raw[-1] == b"":
            raw.pop()
        if not raw:
            raise EmbedError(f"--texts {path}: the file is empty (expected one caption a line)")
        self.lines: List[Tuple[Optional[str], Optional[str]]] = []  # (text, reject reason)
        for n, line in enumerate(raw, 1):
            if line.endswith(b"\r"):
                line = line[:-1]
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                self.lines.append((None, f"not valid UTF-8 (byte {e.start + 1} of the line)"))
                continue
            self.lines.append((text, None if text.strip() else "blank line"))

    def __len__(self) -> int:
        return len(self.lines)

    def record(self) -> Dict[str, Any]:
        return {"type": self.type, "path": str(self.path), "lines": len(self.lines),
                "sha256": self._sha}

    def item_id(self, i: int) -> str:
        return str(i + 1)

    def get(self, i: int, encoder) -> Tuple[Dict[str, Any], Any]:
        text, reason = self.lines[i]
        if reason is not None:
            raise Rejected(reason)
        return {"id": str(i + 1), "line": i + 1, "text": text}, text

    def encode(self, encoder, inputs: Sequence[Any]) -> torch.Tensor:
        return encoder.encode_text(list(inputs), batch_size=len(inputs))
