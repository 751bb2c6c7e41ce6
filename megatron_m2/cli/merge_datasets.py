"""``m2-merge-datasets`` / ``tools/merge_datasets.py``: concatenate image–text indexed datasets.

Example::

    m2-merge-datasets --input data/cc3m data/wukong_part{0..3} --output-prefix data/train

Samples keep their order: every sample of the first input, then every sample of the second, and
so on. The inputs' dataset cards (``PREFIX.meta.json``) must agree on the tokenizer and its text
style (``--allow-dataset-mismatch`` merges anyway, without an output card); the output's card
sums their samples and captions per language.

Inputs are checked *before* anything is written (files present, megatron-core index header,
int32 data, multimodal index, only our sequence modes, one image closing every sample, data file
consistent with the index), because megatron-core's ``add_index`` would otherwise concatenate a
text-only or truncated dataset into a silently corrupt result. The output is
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

from ..data.identity import (
    MISMATCH_FLAG,
    check_datasets,
    make_card,
    tokenizer_differences,
    write_card,
)
from ..data.indexed import DatasetError, ImageTextWriter, read_index
from .common import ArgumentParser, run_cli

__all__ = ["merge_datasets", "build_parser", "main"]

PROG = "m2-merge-datasets"

logger = logging.getLogger(__name__)


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def merge_datasets(inputs: Sequence[str], output_prefix: str, force: bool = False,
                   allow_mismatch: bool = False) -> int:
    """Concatenate ``inputs`` into ``output_prefix`` in order; returns the number of samples.

    Every input is validated in full (:func:`~megatron_m2.data.indexed.read_index`) and the
    inputs' dataset cards are compared (:func:`~megatron_m2.data.identity.check_datasets`)
    before the output is opened. The output gets a card when every input has one and they
    agree.

    Raises:
        DatasetError: an input is missing or invalid.
        DatasetMismatchError: the inputs were made with different tokenizers, text styles or text
            lengths (unless ``allow_mismatch``).
        FileExistsError: the output is one of the inputs, or exists and ``force`` is False.
    """
    if not inputs:
        raise ValueError("no inputs to merge")
    indices = [read_index(p) for p in inputs]
    cards = check_datasets(inputs, against=f"the other inputs ({inputs[0]})",
                           allow=allow_mismatch)
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
    first = cards[inputs[0]]
    agree = first is not None and all(
        c is not None and not tokenizer_differences(c["tokenizer"], first["tokenizer"])
        for c in cards.values())
    card = None
    if agree:
        # Captions cut when stored: the output holds captions cut to the shortest such length.
        cuts = [c["text_length"] for c in cards.values() if c["text_length"] is not None]
        card = make_card(inputs, first["tokenizer"], min(cuts) if cuts else None,
                         source={"merged": list(inputs)})
    elif any(c is not None for c in cards.values()):
        logger.warning("the output gets no dataset card: the inputs' cards %s",
                       "disagree" if all(c is not None for c in cards.values()) else
                       "are missing for some inputs")
    with ImageTextWriter(output_prefix) as writer:
        for p in inputs:
            logger.info("appending %s", p)
            writer.add_dataset(p)
        if card is not None:  # before the index is renamed into place
            write_card(output_prefix, card)
    # Re-read what was written: catches a disk that filled up or an input replaced meanwhile.
    written = read_index(output_prefix).num_samples
    if written != total:
        raise DatasetError(f"output {output_prefix!r} has {written} samples, expected {total} "
                           "(was an input modified during the merge?)")
    logger.info("wrote %d samples from %d inputs to %s", total, len(inputs), output_prefix)
    return total


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX",
                   help="dataset prefixes (PREFIX.bin / PREFIX.idx), concatenated in this order")
    p.add_argument("--output-prefix", required=True, metavar="OUT",
                   help="writes OUT.bin and OUT.idx")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument(MISMATCH_FLAG, action="store_true",
                   help="merge inputs whose cards name different tokenizers or text styles "
                        "(the output then has no card)")
    return p


def _main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # megatron-core logs every index it opens at INFO; that is noise for a command-line tool.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    total = merge_datasets(args.input, args.output_prefix, force=args.force,
                           allow_mismatch=args.allow_dataset_mismatch)
    sys.stdout.write(json.dumps({"inputs": len(args.input), "samples": total,
                                 "output": args.output_prefix}) + "\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``m2-merge-datasets``."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
