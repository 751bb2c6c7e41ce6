"""Image–text samples in megatron-core's multimodal indexed format (``.bin`` / ``.idx``).

The files are written by megatron-core's ``IndexedDatasetBuilder`` (dtype int32, multimodal) and
open with megatron-core's own ``IndexedDataset(prefix, multimodal=True)``. One sample is one
*document* made of sequences, each with a mode byte:

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
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

__all__ = ["MODE_TEXT_EN", "MODE_IMAGE", "MODE_TEXT_ZH", "MODE_TEXT_OTHER", "LANG_TO_MODE",
           "MODE_TO_LANG", "encode_image_sequence", "decode_image_sequence", "Sample",
           "ImageTextWriter", "ImageTextIndexedDataset", "dataset_exists"]

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


def dataset_exists(prefix: str) -> bool:
    """Whether both files of ``prefix`` exist."""
    return all(os.path.exists(p) for p in _paths(prefix))


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


class ImageTextIndexedDataset:
    """Memory-mapped reader: ``len`` = samples, ``[i]`` → :class:`Sample`."""

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if not dataset_exists(prefix):
            raise FileNotFoundError(f"no indexed dataset at {prefix!r} (expected {prefix}.bin "
                                    f"and {prefix}.idx)")
        self.prefix = prefix
        self._ds = IndexedDataset(prefix, multimodal=True, mmap=True)
        self._docs = self._ds.document_indices
        self._modes = self._ds.index.sequence_modes

    def __len__(self) -> int:
        return len(self._docs) - 1

    def sequence_range(self, i: int) -> Tuple[int, int]:
        return int(self._docs[i]), int(self._docs[i + 1])

    def caption_languages(self, i: int) -> List[str]:
        """Languages of sample ``i``'s captions, without reading the data file."""
        lo, hi = self.sequence_range(i)
        return [MODE_TO_LANG.get(int(m), "other") for m in self._modes[lo:hi]
                if int(m) != MODE_IMAGE]

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {self.prefix} ({len(self)} samples)")
        lo, hi = self.sequence_range(i)
        seqs, modes = self._ds[lo:hi]
        image, captions = None, []
        for seq, mode in zip(seqs, modes):
            if int(mode) == MODE_IMAGE:
                image = decode_image_sequence(seq)
            else:
                captions.append((MODE_TO_LANG.get(int(mode), "other"), np.array(seq)))
        if image is None:
            raise ValueError(f"{self.prefix}: sample {i} has no image sequence")
        return Sample(image, captions)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def language_counts(self) -> Dict[str, int]:
        """Captions per language over the whole dataset (index only)."""
        modes = np.asarray(self._modes)
        return {MODE_TO_LANG[m]: int((modes == m).sum()) for m in MODE_TO_LANG
                if (modes == m).any()}
