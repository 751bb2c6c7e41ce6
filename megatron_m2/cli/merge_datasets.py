"""``m2-merge-datasets`` / ``tools/merge_datasets.py``: concatenate image–text indexed datasets.

Example::

    m2-merge-datasets --input data/cc3m data/wukong_part{0..3} --output-prefix data/train

Samples keep their order: every sample of the first input, then every sample of the second, and
so on. Inputs are checked *before* anything is written (files present, megatron-core index
header, int32 data, multimodal index, only our sequence modes, one image closing every sample,
data file consistent with the index), because megatron-core's ``add_index`` would otherwise
concatenate a text-only or truncated dataset into a silently corrupt result. The output is
finalised atomically by :class:`~megatron_m2.data.indexed.ImageTextWriter`; an interrupted merge
leaves at most ``OUT.bin.tmp`` / ``OUT.idx.tmp`` behind, never a half-written ``OUT.idx``.

The last line printed is a JSON summary ``{"inputs": n, "samples": total, "output": OUT}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..data.indexed import MODE_IMAGE, MODE_TO_LANG

__all__ = ["DatasetError", "DatasetIndex", "read_index", "merge_datasets", "build_parser",
           "main"]

logger = logging.getLogger(__name__)

# megatron-core's ``.idx`` layout (``_IndexWriter``): magic, u64 version, u8 dtype code,
# u64 sequence count, u64 document count, then int32 lengths, int64 pointers, int64 document
# indices and, for multimodal datasets only, int8 modes. Nothing in the header says whether the
# modes are present, so the file size is what tells a multimodal index from a text-only one.
_MAGIC = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
_INT32_CODE = 4  # megatron.core.datasets.indexed_dataset.DType.int32
_DTYPE_NAMES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64",
                7: "float32", 8: "uint16"}
_VALID_MODES = frozenset(MODE_TO_LANG) | {MODE_IMAGE}


class DatasetError(ValueError):
    """An input is missing or is not an image–text dataset this package wrote."""


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
        if self.bin_bytes == 0:
            return np.zeros(0, dtype="<i4")
        return np.memmap(self.prefix + ".bin", dtype="<i4", mode="r")


def _fail(prefix: str, why: str) -> DatasetError:
    return DatasetError(f"input {prefix!r}: {why}")


def read_index(prefix: str) -> DatasetIndex:
    """Read and validate the index of ``prefix`` (``.bin`` / ``.idx``) without megatron-core.

    Checks everything :meth:`ImageTextWriter.add_dataset
    <megatron_m2.data.indexed.ImageTextWriter.add_dataset>` relies on but does not check itself:
    the files exist, the index is a version-1 megatron-core index of int32 data *with* sequence
    modes, every mode is one of ours, every sample is one or more captions followed by exactly one
    image, and the ``.bin`` file is exactly the sequences the index describes, back to back.

    Raises:
        DatasetError: naming ``prefix`` and the first problem found.
    """
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise _fail(prefix, "no indexed dataset there (missing " + ", ".join(missing) + ")")
    idx_bytes, bin_bytes = os.path.getsize(idx_path), os.path.getsize(bin_path)
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES or header[:9] != _MAGIC:
        raise _fail(prefix, f"{idx_path} is not a megatron-core index (bad header)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise _fail(prefix, f"unsupported index version {version} (expected 1)")
    if code != _INT32_CODE:
        raise _fail(prefix, f"data type {_DTYPE_NAMES.get(code, f'code {code}')}, expected int32 "
                            "(image–text datasets are written as int32)")
    text_only = _HEADER_BYTES + 12 * n_seq + 8 * n_doc
    if idx_bytes == text_only and n_seq:
        raise _fail(prefix, "index has no sequence modes: a text-only dataset, not a multimodal "
                            "image–text one")
    if idx_bytes != text_only + n_seq:
        raise _fail(prefix, f"{idx_path} has {idx_bytes} bytes, expected {text_only + n_seq} for "
                            f"{n_seq} sequences and {n_doc} document indices (truncated?)")
    if n_doc < 1:
        raise _fail(prefix, "index has no document indices")

    mm = np.memmap(idx_path, dtype=np.uint8, mode="r")
    off = _HEADER_BYTES
    lengths = mm[off:off + 4 * n_seq].view("<i4")
    off += 4 * n_seq
    pointers = mm[off:off + 8 * n_seq].view("<i8")
    off += 8 * n_seq
    docs = mm[off:off + 8 * n_doc].view("<i8")
    off += 8 * n_doc
    modes = mm[off:off + n_seq].view(np.int8)

    if docs[0] != 0 or docs[-1] != n_seq or (np.diff(docs) < 2).any():
        raise _fail(prefix, "document indices do not split the sequences into samples of at "
                            "least one caption and one image")
    bad = np.setdiff1d(np.unique(modes), sorted(_VALID_MODES))
    if bad.size:
        raise _fail(prefix, f"unknown sequence modes {bad.tolist()} (expected "
                            f"{sorted(_VALID_MODES)})")
    images = np.flatnonzero(modes == MODE_IMAGE)
    if images.size != n_doc - 1 or not np.array_equal(images, docs[1:] - 1):
        raise _fail(prefix, "every sample must end with exactly one image sequence")
    if (lengths < 1).any():
        raise _fail(prefix, "index has empty sequences")
    ends = np.cumsum(lengths, dtype=np.int64) * 4
    starts = np.concatenate([np.zeros(1, np.int64), ends[:-1]]) if n_seq else ends
    if not np.array_equal(pointers, starts):
        raise _fail(prefix, "sequence pointers are not contiguous")
    expected_bin = int(ends[-1]) if n_seq else 0
    if bin_bytes != expected_bin:
        raise _fail(prefix, f"{bin_path} has {bin_bytes} bytes but the index describes "
                            f"{expected_bin}")
    return DatasetIndex(prefix, lengths, pointers, docs, modes, bin_bytes, idx_bytes)


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def merge_datasets(inputs: Sequence[str], output_prefix: str, force: bool = False) -> int:
    """Concatenate ``inputs`` into ``output_prefix`` in order; returns the number of samples.

    Every input is validated (:func:`read_index`) before the output is opened.

    Raises:
        DatasetError: an input is missing or invalid.
        FileExistsError: the output is one of the inputs, or exists and ``force`` is False.
    """
    from ..data.indexed import ImageTextWriter

    if not inputs:
        raise ValueError("no inputs to merge")
    indices = [read_index(p) for p in inputs]
    for p in inputs:
        for ext in (".bin", ".idx"):
            if _same_file(output_prefix + ext, p + ext):
                raise FileExistsError(f"output {output_prefix!r} is input {p!r}; refusing to "
                                      "overwrite an input")
    existing = [output_prefix + ext for ext in (".bin", ".idx")
                if os.path.exists(output_prefix + ext)]
    if existing and not force:
        raise FileExistsError(f"output {output_prefix!r} exists ({', '.join(existing)}); pass "
                              "--force to replace it")
    if len(set(map(os.path.realpath, inputs))) < len(inputs):
        logger.warning("some inputs are listed more than once; their samples are repeated")

    total = sum(ix.num_samples for ix in indices)
    with ImageTextWriter(output_prefix) as writer:
        for p in inputs:
            logger.info("appending %s", p)
            writer.add_dataset(p)
    # Re-read what was written: catches a disk that filled up or an input replaced meanwhile.
    written = read_index(output_prefix).num_samples
    if written != total:
        raise DatasetError(f"output {output_prefix!r} has {written} samples, expected {total} "
                           "(was an input modified during the merge?)")
    logger.info("wrote %d samples from %d inputs to %s", total, len(inputs), output_prefix)
    return total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m2-merge-datasets", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX",
                   help="dataset prefixes (PREFIX.bin / PREFIX.idx), concatenated in this order")
    p.add_argument("--output-prefix", required=True, metavar="OUT",
                   help="writes OUT.bin and OUT.idx")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # megatron-core logs every index it opens at INFO; that is noise for a command-line tool.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        total = merge_datasets(args.input, args.output_prefix, force=args.force)
    except (DatasetError, FileExistsError) as exc:
        sys.stderr.write(f"m2-merge-datasets: error: {exc}\n")
        return 2
    sys.stdout.write(json.dumps({"inputs": len(args.input), "samples": total,
                                 "output": args.output_prefix}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
