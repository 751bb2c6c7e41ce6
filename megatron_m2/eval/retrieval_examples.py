"""A picture of text→image retrieval: for a few held-out caption queries per language, the
top-k images the model retrieves, the query's own image framed in green (``m2-eval --task
retrieval --retrieval-examples PATH.png``). numpy and Pillow only.

Layout: a header, then one section per language, each a row per query: the query (sample
number, language, caption text, the rank of its own image among the gallery, in red when it is
not in the top k), the top-k images in rank order (rank under each), then, after a gap, the
query's own image ("answer"). Every image sits in a frame of ``BORDER`` pixels, green
(:data:`CORRECT`) for the query's own image and grey (:data:`OTHER`) for any other. Images are
scaled to ``THUMB`` pixels (nearest when enlarged, as in the contact sheet). The same samples
are queried in every language (see :func:`megatron_m2.eval.tasks.example_samples`), so the
English and the Chinese query of one emoji are row ``j`` of their sections.

Text is drawn with :func:`megatron_m2.data.contact_sheet.find_cjk_font`: ``font_path``, else
an installed CJK font, else the package's bundled subset of Noto Sans CJK SC (every character of
the demo set's captions; other characters draw as boxes, with one warning).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Sequence, Tuple

from ..data.contact_sheet import (
    FONT_SIZE,
    LANG_COLOURS,
    LINE_HEIGHT,
    caption_text,
    ellipsize,
    find_cjk_font,
    fit_image,
    text_width,
    wrap_text,
)

__all__ = ["render_retrieval_examples", "picture_size", "tile_origin", "THUMB", "BORDER",
           "CORRECT", "OTHER"]

logger = logging.getLogger(__name__)

THUMB = 96
"""Image side in pixels (64-pixel emoji are enlarged 1.5×)."""
BORDER = 4
"""Frame width around every image."""
TILE = THUMB + 2 * BORDER
LABEL_HEIGHT = LINE_HEIGHT
"""The rank line under each image."""
ROW_HEIGHT = TILE + LABEL_HEIGHT
TEXT_WIDTH = 260
"""The query column."""
GAP = 8
ANSWER_GAP = 3 * GAP
"""Extra space before the answer column."""
HEADER_HEIGHT = 2 * LINE_HEIGHT + GAP
SECTION_HEIGHT = LINE_HEIGHT + GAP

CORRECT = (0, 160, 60)
"""Frame of the query's own image."""
OTHER = (190, 190, 190)
"""Frame of any other image."""
MISSED = (200, 30, 30)
"""The rank of an own image outside the top k."""
INK, GREY, BACKGROUND = (20, 20, 20), (120, 120, 120), (246, 246, 246)
TEXT_LINES = ROW_HEIGHT // LINE_HEIGHT
"""Lines in the query column: the sample line, the caption, the rank line."""


def picture_size(rows: Sequence[int], k: int) -> Tuple[int, int]:
    """Width and height in pixels of a picture with sections of ``rows`` queries and the top
    ``k`` images per query."""
    width = GAP + TEXT_WIDTH + GAP + k * (TILE + GAP) + ANSWER_GAP + TILE + GAP
    height = HEADER_HEIGHT + sum(SECTION_HEIGHT + n * (ROW_HEIGHT + GAP) for n in rows) + GAP
    return width, height


def tile_origin(rows: Sequence[int], section: int, row: int, column: int, k: int
                ) -> Tuple[int, int]:
    """Top-left pixel of the frame of image ``column`` (0-based rank; ``k`` is the answer
    column) of query ``row`` of section ``section``."""
    x = GAP + TEXT_WIDTH + GAP + column * (TILE + GAP) + (ANSWER_GAP if column == k else 0)
    y = HEADER_HEIGHT + sum(SECTION_HEIGHT + n * (ROW_HEIGHT + GAP) for n in rows[:section])
    return x, y + SECTION_HEIGHT + row * (ROW_HEIGHT + GAP)


