"""A contact sheet of an indexed dataset: a PNG grid of seeded random samples, each tile the
image scaled to fit and its captions decoded per language (``m2-inspect-dataset
--contact-sheet``). Chinese needs a CJK font (:func:`find_cjk_font`; without a system one, the
package's subset font covers the bundled demo set). numpy and Pillow only.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
from typing import List, Optional, Tuple

import numpy as np

from .indexed import (
    MODE_IMAGE,
    MODE_TO_LANG,
    DatasetError,
    DatasetIndex,
    Sample,
    decode_image_sequence,
    read_index,
)

__all__ = ["read_sample", "find_cjk_font", "BUNDLED_CJK_FONT", "sheet_size", "contact_sheet",
           "COLUMNS", "TILE_WIDTH", "PAD", "GAP", "text_width", "wrap_text", "ellipsize",
           "caption_text", "fit_image", "LANG_COLOURS"]

logger = logging.getLogger(__name__)


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


BUNDLED_CJK_FONT: Optional[str] = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "fonts",
    "NotoSansCJKsc-Regular-demo-subset.otf")
"""A subset of Noto Sans CJK SC (SIL OFL 1.1) shipped with the package, used when no system CJK
font is found: it covers the bundled emoji demo set's captions, ASCII, Latin-1 and common
punctuation only (built by ``tools/make_demo_font.py``; see ``data/emoji_demo/README.md``)."""


def _subset_font(path: str, size: int):
    """The bundled subset font as a Pillow font that logs one warning, the first time it draws
    text with characters it has no glyph for (they draw as its ``.notdef`` box)."""
    from PIL import Image, ImageDraw, ImageFont

    def rendering(font, ch: str):
        left, top, right, bottom = font.getbbox(ch)
        im = Image.new("L", (max(1, right - left), max(1, bottom - top)))
        ImageDraw.Draw(im).text((-left, -top), ch, fill=255, font=font)
        return im.size, im.tobytes()

    class SubsetFont(ImageFont.FreeTypeFont):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # A plain copy to draw probe characters with (drawing with self would recurse).
            self._probe = ImageFont.FreeTypeFont(self.path, self.size, index=self.index)
            self._notdef = rendering(self._probe, "\ue000")  # private use: never in the subset
            self._known = {}
            self._warned = False

        def missing(self, text: str) -> str:
            """The distinct characters of ``text`` this font has no glyph for."""
            out = []
            for ch in dict.fromkeys(text):
                if ch not in self._known:
                    self._known[ch] = (not ch.isprintable()
                                       or rendering(self._probe, ch) != self._notdef)
                if not self._known[ch]:
                    out.append(ch)
            return "".join(out)

        def getmask2(self, text, *args, **kwargs):
            if not self._warned:
                absent = self.missing(text)
                if absent:
                    self._warned = True
                    logger.warning(
                        "the bundled CJK font (a subset for the demo set) has no glyph for %r "
                        "(in %r): such characters draw as boxes; install fonts-noto-cjk or pass "
                        "--font", absent, text)
            return super().getmask2(text, *args, **kwargs)

    return SubsetFont(path, size)


def find_cjk_font(size: int = FONT_SIZE, path: Optional[str] = None):
    """``(font, description)``: ``path`` if given, else the first system CJK font found
    (:data:`CJK_FONT_CANDIDATES`), else the subset font shipped with the package
    (:data:`BUNDLED_CJK_FONT`: it covers the demo set's captions; it logs a warning once if it
    is asked to draw a character it lacks), else Pillow's default font (logged as a warning,
    because it draws Chinese as boxes).

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
    if BUNDLED_CJK_FONT is not None and os.path.isfile(BUNDLED_CJK_FONT):
        try:
            font = _subset_font(BUNDLED_CJK_FONT, size)
        except OSError as exc:
            logger.debug("cannot load font %s: %s", BUNDLED_CJK_FONT, exc)
        else:
            logger.debug("no system CJK font found; using the bundled subset %s (demo set's "
                        "characters only)", os.path.basename(BUNDLED_CJK_FONT))
            return font, " ".join(font.getname()) + " (bundled demo subset)"
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


def text_width(font, text: str) -> float:
    """Width in pixels of ``text`` drawn in ``font``."""
    return font.getlength(text) if hasattr(font, "getlength") else font.getsize(text)[0]


def wrap_text(text: str, font, width: float, max_lines: int) -> Tuple[List[str], bool]:
    """Greedy pixel-width wrapping, breaking at spaces where there are any (English) and
    between characters otherwise (Chinese has no spaces). Returns ``(lines, truncated)`` with
    at most ``max_lines`` lines."""
    lines: List[str] = []
    line = ""
    for pos, ch in enumerate(text):
        if text_width(font, line + ch) <= width:
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


def ellipsize(line: str, font, width: float) -> str:
    """``line`` cut to fit ``width`` with a trailing ellipsis."""
    while line and text_width(font, line + "…") > width:
        line = line[:-1]
    return line.rstrip() + "…"


def caption_text(ids: np.ndarray, tokenizer) -> str:
    """A caption's text decoded with ``tokenizer`` (its token ids when there is none or the
    ids do not decode)."""
    if tokenizer is not None:
        try:
            return tokenizer.decode(ids)
        except Exception as exc:  # ids outside this tokenizer's vocabulary: show them instead
            logger.warning("cannot decode caption with %s (%s); showing token ids",
                           tokenizer.model_path, exc)
    return " ".join(str(int(i)) for i in ids)


def fit_image(data: bytes, box: int = IMAGE_BOX):
    """``(image, original size)``: the decoded image on white, scaled to fit a ``box`` square
    (nearest when enlarged); ``(None, None)`` if it does not decode."""
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
    scale = box / max(size)
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
    thumb, size = fit_image(sample.image)
    if thumb is None:
        note = "undecodable image"
        draw.text((box_x + (IMAGE_BOX - text_width(font, note)) / 2,
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
        indent = text_width(font, f"{lang} ")
        lines, cut = wrap_text(caption_text(ids, tokenizer), font, width - indent, budget)
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
            kept[-1] = ellipsize(kept[-1], font, width - indent)
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
    if text_width(font, title) > width - 2 * GAP:
        title = ellipsize(title, font, width - 2 * GAP)
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


