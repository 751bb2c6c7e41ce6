"""``m2-inspect-dataset`` / ``tools/inspect_dataset.py``: statistics and a contact sheet.

Examples::

    m2-inspect-dataset --input data/train                     # table of statistics
    m2-inspect-dataset --input data/train --json              # the same as one JSON object
    m2-inspect-dataset --input data/train --tokenizer-model tok.model \
        --contact-sheet train.png --samples 16 --seed 0       # plus a PNG grid of samples
    m2-inspect-dataset --input data/old --tokenizer-model tok.model --write-card
                                                              # check ids, write the card

Counts, caption lengths and image byte sizes come from the index (and one word per image from
the data file), so they cover the whole dataset; image dimensions are measured by decoding a
seeded sample of at most ``--image-sample`` images. The dataset is read with numpy alone (no
megatron-core, no torch), so the tool starts in well under a second.

The contact sheet shows ``--samples`` randomly chosen samples (seeded, in dataset order), each
tile holding the image scaled to fit 128 px and its captions, one per language-prefixed line,
decoded with ``--tokenizer-model`` (token ids without one). Chinese needs a CJK font: Noto Sans
CJK (Debian/Ubuntu ``fonts-noto-cjk``) and a few other common ones are looked for, ``--font``
names another; without any, the package's bundled subset of Noto Sans CJK SC is used (it
covers the demo set's captions; characters outside it draw as boxes, with one warning).

``--write-card`` adds the dataset card (``PREFIX.meta.json``, see
:mod:`megatron_m2.data.identity`) to a dataset that has none (made by an older version or
another tool) or replaces it: every caption is first checked against ``--tokenizer-model``
(framed by its ``[CLS]`` and ``<|endoftext|>``, every id inside its vocabulary), so the card
never vouches for ids another tokenizer made.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
from typing import Dict, Optional, Sequence

import numpy as np

from ..data.contact_sheet import COLUMNS, contact_sheet, read_sample
from ..data.indexed import (
    MODE_IMAGE,
    MODE_TO_LANG,
    DatasetIndex,
    read_index,
)
from ..data.tokenizer import DEFAULT_MAX_LENGTH
from .common import ArgumentParser, run_cli

__all__ = ["dataset_stats", "format_stats", "check_token_ids", "build_parser", "main"]

PROG = "m2-inspect-dataset"

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Reading and statistics


def _summary(values: np.ndarray, percentiles: bool = True) -> Optional[Dict[str, float]]:
    if values.size == 0:
        return None
    out = {"min": int(values.min()), "mean": round(float(values.mean()), 3)}
    if percentiles:
        out["p50"] = float(np.percentile(values, 50))
        out["p95"] = float(np.percentile(values, 95))
    out["max"] = int(values.max())
    return out


def dataset_stats(prefix: str, image_sample: int = 1000, seed: int = 0) -> dict:
    """Statistics of the dataset at ``prefix`` as a JSON-able dict.

    Keys: ``prefix``, ``files`` (bytes of ``.bin`` / ``.idx``), ``samples``, ``captions``,
    ``captions_per_language``, ``samples_with_language`` (samples having at least one caption in
    that language), ``captions_per_sample`` (``{"k": samples with k captions}``),
    ``caption_tokens`` (per language and ``all``: min/mean/p50/p95/max framed length and
    ``over_max_length``, the captions longer than the official 52 that loading truncates) and
    ``images`` (encoded bytes over all images; decoded width/height/format over a seeded sample
    of at most ``image_sample`` images, with the undecodable ones counted).

    Raises:
        DatasetError: if ``prefix`` is missing or not a valid image–text dataset.
    """
    index = read_index(prefix)
    data = index.data()
    n = index.num_samples
    modes, lengths = np.asarray(index.modes), np.asarray(index.lengths)
    docs = np.asarray(index.document_indices)
    is_caption = modes != MODE_IMAGE
    per_sample = np.diff(docs) - 1  # every sample ends with its one image
    ks, counts = np.unique(per_sample, return_counts=True)

    stats: dict = {
        "prefix": prefix,
        "files": {"bin_bytes": index.bin_bytes, "idx_bytes": index.idx_bytes},
        "samples": n,
        "captions": int(is_caption.sum()),
        "captions_per_language": {},
        "samples_with_language": {},
        "captions_per_sample": {str(int(k)): int(c) for k, c in zip(ks, counts)},
        "caption_tokens": {},
    }
    for mode, lang in MODE_TO_LANG.items():
        sel = modes == mode
        if not sel.any():
            continue
        stats["captions_per_language"][lang] = int(sel.sum())
        # Captions per sample in this language; reduceat is safe since no sample is empty.
        stats["samples_with_language"][lang] = int(
            (np.add.reduceat(sel.astype(np.int64), docs[:-1]) > 0).sum())
        stats["caption_tokens"][lang] = _token_summary(lengths[sel])
    if is_caption.any():
        stats["caption_tokens"]["all"] = _token_summary(lengths[is_caption])

    stats["images"] = _image_stats(index, data, image_sample, seed)
    from ..data.identity import read_card

    stats["card"] = read_card(prefix)
    return stats


def _token_summary(lengths: np.ndarray) -> dict:
    out = _summary(lengths)
    out["over_max_length"] = int((lengths > DEFAULT_MAX_LENGTH).sum())
    return out


def _image_stats(index: DatasetIndex, data: np.ndarray, image_sample: int, seed: int) -> dict:
    from PIL import Image

    n = index.num_samples
    img_seq = np.asarray(index.document_indices[1:]) - 1
    words = np.asarray(index.lengths)[img_seq].astype(np.int64) - 1
    # The pad count is the first word of each image sequence: one read per image.
    pads = np.asarray(data[np.asarray(index.pointers)[img_seq] // 4]).astype(np.int64) if n else (
        np.zeros(0, np.int64))
    bad_pad = (pads < 0) | (pads > 3)
    nbytes = words * 4 - np.clip(pads, 0, 3)
    out: dict = {"count": n, "corrupt_sequences": int(bad_pad.sum()),
                 "bytes": _summary(nbytes, percentiles=False)}
    if n:
        out["bytes"]["total"] = int(nbytes.sum())

    chosen = sorted(random.Random(seed).sample(range(n), min(max(image_sample, 0), n)))
    widths, heights, formats, undecodable = [], [], {}, 0
    for i in chosen:
        try:
            s = read_sample(index, data, i)
            with Image.open(io.BytesIO(s.image)) as im:
                im.load()  # a full decode, so truncated files count as undecodable
                widths.append(im.width)
                heights.append(im.height)
                formats[im.format or "unknown"] = formats.get(im.format or "unknown", 0) + 1
        except Exception as exc:  # any decoder failure is a finding, not a crash
            logger.debug("sample %d: image does not decode: %s", i, exc)
            undecodable += 1
    out.update({"decoded_sample": len(chosen), "undecodable": undecodable,
                "width": _summary(np.asarray(widths), percentiles=False),
                "height": _summary(np.asarray(heights), percentiles=False),
                "formats": dict(sorted(formats.items()))})
    return out


def _human(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_stats(stats: dict) -> str:
    """The statistics of :func:`dataset_stats` as an aligned plain-text table."""
    lines = [f"dataset            {stats['prefix']}",
             f"files              .bin {_human(stats['files']['bin_bytes'])}, "
             f".idx {_human(stats['files']['idx_bytes'])}",
             f"samples            {stats['samples']}",
             f"captions           {stats['captions']}"]
    for lang, c in stats["captions_per_language"].items():
        lines.append(f"  {lang:<16} {c} captions in {stats['samples_with_language'][lang]} "
                     "samples")
    dist = ", ".join(f"{k}: {v}" for k, v in stats["captions_per_sample"].items())
    lines.append(f"captions/sample    {dist or '-'}")
    if stats["caption_tokens"]:
        lines.append("")
        lines.append(f"caption tokens (framed)  {'min':>6} {'mean':>8} {'p50':>7} {'p95':>7} "
                     f"{'max':>6}  >{DEFAULT_MAX_LENGTH}")
        for lang, t in stats["caption_tokens"].items():
            lines.append(f"  {lang:<22} {t['min']:>6} {t['mean']:>8.2f} {t['p50']:>7.1f} "
                         f"{t['p95']:>7.1f} {t['max']:>6}  {t['over_max_length']}")
    im = stats["images"]
    lines.append("")
    if im["bytes"]:
        lines.append(f"image bytes        mean {_human(int(im['bytes']['mean']))}, max "
                     f"{_human(im['bytes']['max'])}, total {_human(im['bytes']['total'])}")
    if im["corrupt_sequences"]:
        lines.append(f"  corrupt image sequences: {im['corrupt_sequences']}")
    lines.append(f"decoded sample     {im['decoded_sample']} images, {im['undecodable']} "
                 "undecodable")
    for key in ("width", "height"):
        if im[key]:
            w = im[key]
            lines.append(f"  {key:<16} min {w['min']}, mean {w['mean']:.1f}, max {w['max']}")
    if im["formats"]:
        lines.append("  formats          " + ", ".join(f"{k} {v}"
                                                       for k, v in im["formats"].items()))
    card = stats.get("card")
    lines.append("")
    if card:
        tok = card["tokenizer"]
        cut = card["text_length"]
        lines.append(f"card               tokenizer sha256 {str(tok.get('sha256'))[:12]}…, "
                     f"vocab {tok.get('vocab_size')}, text style {tok.get('text_style')}, "
                     f"captions {'whole' if cut is None else f'cut to {cut} tokens'}")
    else:
        lines.append("card               none (m2-inspect-dataset --write-card adds one)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line


def check_token_ids(index: DatasetIndex, data: np.ndarray, tokenizer) -> None:
    """Check that every caption of the dataset could come from ``tokenizer``: framed by its
    ``[CLS]`` ... ``<|endoftext|>`` and every id in ``[0, vocab_size)`` (vectorised over the
    whole data file).

    Raises:
        DatasetMismatchError: naming the first offending sample and what is wrong.
    """
    from ..data.identity import DatasetMismatchError

    modes, lengths = np.asarray(index.modes), np.asarray(index.lengths)
    starts = np.asarray(index.pointers) // 4
    caps = np.flatnonzero(modes != MODE_IMAGE)
    if not caps.size:
        return
    first, last = data[starts[caps]], data[starts[caps] + lengths[caps] - 1]
    # Min and max of every sequence (image sequences included, then dropped): one pass.
    bounds = np.asarray(starts, dtype=np.int64)
    lo = np.minimum.reduceat(data, bounds)[caps]
    hi = np.maximum.reduceat(data, bounds)[caps]
    bad = (first != tokenizer.cls_id) | (last != tokenizer.eos_id) | (lo < 0) | (
        hi >= tokenizer.vocab_size)
    if bad.any():
        j = int(caps[np.argmax(bad)])
        sample = int(np.searchsorted(np.asarray(index.document_indices), j, side="right") - 1)
        raise DatasetMismatchError(
            f"dataset {index.prefix!r}: {int(bad.sum())} caption(s) were not made by "
            f"{tokenizer.model_path} (first: sample {sample}, ids {int(data[starts[j]])} ... "
            f"{int(data[starts[j] + lengths[j] - 1])}, range [{int(lo[np.argmax(bad)])}, "
            f"{int(hi[np.argmax(bad)])}]; that tokenizer frames captions as "
            f"{tokenizer.cls_id} ... {tokenizer.eos_id} with ids below {tokenizer.vocab_size})")


def write_card_for(prefix: str, tokenizer_model: str, text_style: Optional[str] = None,
                   text_length: Optional[int] = None) -> str:
    """Check ``prefix``'s token ids against the tokenizer and write its dataset card."""
    from ..data.identity import make_card, tokenizer_identity, write_card
    from ..data.tokenizer import M2Tokenizer

    tokenizer = M2Tokenizer(tokenizer_model, text_style=text_style)
    index = read_index(prefix)
    check_token_ids(index, index.data(), tokenizer)
    return write_card(prefix, make_card(prefix, tokenizer_identity(tokenizer), text_length,
                                        source={"card_written_by": PROG}))