def _draw_image(sheet, draw, font, x: int, y: int, data: bytes, frame, label: str,
                label_colour) -> None:
    draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], fill=frame)
    draw.rectangle([x + BORDER, y + BORDER, x + BORDER + THUMB - 1, y + BORDER + THUMB - 1],
                   fill=(236, 236, 236))
    thumb, _ = fit_image(data, THUMB)
    if thumb is None:
        note = "undecodable"
        draw.text((x + (TILE - text_width(font, note)) / 2, y + (TILE - LINE_HEIGHT) / 2), note,
                  fill=MISSED, font=font)
    else:
        sheet.paste(thumb, (x + BORDER + (THUMB - thumb.width) // 2,
                            y + BORDER + (THUMB - thumb.height) // 2))
    draw.text((x + (TILE - text_width(font, label)) / 2, y + TILE + 2), label,
              fill=label_colour, font=font)


def _draw_query(draw, font, x: int, y: int, lang: str, query, text: str, k: int) -> None:
    tag = f"{lang} "
    draw.text((x, y), tag, fill=LANG_COLOURS.get(lang, LANG_COLOURS["other"]), font=font)
    draw.text((x + text_width(font, tag), y), f"sample #{query.sample}", fill=GREY, font=font)
    budget = TEXT_LINES - 2
    lines, cut = wrap_text(text, font, TEXT_WIDTH, budget)
    lines = lines or [""]
    if cut:
        lines[-1] = ellipsize(lines[-1], font, TEXT_WIDTH)
    for j, line in enumerate(lines):
        draw.text((x, y + (1 + j) * LINE_HEIGHT), line, fill=INK, font=font)
    found = query.rank <= k
    note = f"own image: rank {query.rank} of {query.gallery}"
    if text_width(font, note) > TEXT_WIDTH:
        note = ellipsize(note, font, TEXT_WIDTH)
    draw.text((x, y + (TEXT_LINES - 1) * LINE_HEIGHT), note,
              fill=CORRECT if found else MISSED, font=font)


def render_retrieval_examples(prefix: str, examples: Dict[str, Sequence], out_path: str,
                              tokenizer=None, font_path: Optional[str] = None,
                              title: Optional[str] = None) -> dict:
    """Write the picture of ``examples`` (``{lang: [ExampleQuery]}``, as
    :func:`megatron_m2.eval.tasks.retrieval_report` makes them; their sample numbers index
    ``prefix``) to ``out_path`` (PNG).

    Captions are decoded with ``tokenizer`` (an :class:`~megatron_m2.data.tokenizer.M2Tokenizer`;
    token ids are shown without one).

    Returns:
        ``{"path", "width", "height", "top_k", "font", "samples": {lang: [sample]},
        "ranks": {lang: [rank of the own image]}}``.
    """
    from PIL import Image, ImageDraw

    from ..data.indexed import ImageTextIndexedDataset

    langs = [lang for lang, queries in examples.items() if queries]
    if not langs:
        raise ValueError("no example queries to draw")
    k = max(len(q.top) for lang in langs for q in examples[lang])
    rows = [len(examples[lang]) for lang in langs]
    width, height = picture_size(rows, k)
    reader = ImageTextIndexedDataset(prefix)
    font, font_name = find_cjk_font(FONT_SIZE, font_path)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    title = title or f"{os.path.basename(prefix)}: text-to-image retrieval, top {k}"
    legend = (f"frame: green = the query's own image, grey = another; under each image: its "
              f"rank; a red rank: the own image is not in the top {k}")
    for j, line in enumerate((title, legend)):
        if text_width(font, line) > width - 2 * GAP:
            line = ellipsize(line, font, width - 2 * GAP)
        draw.text((GAP, GAP // 2 + j * LINE_HEIGHT), line, fill=INK if j == 0 else GREY,
                  font=font)
    images: Dict[int, bytes] = {}

    def image(i: int) -> bytes:
        if i not in images:
            images[i] = reader[i].image
        return images[i]

    for s, lang in enumerate(langs):
        queries = examples[lang]
        x0, y0 = tile_origin(rows, s, 0, 0, k)
        gallery = queries[0].gallery
        found = sum(q.rank <= k for q in queries)
        head = (f"{lang}: {len(queries)} quer{'y' if len(queries) == 1 else 'ies'} against "
                f"{gallery} images; own image in the top {k} for {found}")
        draw.text((GAP, y0 - SECTION_HEIGHT + GAP // 2), head,
                  fill=LANG_COLOURS.get(lang, LANG_COLOURS["other"]), font=font)
        for r, query in enumerate(queries):
            _, y = tile_origin(rows, s, r, 0, k)
            _draw_query(draw, font, GAP, y, lang, query, caption_text(query.caption, tokenizer),
                        k)
            for c, i in enumerate(query.top):
                x, _ = tile_origin(rows, s, r, c, k)
                right = i == query.sample
                _draw_image(sheet, draw, font, x, y, image(i), CORRECT if right else OTHER,
                            str(c + 1), CORRECT if right else GREY)
            x, _ = tile_origin(rows, s, r, k, k)
            _draw_image(sheet, draw, font, x, y, image(query.sample), CORRECT,
                        f"own, rank {query.rank}", CORRECT if query.rank <= k else MISSED)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    sheet.save(out_path, format="PNG")
    logger.info("retrieval examples (%s, %s queries) written to %s (%dx%d px, font %s)",
                "/".join(langs), "/".join(map(str, rows)), out_path, width, height, font_name)
    return {"path": out_path, "width": width, "height": height, "top_k": k, "font": font_name,
            "samples": {lang: [q.sample for q in examples[lang]] for lang in langs},
            "ranks": {lang: [q.rank for q in examples[lang]] for lang in langs}}
