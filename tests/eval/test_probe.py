"""The counting / spatial-relations probe (``megatron_m2.eval.probe``, ``m2-eval --task probe``).

Built from the bundled emoji demo set; the scorer is checked with fake encoders (one that sees
the truth, one that sees nothing) and end to end with a tiny random ``M2Encoder``.
"""

import dataclasses
import json
import zlib

import numpy as np
import pytest
import torch

from megatron_m2.eval import probe as P
from tests.helpers.tools import ROOT, load_tool

DEMO = ROOT / "data" / "emoji_demo"
PREFIX = str(DEMO / "validation")
TOKENIZER = DEMO / "tokenizer.model"
ITEMS = 12
SAMPLES = 80


def _build(seed=0, items=ITEMS, **kw):
    return P.build_probe(PREFIX, TOKENIZER, items=items, seed=seed, max_samples=SAMPLES, **kw)


@pytest.fixture(scope="module")
def probe():
    return _build()


def test_templates_are_the_demo_tools():
    tool = load_tool("make_demo_dataset")
    assert {k: tuple(v) for k, v in tool.TEMPLATES.items()} == P.DEMO_TEMPLATES


def test_parse_name():
    assert P.parse_name("an emoji of red heart", "en") == "red heart"
    assert P.parse_name("a picture of Israel flag", "en") == "Israel flag"
    assert P.parse_name("koala", "en") == "koala"  # the bare template
    assert P.parse_name("一个清酒的图标", "zh") == "清酒"
    assert P.parse_name("以色列旗帜的表情符号", "zh") == "以色列旗帜"
    assert P.parse_name("   ", "en") is None


def test_names_recovered_from_the_demo(probe):
    assert sum(probe.skipped.values()) == 0 and len(probe.emoji) == SAMPLES
    for e in probe.emoji:
        assert set(e.names) == {"en", "zh"} and all(e.names.values())
        assert not e.names["en"].startswith(("an emoji of ", "a picture of ", "an icon of "))
        assert not e.names["zh"].endswith(("的表情符号", "的图标", "的图片"))


def _same(a, b):
    return (a.items == b.items and [e.sample for e in a.emoji] == [e.sample for e in b.emoji]
            and all(a.image(x).tobytes() == b.image(y).tobytes()
                    for k in a.items for x, y in zip(a.items[k], b.items[k])))


def test_deterministic_per_seed(probe):
    assert _same(probe, _build(seed=0))
    other = _build(seed=1)
    for kind in P.KINDS:
        assert other.items[kind] != probe.items[kind]
    # item i of a kind does not depend on how many items are drawn
    small = _build(items=4)
    assert all(small.items[k] == probe.items[k][:4] for k in P.KINDS)


def _check_boxes(item, size):
    for i, a in enumerate(item.boxes):
        assert 0 <= a[0] < a[2] <= size and 0 <= a[1] < a[3] <= size
        for b in item.boxes[i + 1:]:
            assert (a[0] >= b[2] + P.GAP or b[0] >= a[2] + P.GAP or a[1] >= b[3] + P.GAP
                    or b[1] >= a[3] + P.GAP), (a, b)


def _check_drawn(probe, item, fg):
    """Every box shows its emoji; nothing is drawn outside the boxes."""
    canvas = np.asarray(probe.image(item))
    inside = np.zeros_like(fg)
    for e, (x0, y0, x1, y1) in zip(item.emoji, item.boxes):
        m = np.asarray(probe.emoji[e].mask) > 0
        assert np.array_equal(canvas[y0:y1, x0:x1][m], np.asarray(probe.emoji[e].sprite)[m])
        inside[y0:y1, x0:x1] = True
    assert not (fg & ~inside).any()


def test_counting_images_match_captions(probe):
    items = probe.items["counting"]
    assert [it.count for it in items] == [1 + i % 4 for i in range(ITEMS)]
    for item in items:
        n = item.count
        assert len(item.emoji) == len(item.boxes) == n and len(set(item.emoji)) == 1
        _check_boxes(item, probe.canvas_size)
        fg = P.foreground_mask(probe.image(item))
        _check_drawn(probe, item, fg)
        # the count a viewer sees: separate blobs on the canvas
        assert P.count_blobs(fg) == n
        name = probe.emoji[item.emoji[0]].names
        en, zh = P.COUNT_WORDS["en"][n - 1], P.COUNT_WORDS["zh"][n - 1]
        assert item.candidates["en"][item.answer] == f"{en} {name['en']} emoji"
        assert item.candidates["zh"][item.answer] == f"{zh}个{name['zh']}的表情符号"
        assert len(set(item.candidates["en"])) == len(set(item.candidates["zh"])) == 4


