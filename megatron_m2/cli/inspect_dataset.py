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
names another; without any, Pillow's default font draws Chinese as boxes.

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
import math
import os
import random
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data.indexed import (
    MODE_IMAGE,
    MODE_TO_LANG,
    DatasetError,
    DatasetIndex,
    Sample,
    decode_image_sequence,
    read_index,
)
from ..data.tokenizer import DEFAULT_MAX_LENGTH
from .common import ArgumentParser, run_cli

__all__ = ["dataset_stats", "format_stats", "read_sample", "find_cjk_font", "sheet_size",
           "contact_sheet", "check_token_ids", "build_parser", "main"]

PROG = "m2-inspect-dataset"

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Reading and statistics


def read_sample(index: DatasetIndex, data: np.ndarray, i: int) -> Sample:
    """Sample ``i`` from a validated index and its data map (see :meth:`DatasetIndex.data`)."""
    lo, hi = int(index.document_indices[i]), int(index.document_indices[i + 1])
    image, captions = b"", []
    for s in range(lo, hi):
        start = int(index.pointers[s]) // 4
        seq = np.asarray(data[start:start + int(index.lengths[s])])
        mode = int(index.modes[s])
        if mode == MODE_IMAGE:
            image = decode_image_sequence(seq)
        else:
            captions.append((MODE_TO_LANG[mode], seq.copy()))
    return Sample(image, captions)


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
# Contact sheet

COLUMNS = 4
TILE_WIDTH = 256
IMAGE_BOX = 128
FONT_SIZE = 13
LINE_HEIGHT = FONT_SIZE + 5
TEXT_LINES = 8  # one info line (sample index, image size) and up to seven caption lines
PAD = 6
GAP = 8
HEADER_HEIGHT = 26
TILE_HEIGHT = PAD + IMAGE_BOX + PAD + TEXT_LINES * LINE_HEIGHT + PAD

LANG_COLOURS = {"en": (31, 84, 178), "zh": (190, 30, 45), "other": (110, 110, 110)}

# (path, face index). In the Noto CJK collections face 2 is Simplified Chinese, whose glyph
# shapes (rather than the Japanese default, face 0) are what Chinese captions want.
CJK_FONT_CANDIDATES: Tuple[Tuple[str, int], ...] = (
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 2),     # Debian/Ubuntu
    ("/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc", 2),          # Arch
    ("/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc", 2),   # Fedora
    ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc", 2),
    ("/usr/share/fonts/truetype/noto/NotoSansSC-Regular.ttf", 0),
    ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", 0),
    ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", 0),
    ("/usr/share/fonts/wenquanyi/wqy-microhei/wqy-microhei.ttc", 0),
    ("/usr/share/fonts/truetype/arphic/uming.ttc", 0),
    ("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf", 0),
    ("/System/Library/Fonts/PingFang.ttc", 0),                          # macOS
    ("/System/Library/Fonts/STHeiti Light.ttc", 0),
    ("C:/Windows/Fonts/msyh.ttc", 0),                                   # Windows
    ("C:/Windows/Fonts/simhei.ttf", 0),
)


def find_cjk_font(size: int = FONT_SIZE, path: Optional[str] = None):
    """``(font, description)``: ``path`` if given, else the first CJK font found, else Pillow's
    default font (logged as a warning, because it draws Chinese as boxes).

    Raises:
        OSError: if an explicitly given ``path`` cannot be loaded.
    """
    from PIL import ImageFont

    if path is not None:
        font = ImageFont.truetype(path, size)
        return font, " ".join(font.getname())
    for candidate, face in CJK_FONT_CANDIDATES:
        if os.path.isfile(candidate):
            try:
                font = ImageFont.truetype(candidate, size, index=face)
            except OSError as exc:
                logger.debug("cannot load font %s: %s", candidate, exc)
                continue
            return font, " ".join(font.getname())
    logger.warning("no CJK font found (install fonts-noto-cjk or pass --font); Chinese captions "
                   "will render as boxes")
    try:
        return ImageFont.load_default(size=size), "Pillow default"
    except TypeError:  # Pillow < 10.1: only the fixed-size bitmap font
        return ImageFont.load_default(), "Pillow default (bitmap)"