def build_parser() -> argparse.ArgumentParser:
    from ..data.tokenizer import TEXT_STYLES

    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--input", required=True, metavar="PREFIX",
                   help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--json", action="store_true", help="print one JSON object, not a table")
    p.add_argument("--image-sample", type=int, default=1000,
                   help="images decoded for the width/height statistics")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the decoded-image sample and of the contact-sheet samples")
    p.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model: decodes captions on the contact sheet (token ids "
                        "without it); required by --write-card")
    g = p.add_argument_group("contact sheet")
    g.add_argument("--contact-sheet", default=None, metavar="OUT.png",
                   help="write a PNG grid of randomly chosen samples")
    g.add_argument("--samples", type=int, default=16, help="samples on the contact sheet")
    g.add_argument("--columns", type=int, default=COLUMNS, help="tiles per row")
    g.add_argument("--font", default=None,
                   help="TrueType/OpenType font for captions (default: a CJK font if found)")
    g = p.add_argument_group("dataset card")
    g.add_argument("--write-card", action="store_true",
                   help="check every caption against --tokenizer-model and write "
                        "PREFIX.meta.json")
    g.add_argument("--text-style", default=None, choices=TEXT_STYLES,
                   help="text style the captions were made in (default: the tokenizer's)")
    g.add_argument("--text-length", type=int, default=None,
                   help="the length the captions were cut to when stored, if they were "
                        "(default: stored whole)")
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.samples < 1 or args.columns < 1:
        parser.error("--samples and --columns must be >= 1")
    if args.write_card and not args.tokenizer_model:
        parser.error("--write-card needs --tokenizer-model")
    card = None
    if args.write_card:  # first, so that the statistics show the card just written
        card = write_card_for(args.input, args.tokenizer_model, args.text_style,
                              args.text_length)
    stats = dataset_stats(args.input, image_sample=args.image_sample, seed=args.seed)
    if card:
        stats["card_written"] = card
    if args.contact_sheet:
        stats["contact_sheet"] = contact_sheet(
            args.input, args.contact_sheet, tokenizer_model=args.tokenizer_model,
            samples=args.samples, seed=args.seed, columns=args.columns, font_path=args.font)
    if args.json:
        sys.stdout.write(json.dumps(stats, ensure_ascii=False) + "\n")
    else:
        text = format_stats(stats)
        if "contact_sheet" in stats:
            cs = stats["contact_sheet"]
            text += (f"\ncontact sheet      {cs['path']} ({len(cs['samples'])} samples, "
                     f"{cs['width']}x{cs['height']} px, font {cs['font']})")
        if "card_written" in stats:
            text += f"\ncard written       {stats['card_written']}"
        sys.stdout.write(text + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``m2-inspect-dataset``."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
