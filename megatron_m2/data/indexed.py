"""Image–text samples in megatron-core's multimodal indexed format (``.bin`` / ``.idx``).

The files are written by megatron-core's ``IndexedDatasetBuilder`` (dtype int32, multimodal) and
open with megatron-core's own ``IndexedDataset(prefix, multimodal=True)``. Reading here needs only
numpy (:func:`read_index`, :class:`ImageTextIndexedDataset`): megatron-core takes seconds to
import, which every DataLoader worker process would otherwise pay before its first sample. One
sample is one *document* made of sequences, each with a mode byte:

=====  ==========================================================================
mode   sequence
=====  ==========================================================================
0      English caption: token ids ``[CLS] pieces <|endoftext|>`` (Megatron-LM's text mode)
2      Chinese caption, same framing
3      caption in another or unknown language, same framing
1      image: ``[pad, int32 view of the encoded image bytes + pad zero bytes]``
       (Megatron-LM's image convention: bytes padded to a multiple of 4, pad count first)
=====  ==========================================================================

A document holds one or more captions followed by exactly one image, so an English-only,
single-caption dataset is laid out exactly as Megatron-LM's multimodal writer lays it out.
Captions are stored framed but neither truncated nor padded: the text length is chosen when
loading (:meth:`~megatron_m2.data.tokenizer.M2Tokenizer.pad`).

Files are finalised atomically: both are written under temporary names and renamed into place,
the ``.idx`` last, so a reader never sees a half-written pair under the final names.

The ``.idx`` layout (megatron-core's ``_IndexWriter``, little-endian): the magic
``b"MMIDIDX\\x00\\x00"``, a u64 version (1), a u8 dtype code (4 = int32), a u64 sequence count
``S``, a u64 document-index count ``D``, then ``S`` int32 lengths, ``S`` int64 byte pointers into
the ``.bin`` file, ``D`` int64 document indices and, in a multimodal index only, ``S`` int8 modes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import UserError

__all__ = ["MODE_TEXT_EN", "MODE_IMAGE", "MODE_TEXT_ZH", "MODE_TEXT_OTHER", "LANG_TO_MODE",
           "MODE_TO_LANG", "encode_image_sequence", "decode_image_sequence", "Sample",
           "ImageTextWriter", "ImageTextIndexedDataset", "DatasetError",
           "DatasetNotFoundError", "DatasetIndex", "read_index", "split_ranges"]

MODE_TEXT_EN, MODE_IMAGE, MODE_TEXT_ZH, MODE_TEXT_OTHER = 0, 1, 2, 3
LANG_TO_MODE = {"en": MODE_TEXT_EN, "zh": MODE_TEXT_ZH}
MODE_TO_LANG = {MODE_TEXT_EN: "en", MODE_TEXT_ZH: "zh", MODE_TEXT_OTHER: "other"}


def encode_image_sequence(data: bytes) -> np.ndarray:
    """Encoded image bytes → int32 sequence ``[pad, words...]`` (little-endian words)."""
    pad = (-len(data)) % 4
    words = np.frombuffer(data + b"\0" * pad, dtype="<i4")
    return np.concatenate([np.array([pad], dtype="<i4"), words])


def decode_image_sequence(seq: np.ndarray) -> bytes:
    """Inverse of :func:`encode_image_sequence`."""
    seq = np.asarray(seq)
    pad = int(seq[0])
    if not 0 <= pad <= 3:
        raise ValueError(f"corrupt image sequence: pad count {pad}")
    raw = seq[1:].astype("<i4", copy=False).tobytes()
    return raw[:len(raw) - pad] if pad else raw


@dataclass
class Sample:
    """One decoded document."""

    image: bytes
    """Encoded image (JPEG as written by preprocessing)."""
    captions: List[Tuple[str, np.ndarray]]
    """``(language, framed token ids)`` per caption."""


def _paths(prefix: str) -> Tuple[str, str]:
    return prefix + ".bin", prefix + ".idx"


class ImageTextWriter:
    """Write samples to ``prefix.bin`` / ``prefix.idx`` (megatron-core's builder, atomically).

    Use as a context manager; on an exception nothing is left under the final names.
    """

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self._bin, self._idx = _paths(prefix)
        self._tmp_bin, self._tmp_idx = self._bin + ".tmp", self._idx + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=np.int32, multimodal=True)
        self.num_samples = 0
        self._closed = False

    def add_sample(self, image: bytes, captions: Sequence[Tuple[str, Sequence[int]]]) -> None:
        """Append one document: its captions ``(lang, framed ids)`` then its image."""
        import torch

        if not captions:
            raise ValueError("a sample needs at least one caption")
        for lang, ids in captions:
            mode = LANG_TO_MODE.get(lang, MODE_TEXT_OTHER)
            self._builder.add_item(torch.as_tensor(np.asarray(ids, dtype=np.int32)), mode=mode)
        self._builder.add_item(torch.from_numpy(encode_image_sequence(image)), mode=MODE_IMAGE)
        self._builder.end_document()
        self.num_samples += 1

    def add_dataset(self, prefix: str) -> None:
        """Append every document of another dataset (megatron-core's ``add_index``)."""
        self._builder.add_index(prefix)
        self.num_samples = -1  # unknown without reading the index; see finalize()

    def finalize(self) -> None:
        """Write the index and move both files into place (``.bin`` first, ``.idx`` last)."""
        self._builder.finalize(self._tmp_idx)
        for tmp in (self._tmp_bin, self._tmp_idx):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(self._tmp_bin, self._bin)
        os.replace(self._tmp_idx, self._idx)
        self._closed = True

    def abort(self) -> None:
        """Drop the temporary files."""
        if not self._closed:
            try:
                self._builder.data_file.close()
            except Exception:
                pass
            for tmp in (self._tmp_bin, self._tmp_idx):
                if os.path.exists(tmp):
                    os.remove(tmp)
            self._closed = True

    def __enter__(self) -> "ImageTextWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


# -- reading (numpy only) ----------------------------------------------------------------------

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
_INT32_CODE = 4  # megatron.core.datasets.indexed_dataset.DType.int32
_DTYPE_NAMES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64",
                7: "float32", 8: "uint16"}
_VALID_MODES = frozenset(MODE_TO_LANG) | {MODE_IMAGE}


class DatasetError(UserError, ValueError):
    """A dataset is missing, or its files are not an image–text dataset this package wrote."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The ``.bin`` or ``.idx`` file of a dataset does not exist."""


@dataclass
class DatasetIndex:
    """The validated index of one dataset, as read-only memory maps (cheap for any size)."""

    prefix: str
    lengths: np.ndarray
    """int32 length of every sequence (tokens, or ``1 + words`` for images)."""
    pointers: np.ndarray
    """int64 byte offset of every sequence in the ``.bin`` file."""
    document_indices: np.ndarray
    """int64, ``num_samples + 1`` entries: sample ``i`` is sequences ``[d[i], d[i+1])``."""
    modes: np.ndarray
    """int8 mode of every sequence (see :mod:`megatron_m2.data.indexed`)."""
    bin_bytes: int
    idx_bytes: int

    @property
    def num_samples(self) -> int:
        return len(self.document_indices) - 1

    def data(self) -> np.ndarray:
        """The ``.bin`` file as a read-only int32 memory map (empty array for an empty file)."""
        return self.data_bytes().view("<i4")

    def data_bytes(self) -> np.ndarray:
        """The ``.bin`` file as a read-only uint8 memory map (empty array for an empty file)."""
        if self.bin_bytes == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(self.prefix + ".bin", dtype=np.uint8, mode="r")


def _fail(prefix: str, why: str) -> DatasetError:
    return DatasetError(f"dataset {prefix!r}: {why}")


def read_index(prefix: str, full: bool = True) -> DatasetIndex:
    """Read and validate the index of ``prefix`` (``.bin`` / ``.idx``) with numpy alone.

    Always checked, at a cost independent of the dataset's size: both files exist; the ``.idx``
    header has megatron-core's magic, version 1 and the int32 dtype code; the ``.idx`` size is
    exactly a multimodal index of the counts in its header (so a text-only or truncated index is
    refused); the document indices start at 0 and end at the sequence count; the ``.bin`` size
    is where the last sequence ends.

    With ``full`` (for tools that rewrite or inspect a whole dataset), also everything
    :meth:`ImageTextWriter.add_dataset` relies on but does not check itself, at a cost linear in
    the number of sequences: every mode is one of ours, every sample is one or more captions
    followed by exactly one image, no sequence is empty, and the ``.bin`` file is exactly the
    sequences the index describes, back to back.

    Raises:
        DatasetNotFoundError: a file is missing.
        DatasetError: naming ``prefix`` (and the file, for a file-level problem) and the first
            problem found.
    """
    bin_path, idx_path = _paths(prefix)
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise DatasetNotFoundError(f"dataset {prefix!r}: no indexed dataset there (missing "
                                   + ", ".join(missing) + ")")
    idx_bytes, bin_bytes = os.path.getsize(idx_path), os.path.getsize(bin_path)
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES:
        raise _fail(prefix, f"{idx_path} has {len(header)} bytes, fewer than the "
                            f"{_HEADER_BYTES}-byte header of a megatron-core index (truncated?)")
    if header[:9] != _MAGIC:
        raise _fail(prefix, f"{idx_path} is not a megatron-core index (bad header: magic "
                            f"{header[:9]!r}, expected {_MAGIC!r})")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise _fail(prefix, f"{idx_path}: unsupported index version {version} (expected 1)")
    if code != _INT32_CODE:
        name = _DTYPE_NAMES.get(code, f"unknown code {code}")
        raise _fail(prefix, f"{idx_path}: data type {name}, expected int32 (image–text "
                            "datasets are written as int32)")
    text_only = _HEADER_BYTES + 12 * n_seq + 8 * n_doc
    if idx_bytes == text_only and n_seq:
        raise _fail(prefix, f"{idx_path} has no sequence modes: a text-only dataset, not a "
                            "multimodal image–text one")
    if idx_bytes != text_only + n_seq:
        raise _fail(prefix, f"{idx_path} has {idx_bytes} bytes, expected {text_only + n_seq} "
                            f"for {n_seq} sequences and {n_doc} document indices (truncated?)")
    if n_doc < 1:
        raise _fail(prefix, f"{idx_path} has no document indices")

    mm = np.memmap(idx_path, dtype=np.uint8, mode="r")
    off = _HEADER_BYTES
    lengths = mm[off:off + 4 * n_seq].view("<i4")
    off += 4 * n_seq
    pointers = mm[off:off + 8 * n_seq].view("<i8")
    off += 8 * n_seq
    docs = mm[off:off + 8 * n_doc].view("<i8")
    off += 8 * n_doc
    modes = mm[off:off + n_seq].view(np.int8)

    if docs[0] != 0 or docs[-1] != n_seq:
        raise _fail(prefix, f"{idx_path}: document indices run from {int(docs[0])} to "
                            f"{int(docs[-1])}, expected 0 to {n_seq}")
    end = int(pointers[-1]) + 4 * int(lengths[-1]) if n_seq else 0
    if bin_bytes != end:
        raise _fail(prefix, f"{bin_path} has {bin_bytes} bytes but the index describes "
                            f"{end} (truncated, or not the data file of this index?)")
    if full:
        _validate_contents(prefix, lengths, pointers, docs, modes)
    return DatasetIndex(prefix, lengths, pointers, docs, modes, bin_bytes, idx_bytes)


def _validate_contents(prefix: str, lengths: np.ndarray, pointers: np.ndarray,
                       docs: np.ndarray, modes: np.ndarray) -> None:
    """The linear-cost checks of :func:`read_index` (``full=True``)."""
    n_seq = len(lengths)
    if (np.diff(docs) < 2).any():
        raise _fail(prefix, "document indices do not split the sequences into samples of at "
                            "least one caption and one image")
    bad = np.setdiff1d(np.unique(modes), sorted(_VALID_MODES))
    if bad.size:
        raise _fail(prefix, f"unknown sequence modes {bad.tolist()} (expected "
                            f"{sorted(_VALID_MODES)})")
    images = np.flatnonzero(modes == MODE_IMAGE)
    if images.size != len(docs) - 1 or not np.array_equal(images, docs[1:] - 1):
        raise _fail(prefix, "every sample must end with exactly one image sequence")
    if (lengths < 1).any():
        raise _fail(prefix, "index has empty sequences")
    short = images[lengths[images] < 2]
    if short.size:  # an image is its pad count and at least one word of data
        sample = int(np.searchsorted(docs, short[0], side="right") - 1)
        raise _fail(prefix, f"{short.size} image sequence(s) hold no image data (first: "
                            f"sample {sample})")
    ends = np.cumsum(lengths, dtype=np.int64) * 4
    starts = np.concatenate([np.zeros(1, np.int64), ends[:-1]]) if n_seq else ends
    if not np.array_equal(pointers, starts):
        j = int(np.argmax(pointers != starts))
        sample = int(np.searchsorted(docs, j, side="right") - 1)
        raise _fail(prefix, f"sequence pointers are not contiguous (first at sequence {j}, "
                            f"sample {sample}: byte {int(pointers[j])}, expected "
                            f"{int(starts[j])}; the index does not describe {prefix}.bin)")


class ImageTextIndexedDataset:
    """Memory-mapped reader with numpy alone: ``len`` = samples, ``[i]`` → :class:`Sample`.

    Reads exactly what megatron-core's ``IndexedDataset(prefix, multimodal=True)`` reads (same
    sequences, lengths, pointers, document indices and modes), without importing megatron-core.
    The header and file sizes are validated when the reader is built (:func:`read_index` with
    ``full=False``), so a bad dataset fails in the process that names it, not in a worker.

    The reader pickles as its prefix only: a DataLoader worker (spawned or forked) maps the files
    itself on first use, and a reader used in another process than the one that mapped the files
    maps them again there.

    Raises:
        DatasetNotFoundError: ``prefix.bin`` or ``prefix.idx`` is missing.
        DatasetError: the files are not a valid int32 multimodal megatron-core dataset.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._pid: Optional[int] = None
        self._index: Optional[DatasetIndex] = None
        self._data: Optional[np.ndarray] = None
        self._open()

    def _open(self) -> DatasetIndex:
        index = read_index(self.prefix, full=False)
        self._index, self._data, self._pid = index, index.data_bytes(), os.getpid()
        return index

    @property
    def index(self) -> DatasetIndex:
        """The validated index, mapped in this process (mapped again after a fork or unpickling)."""
        if self._pid != os.getpid() or self._index is None:
            return self._open()
        return self._index

    def __getstate__(self) -> Dict[str, str]:
        return {"prefix": self.prefix}

    def __setstate__(self, state: Dict[str, str]) -> None:
        self.prefix = state["prefix"]
        self._pid, self._index, self._data = None, None, None

    def __len__(self) -> int:
        return self.index.num_samples

    @property
    def num_sequences(self) -> int:
        """Number of sequences (captions and images) over all samples."""
        return len(self.index.lengths)

    @property
    def document_indices(self) -> np.ndarray:
        """int64, ``len + 1`` entries: sample ``i`` is sequences ``[d[i], d[i+1])``."""
        return self.index.document_indices

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 length of every sequence."""
        return self.index.lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 byte offset of every sequence in the ``.bin`` file."""
        return self.index.pointers

    @property
    def sequence_modes(self) -> np.ndarray:
        """int8 mode of every sequence (``MODE_*``)."""
        return self.index.modes

    def sequence(self, j: int) -> Tuple[np.ndarray, int]:
        """Sequence ``j`` as a read-only int32 view into the mapped data file, and its mode."""
        index = self.index
        if not 0 <= j < len(index.lengths):
            raise IndexError(f"sequence {j} out of range for {self.prefix} "
                             f"({len(index.lengths)} sequences)")
        start = int(index.pointers[j])
        seq = self._data[start:start + 4 * int(index.lengths[j])].view("<i4")
        return seq, int(index.modes[j])

    def sequence_range(self, i: int) -> Tuple[int, int]:
        """Sequences ``[lo, hi)`` of sample ``i`` (its captions, then its image)."""
        docs = self.index.document_indices
        return int(docs[i]), int(docs[i + 1])

    def caption_languages(self, i: int) -> List[str]:
        """Languages of sample ``i``'s captions, without reading the data file."""
        lo, hi = self.sequence_range(i)
        return [MODE_TO_LANG.get(int(m), "other") for m in self.index.modes[lo:hi]
                if int(m) != MODE_IMAGE]

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {self.prefix} ({len(self)} samples)")
        lo, hi = self.sequence_range(i)
        image, captions = None, []
        for j in range(lo, hi):
            seq, mode = self.sequence(j)
            if mode == MODE_IMAGE:
                image = decode_image_sequence(seq)
            else:
                captions.append((MODE_TO_LANG.get(mode, "other"), np.array(seq)))
        if image is None:
            raise ValueError(f"{self.prefix}: sample {i} has no image sequence")
        return Sample(image, captions)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def language_counts(self) -> Dict[str, int]:
        """Captions per language over the whole dataset (index only)."""
        modes = np.asarray(self.index.modes)
        return {MODE_TO_LANG[m]: int((modes == m).sum()) for m in MODE_TO_LANG
                if (modes == m).any()}


def split_ranges(n: int, split: Sequence[float]) -> List[Tuple[int, int]]:
    """Megatron-style ``--split 98,1,1``: contiguous [start, end) ranges for train/valid/test."""
    w = np.asarray(list(split) + [0.0] * (3 - len(split)), dtype=np.float64)[:3]
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"invalid split {split}")
    bounds = np.round(np.concatenate([[0.0], np.cumsum(w / w.sum())]) * n).astype(int)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(3)]
