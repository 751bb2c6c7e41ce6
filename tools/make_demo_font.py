#!/usr/bin/env python3
"""Build the small CJK font bundled for the demo: a subset of Noto Sans CJK SC with exactly the
characters the pictures of the emoji demo set need.

The project draws Chinese captions (``m2-inspect-dataset --contact-sheet``, ``m2-eval
--retrieval-examples``); a machine without a CJK font would draw them as boxes.
:func:`megatron_m2.data.contact_sheet.find_cjk_font` falls back to this subset when no system
CJK font is installed, so the README's demo draws Chinese on a fresh machine.

The subset holds:

* every character of every caption (any language) of ``--dataset-dir``'s ``train``,
  ``validation`` and ``test`` splits, decoded with its ``tokenizer.model`` exactly as the
  pictures decode them (so SentencePiece's unknown-piece mark ``⁇`` is included if it occurs);
* printable ASCII, Latin-1 letters and symbols, and common CJK / general punctuation
  (:data:`EXTRA_CHARACTERS`), including the ellipsis the pictures end cut lines with.

The source is the Simplified Chinese face (index 2) of Debian's ``NotoSansCJK-Regular.ttc``
(package ``fonts-noto-cjk``; SIL Open Font License 1.1)::

    apt-get download fonts-noto-cjk && dpkg-deb -x fonts-noto-cjk_*.deb /tmp/noto
    pip install fonttools          # build-time only
    python tools/make_demo_font.py \\
        --source /tmp/noto/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc \\
        --dataset-dir data/emoji_demo \\
        --output megatron_m2/assets/fonts/NotoSansCJKsc-Regular-demo-subset.otf

The output is deterministic (same source file, fontTools version and dataset → same bytes): the
font's timestamps are kept from the source. The font keeps its name (``Noto Sans CJK SC``; the
licence's Reserved Font Name is ``Source``, which it does not use) and its ``.notdef`` box, so a
character outside the subset draws as a visible box.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Iterable, List, Set

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("make_demo_font")

SPLITS = ("train", "validation", "test")
DEFAULT_FACE = 2  # NotoSansCJK-Regular.ttc: 0 JP, 1 KR, 2 SC, 3 TC, 4 HK (then the mono faces)

EXTRA_CHARACTERS = (
    "".join(chr(c) for c in range(0x20, 0x7F))            # printable ASCII
    + "".join(chr(c) for c in range(0xA0, 0x100))         # Latin-1 letters and symbols
    + "\u3000、。〃〈〉《》「」『』【】〔〕〖〗〜"            # CJK symbols and punctuation
    + "，：；！？（）［］｛｝．／％＋－＝～＆＃＊＠"          # full-width forms
    + "‐–—―‘’“”•…‥′″※→←↑↓×÷·⁇"                          # general punctuation, arrows
)
"""Characters kept beside the dataset's own: what other text on the pictures may use."""


def caption_characters(dataset_dir: Path, splits: Iterable[str] = SPLITS) -> Set[str]:
    """Every character of every caption of ``dataset_dir``'s ``splits``, decoded with
    ``dataset_dir/tokenizer.model`` the way the pictures decode them."""
    from megatron_m2.data.contact_sheet import caption_text
    from megatron_m2.data.indexed import ImageTextIndexedDataset
    from megatron_m2.data.tokenizer import M2Tokenizer

    tokenizer = M2Tokenizer(dataset_dir / "tokenizer.model")
    chars: Set[str] = set()
    for split in splits:
        ds = ImageTextIndexedDataset(str(dataset_dir / split))
        for i in range(len(ds)):
            lo, hi = ds.sequence_range(i)
            for j in range(lo, hi):
                seq, mode = ds.sequence(j)
                if mode != 1:  # MODE_IMAGE
                    chars.update(caption_text(seq, tokenizer))
    return chars


def subset_characters(dataset_dir: Path) -> List[str]:
    """The sorted characters the subset keeps (dataset captions + :data:`EXTRA_CHARACTERS`),
    without control characters."""
    chars = caption_characters(dataset_dir) | set(EXTRA_CHARACTERS)
    return sorted(c for c in chars if c.isprintable() or c == "\u3000")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_subset(source: Path, chars: List[str], output: Path, face: int = DEFAULT_FACE) -> dict:
    """Write the subset of ``source`` (face ``face`` of a collection) holding ``chars`` to
    ``output``. Returns a summary (characters kept, those the source lacks, sizes, hashes)."""
    from fontTools import subset
    from fontTools import version as fonttools_version
    from fontTools.ttLib import TTFont

    kwargs = {"fontNumber": face} if source.suffix.lower() in (".ttc", ".otc") else {}
    font = TTFont(str(source), recalcTimestamp=False, lazy=True, **kwargs)
    cmap = font.getBestCmap()
    missing = [c for c in chars if ord(c) not in cmap]
    options = subset.Options()
    # Kerning only: the other features (vertical forms, locl, proportional widths...) pull in
    # about 1200 alternate glyphs (690 KB instead of 360 KB) that horizontal captions never use.
    options.layout_features = ["kern"]
    options.name_IDs = ["*"]          # keep copyright, licence and trademark notices
    options.name_languages = ["*"]
    options.notdef_outline = True     # characters outside the subset draw as a visible box
    options.glyph_names = False
    options.hinting = True
    options.desubroutinize = False
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=[ord(c) for c in chars])
    subsetter.subset(font)
    output.parent.mkdir(parents=True, exist_ok=True)
    font.save(str(output))
    return {"source": str(source), "source_sha256": sha256(source), "face": face,
            "output": str(output), "output_sha256": sha256(output),
            "bytes": output.stat().st_size, "characters": len(chars),
            "cjk_ideographs": sum(1 for c in chars if "\u4e00" <= c <= "\u9fff"),
            "missing_in_source": missing, "fonttools": fonttools_version}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, required=True,
                   help="source CJK font (NotoSansCJK-Regular.ttc from fonts-noto-cjk)")
    p.add_argument("--face", type=int, default=DEFAULT_FACE,
                   help="face index in a .ttc collection (default 2: Simplified Chinese)")
    p.add_argument("--dataset-dir", type=Path, default=ROOT / "data" / "emoji_demo",
                   help="dataset whose captions the subset must cover (its tokenizer.model and "
                        "train/validation/test splits)")
    p.add_argument("--output", type=Path, required=True, help="subset font to write (.otf)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # its per-table subset notes

    chars = subset_characters(args.dataset_dir)
    summary = build_subset(args.source, chars, args.output, args.face)
    if summary["missing_in_source"]:
        log.warning("the source font lacks %d of the characters: %s",
                    len(summary["missing_in_source"]), "".join(summary["missing_in_source"]))
    print(json.dumps(summary, ensure_ascii=False, indent=1))
    return 1 if summary["missing_in_source"] else 0


if __name__ == "__main__":
    sys.exit(main())