def sheet_size(num_tiles: int, columns: int = COLUMNS) -> Tuple[int, int]:
    """Width and height in pixels of a contact sheet with ``num_tiles`` tiles."""
    cols = max(1, min(columns, num_tiles))
    rows = max(1, math.ceil(num_tiles / cols))
    return (cols * TILE_WIDTH + (cols + 1) * GAP,
            HEADER_HEIGHT + rows * TILE_HEIGHT + (rows + 1) * GAP)


def _text_width(font, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else font.getsize(text)[0]


def _wrap(text: str, font, width: float, max_lines: int) -> Tuple[List[str], bool]:
    """Greedy pixel-width wrapping, breaking at spaces where there are any (English) and
    between characters otherwise (Chinese has no spaces). Returns ``(lines, truncated)`` with
    at most ``max_lines`` lines."""
    lines: List[str] = []
    line = ""
    for pos, ch in enumerate(text):
        if _text_width(font, line + ch) <= width:
            line += ch
            continue
        cut = line.rfind(" ")
        if ch != " " and cut > 0:
            lines.append(line[:cut])
            line = line[cut + 1:] + ch
        else:
            lines.append(line.rstrip())
            line = ch.lstrip()
        if len(lines) == max_lines:
            return lines, True
    if line:
        lines.append(line)
    return lines, False


def _ellipsize(line: str, font, width: float) -> str:
    while line and _text_width(font, line + "…") > width:
        line = line[:-1]
    return line.rstrip() + "…"


def _caption_text(ids: np.ndarray, tokenizer) -> str:
    if tokenizer is not None:
        try:
            return tokenizer.decode(ids)
        except Exception as exc:  # ids outside this tokenizer's vocabulary: show them instead
            logger.warning("cannot decode caption with %s (%s); showing token ids",
                           tokenizer.model_path, exc)
    return " ".join(str(int(i)) for i in ids)


def _fit_image(data: bytes):
    """The decoded image on white, scaled to fit ``IMAGE_BOX``; None if it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgba = im.convert("RGBA")
    except Exception:
        return None, None
    size = rgba.size
    flat = Image.new("RGBA", size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    scale = IMAGE_BOX / max(size)
    new = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    # Nearest keeps tiny images' pixels crisp instead of blurring them into mush when enlarged.
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return flat.convert("RGB").resize(new, resample), size


def _draw_tile(sheet, draw, font, x: int, y: int, index: int, sample: Sample, tokenizer) -> None:
    draw.rectangle([x, y, x + TILE_WIDTH - 1, y + TILE_HEIGHT - 1], fill=(255, 255, 255),
                   outline=(200, 200, 200))
    box_x, box_y = x + (TILE_WIDTH - IMAGE_BOX) // 2, y + PAD
    draw.rectangle([box_x, box_y, box_x + IMAGE_BOX - 1, box_y + IMAGE_BOX - 1],
                   fill=(236, 236, 236))
    thumb, size = _fit_image(sample.image)
    if thumb is None:
        note = "undecodable image"
        draw.text((box_x + (IMAGE_BOX - _text_width(font, note)) / 2,
                   box_y + (IMAGE_BOX - LINE_HEIGHT) / 2), note, fill=(170, 0, 0), font=font)
        info = f"#{index}  undecodable, {len(sample.image)} B"
    else:
        sheet.paste(thumb, (box_x + (IMAGE_BOX - thumb.width) // 2,
                            box_y + (IMAGE_BOX - thumb.height) // 2))
        info = f"#{index}  {size[0]}x{size[1]}  {len(sample.image)} B"
    text_x, text_y = x + PAD, box_y + IMAGE_BOX + PAD
    width = TILE_WIDTH - 2 * PAD
    draw.text((text_x, text_y), info, fill=(120, 120, 120), font=font)

    row = 1
    for lang, indent, lines in _layout_captions(sample.captions, font, width, tokenizer):
        if lang is None:  # the "+k more captions" note
            draw.text((text_x, text_y + row * LINE_HEIGHT), lines[0], fill=(120, 120, 120),
                      font=font)
            break
        colour = LANG_COLOURS.get(lang, LANG_COLOURS["other"])
        draw.text((text_x, text_y + row * LINE_HEIGHT), lang, fill=colour, font=font)
        for line in lines:
            draw.text((text_x + indent, text_y + row * LINE_HEIGHT), line, fill=(20, 20, 20),
                      font=font)
            row += 1


def _layout_captions(captions, font, width: float, tokenizer):
    """``[(lang, indent, lines)]`` filling the tile's ``TEXT_LINES - 1`` caption lines.

    Every caption gets its first line before any gets a second (so a sample with many captions
    still shows each of them), continuation lines hang under the text rather than the language
    tag, and a caption cut short ends in an ellipsis. Captions that do not fit at all are
    summarised by a final ``(None, 0, ["+k more captions"])`` entry.
    """
    budget = TEXT_LINES - 1
    shown = captions if len(captions) <= budget else captions[:budget - 1]
    hidden = len(captions) - len(shown)
    wrapped = []
    for lang, ids in shown:
        indent = _text_width(font, f"{lang} ")
        lines, cut = _wrap(_caption_text(ids, tokenizer), font, width - indent, budget)
        wrapped.append((lang, indent, lines or [""], cut))
    take = [1] * len(wrapped)
    left = budget - (1 if hidden else 0) - len(wrapped)
    while left > 0 and any(t < len(w[2]) for t, w in zip(take, wrapped)):
        for k, w in enumerate(wrapped):
            if left > 0 and take[k] < len(w[2]):
                take[k] += 1
                left -= 1
    out = []
    for (lang, indent, lines, cut), t in zip(wrapped, take):
        kept = lines[:t]
        if cut or t < len(lines):
            kept[-1] = _ellipsize(kept[-1], font, width - indent)
        out.append((lang, indent, kept))
    if hidden:
        out.append((None, 0, [f"+{hidden} more captions"]))
    return out


def contact_sheet(prefix: str, out_path: str, tokenizer_model: Optional[str] = None,
                  samples: int = 16, seed: int = 0, columns: int = COLUMNS,
                  font_path: Optional[str] = None) -> dict:
    """Write a PNG grid of ``samples`` randomly chosen samples of ``prefix`` to ``out_path``.

    Returns:
        ``{"path", "width", "height", "samples": [indices], "font", "tokenizer"}``.

    Raises:
        DatasetError: if ``prefix`` is not a valid dataset or has no samples.
    """
    from PIL import Image, ImageDraw

    index = read_index(prefix)
    if index.num_samples == 0:
        raise DatasetError(f"input {prefix!r}: no samples to show")
    if samples < 1 or columns < 1:
        raise ValueError("samples and columns must be positive")
    tokenizer = None
    if tokenizer_model is not None:
        from ..data.tokenizer import M2Tokenizer

        tokenizer = M2Tokenizer(tokenizer_model)
    font, font_name = find_cjk_font(FONT_SIZE, font_path)
    data = index.data()
    chosen = sorted(random.Random(seed).sample(range(index.num_samples),
                                               min(samples, index.num_samples)))
    width, height = sheet_size(len(chosen), columns)
    cols = max(1, min(columns, len(chosen)))
    sheet = Image.new("RGB", (width, height), (246, 246, 246))
    draw = ImageDraw.Draw(sheet)
    title = (f"{os.path.basename(prefix)}: {len(chosen)} of {index.num_samples} samples "
             f"(seed {seed}); captions {'decoded' if tokenizer else 'as token ids'}")
    if _text_width(font, title) > width - 2 * GAP:
        title = _ellipsize(title, font, width - 2 * GAP)
    draw.text((GAP, (HEADER_HEIGHT + GAP - LINE_HEIGHT) // 2), title, fill=(0, 0, 0), font=font)
    for n, i in enumerate(chosen):
        r, c = divmod(n, cols)
        x = GAP + c * (TILE_WIDTH + GAP)
        y = HEADER_HEIGHT + GAP + r * (TILE_HEIGHT + GAP)
        _draw_tile(sheet, draw, font, x, y, i, read_sample(index, data, i), tokenizer)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    sheet.save(out_path, format="PNG")
    logger.info("contact sheet of %d samples written to %s (%dx%d px, font %s)", len(chosen),
                out_path, width, height, font_name)
    return {"path": out_path, "width": width, "height": height, "samples": chosen,
            "font": font_name, "tokenizer": tokenizer_model}


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
