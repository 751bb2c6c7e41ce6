"""Cross-lingual agreement, example queries and their picture (``m2-eval --task retrieval
--retrieval-examples``), on hand-built embeddings and a six-sample dataset.

The encoder is a stand-in: image j embeds as the unit vector e_j, and each caption as a vector
whose scores rank the images in an order written out below (``EN`` / ``ZH``), so every expected
figure is read off those orders by hand.
"""

import io
import json
import math
import types

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_m2.data import contact_sheet
from megatron_m2.eval import retrieval_examples as rx
from megatron_m2.eval.retrieval import (
    chance_cross_lingual,
    cross_lingual_agreement,
    format_cross_lingual,
    query_rankings,
)
from megatron_m2.eval.tasks import (
    ExampleQuery,
    evaluate_retrieval,
    example_samples,
    retrieval_report,
)
from tests.helpers.distributed import run_distributed

TOKENIZER = "data/emoji_demo/tokenizer.model"
COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180)]
"""Sample j's image: a 16x16 PNG of one colour."""
NAMES = ["red heart", "green apple", "yellow star", "blue whale", "orange", "purple grapes"]
NAMES_ZH = [None, "青苹果", "黄色星星", "蓝鲸", "橙子", "紫葡萄"]
"""Sample 0 has no Chinese caption: the Chinese gallery and the cross-lingual one are images
1..5, the English gallery images 0..5."""

# The order in which each sample's caption ranks the six images, best first.
EN = {0: [0, 5, 4, 3, 2, 1],
      1: [1, 2, 3, 4, 5, 0],
      2: [2, 1, 0, 3, 4, 5],
      3: [5, 4, 2, 1, 0, 3],   # its own image last: rank 6, outside the top 5
      4: [4, 5, 1, 2, 3, 0],
      5: [2, 4, 0, 5, 3, 1]}   # rank 4
ZH = {1: [1, 3, 2, 4, 5, 0],
      2: [1, 2, 3, 4, 5, 0],   # rank 2
      3: [3, 5, 4, 1, 2, 0],
      4: [4, 5, 1, 2, 3, 0],
      5: [1, 2, 3, 4, 5, 0]}   # rank 5


def _unit(deg):
    rad = math.radians(deg)
    return [math.cos(rad), math.sin(rad)]


# -- cross-lingual agreement on 2-D vectors -----------------------------------------------------
def test_cross_lingual_agreement_by_hand():
    """Images at 0°, 90°, 180°, 270°; images rank by the angle to the query.

    sample  en query  en order      zh query  zh order
    0       10°       I0 I1 I3 I2   20°       I0 I1 I3 I2
    1       100°      I1 I2 I0 I3   170°      I2 I1 I3 I0
    2       60°       I1 I0 I2 I3   120°      I1 I2 I0 I3
    3       280°      I3 I0 I2 I1   190°      I2 I3 I1 I0

    Top-1 agreement: samples 0 and 2 → 50 %. Top-2 overlap: 2, 2, 1, 1 of 2 → 75 %.
    Both right at 1: sample 0 only → 25 %; within 2: samples 0, 1, 3 → 75 %.
    Chance: 1/4 and 2/4. With k = 5 > 4 images every top-k is the whole gallery.
    """
    img = torch.tensor([_unit(0), _unit(90), _unit(180), _unit(270)])
    en = torch.tensor([_unit(10), _unit(100), _unit(60), _unit(280)])
    zh = torch.tensor([_unit(20), _unit(170), _unit(120), _unit(190)])
    expected = {"samples": 4, "top1_agreement": 50.0, "top2_overlap": 75.0, "both_r1": 25.0,
                "both_r2": 75.0, "chance_top1_agreement": 25.0, "chance_top2_overlap": 50.0}
    for chunk_size in (1, 3, 100):
        got = cross_lingual_agreement(img, en, zh, k=2, chunk_size=chunk_size)
        assert got == pytest.approx(expected) and list(got) == list(expected)
    got = cross_lingual_agreement(img, en, zh)
    assert got == pytest.approx({"samples": 4, "top1_agreement": 50.0, "top5_overlap": 100.0,
                                 "both_r1": 25.0, "both_r5": 100.0,
                                 "chance_top1_agreement": 25.0, "chance_top5_overlap": 100.0})
    # The same captions in both languages agree completely.
    same = cross_lingual_agreement(img, en, en.clone(), k=2)
    assert same["top1_agreement"] == same["top2_overlap"] == 100.0
    assert same["both_r1"] == 75.0  # samples 0, 1 and 3 rank their own image first in English
    table = format_cross_lingual(got)
    assert "top-1 agreement" in table and "25.00" in table and "top-5 overlap" in table


