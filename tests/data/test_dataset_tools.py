"""m2-merge-datasets and m2-inspect-dataset: exact concatenation, refusals, statistics, sheet."""

import io
import json
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from megatron_m2.cli import inspect_dataset, merge_datasets
from megatron_m2.data import contact_sheet
from megatron_m2.data.indexed import ImageTextIndexedDataset, ImageTextWriter
from megatron_m2.data.tokenizer import M2Tokenizer

EN = ["a photo of a cat", "a red car on the road", "two dogs playing", "the city at night"]
ZH = ["一只猫的照片", "路上的一辆红色汽车", "两只狗在玩耍", "夜晚的城市", "山和湖"]


def _image(rng: np.random.Generator, fmt: str) -> bytes:
    w, h = (int(v) for v in rng.integers(8, 48, size=2))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _build(prefix, tok: M2Tokenizer, n: int, seed: int):
    """Write ``n`` samples (1-3 captions, en and zh, PNG and JPEG); return them as written."""
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    samples = []
    with ImageTextWriter(str(prefix)) as w:
        for i in range(n):
            caps = [("en", pick.choice(EN)), ("zh", pick.choice(ZH))][: 1 + i % 2]
            if i % 3 == 2:
                caps.append(("zh", pick.choice(ZH) + " " + pick.choice(ZH)))
            framed = [(lang, tok.frame(tok.encode(t), max_length=1 << 20)) for lang, t in caps]
            image = _image(rng, "PNG" if i % 2 else "JPEG")
            w.add_sample(image, framed)
            samples.append((image, framed))
    return samples


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tokenizer_model):
    d = tmp_path_factory.mktemp("tools")
    tok = M2Tokenizer(tokenizer_model)
    a = _build(d / "a", tok, 7, seed=1)
    b = _build(d / "b", tok, 5, seed=2)
    return d, a + b


def _assert_equal(prefix, expected):
    ds = ImageTextIndexedDataset(str(prefix))
    assert len(ds) == len(expected)
    for i, (image, caps) in enumerate(expected):
        s = ds[i]
        assert s.image == image
        assert [(lang, ids.tolist()) for lang, ids in s.captions] == caps


def test_merge_is_the_concatenation(datasets, capsys):
    d, expected = datasets
    out = d / "merged" / "ab"
    assert merge_datasets.main(["--input", str(d / "a"), str(d / "b"),
                                "--output-prefix", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"inputs": 2, "samples": 12, "output": str(out)}
    _assert_equal(out, expected)
    assert not list((d / "merged").glob("*.tmp"))


def test_merge_refusals(datasets, tmp_path, capsys):
    d, _ = datasets
    a, b = str(d / "a"), str(d / "b")

    def run(*argv):
        rc = merge_datasets.main(list(argv))
        return rc, capsys.readouterr().err

    rc, err = run("--input", a, str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "o"))
    assert rc == 2 and "nope" in err and "missing" in err
    assert not list(tmp_path.glob("o.*"))  # validated before anything was written

    before = (d / "a.bin").read_bytes()
    for force in ([], ["--force"]):
        rc, err = run("--input", a, b, "--output-prefix", a, *force)
        assert rc == 2 and "refusing to overwrite an input" in err
    assert (d / "a.bin").read_bytes() == before

    out = tmp_path / "out"
    shutil.copy(d / "b.bin", str(out) + ".bin")
    shutil.copy(d / "b.idx", str(out) + ".idx")
    rc, err = run("--input", a, "--output-prefix", str(out))
    assert rc == 2 and "--force" in err
    assert run("--input", a, "--output-prefix", str(out), "--force")[0] == 0
    assert len(ImageTextIndexedDataset(str(out))) == 7

    # Not our format: a text-only (no modes) index and a truncated data file.
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    text = tmp_path / "text"
    builder = IndexedDatasetBuilder(str(text) + ".bin", dtype=np.int32)
    builder.add_item(torch.tensor([1, 2, 3], dtype=torch.int32))
    builder.end_document()
    builder.finalize(str(text) + ".idx")
    rc, err = run("--input", a, str(text), "--output-prefix", str(tmp_path / "o"))
    assert rc == 2 and str(text) in err and "text-only" in err
    trunc = tmp_path / "trunc"
    shutil.copy(d / "a.idx", str(trunc) + ".idx")
    (tmp_path / "trunc.bin").write_bytes(before[:-4])
    rc, err = run("--input", str(trunc), "--output-prefix", str(tmp_path / "o"))
    assert rc == 2 and str(trunc) in err and "bytes" in err


