"""tools/make_demo_dataset.py: rendering, manifests, concept splits and determinism (no build)."""

import argparse
import json
import struct
import subprocess
import sys

import pytest

from tests.helpers.tools import ROOT, load_tool

LIMIT = 30


tool = load_tool("make_demo_dataset")


@pytest.fixture(scope="module")
def requirements():
    """Skip unless the emoji package and the Noto Color Emoji font are installed."""
    pytest.importorskip("emoji", minversion="2.16")
    try:
        tool.find_font()
    except SystemExit as exc:
        pytest.skip(str(exc))


def _run(tmp_path, name, *extra):
    work, out = tmp_path / name / "work", tmp_path / name / "out"
    assert tool.main(["--limit", str(LIMIT), "--skip-build", "--work-dir", str(work),
                      "--output-dir", str(out), *extra]) == 0
    return work, out


def _manifests(work):
    return {s: [json.loads(line) for line in (work / f"{s}.jsonl").read_text("utf-8").splitlines()]
            for s in tool.SPLITS if (work / f"{s}.jsonl").exists()}


def test_manifests_images_and_splits(requirements, tmp_path):
    from PIL import Image

    work, out = _run(tmp_path, "a", "--image-size", "48")
    manifests = _manifests(work)
    stats = json.loads((out / "stats.json").read_text("utf-8"))
    assert set(manifests) == set(tool.SPLITS)
    ids = {s: {r["id"] for r in recs} for s, recs in manifests.items()}
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    skipped = sum(stats["skipped"].values())
    assert sum(map(len, ids.values())) == stats["rendered"] == LIMIT - skipped
    for split, recs in manifests.items():
        assert len(recs) == stats["splits"][split]["emoji"] > 0
        for rec in recs:
            assert set(rec) == {"image", "captions", "id", "emoji"}
            assert rec["id"] == tool.codepoints_id(rec["emoji"])
            assert [c["lang"] for c in rec["captions"]] == ["en", "zh"]
            assert all(0 < len(c["text"]) < 80 for c in rec["captions"])
            with Image.open(work / rec["image"]) as im:
                assert im.size == (48, 48) and im.mode == "RGB" and im.format == "PNG"
                # Not blank: some pixels differ from the plain background.
                assert len(im.getcolors(48 * 48)) > 8
    assert stats["image_size"] == 48 and stats["vocab_size"] is None
    assert "SIL Open Font License" in (out / "LICENSE.md").read_text("utf-8")
    assert "--skip-build" in (out / "README.md").read_text("utf-8")