def test_chance_and_errors():
    assert chance_cross_lingual(174) == {"chance_top1_agreement": 100 / 174,
                                         "chance_top5_overlap": 500 / 174}
    assert chance_cross_lingual(3, k=5)["chance_top5_overlap"] == 100.0
    img = torch.eye(3)
    with pytest.raises(ValueError, match="one text row per image"):
        cross_lingual_agreement(img, img, img[:2])
    with pytest.raises(ValueError, match="targets"):
        query_rankings(img, img, torch.tensor([0, 1, 3]))


def test_query_rankings_match_a_full_sort():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(23, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    targets = torch.tensor([0, 5, 22, 7, 7, 13])
    order = torch.argsort(-(txt @ img.T), dim=1, stable=True)
    rank = (order == targets[:, None]).nonzero()[:, 1] + 1
    for chunk_size in (1, 4, 5, 100):
        top, got = query_rankings(txt, img, targets, k=5, chunk_size=chunk_size)
        assert torch.equal(top, order[:, :5]) and torch.equal(got, rank)


# -- the dataset and the stand-in encoder -------------------------------------------------------
def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tok():
    from megatron_m2.data.tokenizer import M2Tokenizer

    return M2Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tok):
    """``(prefix, {framed caption ids: image order})``."""
    from megatron_m2.data.indexed import ImageTextWriter

    prefix = str(tmp_path_factory.mktemp("examples") / "six")
    orders = {}
    with ImageTextWriter(prefix) as w:
        for j in range(6):
            caps = [("en", tok.frame(tok.encode(f"an emoji of {NAMES[j]}")))]
            orders[tuple(caps[0][1])] = EN[j]
            if NAMES_ZH[j]:
                caps.append(("zh", tok.frame(tok.encode(f"{NAMES_ZH[j]}的表情符号"))))
                orders[tuple(caps[1][1])] = ZH[j]
            w.add_sample(_png(COLOURS[j]), caps)
    assert len(orders) == 11  # every caption distinct
    return prefix, orders


class StandIn:
    """What the evaluation needs of an encoder (see :mod:`megatron_m2.eval.tasks`)."""

    embed_dim = 6

    def __init__(self, orders, tokenizer):
        self.orders, self.tokenizer = orders, tokenizer
        self.cfg = types.SimpleNamespace(max_text_len=32)

    def _need_tokenizer(self):
        pass

    def transform(self, im):
        return torch.tensor(float(COLOURS.index(im.convert("RGB").getpixel((0, 0)))))

    def encode_image(self, pixels):
        return torch.eye(6)[pixels.long()]

    def encode_tokens(self, framed):
        out = torch.zeros(len(framed), 6)
        for row, ids in enumerate(framed):
            for pos, image in enumerate(self.orders[tuple(ids)]):
                out[row, image] = 6.0 - pos
        return torch.nn.functional.normalize(out, dim=-1)


def _rank(order, sample, gallery):
    return [i for i in order if i in gallery].index(sample) + 1