def test_inspect_json_counts(datasets, capsys):
    d, expected = datasets
    prefix = d / "a"
    assert inspect_dataset.main(["--input", str(prefix), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    samples = expected[:7]
    caps = [c for _, cs in samples for c in cs]
    assert stats["samples"] == 7 and stats["captions"] == len(caps)
    assert stats["files"] == {"bin_bytes": (d / "a.bin").stat().st_size,
                              "idx_bytes": (d / "a.idx").stat().st_size}
    for lang in ("en", "zh"):
        lengths = np.array([len(ids) for la, ids in caps if la == lang])
        assert stats["captions_per_language"][lang] == lengths.size
        assert stats["samples_with_language"][lang] == sum(
            any(la == lang for la, _ in cs) for _, cs in samples)
        t = stats["caption_tokens"][lang]
        assert (t["min"], t["max"]) == (lengths.min(), lengths.max())
        assert t["mean"] == pytest.approx(lengths.mean(), abs=1e-3)
        assert t["p50"] == pytest.approx(np.percentile(lengths, 50))
        assert t["p95"] == pytest.approx(np.percentile(lengths, 95))
        assert t["over_max_length"] == 0
    per_sample = {}
    for _, cs in samples:
        per_sample[str(len(cs))] = per_sample.get(str(len(cs)), 0) + 1
    assert stats["captions_per_sample"] == per_sample
    im = stats["images"]
    sizes = np.array([len(img) for img, _ in samples])
    assert (im["count"], im["bytes"]["max"], im["bytes"]["total"]) == (7, sizes.max(),
                                                                       sizes.sum())
    dims = [Image.open(io.BytesIO(img)).size for img, _ in samples]
    assert im["decoded_sample"] == 7 and im["undecodable"] == 0 and im["corrupt_sequences"] == 0
    assert im["width"]["max"] == max(w for w, _ in dims)
    assert im["height"]["min"] == min(h for _, h in dims)
    assert im["formats"] == {"JPEG": 4, "PNG": 3}
    # The table mode prints the same numbers in words.
    assert inspect_dataset.main(["--input", str(prefix)]) == 0
    table = capsys.readouterr().out
    assert "samples            7" in table and "formats          JPEG 4, PNG 3" in table
    assert inspect_dataset.main(["--input", str(d / "missing")]) == 2


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_contact_sheet(datasets, tokenizer_model, tmp_path, with_tokenizer, capsys):
    d, _ = datasets
    out = tmp_path / "sheet.png"
    argv = ["--input", str(d / "a"), "--contact-sheet", str(out), "--samples", "5",
            "--seed", "3", "--json"]
    if with_tokenizer:
        argv += ["--tokenizer-model", tokenizer_model]
    assert inspect_dataset.main(argv) == 0
    sheet = json.loads(capsys.readouterr().out)["contact_sheet"]
    assert len(sheet["samples"]) == 5 and sheet["samples"] == sorted(set(sheet["samples"]))
    width, height = contact_sheet.sheet_size(5, contact_sheet.COLUMNS)
    assert (sheet["width"], sheet["height"]) == (width, height)
    assert width == 4 * contact_sheet.TILE_WIDTH + 5 * contact_sheet.GAP
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (width, height)
        pixels = np.asarray(im.convert("RGB"))
    # Not blank: images (random noise) and text put many distinct colours on the sheet.
    rgb = pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)
    assert pixels.std() > 20 and np.unique(rgb).size > 1000
    # Same seed, same samples.
    assert inspect_dataset.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["contact_sheet"]["samples"] == sheet["samples"]


def test_caption_layout_fits_the_tile(tokenizer_model):
    font, _ = contact_sheet.find_cjk_font()
    tok = M2Tokenizer(tokenizer_model)
    width = contact_sheet.TILE_WIDTH - 2 * contact_sheet.PAD
    long_zh = tok.frame(tok.encode("一只猫的照片" * 20), max_length=1 << 20)
    caps = [("en", tok.frame(tok.encode("two dogs playing " * 10), max_length=1 << 20)),
            ("zh", long_zh)] + [("zh", tok.frame(tok.encode("山和湖")))] * 8
    layout = contact_sheet._layout_captions(caps, font, width, tok)
    assert sum(len(lines) for _, _, lines in layout) == contact_sheet.TEXT_LINES - 1
    assert layout[-1] == (None, 0, ["+4 more captions"])
    for lang, indent, lines in layout[:-1]:
        for line in lines:
            assert contact_sheet.text_width(font, line) <= width - indent
    assert layout[0][2][-1].endswith("…")


def test_contact_sheet_without_cjk_font(datasets, tokenizer_model, tmp_path, monkeypatch, caplog):
    d, _ = datasets
    monkeypatch.setattr(contact_sheet, "CJK_FONT_CANDIDATES", ())
    monkeypatch.setattr(contact_sheet, "BUNDLED_CJK_FONT", None)
    with caplog.at_level("WARNING", logger=contact_sheet.__name__):
        sheet = contact_sheet.contact_sheet(str(d / "b"), str(tmp_path / "s.png"),
                                              tokenizer_model=tokenizer_model, samples=2)
    assert sheet["font"].startswith("Pillow default")
    assert "no CJK font found" in caplog.text
    assert Image.open(tmp_path / "s.png").size == contact_sheet.sheet_size(2)
