"""Inputs as the outside tools users bring write them, through m2-preprocess's command line.

* Chinese-CLIP: ``{split}_imgs.tsv`` with ``base64.urlsafe_b64encode`` images (what its own
  tools write) next to ``{split}_texts.jsonl``;
* img2dataset: shards written by the ``webdataset`` library's ``TarWriter`` (img2dataset's
  writer) with ``key.jpg``, ``key.txt`` and ``key.json`` (``{"caption": ..., "url": ...}``),
  read through brace patterns, ``.tar.gz`` and ``pipe:`` commands;
* OpenCLIP: CSV/TSV tables with a header, ``filepath`` / ``title`` columns, relative paths;
* the outcome of a run: all rejected, too many rejected (resumable), nothing left behind;
* the release's tokenisation through preprocessing (the official text style);
* tokenizer training reads the same layouts.
"""

import base64
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_m2.cli.preprocess import main as preprocess_main
from megatron_m2.cli.train_tokenizer import main as train_tokenizer_main
from megatron_m2.data.identity import read_card
from megatron_m2.data.indexed import ImageTextIndexedDataset
from megatron_m2.data.tokenizer import M2Tokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared"
GLM_MODEL = SHARED / "assets" / "glm_sp.model"
GLM_IDS = SHARED / "fixtures" / "glm_official_ids.jsonl"