def test_retrieval_report_by_hand(dataset, tok):
    prefix, orders = dataset
    enc = StandIn(orders, tok)
    report = retrieval_report(enc, prefix, example_queries=5, seed=3, top_k=2)
    # The recalls are evaluate_retrieval's, unchanged.
    assert report.results == evaluate_retrieval(enc, prefix)
    en, zh = report.results["en"], report.results["zh"]
    assert (en["images"], zh["images"]) == (6, 5)
    assert en["t2i_r1"] == pytest.approx(400 / 6) and en["t2i_r5"] == pytest.approx(500 / 6)
    assert zh["t2i_r1"] == 60.0 and zh["t2i_r5"] == 100.0
    # Samples 1..5 have both captions. Their orders among images 1..5, en | zh:
    # 1: 1 2 . | 1 3 .   2: 2 1 . | 1 2 .   3: 5 4 . | 3 5 .   4: 4 5 . | 4 5 .   5: 2 4 . | 1 2 .
    # top-1 agreement 1, 4 → 40 %; top-2 overlap (1+2+1+2+1)/10 → 70 %;
    # both right at 1: 1, 4 → 40 %; within 2: 1, 2, 4 → 60 %.
    assert report.cross_lingual.pop("languages") == ["en", "zh"]
    assert report.cross_lingual == pytest.approx({
        "samples": 5, "top1_agreement": 40.0, "top2_overlap": 70.0,
        "both_r1": 40.0, "both_r2": 60.0, "chance_top1_agreement": 20.0,
        "chance_top2_overlap": 40.0})
    # Five queries of the five samples with both captions, the same in both languages.
    for lang, order, gallery in (("en", EN, range(6)), ("zh", ZH, range(1, 6))):
        queries = report.examples[lang]
        assert [q.sample for q in queries] == [1, 2, 3, 4, 5]
        for q in queries:
            ranked = [i for i in order[q.sample] if i in gallery]
            assert q.top == ranked[:2] and q.rank == _rank(order[q.sample], q.sample, gallery)
            assert q.gallery == len(gallery)
            assert q.caption == next(ids.tolist() for lang_, ids in _captions(prefix, q.sample)
                                     if lang_ == lang)
    assert [q.rank for q in report.examples["en"]] == [1, 1, 6, 1, 4]
    assert [q.rank for q in report.examples["zh"]] == [1, 2, 1, 1, 5]
    # Top 5 (the default): with five images every top 5 is the whole gallery.
    five = retrieval_report(enc, prefix).cross_lingual
    assert five["top5_overlap"] == 100.0 and five["both_r5"] == 100.0
    assert five["chance_top5_overlap"] == 100.0 and five["top1_agreement"] == 40.0
    # English only: no cross-lingual figures.
    assert retrieval_report(enc, prefix, languages=["en"]).cross_lingual is None


def _captions(prefix, i):
    from megatron_m2.data.indexed import ImageTextIndexedDataset

    return ImageTextIndexedDataset(prefix)[i].captions


def test_example_samples_are_seeded_and_shared():
    langs_of = [["en"], ["en", "zh"], ["zh", "en"], ["en"], ["en", "zh"], ["zh"]]
    a = example_samples(langs_of, ["en", "zh"], 2, seed=5)
    assert a["en"] == a["zh"] and set(a["en"]) <= {1, 2, 4} and len(a["en"]) == 2
    assert a["en"] == sorted(a["en"]) and example_samples(langs_of, ["en", "zh"], 2, seed=5) == a
    assert {tuple(example_samples(langs_of, ["en", "zh"], 2, seed=s)["en"])
            for s in range(20)} == {(1, 2), (1, 4), (2, 4)}
    assert example_samples(langs_of, ["en", "zh"], 9)["zh"] == [1, 2, 4]
    # No sample has both: each language draws from its own.
    b = example_samples([["en"], ["zh"], ["en"]], ["en", "zh"], 5)
    assert b == {"en": [0, 2], "zh": [1]}


# -- the picture --------------------------------------------------------------------------------
def _pixel(pixels, xy, dx=1, dy=1):
    return tuple(int(v) for v in pixels[xy[1] + dy, xy[0] + dx])


