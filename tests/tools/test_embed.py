"""``m2-embed``: a corpus (indexed dataset, text file, image folder) into an embedding store.

The CLI runs in subprocesses (it creates process-wide ``torch.distributed`` state) on a small
random model (``tests.test_inference._cfg``, the demo tokenizer's vocabulary); the reference
embeddings come from ``M2Encoder`` in one spawned process.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "emoji_demo"
TEST_SPLIT = DEMO / "test"
TOKENIZER = DEMO / "tokenizer.model"
N_TEST = 174

EMBED_ATOL = 1e-6
"""m2-embed vs ``M2Encoder`` batched differently (its default batch of 64 against the store's
batches of 25 within chunks of 50): on CPUs, matrix products of very small batches take another
kernel path than larger ones, so an item's embedding can move in the last bits (measured up to
3.3e-7 between batches of 1 or 7 and batches of 16+). With the same batches the results are
equal exactly, which the tests check too."""

CHUNK, BATCH = 50, 25
DATASET_ARGS = ["--dataset", str(TEST_SPLIT), "--chunk-size", str(CHUNK), "--batch-size",
                str(BATCH), "--index", "flat", "--no-progress"]
TEXT_LINES = ["an emoji of red heart", "红心的表情符号", "", "an emoji of grinning face",
              "   ", "一个咧嘴笑的表情符号", "mixed 中文 and English"]
STORE_FILES = ("store.json", "embeddings.safetensors", "items.jsonl", "rejects.jsonl",
               "index.faiss")


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two single-file exports of the same small architecture with different random weights."""
    from megatron_m2.checkpoint import from_official, save_single_file
    from tests.model.test_official import random_official
    from tests.test_inference import _cfg

    cfg = _cfg()
    d = tmp_path_factory.mktemp("embed-models")
    out = {}
    for name, seed in (("a", 11), ("b", 12)):
        out[name] = d / f"{name}.safetensors"
        save_single_file(str(out[name]), from_official(random_official(cfg, seed=seed), cfg),
                         cfg, tokenizer_bytes=TOKENIZER.read_bytes())
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text file (English, Chinese, blank lines) and an image folder with two unreadable
    images (junk bytes, a truncated JPEG), a hidden image and a non-image file."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("embed-corpus")
    texts = d / "captions.txt"
    texts.write_text("\n".join(TEXT_LINES) + "\n", encoding="utf-8")
    folder = d / "photos"
    (folder / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def img():
        return Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8))

    img().save(folder / "a" / "1.png")
    img().save(folder / "a" / "b" / "2.jpg")
    img().save(folder / "c.PNG")
    img().save(folder / "z.bmp")
    img().save(folder / ".hidden.png")
    (folder / "broken.jpg").write_bytes(b"this is not an image")
    img().save(folder / "t.jpg")
    data = (folder / "t.jpg").read_bytes()
    (folder / "t.jpg").write_bytes(data[:len(data) // 2])
    (folder / "notes.txt").write_text("not an image\n")
    good = ["a/1.png", "a/b/2.jpg", "c.PNG", "z.bmp"]
    return {"texts": texts, "folder": folder, "good": good, "bad": ["broken.jpg", "t.jpg"]}


def _reference(model, prefix, texts, folder, good):
    """What M2Encoder gives for the same inputs: every demo image (default batches, and the
    store's batches of BATCH within chunks of CHUNK), decoded first captions, the text lines
    that are not blank, the readable folder images."""
    import io

    from PIL import Image

    from megatron_m2 import M2Encoder
    from megatron_m2.data.indexed import ImageTextIndexedDataset

    enc = M2Encoder.from_pretrained(model)
    reader = ImageTextIndexedDataset(prefix)
    samples = [reader[i] for i in range(len(reader))]
    images = [Image.open(io.BytesIO(s.image)) for s in samples]
    chunked = torch.cat([enc.encode_image(images[lo:lo + CHUNK], batch_size=BATCH)
                         for lo in range(0, len(images), CHUNK)])
    lines = [t for t in texts if t.strip()]
    return {"images": enc.encode_image(images), "images_chunked": chunked,
            "captions": [enc.tokenizer.decode(s.captions[0][1]) for s in samples],
            "texts": enc.encode_text(lines), "lines": lines,
            "folder": enc.encode_image([os.path.join(folder, p) for p in good])}


@pytest.fixture(scope="module")
def reference(models, corpus):
    return run_distributed(_reference, 1, model=str(models["a"]), prefix=str(TEST_SPLIT),
                           texts=TEXT_LINES, folder=str(corpus["folder"]),
                           good=corpus["good"])[0]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _embed(*args, timeout=300, **env):
    return subprocess.run([sys.executable, "-m", "megatron_m2.cli.embed", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=_env(**env))


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _open(path, load_index=True):
    from megatron_m2.serving.store import EmbeddingStore

    return EmbeddingStore.open(path, load_index=load_index)


def _rejects(path):
    return [json.loads(line) for line in (Path(path) / "rejects.jsonl").read_text().splitlines()]


def _assert_same_store(a: Path, b: Path) -> None:
    """Every file of store ``a`` byte-identical to ``b``'s, except that the safetensors header of
    ``embeddings.safetensors`` is compared as JSON: safetensors writes its ``__metadata__`` from
    a hash map, so the order of its two keys varies from process to process. The tensor bytes
    after the header are compared exactly."""
    for name in STORE_FILES:
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        if name == "embeddings.safetensors":
            nx, ny = (int.from_bytes(d[:8], "little") for d in (x, y))
            assert json.loads(x[8:8 + nx]) == json.loads(y[8:8 + ny]), name
            x, y = x[8 + nx:], y[8 + ny:]
        assert x == y, name


@pytest.fixture(scope="module")
def dataset_store(models, tmp_path_factory):
    """m2-embed on the demo test split, uninterrupted, one process."""
    out = tmp_path_factory.mktemp("embed-dataset") / "store"
    summary = _summary(_embed("--load", models["a"], "--output", out, *DATASET_ARGS))
    return {"dir": out, "summary": summary}


# -- tests --------------------------------------------------------------------------------------
def test_dataset_images_equal_the_encoder(dataset_store, reference):
    s, out = dataset_store["summary"], dataset_store["dir"]
    assert (s["status"], s["total"], s["embedded"], s["rejected"]) == ("written", N_TEST,
                                                                       N_TEST, 0)
    assert (s["chunks"], s["resumed_chunks"], s["index"]) == (4, 0, "flat")
    assert s["items_per_s"] > 0 and s["store"] == str(out / "store.json")
    store = _open(out)
    assert store.kind == "image" and store.embeddings.shape == (N_TEST, 32)
    assert store.manifest["source"]["type"] == "dataset"
    assert store.manifest["source"]["path"] == str(TEST_SPLIT)
    assert store.items == [{"id": str(i), "index": i, "caption": reference["captions"][i]}
                           for i in range(N_TEST)]
    assert torch.equal(store.embeddings, reference["images_chunked"])  # the same batches
    diff = (store.embeddings - reference["images"]).abs().max().item()
    assert diff <= EMBED_ATOL, diff  # M2Encoder's own batches of 64 (see EMBED_ATOL)
    assert not (out / "parts").exists() and _rejects(out) == []


def test_text_file_equals_the_encoder_and_rejects_blank_lines(models, corpus, reference,
                                                              tmp_path):
    out = tmp_path / "texts"
    s = _summary(_embed("--load", models["a"], "--texts", corpus["texts"], "--output", out,
                        "--no-progress"))
    assert (s["kind"], s["total"], s["embedded"], s["rejected"]) == ("text", 7, 5, 2)
    store = _open(out)
    keep = [n for n, t in enumerate(TEXT_LINES, 1) if t.strip()]
    assert store.items == [{"id": str(n), "line": n, "text": TEXT_LINES[n - 1]} for n in keep]
    assert store.embeddings.shape == (5, 32)
    # one chunk, one batch of the 5 lines: exactly encode_text on them
    assert torch.equal(store.embeddings, reference["texts"])
    assert _rejects(out) == [{"id": "3", "reason": "blank line"},
                             {"id": "5", "reason": "blank line"}]


def test_corrupt_images_are_rejected_and_the_rest_embedded(models, corpus, reference,
                                                           tmp_path):
    out = tmp_path / "photos"
    s = _summary(_embed("--load", models["a"], "--images", corpus["folder"], "--output", out,
                        "--no-progress"))
    assert (s["total"], s["embedded"], s["rejected"]) == (6, 4, 2)
    store = _open(out)
    assert store.items == [{"id": p, "path": p} for p in corpus["good"]]
    assert torch.equal(store.embeddings, reference["folder"])
    rejects = _rejects(out)
    assert [r["id"] for r in rejects] == corpus["bad"]
    assert all(r["reason"].startswith("cannot read image: ") for r in rejects), rejects
    assert "truncated" in rejects[1]["reason"].lower()
    assert store.manifest["source"]["files"] == 6


def test_flat_index_gives_the_exact_top_k(dataset_store):
    indexed, exact = _open(dataset_store["dir"]), _open(dataset_store["dir"], load_index=False)
    assert indexed.index is not None and indexed.manifest["index"]["type"] == "flat"
    g = torch.Generator().manual_seed(0)
    queries = torch.cat([torch.nn.functional.normalize(torch.randn(8, 32, generator=g), dim=-1),
                         exact.embeddings[:8]])
    scores, rows = indexed.search(queries, k=10)
    truth = torch.topk(queries @ exact.embeddings.T, k=10, dim=1)
    assert torch.equal(rows, truth.indices)
    torch.testing.assert_close(scores, truth.values, atol=1e-5, rtol=0)
    assert torch.equal(exact.search(queries, k=10)[1], truth.indices)
    assert torch.equal(rows[8:, 0], torch.arange(8))  # each stored vector finds itself first


def test_resume_after_sigkill_equals_an_uninterrupted_run(models, dataset_store, tmp_path):
    out = tmp_path / "store"
    parts = out / "parts"
    # A long pause after each chunk: the job is killed while chunk 0 is written and chunk 1 is
    # not started, whatever the machine's speed.
    proc = subprocess.Popen([sys.executable, "-m", "megatron_m2.cli.embed", "--load",
                             str(models["a"]), "--output", str(out), *DATASET_ARGS], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_env(M2_EMBED_TEST_SLEEP_PER_CHUNK="60"))
    try:
        deadline = time.monotonic() + 240
        while not (parts / "part-000000.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no part file within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-000000.json",
                                                            "part-000000.safetensors"]
    assert not (out / "store.json").exists()
    (parts / ".part-000001.safetensors.tmp-99999").write_bytes(b"half a file")

    # another model on the unfinished job: refused, one line, nothing touched
    bad = _embed("--load", models["b"], "--output", out, *DATASET_ARGS)
    lines = [ln for ln in bad.stderr.splitlines() if ": error: " in ln]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-3000:]
    assert lines[0].startswith("m2-embed: error: ") and "another model" in lines[0]
    assert "--force" in lines[0] and "Traceback" not in bad.stderr
    assert (parts / "part-000000.json").exists() and (parts / "job.json").exists()

    s = _summary(_embed("--load", models["a"], "--output", out, *DATASET_ARGS))
    assert (s["status"], s["resumed_chunks"], s["processed"]) == ("written", 1, N_TEST - CHUNK)
    assert not parts.exists()
    ref = dataset_store["dir"]
    _assert_same_store(out, ref)

    again = _summary(_embed("--load", models["a"], "--output", out, *DATASET_ARGS))
    assert (again["status"], again["embedded"], again["processed"]) == ("complete", N_TEST, 0)
    assert (out / "store.json").read_bytes() == (ref / "store.json").read_bytes()


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process(models, dataset_store, tmp_path):
    out = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "megatron_m2.cli.embed", "--load",
                           str(models["a"]), "--output", str(out), *DATASET_ARGS],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    s = _summary(proc)
    assert (s["world_size"], s["embedded"], s["processed"]) == (2, N_TEST, N_TEST)
    _assert_same_store(out, dataset_store["dir"])  # the same chunks and batches on any world


# -- sources without a model --------------------------------------------------------------------
def test_text_file_source_lines(tmp_path):
    from megatron_m2.serving.embed import EmbedError, Rejected, TextFileSource

    p = tmp_path / "t.txt"
    p.write_bytes(b"\xef\xbb\xbfone\r\n\r\nbad \xff byte\n  \ntwo")
    src = TextFileSource(p)
    assert len(src) == 5 and src.record()["lines"] == 5
    assert src.get(0, None) == ({"id": "1", "line": 1, "text": "one"}, "one")
    assert src.get(4, None)[0]["text"] == "two"
    reasons = []
    for i in (1, 2, 3):
        with pytest.raises(Rejected) as e:
            src.get(i, None)
        reasons.append(e.value.reason)
    assert reasons == ["blank line", "not valid UTF-8 (byte 5 of the line)", "blank line"]
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(EmbedError, match="empty.txt: the file is empty"):
        TextFileSource(tmp_path / "empty.txt")


def test_image_folder_source_listing(tmp_path):
    from megatron_m2.serving.embed import EmbedError, ImageFolderSource

    for rel in ("b/x.JPG", "a.png", ".hidden/y.png", "out/parts/z.png", "b/readme.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    src = ImageFolderSource(tmp_path, exclude=tmp_path / "out")
    assert src.paths == ["a.png", "b/x.JPG"] and src.item_id(1) == "b/x.JPG"
    before = src.record()
    (tmp_path / "a.png").write_bytes(b"xy")
    assert ImageFolderSource(tmp_path, exclude=tmp_path / "out").record() != before
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("no images here")
    with pytest.raises(EmbedError, match="no images there"):
        ImageFolderSource(tmp_path / "docs")
