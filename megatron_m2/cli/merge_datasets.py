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
import sys
from typing import List, Optional, Sequence

from ..data.indexed import DatasetError, ImageTextWriter, read_index

__all__ = ["merge_datasets", "build_parser", "main"]

logger = logging.getLogger(__name__)


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def merge_datasets(inputs: Sequence[str], output_prefix: str, force: bool = False) -> int:
    """Concatenate ``inputs`` into ``output_prefix`` in order; returns the number of samples.

    Every input is validated in full (:func:`~megatron_m2.data.indexed.read_index`) before the
    output is opened.

    Raises:
        DatasetError: an input is missing or invalid.
        FileExistsError: the output is one of the inputs, or exists and ``force`` is False.
    """
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