def _check_picture(pixels, examples, langs, k):
    rows = [len(examples[lang]) for lang in langs]
    centre = rx.BORDER + rx.THUMB // 2
    for s, lang in enumerate(langs):
        for r, q in enumerate(examples[lang]):
            for c, i in enumerate(q.top):
                xy = rx.tile_origin(rows, s, r, c, k)
                frame = rx.CORRECT if i == q.sample else rx.OTHER
                # Every side of the frame, and the sample's own colour inside it.
                assert _pixel(pixels, xy) == frame, (lang, q.sample, c)
                assert _pixel(pixels, xy, rx.TILE - 2, rx.TILE - 2) == frame
                assert _pixel(pixels, xy, centre, centre) == COLOURS[i]
            xy = rx.tile_origin(rows, s, r, k, k)  # the answer column: the query's own image
            assert _pixel(pixels, xy) == rx.CORRECT
            assert _pixel(pixels, xy, centre, centre) == COLOURS[q.sample]
            # The rank line is red exactly when the own image is not in the top k.
            x0, y0 = rx.tile_origin(rows, s, r, 0, k)
            text = pixels[y0:y0 + rx.ROW_HEIGHT, rx.GAP:rx.GAP + rx.TEXT_WIDTH]
            red = (text == np.array(rx.MISSED, np.uint8)).all(axis=-1).any()
            assert red == (q.rank > k), (lang, q.sample, q.rank)


def test_picture_geometry_and_marks(dataset, tok, tmp_path):
    prefix, orders = dataset
    report = retrieval_report(StandIn(orders, tok), prefix, example_queries=5)
    out = tmp_path / "pic" / "examples.png"
    info = rx.render_retrieval_examples(prefix, report.examples, str(out), tokenizer=tok)
    rows, k = [5, 5], 5
    width, height = rx.picture_size(rows, k)
    assert width == rx.GAP + rx.TEXT_WIDTH + rx.GAP + 6 * (rx.TILE + rx.GAP) + rx.ANSWER_GAP
    assert height == (rx.HEADER_HEIGHT + 2 * (rx.SECTION_HEIGHT + 5 * (rx.ROW_HEIGHT + rx.GAP))
                      + rx.GAP)
    assert rx.TILE == rx.THUMB + 2 * rx.BORDER and rx.THUMB >= 96
    assert (info["width"], info["height"], info["top_k"]) == (width, height, k)
    assert info["samples"] == {"en": [1, 2, 3, 4, 5], "zh": [1, 2, 3, 4, 5]}
    assert info["ranks"] == {"en": [1, 1, 6, 1, 4], "zh": [1, 2, 1, 1, 5]}
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (width, height)
        pixels = np.asarray(im.convert("RGB"))
    _check_picture(pixels, report.examples, ["en", "zh"], k)


def test_picture_of_hand_made_queries_without_cjk_font(dataset, tmp_path, monkeypatch, caplog):
    """Precomputed queries, another k, one language, token ids for text, Pillow's font."""
    prefix, _ = dataset
    monkeypatch.setattr(contact_sheet, "CJK_FONT_CANDIDATES", ())
    monkeypatch.setattr(contact_sheet, "BUNDLED_CJK_FONT", None)
    examples = {"zh": [ExampleQuery(sample=2, caption=[5, 7, 3], top=[4, 2, 0], rank=2,
                                    gallery=6),
                       ExampleQuery(sample=5, caption=[5, 9, 3], top=[1, 0, 3], rank=4,
                                    gallery=6)],
                "en": []}
    out = tmp_path / "zh.png"
    with caplog.at_level("WARNING", logger=contact_sheet.__name__):
        info = rx.render_retrieval_examples(prefix, examples, str(out))
    assert info["font"].startswith("Pillow default") and "no CJK font found" in caplog.text
    assert info["samples"] == {"zh": [2, 5]} and info["top_k"] == 3
    with Image.open(out) as im:
        assert im.size == rx.picture_size([2], 3)
        pixels = np.asarray(im.convert("RGB"))
    _check_picture(pixels, examples, ["zh"], 3)
    with pytest.raises(ValueError, match="no example queries"):
        rx.render_retrieval_examples(prefix, {"en": []}, str(out))