def test_deterministic(requirements, tmp_path):
    work_a, _ = _run(tmp_path, "a")
    work_b, _ = _run(tmp_path, "b")
    files_a = sorted(p.relative_to(work_a) for p in work_a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(work_b) for p in work_b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (work_a / rel).read_bytes() == (work_b / rel).read_bytes(), rel


def test_train_captions_all(requirements, tmp_path):
    """--train-captions all: every template in both languages on train images only; images,
    splits and the held-out splits' captions stay as with one caption per language."""
    work_one, _ = _run(tmp_path, "one", "--train-captions", "one")
    work_all, out_all = _run(tmp_path, "all", "--train-captions", "all")
    one, every = _manifests(work_one), _manifests(work_all)
    for split in ("validation", "test"):
        name = f"{split}.jsonl"
        assert (work_one / name).read_bytes() == (work_all / name).read_bytes()
    assert [r["id"] for r in one["train"]] == [r["id"] for r in every["train"]]
    n_en, n_zh = len(tool.TEMPLATES["en"]), len(tool.TEMPLATES["zh"])
    for a, b in zip(one["train"], every["train"]):
        assert a["image"] == b["image"]
        assert [c["lang"] for c in b["captions"]] == ["en"] * n_en + ["zh"] * n_zh
        texts = [c["text"] for c in b["captions"]]
        assert len(set(texts)) == len(texts)
        assert all(c in b["captions"] for c in a["captions"])  # the drawn one is among them
    stats = json.loads((out_all / "stats.json").read_text("utf-8"))
    assert stats["train_captions"] == "all"


def test_build_guard_names_missing_tools(requirements, tmp_path, monkeypatch):
    monkeypatch.setattr(tool, "TOOLS_DIR", tmp_path / "no_tools")
    with pytest.raises(SystemExit, match="train_tokenizer.py"):
        tool.main(["--limit", "5", "--work-dir", str(tmp_path / "w"),
                   "--output-dir", str(tmp_path / "o")])


@pytest.mark.slow
@pytest.mark.skipif(not all((ROOT / "tools" / t).is_file()
                            for t in ("train_tokenizer.py", "preprocess_data.py")),
                    reason="tokenizer/preprocessing tools not present")
def test_full_build_small(requirements, tmp_path):
    """End to end through the real tokenizer and preprocessing tools (subprocesses)."""
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_dataset.py"), "--limit", "40",
                    "--output-dir", str(out)], check=True, capture_output=True, timeout=300)
    stats = json.loads((out / "stats.json").read_text("utf-8"))
    assert (out / "tokenizer.model").is_file()
    assert stats["vocab_size"] == tool.DEFAULT_VOCAB_SIZE == 2000
    for split in tool.SPLITS:
        assert (out / f"{split}.bin").stat().st_size > 0
        assert (out / f"{split}.rejects.jsonl").read_text("utf-8") == ""
        header = (out / f"{split}.idx").read_bytes()[:34]
        assert header[:9] == b"MMIDIDX\x00\x00"
        _, _, _, doc_count = struct.unpack("<QBQQ", header[9:])
        assert doc_count == stats["splits"][split]["emoji"] + 1  # one document per image


def test_variants_share_a_concept_and_a_split():
    teacher, man, woman = "\U0001f9d1\u200d\U0001f3eb", "\U0001f468\u200d\U0001f3eb", \
        "\U0001f469\u200d\U0001f3eb"
    runner = "\U0001f3c3"
    woman_runner_right = "\U0001f3c3\u200d\u2640\ufe0f\u200d\u27a1\ufe0f"
    assert tool.concept_key(man) == tool.concept_key(woman) == tool.concept_key(teacher)
    assert tool.concept_key(woman_runner_right) == tool.concept_key(runner)
    assert tool.concept_key("\U0001f538") != tool.concept_key("\U0001f536")  # small/large diamond

    entries = [tool.Entry(e, tool.codepoints_id(e), "x", "x")
               for e in (teacher, man, woman, runner, woman_runner_right)]
    entries += [tool.Entry(chr(c), f"{c:x}", "x", "x") for c in range(0x1F400, 0x1F420)]
    for seed in range(5):
        splits = tool.split_by_concept(entries, tool.parse_split("80,10,10"), seed)
        where = {e.emoji: s for s, members in splits.items() for e in members}
        assert len(where) == len(entries)
        assert where[man] == where[woman] == where[teacher]
        assert where[runner] == where[woman_runner_right]
        assert all(splits[s] for s in tool.SPLITS)


def test_parse_split():
    assert tool.parse_split("80,10,10") == pytest.approx((0.8, 0.1, 0.1))
    assert tool.parse_split("8,1,1") == pytest.approx((0.8, 0.1, 0.1))
    for bad in ("80,20", "0,50,50", "80,-10,30", "a,b,c"):
        with pytest.raises(argparse.ArgumentTypeError):
            tool.parse_split(bad)



def test_demo_cards_name_the_demo_tokenizer():
    """The bundled splits' cards: the demo tokenizer, captions stored whole, both languages."""
    from megatron_m2.data.identity import read_card
    from megatron_m2.data.tokenizer import M2Tokenizer

    sha = M2Tokenizer(ROOT / "data" / "emoji_demo" / "tokenizer.model").sha256()
    for split in tool.SPLITS:
        card = read_card(str(ROOT / "data" / "emoji_demo" / split))
        assert card["text_length"] is None
        assert card["tokenizer"]["sha256"] == sha and card["tokenizer"]["text_style"] == \
            "normalized"
        assert set(card["captions"]) == {"en", "zh"}
