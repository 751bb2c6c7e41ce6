"""The CJK subset font shipped with the package (megatron_m2/assets/fonts, built by
tools/make_demo_font.py): packaged, loadable, covering every caption character of the bundled
emoji demo set, and picked by :func:`find_cjk_font` when the system has no CJK font."""

from __future__ import annotations

import configparser
import fnmatch
import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from megatron_m2.data import contact_sheet
from megatron_m2.data.contact_sheet import caption_text
from megatron_m2.data.indexed import MODE_IMAGE, ImageTextIndexedDataset
from megatron_m2.data.tokenizer import M2Tokenizer

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "emoji_demo"
FONT = Path(contact_sheet.BUNDLED_CJK_FONT)


@pytest.fixture
def no_system_font(monkeypatch):
    monkeypatch.setattr(contact_sheet, "CJK_FONT_CANDIDATES", ())


def _demo_captions():
    tok = M2Tokenizer(DEMO / "tokenizer.model")
    texts = []
    for split in ("train", "validation", "test"):
        ds = ImageTextIndexedDataset(str(DEMO / split))
        for i in range(len(ds)):
            lo, hi = ds.sequence_range(i)
            for j in range(lo, hi):
                seq, mode = ds.sequence(j)
                if mode != MODE_IMAGE:
                    texts.append(caption_text(seq, tok))
    return texts


def test_bundled_font_is_shipped_as_package_data():
    assert FONT.is_file() and FONT.stat().st_size < 500_000
    licence = (FONT.parent / "LICENSE").read_text(encoding="utf-8")
    assert "SIL OPEN FONT LICENSE Version 1.1" in licence and FONT.name in licence
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    globs = [g.strip() for g in cfg["options.package_data"]["megatron_m2"].split(",")]
    package_dir = ROOT / "megatron_m2"
    for path in (FONT, FONT.parent / "LICENSE"):
        rel = path.relative_to(package_dir).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel
    font = ImageFont.truetype(str(FONT), 13)
    assert font.getname() == ("Noto Sans CJK SC", "Regular")


def test_bundled_font_covers_the_demo_captions(no_system_font):
    font, name = contact_sheet.find_cjk_font()
    texts = _demo_captions()
    chars = "".join(sorted(set("".join(texts))))
    han = [c for c in chars if "\u4e00" <= c <= "\u9fff"]
    assert len(texts) > 3000 and len(han) > 1000  # both languages of all three splits decoded
    assert font.missing(chars) == ""
    # ASCII, the ellipsis cut lines end with, and common Chinese punctuation.
    assert font.missing("".join(map(chr, range(0x20, 0x7F))) + "…，。、：；！？（）《》“”") == ""
    # The check itself sees a missing glyph: these are not in the subset.
    assert font.missing("鬱齉 a") == "鬱齉"


def test_find_cjk_font_order(no_system_font, monkeypatch, caplog):
    # No system font: the bundled subset, without the "no CJK font" warning.
    with caplog.at_level("WARNING", logger=contact_sheet.__name__):
        font, name = contact_sheet.find_cjk_font(20)
    assert name == "Noto Sans CJK SC Regular (bundled demo subset)" and font.size == 20
    assert caplog.text == ""
    # A system font comes first (the bundled file stands in for one).
    monkeypatch.setattr(contact_sheet, "CJK_FONT_CANDIDATES", ((str(FONT), 0),))
    font, name = contact_sheet.find_cjk_font()
    assert name == "Noto Sans CJK SC Regular" and not hasattr(font, "missing")
    # An explicit path comes before everything.
    font, name = contact_sheet.find_cjk_font(path=str(FONT))
    assert name == "Noto Sans CJK SC Regular"
    # Neither a system nor the bundled font: Pillow's default, with the warning.
    monkeypatch.setattr(contact_sheet, "CJK_FONT_CANDIDATES", ())
    monkeypatch.setattr(contact_sheet, "BUNDLED_CJK_FONT", os.devnull + ".missing")
    with caplog.at_level("WARNING", logger=contact_sheet.__name__):
        _, name = contact_sheet.find_cjk_font()
    assert name.startswith("Pillow default") and "no CJK font found" in caplog.text


def test_bundled_font_draws_chinese_and_warns_once_about_missing_glyphs(no_system_font, caplog):
    font, _ = contact_sheet.find_cjk_font()
    notdef = ImageFont.FreeTypeFont(str(FONT), font.size)

    def draw(text, f=font):
        im = Image.new("L", (200, 30))
        ImageDraw.Draw(im).text((2, 2), text, fill=255, font=f)
        return im.tobytes()

    with caplog.at_level("WARNING", logger=contact_sheet.__name__):
        # Two different demo characters draw differently (not both as the .notdef box).
        assert draw("表") != draw("情") and draw("表") != draw("\ue000", notdef)
        assert caplog.text == ""
        draw("鬱的表情符号")
        draw("齉的表情符号")
    assert caplog.text.count("has no glyph") == 1 and "'鬱'" in caplog.text