# -- m2-eval ------------------------------------------------------------------------------------
def test_m2_eval_retrieval_examples(dataset, tok, tmp_path, monkeypatch, capsys):
    """The CLI end to end with the stand-in encoder in place of a checkpoint."""
    from megatron_m2.cli import evaluate
    from megatron_m2.inference import M2Encoder

    prefix, orders = dataset
    monkeypatch.setattr(M2Encoder, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: StandIn(orders, tok)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    pic, rec = tmp_path / "ex.png", tmp_path / "rec.json"
    argv = ["--load", str(tmp_path), "--task", "retrieval", "--data", prefix, "--device", "cpu",
            "--no-progress", "--retrieval-examples", str(pic), "--retrieval-examples-queries",
            "2", "--seed", "1"]
    assert evaluate.main(argv + ["--json", "--output", str(rec)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record == json.loads(rec.read_text())
    assert set(record["results"]) == {"en", "zh"}
    assert set(record["results"]["en"]) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
                                            "t2i_r10", "mean_recall", "images", "captions"}
    assert record["cross_lingual"].pop("languages") == ["en", "zh"]
    assert record["cross_lingual"] == pytest.approx({
        "samples": 5, "top1_agreement": 40.0,
        "top5_overlap": 100.0, "both_r1": 40.0, "both_r5": 100.0,
        "chance_top1_agreement": 20.0, "chance_top5_overlap": 100.0})
    ex = record["retrieval_examples"]
    chosen = example_samples([["en"]] + [["en", "zh"]] * 5, ["en", "zh"], 2, seed=1)["en"]
    assert ex["path"] == str(pic) and ex["samples"] == {"en": chosen, "zh": chosen}
    with Image.open(pic) as im:
        assert im.size == rx.picture_size([2, 2], 5) == (ex["width"], ex["height"])
    # The table output names the cross-lingual figures and the picture.
    assert evaluate.main(argv) == 0
    text = capsys.readouterr().out
    assert "cross-lingual" in text and "top-1 agreement" in text and "20.00" in text
    assert f"retrieval examples: {pic}" in text
    # The option belongs to retrieval.
    with pytest.raises(SystemExit):
        evaluate.main(["--load", str(tmp_path), "--task", "probe", "--data", prefix,
                       "--retrieval-examples", str(pic)])
    assert "--retrieval-examples goes with --task retrieval" in capsys.readouterr().err


# -- distributed --------------------------------------------------------------------------------
def _dist_report(prefix, orders):
    import torch.distributed as dist

    from megatron_m2.data.tokenizer import M2Tokenizer

    enc = StandIn(orders, M2Tokenizer(TOKENIZER))
    report = retrieval_report(enc, prefix, shard=(dist.get_rank(), 2), group=dist.group.WORLD,
                              example_queries=3, seed=2, top_k=2, chunk_size=2)
    return report.results, report.cross_lingual, report.examples


@pytest.mark.slow
def test_distributed_report_equals_single_process(dataset, tok):
    """Two gloo ranks: English splits 0-2 | 3-5, the cross-lingual samples 1-3 | 4-5, so a rank
    embeds captions of samples whose English caption the other rank scored."""
    prefix, orders = dataset
    single = retrieval_report(StandIn(orders, tok), prefix, example_queries=3, seed=2,
                              top_k=2)
    got = run_distributed(_dist_report, 2, prefix=prefix, orders=orders)
    for results, cross, examples in got:
        assert results == single.results and cross == single.cross_lingual
        assert examples == single.examples


def test_retrieval_table_has_the_chance_row_and_ratio():
    """One caption per image in every language: the chance row (R@k = k/N) and MR/chance; a
    gallery that differs between languages has no single chance row."""
    from megatron_m2.cli.evaluate import _table

    row = {"i2t_r1": 2.0, "i2t_r5": 10.0, "i2t_r10": 20.0, "t2i_r1": 4.0, "t2i_r5": 12.0,
           "t2i_r10": 24.0, "mean_recall": 12.0, "images": 100, "captions": 100}
    text = _table({"en": row, "zh": dict(row, mean_recall=6.0)}, "retrieval")
    chance = next(line for line in text.splitlines() if line.startswith("chance"))
    assert chance.split()[1:] == ["1.00", "5.00", "10.00", "1.00", "5.00", "10.00", "5.33"]
    assert text.splitlines()[-1] == "mean recall / chance: en 2.2x, zh 1.1x"
    text = _table({"en": row, "zh": dict(row, images=50, captions=50)}, "retrieval")
    assert "chance" not in text
