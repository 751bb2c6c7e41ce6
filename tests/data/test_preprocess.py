"""Preprocessing: exact round trips for every input format, fault accounting, resume."""

import base64
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_m2.data.indexed import (
    MODE_IMAGE,
    MODE_TEXT_EN,
    MODE_TEXT_ZH,
    ImageTextIndexedDataset,
    decode_image_sequence,
    encode_image_sequence,
)
from megatron_m2.data.preprocess import PreprocessConfig, _encode_image, preprocess
from megatron_m2.data.tokenizer import M2Tokenizer, normalize_caption


def _png(seed: int, size=(40, 30), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 4 if mode == "RGBA" else 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _cfg(tok, **kw):
    return PreprocessConfig(tokenizer_model=tok, max_image_size=32, **kw)


def _expected_ids(tok_path, text):
    tok = M2Tokenizer(tok_path)
    return tok.frame(tok.encode(normalize_caption(text)), max_length=1 << 30)


def _check_roundtrip(prefix, expected, tok_path, cfg):
    """expected: list of (source image bytes, [(lang, text), ...]) in input order."""
    ds = ImageTextIndexedDataset(str(prefix))
    assert len(ds) == len(expected)
    for i, (img, caps) in enumerate(expected):
        s = ds[i]
        # Image: the stored JPEG decodes to the pixels of the reference re-encoding.
        np.testing.assert_array_equal(_pixels(s.image), _pixels(_encode_image(img, cfg)))
        assert [lang for lang, _ in s.captions] == [lang for lang, _ in caps]
        for (_, ids), (_, text) in zip(s.captions, caps):
            assert ids.tolist() == _expected_ids(tok_path, text)
    # megatron-core's own reader opens the files and reports the documented modes.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    raw = IndexedDataset(str(prefix), multimodal=True)
    modes = raw.index.sequence_modes.tolist()
    assert modes.count(MODE_IMAGE) == len(expected)
    want = []
    for _, caps in expected:
        want += [MODE_TEXT_EN if lang == "en" else MODE_TEXT_ZH for lang, _ in caps]
        want.append(MODE_IMAGE)
    assert modes == want
    assert len(raw.document_indices) == len(expected) + 1


def test_image_sequence_roundtrip():
    for n in range(0, 9):
        data = bytes(range(n))
        seq = encode_image_sequence(data)
        assert seq.dtype == np.dtype("<i4") and seq[0] == (-n) % 4
        assert decode_image_sequence(seq) == data


def test_jsonl_roundtrip(tmp_path, tokenizer_model):
    imgs = [_png(i) for i in range(5)]
    (tmp_path / "img").mkdir()
    rows, expected = [], []
    for i, data in enumerate(imgs):
        (tmp_path / "img" / f"{i}.png").write_bytes(data)
        if i % 2:
            caps = [("en", f"a photo of a cat {i}"), ("zh", "一只猫的照片")]
            rows.append({"image": f"img/{i}.png",
                         "captions": [{"text": t, "lang": la} for la, t in caps]})
        else:
            caps = [("en", "two  dogs\tplaying"), ("zh", "两只狗在玩耍")]
            rows.append({"image": str(tmp_path / "img" / f"{i}.png"),
                         "caption_en": caps[0][1], "caption_zh": caps[1][1]})
        expected.append((data, caps))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                        encoding="utf-8")
    cfg = _cfg(tokenizer_model, workers=2, chunk_size=2)
    s = preprocess([str(manifest)], str(tmp_path / "out" / "ds"), cfg)
    assert s.to_dict() == {"records": 5, "written": 5, "rejected": 0}
    _check_roundtrip(tmp_path / "out" / "ds", expected, tokenizer_model, cfg)
    assert not (tmp_path / "out" / "ds.parts").exists()


def test_webdataset_roundtrip(tmp_path, tokenizer_model):
    shard = tmp_path / "s.tar"
    expected = []
    with tarfile.open(shard, "w") as tf:
        for i in range(4):
            data = _png(10 + i, mode="RGBA" if i == 3 else "RGB")
            members = {f"{i:04d}.png": data}
            if i % 2:
                # Shorthand fields are read in a fixed order (en, then zh), whatever the JSON.
                caps = [("en", "the city at night"), ("zh", "夜晚的城市")]
                members[f"{i:04d}.json"] = json.dumps(
                    {"caption_zh": caps[1][1], "caption_en": caps[0][1]}).encode()
            else:
                caps = [("en", f"a red car {i}")]
                members[f"{i:04d}.txt"] = caps[0][1].encode()
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            expected.append((data, caps))
    cfg = _cfg(tokenizer_model)
    s = preprocess([str(shard)], str(tmp_path / "ds"), cfg)
    assert s.to_dict() == {"records": 4, "written": 4, "rejected": 0}
    _check_roundtrip(tmp_path / "ds", expected, tokenizer_model, cfg)


def test_chinese_clip_roundtrip(tmp_path, tokenizer_model):
    tsv, texts = tmp_path / "imgs.tsv", tmp_path / "imgs.jsonl"
    imgs = {f"id{i}": _png(20 + i) for i in range(3)}
    tsv.write_text("".join(f"{k}\t{base64.b64encode(v).decode()}\n" for k, v in imgs.items()))
    caps = {"id0": ["一碗面条"], "id1": ["山和湖", "夜晚的城市"], "id2": ["一只猫的照片"]}
    lines, tid = [], 0
    for k, cs in caps.items():
        for c in cs:
            lines.append(json.dumps({"text_id": tid, "text": c, "image_ids": [k]},
                                    ensure_ascii=False))
            tid += 1
    texts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = _cfg(tokenizer_model)
    s = preprocess([str(tsv)], str(tmp_path / "ds"), cfg)
    assert s.to_dict() == {"records": 3, "written": 3, "rejected": 0}
    expected = [(imgs[k], [("zh", c) for c in caps[k]]) for k in imgs]
    _check_roundtrip(tmp_path / "ds", expected, tokenizer_model, cfg)