def test_relation_images_match_captions(probe):
    items = probe.items["relations"]
    assert [it.relation for it in items] == ["left", "above"] * (ITEMS // 2)
    assert [it.answer for it in items] == [0, 0, 1, 1] * (ITEMS // 4)
    for item in items:
        a, b = item.emoji
        assert a != b
        _check_boxes(item, probe.canvas_size)
        fg = P.foreground_mask(probe.image(item))
        _check_drawn(probe, item, fg)
        ys, xs = np.nonzero(fg)
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = item.boxes
        in_a = (xs >= ax0) & (xs < ax1) & (ys >= ay0) & (ys < ay1)
        # the first emoji's pixels lie left of (above) every pixel of the second
        if item.relation == "left":
            assert xs[in_a].max() < xs[~in_a].min()
            words = ("to the left of", "的左边")
        else:
            assert ys[in_a].max() < ys[~in_a].min()
            words = ("above", "的上面")
        na, nb = probe.emoji[a].names, probe.emoji[b].names
        assert item.candidates["en"][item.answer] == f"{na['en']} {words[0]} {nb['en']}"
        assert item.candidates["zh"][item.answer] == f"{na['zh']}在{nb['zh']}{words[1]}"
        assert item.candidates["en"][1 - item.answer] == f"{nb['en']} {words[0]} {na['en']}"


# -- scoring with fake encoders -----------------------------------------------------------------
class _Fake:
    embed_dim = 64

    def transform(self, image):
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def encode_image(self, pixels):
        return torch.nn.functional.normalize(torch.stack([self.see(p) for p in pixels]), dim=-1)

    def encode_text(self, texts):
        return torch.nn.functional.normalize(torch.stack([self.read(t) for t in texts]), dim=-1)


class _Counter(_Fake):
    """Counts the blobs in the image; reads the number word of the caption."""

    def see(self, pixels):
        from PIL import Image

        n = P.count_blobs(P.foreground_mask(Image.fromarray(pixels.permute(1, 2, 0).numpy())))
        return torch.nn.functional.one_hot(torch.tensor(n), self.embed_dim).float()

    def read(self, text):
        n = next(i + 1 for i in range(4) if text.startswith((P.COUNT_WORDS["en"][i] + " ",
                                                             P.COUNT_WORDS["zh"][i] + "个")))
        return torch.nn.functional.one_hot(torch.tensor(n), self.embed_dim).float()


def _vec(text, dim=_Fake.embed_dim):
    return torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(text.encode())))


class _Oracle(_Fake):
    """Knows each image's right captions (by its pixels) and embeds it as their sum."""

    def __init__(self, probe):
        self.truth = {}
        for items in probe.items.values():
            for item in items:
                key = probe.image(item).tobytes()
                self.truth[key] = sum(_vec(item.candidates[lang][item.answer])
                                      for lang in probe.languages)

    def see(self, pixels):
        return self.truth[pixels.permute(1, 2, 0).numpy().tobytes()]

    def read(self, text):
        return _vec(text)


class _Constant(_Fake):
    def see(self, pixels):
        return torch.ones(self.embed_dim)

    def read(self, text):
        return torch.ones(self.embed_dim)


def _only(probe, kind):
    return dataclasses.replace(probe, items={kind: probe.items[kind]})


def _accuracies(results):
    return {(k, lang): m["accuracy"] for k, r in results.items() for lang, m in r.items()}


def test_encoder_that_sees_the_truth_scores_100(probe):
    counting = P.evaluate_probe(_Counter(), _only(probe, "counting"), batch_size=5)
    oracle = P.evaluate_probe(_Oracle(probe), probe, batch_size=5)
    for res in (counting, oracle):
        assert set(_accuracies(res).values()) == {100.0}
    assert oracle["counting"]["zh"] == {"accuracy": 100.0, "correct": ITEMS, "items": ITEMS,
                                        "candidates": 4, "chance": 25.0}
    assert oracle["relations"]["en"]["chance"] == 50.0


