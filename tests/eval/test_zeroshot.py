"""Zero-shot classification: bundled class names/templates, user files, template ensembling
against a hand computation, and exact top-k accuracy with constructed encoders."""

import collections
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_m2.eval import (
    build_classifier,
    evaluate_with_classifier,
    evaluate_zero_shot,
    load_classnames,
    load_templates,
    zero_shot_accuracy,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def assert_close(got, expected, atol=1e-6):
    """Max-abs-difference check (cheaper to import than torch.testing on a busy machine)."""
    expected = torch.as_tensor(expected, dtype=got.dtype)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    diff = (got - expected).abs().max().item() if got.numel() else 0.0
    assert diff <= atol, f"max |difference| {diff} > {atol}"


def dups(items):
    where = collections.defaultdict(list)
    for i, x in enumerate(items):
        where[x].append(i)
    return {k: v for k, v in where.items() if len(v) > 1}


# -- bundled data -------------------------------------------------------------------------------
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_bundled_counts(lang):
    assert len(load_classnames("imagenet1k", lang)) == 1000
    assert len(load_templates(lang)) == 80
    assert len(load_classnames("fashion_mnist", lang)) == 10


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_bundled_entries_clean(lang):
    for items in (load_classnames("imagenet1k", lang), load_templates(lang),
                  load_classnames("fashion_mnist", lang)):
        assert all(isinstance(x, str) and x and x == x.strip() for x in items)
    for t in load_templates(lang):
        assert t.count("{c}") == 1, t
        assert "{" not in t.replace("{c}", "") and "}" not in t.replace("{c}", ""), t
    assert not dups(load_classnames("fashion_mnist", lang))


def test_bundled_known_duplicates():
    """The published lists' genuine duplicates, kept as is (see data/README.md)."""
    en, zh = load_classnames("imagenet1k", "en"), load_classnames("imagenet1k", "zh")
    assert dups(en) == {"missile": [657, 744], "sunglasses": [836, 837]}
    assert dups(zh) == {"太阳镜": [836, 837]}
    # Case-insensitive comparison finds nothing more.
    assert len({n.casefold() for n in en}) == 1000 - 2
    assert en[134] == "crane bird" and en[517] == "construction crane"
    assert dups(load_templates("en")) == {}
    assert dups(load_templates("zh")) == {"{c}的裁剪照片。": [9, 28], "{c}的涂鸦照。": [43, 74]}


def test_bundled_anchors():
    en, zh = load_classnames("imagenet", "en"), load_classnames("imagenet-1k", "cn")
    assert (en[0], en[1], en[999]) == ("tench", "goldfish", "toilet paper")
    assert (zh[0], zh[1], zh[999]) == ("丁鲷", "金鱼", "卫生纸")
    assert load_templates("en")[0] == "a bad photo of a {c}."
    assert load_templates("zh")[0] == "{c}的照片。"
    assert load_classnames("fashion-mnist", "en") == [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
        "Bag", "Ankle boot"]
    assert load_classnames("fashion_mnist", "zh")[:3] == ["T恤/上衣", "裤子", "套头衫"]


def test_unknown_language_and_list():
    with pytest.raises(ValueError, match="unknown language 'fr'"):
        load_classnames("imagenet1k", "fr")
    with pytest.raises(ValueError, match="unknown class-name list 'cifar10'"):
        load_classnames("cifar10")


# -- user files ---------------------------------------------------------------------------------
def test_user_text_file(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_text("red apple\r\ngreen pear  \nblue sky\n\n", encoding="utf-8")
    assert load_classnames(p) == ["red apple", "green pear", "blue sky"]
    p.write_text("苹果\n梨\n", encoding="utf-8")
    assert load_classnames(str(p), "zh") == ["苹果", "梨"]


def test_user_json_files(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(["a", "b"]), encoding="utf-8")
    assert load_classnames(p) == ["a", "b"]
    p.write_text(json.dumps({"en": ["a"], "cn": ["甲"]}, ensure_ascii=False), encoding="utf-8")
    assert load_classnames(p, "en") == ["a"] and load_classnames(p, "zh") == ["甲"]
    t = tmp_path / "t.json"
    t.write_text(json.dumps(["a {c}", "{c}!"]), encoding="utf-8")
    assert load_templates(path=t) == ["a {c}", "{c}!"]


def test_user_file_errors_name_file_and_line(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_text("a\nb\n\nc\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(str(p))}:3: empty class name"):
        load_classnames(p)
    p.write_bytes("a\nb\n".encode() + b"\xff\xfe oops\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(p))}:3: not valid UTF-8"):
        load_classnames(p)
    j = tmp_path / "c.json"
    j.write_text('[\n "a",\n "b"\n "c"\n]', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(str(j))}:4:2: invalid JSON"):
        load_classnames(j)
    j.write_text('["a", 3]', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(str(j))}: class name #1 is int"):
        load_classnames(j)
    j.write_text('{"en": ["a"]}', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(str(j))}: JSON object has no list "
                       r"for language 'zh'"):
        load_classnames(j, "zh")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_classnames(tmp_path / "missing.txt")
    t = tmp_path / "templates.txt"
    t.write_text("a photo of {c}\na photo of c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(str(t))}:2: template 'a photo of c' "
                       r"has no \{c\}"):
        load_templates(path=t)


# -- ensembling ---------------------------------------------------------------------------------
class TableEncoder:
    """Text encoder with a fixed embedding per prompt; records every call."""

    def __init__(self, table):
        self.table = {k: torch.tensor(v, dtype=torch.float32) for k, v in table.items()}
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return torch.stack([self.table[t] for t in texts])


def test_ensemble_matches_hand_computation():
    # Class "cat": prompts e0, e0, e1 -> mean (2/3, 1/3, 0) -> (2, 1, 0)/sqrt(5).
    # Class "dog": prompts e2, (0, 0.6, 0.8), e2 -> mean (0, 0.2, 0.9333) -> (0, 3, 14)/sqrt(205).
    # Encoder rows are unnormalised (x2, x5, ...): each row is normalised before averaging.
    table = {"a cat": [2, 0, 0], "the cat": [5, 0, 0], "cat!": [0, 3, 0],
             "a dog": [0, 0, 1], "the dog": [0, 0.6, 0.8], "dog!": [0, 0, 7]}
    enc = TableEncoder(table)
    w = build_classifier(enc, ["cat", "dog"], ["a {c}", "the {c}", "{c}!"], batch_size=4,
                         progress=False)
    expected = torch.tensor([[2 / math.sqrt(5), 1 / math.sqrt(5), 0],
                             [0, 3 / math.sqrt(205), 14 / math.sqrt(205)]])
    assert w.dtype == torch.float32 and w.shape == (2, 3)
    assert_close(w, expected)
    # Prompts class-major, template-minor, in batches of at most 4.
    assert enc.calls == [["a cat", "the cat", "cat!", "a dog"], ["the dog", "dog!"]]


@pytest.mark.parametrize("batch_size", [1, 3, 7, 1000])
def test_ensemble_independent_of_batch_size(batch_size):
    g = torch.Generator().manual_seed(0)
    names = [f"class{i}" for i in range(7)]
    templates = ["{c}", "a {c}", "the {c} here"]
    table = {t.replace("{c}", n): torch.randn(5, generator=g).tolist()
             for n in names for t in templates}
    ref = build_classifier(TableEncoder(table), names, templates, batch_size=1000,
                           progress=False)
    enc = TableEncoder(table)
    w = build_classifier(enc, names, templates, batch_size=batch_size, progress=False)
    assert_close(w, ref)
    assert len(enc.calls) == math.ceil(21 / batch_size)
    assert all(len(c) <= batch_size for c in enc.calls)
    # By hand: normalise every prompt embedding, mean per class, normalise.
    manual = torch.stack([F.normalize(torch.stack([F.normalize(torch.tensor(
        table[t.replace("{c}", n)]), dim=0) for t in templates]).mean(0), dim=0) for n in names])
    assert_close(w, manual)


def test_single_template_is_bare_names():
    table = {"a": [0.5, 0.5, 0.5, 0.5], "b": [1.0, 0, 0, 0]}
    for templates in ("{c}", ["{c}"]):
        enc = TableEncoder(table)
        w = build_classifier(enc, ["a", "b"], templates, progress=False)
        assert enc.calls == [["a", "b"]]
        assert_close(w, torch.tensor([[0.5] * 4, [1.0, 0, 0, 0]]))


def test_ensemble_accepts_numpy_and_reports_bad_output():
    def np_enc(texts):
        return np.ones((len(texts), 4), dtype=np.float64)

    w = build_classifier(np_enc, ["a", "b"], "{c}", progress=False)
    assert_close(w, torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match=r"expected \[2, D\]"):
        build_classifier(lambda t: torch.ones(3, 4), ["a", "b"], progress=False)
    with pytest.raises(ValueError, match="zero or non-finite embedding for 'b'"):
        build_classifier(lambda t: torch.tensor([[1.0, 0], [0, 0]]), ["a", "b"],
                         progress=False)
    with pytest.raises(ValueError, match="has no {c} placeholder"):
        build_classifier(np_enc, ["a"], ["a photo"], progress=False)
    with pytest.raises(ValueError, match="class name #1 is empty"):
        build_classifier(np_enc, ["a", " "], progress=False)


def test_bundled_templates_with_hash_encoder():
    """80 templates x 10 classes through a deterministic string-hash encoder."""
    def enc(texts):
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(map(ord, t)) * 7919 + len(t))
            out.append(torch.randn(16, generator=g))
        return F.normalize(torch.stack(out), dim=1)

    calls = []
    names = load_classnames("fashion_mnist", "zh")
    templates = load_templates("zh")
    w = build_classifier(lambda t: calls.append(len(t)) or enc(t), names, templates,
                         batch_size=128, progress=False)
    assert w.shape == (10, 16)
    assert_close(w.norm(dim=1), torch.ones(10))
    assert calls == [128] * 6 + [800 - 768]


# -- accuracy -----------------------------------------------------------------------------------
def one_hot_text_encoder(names, dim):
    """Prompt for class i -> e_i (whatever the template): the class weights are the identity."""
    index = {n: i for i, n in enumerate(names)}

    def enc(texts):
        rows = torch.zeros(len(texts), dim)
        for r, t in enumerate(texts):
            rows[r, index[t.split("|")[-1]]] = 1.0
        return rows
    return enc


def test_accuracy_exact_with_constructed_encoders():
    """Image embeddings are the class scores themselves; top-1/top-5 are known by hand."""
    names = [f"c{i}" for i in range(7)]
    scores = {  # image id -> (scores over the 7 classes, label)
        0: ([7, 6, 5, 4, 3, 2, 1], 0),   # rank 1: top-1 and top-5 hit
        1: ([7, 6, 5, 4, 3, 2, 1], 4),   # rank 5: top-5 hit only
        2: ([7, 6, 5, 4, 3, 2, 1], 5),   # rank 6: miss
        3: ([1, 2, 3, 4, 5, 6, 7], 6),   # rank 1
        4: ([1, 2, 3, 4, 5, 6, 7], 2),   # rank 5
        5: ([0, 0, 0, 0, 0, 0, 9], 1),   # tie among 0..5 -> lower index first: rank 3
        6: ([0, 0, 0, 0, 0, 0, 9], 5),   # tie: class 5 at rank 7: miss
        7: ([3, 3, 0, 0, 0, 0, 0], 1),   # tie between 0 and 1 -> class 0 first: rank 2
    }
    # top-1: images 0, 3 -> 2/8; top-5: images 0, 1, 3, 4, 5, 7 -> 6/8; top-2: 0, 3, 7 -> 3/8.
    emb = {i: torch.tensor(s, dtype=torch.float32) for i, (s, _) in scores.items()}

    def encode_image(ids):
        return torch.stack([emb[i] for i in ids])

    batches = [([0, 1, 2], [0, 4, 5]), ([3], torch.tensor([6])), ([4, 5, 6, 7], [2, 1, 5, 1])]
    got = evaluate_zero_shot(encode_image, one_hot_text_encoder(names, 7), batches, names,
                             templates=["x|{c}", "y|{c}"], ks=(1, 2, 5), progress=False)
    assert got == {"top1": 25.0, "top2": 37.5, "top5": 75.0}


def test_streamed_equals_zero_shot_accuracy():
    """Batch by batch gives zero_shot_accuracy's result on everything at once, ties included.

    Small-integer embeddings make every dot product exact whatever the block shapes, so exact
    ties (duplicate classes, duplicate images) must follow the same lower-index rule.
    """
    g = torch.Generator().manual_seed(1)
    n, c, d = 203, 11, 8
    classes = torch.randint(-2, 3, (c, d), generator=g).float()
    classes = torch.cat([classes, classes[:2]])  # classes 11, 12 tie exactly with 0, 1
    labels = torch.randint(0, c + 2, (n,), generator=g)
    img = classes[labels] + torch.randint(-2, 3, (n, d), generator=g).float()
    img[:20] = classes[3]
    expected = zero_shot_accuracy(img, classes, labels, ks=(1, 3, 5))
    cuts = [0, 1, 50, 51, 130, n]
    batches = [(img[a:b], labels[a:b]) for a, b in zip(cuts, cuts[1:])]
    for chunk_size in (3, 4096):
        got = evaluate_with_classifier(lambda x: x, batches, classes, ks=(1, 3, 5),
                                       chunk_size=chunk_size, progress=False)
        assert got == expected
    assert 0 < got["top1"] < got["top3"] < got["top5"] < 100


def test_accuracy_errors():
    w = torch.eye(3)
    with pytest.raises(ValueError, match=r"batch #1: labels outside \[0, 3\): \[3\]"):
        evaluate_with_classifier(lambda x: x, [(torch.eye(3), [0, 1, 2]),
                                               (torch.eye(3), [0, 3, 1])], w, progress=False)
    with pytest.raises(ValueError, match="at least one image"):
        evaluate_with_classifier(lambda x: x, [], w, progress=False)
    with pytest.raises(ValueError, match=r"returned \(2, 3\) for 3 labels"):
        evaluate_with_classifier(lambda x: x[:2], [(torch.eye(3), [0, 1, 2])], w,
                                 progress=False)


def test_progress_flag(capsys):
    batches = [(torch.eye(3), [0, 1, 2])]
    enc = one_hot_text_encoder(["a", "b", "c"], 3)
    evaluate_zero_shot(lambda x: x, enc, batches, ["a", "b", "c"], progress=False)
    assert capsys.readouterr().err == ""
    got = evaluate_zero_shot(lambda x: x, enc, batches, ["a", "b", "c"], progress=True)
    assert "zero-shot" in capsys.readouterr().err
    assert got == {"top1": 100.0, "top5": 100.0}