def _tree(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_bad_input_corpus_every_record_accounted(tmp_path, tokenizer_model):
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    good = _png(1)
    (src / "img" / "good.png").write_bytes(good)
    (src / "img" / "big.png").write_bytes(_png(2, size=(200, 200)))  # over the pixel limit
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(jpeg, format="JPEG")
    (src / "img" / "trunc.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (src / "img" / "text.jpg").write_bytes(b"this is not an image")
    lines = [
        json.dumps({"image": "img/good.png", "caption_en": "a photo of a cat"}).encode(),
        json.dumps({"image": "img/big.png", "caption_en": "a bomb"}).encode(),
        json.dumps({"image": "img/trunc.jpg", "caption_en": "truncated"}).encode(),
        json.dumps({"image": "img/text.jpg", "caption_en": "not an image"}).encode(),
        json.dumps({"image": "img/missing.png", "caption_en": "missing file"}).encode(),
        json.dumps({"image": "img/good.png", "caption_en": "   "}).encode(),
        json.dumps({"image": "img/good.png", "caption_zh": "长" * 80}, ensure_ascii=False
                   ).encode(),
        b'{"image": "img/good.png", "caption_en": "invalid \xff\xfe utf8"}',
        b'{"image": "img/good.png", "caption_en": ',
        json.dumps({"image": "img/good.png"}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
    ]
    manifest = src / "m.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    shard = src / "evil.tar"
    with tarfile.open(shard, "w") as tf:
        for name, payload in [("../evil.png", good), ("../evil.txt", b"escape"),
                              ("/abs.png", good), ("/abs.txt", b"absolute"),
                              ("ok.png", good), ("ok.txt", b"a fine caption")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    before = _tree(tmp_path)
    out = tmp_path / "out"
    log = out / "rejects.jsonl"
    out.mkdir()
    cfg = _cfg(tokenizer_model, max_image_pixels=10_000, max_caption_chars=50, workers=2,
               chunk_size=3, max_reject_fraction=1.0)
    s = preprocess([str(manifest), str(shard)], str(out / "ds"), cfg, reject_log=str(log))
    assert s.records == s.written + s.rejected
    assert (s.records, s.written) == (14, 2)
    rejects = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rejects) == s.rejected
    reasons = " | ".join(r["reason"] for r in rejects)
    for needle in ("decompression bomb", "truncated", "not an image", "missing image file",
                   "is empty", "characters (limit 50)", "invalid UTF-8", "malformed JSON",
                   "no caption field", "not a JSON object", "unsafe member path"):
        assert needle in reasons, needle
    assert all(r["location"] and r["reason"] for r in rejects)
    assert rejects[0]["location"].endswith("m.jsonl:2")
    # Nothing outside the output directory was written; no member escaped.
    after = [p for p in _tree(tmp_path) if not p.startswith("out")]
    assert after == [p for p in before if not p.startswith("out")]
    assert not list(tmp_path.parent.rglob("evil.png")) and not Path("/abs.png").exists()
    assert sorted(os.listdir(out)) == ["ds.bin", "ds.idx", "ds.meta.json", "rejects.jsonl"]


def test_interrupted_run_resumes_without_duplicates(tmp_path, tokenizer_model):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(7):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(30 + i))
        rows.append(json.dumps({"image": f"img/{i}.png", "caption_en": f"a photo {i}"}))
    rows.insert(3, "{broken")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    cfg = _cfg(tokenizer_model, chunk_size=2, max_reject_fraction=0.2)

    class Kill(Exception):
        pass

    def die_after_two_chunks(done, rejected):
        if done >= 4:
            raise Kill()

    with pytest.raises(Kill):
        preprocess([str(manifest)], str(tmp_path / "a"), cfg, reject_log=str(tmp_path / "r"),
                   progress=die_after_two_chunks)
    assert not (tmp_path / "a.bin").exists()  # nothing under the final names
    assert len(list((tmp_path / "a.parts").glob("*.done.json"))) == 2
    s = preprocess([str(manifest)], str(tmp_path / "a"), cfg, reject_log=str(tmp_path / "r"))
    assert s.to_dict() == {"records": 8, "written": 7, "rejected": 1}
    clean = preprocess([str(manifest)], str(tmp_path / "b"), cfg)
    assert clean.to_dict() == s.to_dict()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()
    assert len((tmp_path / "r").read_text().splitlines()) == 1


def test_cli_prints_summary(tmp_path, tokenizer_model):
    import subprocess
    import sys

    (tmp_path / "x.png").write_bytes(_png(5))
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": "x.png", "caption_en": "a cat"}) + "\n{bad\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "tools" / "preprocess_data.py"), "--input",
                          str(m), "--output-prefix", str(tmp_path / "ds"), "--tokenizer-model",
                          tokenizer_model, "--reject-log", str(tmp_path / "rej.jsonl"),
                          "--max-reject-fraction", "0.5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"records": 2, "written": 1,
                                                               "rejected": 1}