def _jpeg(seed: int, size=(24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=90)
    return buf.getvalue()


def _run(capsys, *argv):
    """m2-preprocess in-process: (exit code, stdout, stderr)."""
    code = preprocess_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error(err: str) -> str:
    """The one error line a failed run prints (progress bars may share stderr); no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("m2-preprocess: error: ")
    return lines[0]


def _summary(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _captions(prefix) -> list:
    ds = ImageTextIndexedDataset(str(prefix))
    return [[(lang, ids.tolist()) for lang, ids in ds[i].captions] for i in range(len(ds))]


def _framed(tok_path, text):
    tok = M2Tokenizer(tok_path)
    return tok.frame(tok.encode(text), max_length=1 << 30)


# -- Chinese-CLIP ------------------------------------------------------------------------------
def test_chinese_clip_urlsafe_base64_and_default_texts_name(tmp_path, capsys, tokenizer_model):
    """Chinese-CLIP's own writer (``base64.urlsafe_b64encode``) and naming (``train_imgs.tsv``
    with ``train_texts.jsonl``); the standard alphabet and unpadded fields read too."""
    images = {1000 + i: _jpeg(i) for i in range(6)}
    encoded = {k: base64.urlsafe_b64encode(v).decode() for k, v in images.items()}
    assert any(set("-_") & set(e) for e in encoded.values())  # the URL-safe alphabet is used
    encoded[1004] = base64.b64encode(images[1004]).decode()        # standard alphabet
    encoded[1005] = base64.urlsafe_b64encode(images[1005]).decode().rstrip("=")  # unpadded
    (tmp_path / "train_imgs.tsv").write_text(
        "".join(f"{k}\t{v}\n" for k, v in encoded.items()), encoding="utf-8")
    texts = [{"text_id": i, "text": f"第{i}张图片", "image_ids": [k]}
             for i, k in enumerate(images)]
    texts.append({"text_id": 99, "text": "两张图片共用的描述", "image_ids": [1000, 1001]})
    (tmp_path / "train_texts.jsonl").write_text(
        "\n".join(json.dumps(t, ensure_ascii=False) for t in texts) + "\n", encoding="utf-8")
    code, out, err = _run(capsys, "--input", str(tmp_path / "train_imgs.tsv"),
                          "--output-prefix", str(tmp_path / "ds"),
                          "--tokenizer-model", tokenizer_model)
    assert code == 0, err
    assert _summary(out) == {"records": 6, "written": 6, "rejected": 0}
    ds = ImageTextIndexedDataset(str(tmp_path / "ds"))
    for i, k in enumerate(images):
        sample = ds[i]
        assert np.asarray(Image.open(io.BytesIO(sample.image))).shape == (20, 24, 3)
        want = [("zh", _framed(tokenizer_model, f"第{i}张图片"))]
        if k in (1000, 1001):
            want.append(("zh", _framed(tokenizer_model, "两张图片共用的描述")))
        assert [(lang, ids.tolist()) for lang, ids in sample.captions] == want


def test_chinese_clip_missing_texts_file_is_one_line(tmp_path, capsys, tokenizer_model):
    (tmp_path / "valid_imgs.tsv").write_text("1\tAAAA\n")
    code, out, err = _run(capsys, "--input", str(tmp_path / "valid_imgs.tsv"),
                          "--output-prefix", str(tmp_path / "ds"),
                          "--tokenizer-model", tokenizer_model)
    assert code == 2 and out == ""
    err = _one_error(err)
    assert "valid_texts.jsonl does not exist" in err and "--texts" in err


# -- img2dataset / webdataset ------------------------------------------------------------------
def _img2dataset_shard(path: Path, start: int, n: int, compress: bool = False) -> list:
    """A shard as img2dataset writes it: webdataset's TarWriter, key.jpg + key.txt + key.json
    whose "caption" repeats the txt member."""
    import webdataset as wds

    captions = []
    with wds.TarWriter(str(path), compress=compress) as sink:
        for i in range(start, start + n):
            caption = f"a photo of a cat number {i}"
            meta = {"url": f"https://example.com/{i}.jpg", "caption": caption,
                    "key": f"{i:09d}", "status": "success", "error_message": None,
                    "width": 24, "height": 20, "original_width": 240, "original_height": 200,
                    "exif": "{}", "sha256": "0" * 64}
            sink.write({"__key__": f"{i:09d}", "jpg": _jpeg(i), "txt": caption,
                        "json": json.dumps(meta, indent=4)})
            captions.append(caption)
    return captions


def test_img2dataset_shards_one_caption_per_sample(tmp_path, capsys, tokenizer_model):
    """The caption stated in both key.txt and key.json is stored once (twice would count each
    image twice in retrieval evaluation); shards come through a brace pattern, a .tar.gz and a
    pipe: command, as the webdataset library opens them."""
    caps = _img2dataset_shard(tmp_path / "shard-000.tar", 0, 3)
    caps += _img2dataset_shard(tmp_path / "shard-001.tar", 3, 2)
    caps += _img2dataset_shard(tmp_path / "extra.tar.gz", 5, 2, compress=True)
    caps += _img2dataset_shard(tmp_path / "piped.tar", 7, 2)
    code, out, err = _run(capsys, "--input", str(tmp_path / "shard-{000..001}.tar"),
                          str(tmp_path / "extra.tar.gz"), f"pipe:cat {tmp_path / 'piped.tar'}",
                          "--output-prefix", str(tmp_path / "ds"),
                          "--tokenizer-model", tokenizer_model)
    assert code == 0, err
    assert _summary(out) == {"records": 9, "written": 9, "rejected": 0}
    assert _captions(tmp_path / "ds") == [[("en", _framed(tokenizer_model, c))] for c in caps]


def test_shard_problems_are_rejects_with_locations(tmp_path, capsys, tokenizer_model):
    """A truncated shard and a failing pipe: command are accounted for, named by location."""
    _img2dataset_shard(tmp_path / "good.tar", 0, 4)
    data = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    log = tmp_path / "rejects.jsonl"
    code, out, err = _run(capsys, "--input", str(tmp_path / "good.tar"),
                          str(tmp_path / "cut.tar"), "pipe:exit 3",
                          "--output-prefix", str(tmp_path / "ds"),
                          "--tokenizer-model", tokenizer_model, "--reject-log", str(log),
                          "--max-reject-fraction", "1")
    assert code == 0, err
    s = _summary(out)
    assert s["records"] == s["written"] + s["rejected"] and s["written"] >= 5
    rejects = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(r["location"].startswith(str(tmp_path / "cut.tar")) and "truncated" in r["reason"]
               for r in rejects), rejects
    assert any(r["location"] == "pipe:exit 3" and "status 3" in r["reason"] for r in rejects)


# -- OpenCLIP CSV ------------------------------------------------------------------------------
def test_openclip_csv_and_tsv(tmp_path, capsys, tokenizer_model):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(_jpeg(40 + i))
        rows.append((f"imgs/{i}.jpg", f'a "quoted", comma caption\nover two lines {i}',
                     f"一张图片 {i}"))
    # OpenCLIP's default: a tab-separated table with filepath / title columns.
    with open(tmp_path / "train.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        w.writerows((p, en) for p, en, _ in rows)
    code, out, err = _run(capsys, "--input", str(tmp_path / "train.tsv"),
                          "--output-prefix", str(tmp_path / "tsv"),
                          "--tokenizer-model", tokenizer_model)
    assert code == 0, err
    assert _summary(out) == {"records": 4, "written": 4, "rejected": 0}
    assert _captions(tmp_path / "tsv") == [[("en", _framed(tokenizer_model, en))]
                                           for _, en, _ in rows]
    # A comma CSV (Excel's BOM) with other column names and a Chinese column, run from
    # another working directory: image paths are relative to the table.
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption_en", "caption_zh"])
        w.writerows(rows)
    cwd = os.getcwd()
    os.chdir("/")
    try:
        code, out, err = _run(capsys, "--input", str(tmp_path / "pairs.csv"),
                              "--csv-img-key", "image", "--csv-caption-key", "caption_en",
                              "zh=caption_zh", "--output-prefix", str(tmp_path / "csv"),
                              "--tokenizer-model", tokenizer_model)
    finally:
        os.chdir(cwd)
    assert code == 0, err
    assert _captions(tmp_path / "csv") == [
        [("en", _framed(tokenizer_model, en)), ("zh", _framed(tokenizer_model, zh))]
        for _, en, zh in rows]
    # A table without the asked-for column fails before any work, naming the columns.
    code, out, err = _run(capsys, "--input", str(tmp_path / "pairs.csv"),
                          "--output-prefix", str(tmp_path / "x"),
                          "--tokenizer-model", tokenizer_model)
    assert code == 2
    err = _one_error(err)
    assert "pairs.csv: no column 'filepath'" in err and "image, caption_en" in err


# -- the outcome of a run ------------------------------------------------------------------------
def _manifest(tmp_path: Path, n_good: int, n_bad: int) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(n_good):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(60 + i))
        lines.append(json.dumps({"image": f"img/{i}.jpg", "caption_en": f"photo {i}"}))
    lines += [json.dumps({"image": f"img/missing{i}.jpg", "caption_en": "gone"})
              for i in range(n_bad)]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_all_rejected_run_fails_and_leaves_nothing(tmp_path, capsys, tokenizer_model):
    manifest = _manifest(tmp_path, 0, 3)
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "--input", str(manifest), "--output-prefix",
                          str(out_dir / "ds"), "--tokenizer-model", tokenizer_model,
                          "--reject-log", str(out_dir / "rejects.jsonl"),
                          "--max-reject-fraction", "1")
    assert code == 2
    err = _one_error(err)
    assert err.startswith("m2-preprocess: error: no record was written")
    assert "3 x missing image file <path>" in err
    assert _summary(out) == {"records": 3, "written": 0, "rejected": 3}
    # The reject log is there (it says why); no dataset, no card, no .parts folder.
    assert sorted(os.listdir(out_dir)) == ["rejects.jsonl"]


def test_too_many_rejects_fails_resumably(tmp_path, capsys, tokenizer_model):
    manifest = _manifest(tmp_path, 3, 2)
    args = ["--input", str(manifest), "--output-prefix", str(tmp_path / "ds"),
            "--tokenizer-model", tokenizer_model, "--chunk-size", "2"]
    code, out, err = _run(capsys, *args)  # default --max-reject-fraction 0.1
    assert code == 2
    err = _one_error(err)
    assert "2 of 5 records (40.0%) were rejected, more than --max-reject-fraction 0.1" in err
    assert "kept in" in err and "rerun with a higher --max-reject-fraction" in err
    assert not (tmp_path / "ds.bin").exists() and not (tmp_path / "ds.meta.json").exists()
    assert (tmp_path / "ds.parts").is_dir()
    # Rerun with a higher limit: the kept chunks are assembled, nothing is processed again
    # (the images are gone now).
    for p in (tmp_path / "img").iterdir():
        p.unlink()
    code, out, err = _run(capsys, *args, "--max-reject-fraction", "0.5")
    assert code == 0, err
    assert _summary(out) == {"records": 5, "written": 3, "rejected": 2}
    assert len(ImageTextIndexedDataset(str(tmp_path / "ds"))) == 3
    assert not (tmp_path / "ds.parts").exists()


def test_missing_input_and_bad_tokenizer_are_one_line(tmp_path, capsys, tokenizer_model):
    code, _, err = _run(capsys, "--input", str(tmp_path / "nope.jsonl"), "--output-prefix",
                        str(tmp_path / "ds"), "--tokenizer-model", tokenizer_model)
    assert (code, err) == (2, f"m2-preprocess: error: input {tmp_path / 'nope.jsonl'} does "
                              "not exist\n")
    manifest = _manifest(tmp_path, 1, 0)
    bad_tok = tmp_path / "tok.model"
    bad_tok.write_text("not a model")
    code, _, err = _run(capsys, "--input", str(manifest), "--output-prefix",
                        str(tmp_path / "ds"), "--tokenizer-model", str(bad_tok))
    assert code == 2 and "not a SentencePiece model" in _one_error(err)
    assert not list(tmp_path.glob("ds*"))


# -- card and text styles ------------------------------------------------------------------------
def test_card_records_the_tokenizer(tmp_path, capsys, tokenizer_model):
    manifest = _manifest(tmp_path, 2, 0)
    code, out, err = _run(capsys, "--input", str(manifest), "--output-prefix",
                          str(tmp_path / "ds"), "--tokenizer-model", tokenizer_model,
                          "--text-length", "16")
    assert code == 0, err
    card = read_card(str(tmp_path / "ds"))
    tok = M2Tokenizer(tokenizer_model)
    assert card["tokenizer"]["sha256"] == tok.sha256()
    assert card["tokenizer"]["text_style"] == "normalized"
    assert card["tokenizer"]["vocab_size"] == tok.vocab_size
    assert (card["text_length"], card["samples"], card["captions"]) == (16, 2, {"en": 2})
    assert card["source"]["records"] == 2


def test_official_style_preprocessing_gives_the_release_ids(tmp_path, capsys):
    """Captions preprocessed with the release's tokenizer, loaded at text length 52, are the
    ids of the release's GLMChineseTokenizer (whitespace runs, literal specials, left
    truncation)."""
    if not (GLM_MODEL.exists() and GLM_IDS.exists()):
        pytest.skip("release tokenizer or its id fixture not found beside the project")
    rows = [json.loads(line) for line in GLM_IDS.read_text(encoding="utf-8").splitlines()]
    (tmp_path / "x.jpg").write_bytes(_jpeg(1))
    usable = [r for r in rows if r["text"].strip()]  # empty captions are rejects
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": "x.jpg", "caption_en": r["text"]})
                                  for r in rows) + "\n")
    code, out, err = _run(capsys, "--input", str(manifest), "--output-prefix",
                          str(tmp_path / "ds"), "--tokenizer-model", str(GLM_MODEL),
                          "--max-reject-fraction", "0.5")
    assert code == 0, err
    assert _summary(out)["written"] == len(usable)
    assert read_card(str(tmp_path / "ds"))["tokenizer"]["text_style"] == "official"
    tok = M2Tokenizer(GLM_MODEL)
    ds = ImageTextIndexedDataset(str(tmp_path / "ds"))
    for i, r in enumerate(usable):
        ids, pad = tok.pad([ds[i].captions[0][1]], max_length=52)
        assert ids[0].tolist() == r["input_ids"], r["text"]
        assert (~pad[0]).int().tolist() == r["attention_mask"], r["text"]


# -- tokenizer training reads the same layouts -------------------------------------------------
def test_train_tokenizer_reads_every_layout(tmp_path, capsys):
    shard_caps = _img2dataset_shard(tmp_path / "s.tar", 0, 3)
    (tmp_path / "t_imgs.tsv").write_text(
        "".join(f"{k}\t{base64.urlsafe_b64encode(_jpeg(k)).decode()}\n" for k in range(2)))
    (tmp_path / "t_texts.jsonl").write_text("\n".join(json.dumps(
        {"text_id": k, "text": t, "image_ids": [k % 2]}, ensure_ascii=False)
        for k, t in enumerate(["一只猫", "两只狗", "一碗面条"])) + "\n", encoding="utf-8")
    with open(tmp_path / "c.csv", "w", newline="") as f:
        csv.writer(f).writerows([["filepath", "title"], ["a.jpg", "red car"],
                                 ["b.jpg", "blue car"]])
    (tmp_path / "plain.txt").write_text("line one\nline two\n")
    code = train_tokenizer_main(["--input", str(tmp_path / "s.tar"),
                                 str(tmp_path / "t_imgs.tsv"), str(tmp_path / "c.csv"),
                                 str(tmp_path / "plain.txt"), "--model-prefix",
                                 str(tmp_path / "sp"), "--vocab-size", "300"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["sentences"] == len(shard_caps) + 3 + 2 + 2
    assert Path(summary["model"]).is_file()