def test_constant_encoder_scores_chance(probe):
    res = P.evaluate_probe(_Constant(), probe)
    assert _accuracies(res) == {("counting", "en"): 25.0, ("counting", "zh"): 25.0,
                                ("relations", "en"): 50.0, ("relations", "zh"): 50.0}


def test_tie_rule():
    assert P._credit(torch.tensor([0.1, 0.5, 0.5, 0.2]), 1) == 0.5
    assert P._credit(torch.tensor([0.1, 0.5, 0.5, 0.2]), 0) == 0.0
    assert P._credit(torch.tensor([0.9, 0.5]), 0) == 1.0


def test_shards_add_up(probe):
    """Each shard scores its part; summed (what all_reduce does) they give the whole."""
    enc = _Oracle(probe)

    class _Half(_Oracle):  # right on even-count / some items only: a non-trivial figure
        def see(self, pixels):
            v = super().see(pixels)
            return v if int(pixels.sum()) % 2 else -v

    half = _Half.__new__(_Half)
    half.truth = enc.truth
    whole = P.evaluate_probe(half, probe, batch_size=4)
    parts = [P.evaluate_probe(half, probe, shard=(i, 3), batch_size=4) for i in range(3)]
    for kind in P.KINDS:
        for lang in ("en", "zh"):
            total = sum(p[kind][lang]["correct"] for p in parts)
            assert total == pytest.approx(whole[kind][lang]["correct"])
            assert all(p[kind][lang]["items"] == ITEMS for p in parts)


def test_build_errors():
    with pytest.raises(ValueError, match="probe language"):
        _build(languages=("fr",))
    with pytest.raises(ValueError, match="canvas"):
        _build(canvas_size=80, kinds=("relations",))
    with pytest.raises(ValueError, match="canvas"):
        _build(canvas_size=40, kinds=("counting",))


# -- m2-eval end to end -------------------------------------------------------------------------
def test_m2_eval_parser_needs_data():
    from megatron_m2.cli import evaluate

    args = evaluate.build_parser().parse_args(["--load", "x", "--task", "probe"])
    assert "--data" in evaluate._validate(args)
    args = evaluate.build_parser().parse_args(["--load", "x", "--task", "probe", "--data", "d",
                                               "--probe-items", "0"])
    assert "--probe-items" in evaluate._validate(args)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from megatron_m2.checkpoint import from_official, save_single_file
    from tests.model.test_official import random_official
    from tests.test_inference import _cfg

    cfg = _cfg()
    path = tmp_path_factory.mktemp("probe") / "model.safetensors"
    state = from_official(random_official(cfg, seed=11), cfg)
    save_single_file(str(path), state, cfg, tokenizer_bytes=TOKENIZER.read_bytes())
    return path


@pytest.mark.slow
def test_m2_eval_probe(tiny_model):
    from tests.test_inference import _m2_eval

    common = ("--load", str(tiny_model), "--task", "probe", "--data", PREFIX,
              "--probe-items", "8", "--max-samples", "40", "--seed", "3", "--no-progress",
              "--batch-size", "16")
    proc = _m2_eval(*common, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["task"] == "probe" and record["probe"]["seed"] == 3
    res = record["results"]
    assert set(res) == {"counting", "relations"}
    for kind, chance in (("counting", 25.0), ("relations", 50.0)):
        assert set(res[kind]) == {"en", "zh"}
        for m in res[kind].values():
            assert m["items"] == 8 and m["chance"] == chance
            assert 0.0 <= m["accuracy"] <= 100.0
            assert m["accuracy"] == pytest.approx(100.0 * m["correct"] / 8)
    table = _m2_eval(*common)
    assert table.returncode == 0, table.stderr[-3000:]
    lines = table.stdout.strip().splitlines()
    assert lines[0].startswith("probe on ") and "counting" in lines[1]
    assert lines[-2].split() == ["chance", "25.00", "50.00"]
    assert lines[-1].split() == ["items", "8", "8"]
    en = lines[2].split()
    assert en[0] == "en" and float(en[1]) == pytest.approx(res["counting"]["en"]["accuracy"],
                                                           abs=0.005)
