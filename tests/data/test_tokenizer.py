"""M2Tokenizer: official GLM framing, truncation, padding masks, and tokenizer training (+ CLI)."""

import io
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from megatron_m2.data.tokenizer import (
    M2Tokenizer,
    normalize_caption,
    read_caption_file,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[2]
GLM_MODEL = Path(__file__).resolve().parents[3] / "shared" / "assets" / "glm_sp.model"
GLM_IDS = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "glm_official_ids.jsonl"
SPECIALS = ("<|endoftext|>", "[SEP]", "[CLS]", "[MASK]", "[UNK]")


@pytest.fixture(scope="module")
def glm():
    if not GLM_MODEL.exists():
        pytest.skip(f"official GLM SentencePiece model not found at {GLM_MODEL} "
                    "(compatibility asset, not shipped with the project)")
    return M2Tokenizer(GLM_MODEL)


@pytest.fixture(scope="module")
def glm_normalized(glm):
    return M2Tokenizer(GLM_MODEL, text_style="normalized")


@pytest.fixture(scope="module")
def glm_sp(glm):
    return spm.SentencePieceProcessor(model_file=str(GLM_MODEL))


# ---------------------------------------------------------------------------------------------
# Official GLM model


def test_glm_specials(glm):
    assert glm.vocab_size == 115244
    assert (glm.cls_id, glm.eos_id, glm.pad_id) == (50002, 50000, 50000)
    assert (glm.sep_id, glm.mask_id) == (50001, 50003)
    assert glm.special_ids == {"<|endoftext|>": 50000, "[SEP]": 50001, "[CLS]": 50002,
                               "[MASK]": 50003, "[UNK]": 50004}
    assert glm.max_length == 52
    d = glm.to_dict()
    json.dumps(d)
    assert d["vocab_size"] == 115244 and d["cls_id"] == 50002 and len(d["sha256"]) == 64


def test_glm_official_ids_mixed(glm):
    ids, mask = glm("Hello 世界, a photo of a cat 一只猫")
    expected = [50002, 67074, 6571, 43359, 778, 51021, 885, 778, 52984, 15955, 44506, 50000]
    expected += [50000] * (52 - len(expected))
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (1, 52)
    assert ids[0].tolist() == expected
    assert mask[0].tolist() == [False] * 12 + [True] * 40


@pytest.mark.parametrize("text", [
    "一只可爱的小狗在草地上奔跑",                          # pure Chinese
    "A man riding a horse on the beach at sunset.",  # pure English
    "2024年3月15日, price 1234.56 元, 007",              # digits
    "你好，世界！“引号”（括号）…… ok?! [x] a-b/c",          # punctuation, full-width
])
def test_glm_matches_direct_sentencepiece(glm, glm_sp, text):
    pieces = glm_sp.encode(text)
    assert glm.encode(text) == pieces
    n = len(pieces) + 2
    assert n <= 52
    ids, mask = glm([text])
    assert ids[0].tolist() == [50002] + pieces + [50000] + [50000] * (52 - n)
    assert mask[0].tolist() == [False] * n + [True] * (52 - n)
    assert glm.frame(pieces) == [50002] + pieces + [50000]


def test_glm_batch_and_decode(glm):
    texts = ["a photo of a dog", "一张狗的照片", ""]
    ids, mask = glm(texts)
    assert ids.shape == (3, 52)
    assert (~mask).sum(1).tolist() == [len(glm.encode(t)) + 2 for t in texts]
    assert glm.decode(ids) == texts
    assert glm.decode(ids[1]) == "一张狗的照片"


def test_truncation_keeps_cls_and_final_eot(glm, glm_normalized, glm_sp):
    """Normalized style keeps the first pieces; official style (the release's
    ``truncation_side="left"``) the last ones. Both keep [CLS] and the final <|endoftext|>."""
    text = " ".join(["a very long caption about cats and 很多猫"] * 20) + " the end"
    pieces = glm_sp.encode(text)
    assert len(pieces) > 60
    for tok, kept in ((glm_normalized, lambda n: pieces[:n]), (glm, lambda n: pieces[-n:])):
        ids, mask = tok(text)
        assert ids[0].tolist() == [50002] + kept(50) + [50000]
        assert not mask.any()
        ids8, mask8 = tok(text, max_length=8)
        assert ids8[0].tolist() == [50002] + kept(6) + [50000]
        assert not mask8.any()
        assert tok.frame(pieces, max_length=5) == [50002] + kept(3) + [50000]
        # pre-tokenized, untruncated captions (indexed datasets) are cut the same way
        framed = tok.frame(pieces, max_length=1 << 20)
        assert tok.pad([framed], max_length=8)[0][0].tolist() == [50002] + kept(6) + [50000]


def test_official_ids_equal_the_release_tokenizer(glm):
    """Ids and attention masks of the release's GLMChineseTokenizer (transformers 4.17, called
    as the release calls it: padding to 52, truncation) for 32 strings: whitespace runs,
    combining marks, full-width forms, emoji, literal special tokens, over-long captions.
    Checked on both paths: raw text, and untruncated framing then padding (preprocessing)."""
    if not GLM_IDS.exists():
        pytest.skip(f"release token-id fixture not found at {GLM_IDS}")
    rows = [json.loads(line) for line in GLM_IDS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 32
    assert glm.text_style == "official"  # the default for the release's model
    ids, pad = glm([r["text"] for r in rows])
    framed_ids, framed_pad = glm.pad([glm.frame(glm.encode(r["text"]), max_length=1 << 30)
                                      for r in rows])
    for i, r in enumerate(rows):
        assert ids[i].tolist() == r["input_ids"], r["text"]
        assert (~pad[i]).int().tolist() == r["attention_mask"], r["text"]
        assert framed_ids[i].tolist() == r["input_ids"], r["text"]
        assert torch.equal(framed_pad[i], pad[i])


def test_normalized_style_on_the_release_model(glm_normalized, glm_sp):
    """The normalized style is today's behaviour: NFC + collapsed whitespace, then plain
    SentencePiece; it differs from the release on whitespace runs and literal specials."""
    text = "  two   spaces  [MASK] cafe\u0301 "
    assert glm_normalized.encode(text) == glm_sp.encode(normalize_caption(text))
    assert glm_normalized.text_style == "normalized"
    assert glm_normalized.to_dict()["text_style"] == "normalized"


def test_text_style_defaults_by_model(glm, tokenizer_model):
    assert glm.text_style == "official"
    trained = M2Tokenizer(tokenizer_model)
    assert trained.text_style == "normalized"
    assert M2Tokenizer(tokenizer_model, text_style="official").text_style == "official"
    with pytest.raises(ValueError, match="text_style"):
        M2Tokenizer(tokenizer_model, text_style="nfc")


def test_not_a_sentencepiece_model_is_named(tmp_path):
    from megatron_m2.data.tokenizer import TokenizerError

    bogus = tmp_path / "tok.model"
    bogus.write_text("not a model")
    with pytest.raises(TokenizerError, match=f"{bogus}.*not a SentencePiece model"):
        M2Tokenizer(bogus)
    with pytest.raises(TokenizerError, match="no such file"):
        M2Tokenizer(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="is a directory"):
        M2Tokenizer(tmp_path)


def test_empty_string(glm):
    ids, mask = glm("")
    assert ids[0].tolist() == [50002, 50000] + [50000] * 50
    assert mask[0].tolist() == [False, False] + [True] * 50


@pytest.mark.parametrize("style,kept", [("normalized", range(100, 108)),
                                         ("official", range(152, 160))])
def test_pad_framed_lists(style, kept):
    import numpy as np

    if not GLM_MODEL.exists():
        pytest.skip(f"official GLM SentencePiece model not found at {GLM_MODEL}")
    glm = M2Tokenizer(GLM_MODEL, text_style=style)
    framed = [[50002, 10, 11, 50000], np.array([50002, 50000]), [50002] + list(range(100, 160))
              + [50000]]
    ids, mask = glm.pad(framed, max_length=10)
    assert ids.tolist() == [
        [50002, 10, 11, 50000] + [50000] * 6,
        [50002, 50000] + [50000] * 8,
        [50002] + list(kept) + [50000],
    ]
    assert (~mask).sum(1).tolist() == [4, 2, 10]
    # same as tokenizing the text directly
    t_ids, t_mask = glm(["a cat"])
    p_ids, p_mask = glm.pad([glm.frame(glm.encode("a cat"))])
    assert torch.equal(t_ids, p_ids) and torch.equal(t_mask, p_mask)
    with pytest.raises(ValueError, match="not framed"):
        glm.pad([[10, 11, 50000]])
    with pytest.raises(ValueError, match="not framed"):
        glm.pad([[50002, 10]])
    with pytest.raises(ValueError, match="max_length"):
        glm("x", max_length=1)


def test_pickle_for_dataloader_workers(glm):
    clone = pickle.loads(pickle.dumps(glm))
    assert torch.equal(clone("一只猫 a cat")[0], glm("一只猫 a cat")[0])


# ---------------------------------------------------------------------------------------------
# Normalisation and corpus reading


def test_normalize_caption():
    assert normalize_caption("  a\u3000 photo\tof\n a cat \u00a0") == "a photo of a cat"
    assert normalize_caption("cafe\u0301") == "caf\u00e9"          # NFC composes
    assert normalize_caption("ＡＢＣ１２３，") == "ＡＢＣ１２３，"      # NFC, not NFKC
    assert normalize_caption(" \n ") == ""


def test_read_caption_file(tmp_path, caplog):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"image": "a.jpg", "captions": [{"text": " a  cat ", "lang": "en"},
                                                   {"text": "一只猫", "lang": "zh"}]}),
        "",
        json.dumps({"image": "b.jpg", "caption_en": "a dog", "caption_zh": "一只狗"}),
        json.dumps({"image": "c.jpg", "captions": [{"text": "   ", "lang": "en"}]}),
    ]), encoding="utf-8")
    assert list(read_caption_file(manifest)) == ["a cat", "一只猫", "a dog", "一只狗"]
    txt = tmp_path / "c.txt"
    txt.write_text("first line\n\n  第二行  \n", encoding="utf-8")
    assert list(read_caption_file(txt)) == ["first line", "第二行"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption_en": "ok"}\nnot json\n', encoding="utf-8")
    with caplog.at_level("WARNING"):
        assert list(read_caption_file(bad)) == ["ok"]
    assert "skipped 1 unusable record(s), e.g. " in caplog.text and "bad.jsonl:2" in caplog.text


# ---------------------------------------------------------------------------------------------
# Training a tokenizer


EN_WORDS = ("a photo of the cat dog bird horse man woman child red blue green small big old "
            "young on under near table park beach street with two three sitting running "
            "standing playing eating looking at water grass tree car").split()
ZH_WORDS = ["一只", "两只", "猫", "狗", "鸟", "马", "男人", "女人", "孩子", "红色的", "蓝色的",
            "绿色的", "小", "大", "在", "桌子上", "公园里", "海滩上", "街道上", "坐着", "跑着",
            "站着", "玩耍", "吃东西", "看着", "水", "草地", "树", "汽车", "的照片"]


def _corpus(n=300, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines.append(" ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(4, 10))))
        lines.append("".join(rng.choice(ZH_WORDS) for _ in range(rng.randint(3, 8))))
    return lines


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("sp") / "tiny"
    path = train_tokenizer(_corpus(), prefix, vocab_size=600)
    return M2Tokenizer(path)


def test_trained_specials_by_name(tiny):
    sp = tiny.sp
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [sp.id_to_piece(i) for i in range(3, 8)] == list(SPECIALS)
    assert tiny.special_ids == {name: 3 + i for i, name in enumerate(SPECIALS)}
    assert (tiny.eos_id, tiny.cls_id, tiny.pad_id) == (3, 5, 3)
    assert 300 < tiny.vocab_size <= 600
    assert Path(tiny.model_path).with_suffix(".vocab").read_text(encoding="utf-8").count("\n") \
        == tiny.vocab_size


def test_trained_round_trip(tiny):
    for caption in ["一只猫坐在红色的桌子上", "a small dog running in the park",
                    "鲸鱼 whale Ω 42 🐱"]:  # unseen characters go through byte fallback
        ids, mask = tiny(caption)
        real = ids[0][~mask[0]].tolist()
        assert real[0] == tiny.cls_id and real[-1] == tiny.eos_id
        assert 0 not in real  # nothing maps to <unk>
        assert tiny.decode(ids[0]) == caption
        assert tiny.decode(tiny.encode(caption)) == caption


def test_training_is_deterministic(tmp_path):
    a = train_tokenizer(_corpus(), tmp_path / "a", vocab_size=500)
    b = train_tokenizer(_corpus(), tmp_path / "b", vocab_size=500)
    assert Path(a).read_bytes() == Path(b).read_bytes()
    # a sampled corpus is reproducible too
    c = train_tokenizer(_corpus(), tmp_path / "c", vocab_size=500, max_sentences=200, seed=3)
    d = train_tokenizer(_corpus(), tmp_path / "d", vocab_size=500, max_sentences=200, seed=3)
    assert Path(c).read_bytes() == Path(d).read_bytes()


def _han_pieces(tok):
    """Pieces holding a Han character, and those that hold it with anything else."""
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    han = [p for p in pieces if any("\u4e00" <= c <= "\u9fff" for c in p)]
    return han, [p for p in han if len(p.lstrip("\u2581")) > 1]


def test_han_as_characters(tiny, tmp_path):
    """The same corpus learns multi-character Chinese pieces by default and none with the flag;
    English still gets learned pieces, and any text round-trips without preparation."""
    _, fused = _han_pieces(tiny)
    assert fused  # the default merges the corpus' two-character words
    path = train_tokenizer(_corpus(), tmp_path / "han", vocab_size=400, han_as_characters=True)
    tok = M2Tokenizer(path)
    han, fused = _han_pieces(tok)
    assert han and not fused
    caption = "一只猫坐在红色的桌子上 a small dog"
    ids = tok.encode(caption)
    assert [tok.sp.id_to_piece(i) for i in ids if tok.sp.id_to_piece(i) != "\u2581"][:11] == \
        list("一只猫坐在红色的桌子上")
    assert any(len(tok.sp.id_to_piece(i).lstrip("\u2581")) > 2 for i in ids)  # English words
    assert tok.decode(ids) == caption


def test_training_errors(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(_corpus(50), tmp_path / "small", vocab_size=100)
    with pytest.raises(ValueError, match="no non-empty caption"):
        train_tokenizer(["", "  "], tmp_path / "empty", vocab_size=500)
    with pytest.raises(TypeError):
        train_tokenizer("a single caption", tmp_path / "str", vocab_size=500)


def test_model_without_cls_is_rejected(tmp_path):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus(50)), model_writer=buf,
                                   vocab_size=400, hard_vocab_limit=False, byte_fallback=True,
                                   user_defined_symbols=["<|endoftext|>"], num_threads=1,
                                   minloglevel=2)
    path = tmp_path / "no_cls.model"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"no_cls\.model.*\[CLS\]"):
        M2Tokenizer(path)


def test_cli(tmp_path):
    lines = _corpus(150, seed=1)
    manifest = tmp_path / "train.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        for i in range(0, 200, 2):
            f.write(json.dumps({"image": f"{i}.jpg", "captions": [
                {"text": lines[i], "lang": "en"}, {"text": lines[i + 1], "lang": "zh"}]},
                ensure_ascii=False) + "\n")
        for i in range(200, 300, 2):
            f.write(json.dumps({"image": f"{i}.jpg", "caption_en": lines[i],
                                "caption_zh": lines[i + 1]}, ensure_ascii=False) + "\n")
    text = tmp_path / "extra.txt"
    text.write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    prefix = tmp_path / "out" / "cli_sp"
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", str(manifest),
         str(text), "--model-prefix", str(prefix), "--vocab-size", "500"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["model"] == f"{prefix}.model"
    assert summary["sentences"] == 340
    tok = M2Tokenizer(summary["model"])
    assert summary["vocab_size"] == tok.vocab_size
    assert summary["specials"]["[CLS]"] == tok.cls_id
    assert tok.decode(tok("一只猫在公园里")[0][0]) == "一只猫在公园里"
