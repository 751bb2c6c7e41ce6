"""``m2-serve``: the HTTP service, its micro-batcher, the search page and the load-test tool.

The end-to-end tests (``slow``) share one real service, started as a subprocess on a free
loopback port: a small random model exported to a single ``.safetensors`` file (the same
architecture as tests/test_inference.py, the demo tokenizer's vocabulary) and an image-folder
store of 20 images of the bundled emoji test split, embedded by ``M2Encoder`` in a spawned
process (which also computes the reference text embeddings). Requests go through httpx; the
page is driven in headless Chromium through Playwright.

The fast tests run the app in-process on a stand-in encoder (deterministic embeddings, no model)
for what does not need the model: dataset and text stores, path traversal in a store's item
paths, the model-identity check, the body limit, and the batcher itself.
"""

import asyncio
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# starlette's TestClient on httpx (the in-process tests) warns about its own future
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "emoji_demo"
TEST_SPLIT = DEMO / "test"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"

N_IMAGES = 20
TEXTS = ["an emoji of red heart", "红心的表情符号", "an emoji of grinning face",
         "一个咧嘴笑的表情符号", "a yellow star", "黄色的星星", "two thumbs up",
         "竖起大拇指", "a smiling cat", "一只猫", "a pizza slice", "一片披萨"]
# The service's limits in these tests (small, so that the refusals are cheap to provoke).
LIMITS = {"max_image_bytes": 150_000, "max_image_pixels": 1_000_000,
          "max_images_per_request": 4, "max_text_chars": 200, "max_texts_per_request": 8,
          "max_k": 20}
MAX_BATCH = 8
ROW_ATOL = 1e-6
"""Rows of a batch against the same rows encoded alone or in another batch: the same fp32
arithmetic, only the matrix kernels' blocking differs with the batch size (a few ulps)."""


# -- the served model and store ----------------------------------------------------------------
def _image_name(i: int) -> str:
    """Relative paths of the store's images: two sub-folders, one name with a space and CJK
    characters (ids are these paths, so some need percent-encoding in URLs)."""
    sub = "a" if i < N_IMAGES // 2 else "b"
    return f"{sub}/表情 {i:02d}.png" if i == N_IMAGES - 1 else f"{sub}/emoji_{i:02d}.png"


def _build_store(model, folder, store_dir, texts):
    """In a spawned process: embed the folder's images into a store with ``M2Encoder`` and
    return the reference text embeddings (all at once, and each alone) and the identity."""
    from megatron_m2 import M2Encoder
    from megatron_m2.serving.store import model_identity, write_store

    enc = M2Encoder.from_pretrained(model)
    rel = [_image_name(i) for i in range(N_IMAGES)]
    emb = enc.encode_image([os.path.join(folder, r) for r in rel])
    identity = model_identity(enc, model)
    write_store(store_dir, emb, [{"id": r, "path": r} for r in rel], kind="image",
                model=identity, source={"type": "folder", "path": str(folder)})
    return {"identity": identity, "text_all": enc.encode_text(texts),
            "text_each": torch.cat([enc.encode_text([t]) for t in texts])}


class Service:
    """``m2-serve`` in a subprocess; ``url`` once it answers ``/health``."""

    def __init__(self, argv, timeout_s=180.0):
        self.lines = []
        self.url = None
        self._found = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_m2.cli.serve", *argv], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        threading.Thread(target=self._read, daemon=True).start()
        if not self._found.wait(timeout_s) or self.url is None:
            self.stop()
            raise AssertionError(f"m2-serve did not start:\n{self.log()}")
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log()
            time.sleep(0.2)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
            if m and self.url is None:
                self.url = m.group(1)
                self._found.set()
        self._found.set()

    def log(self, last=40) -> str:
        return "".join(self.lines[-last:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The exported model, the store, the references and the running service."""
    from PIL import Image

    from megatron_m2.checkpoint import from_official, save_single_file
    from megatron_m2.data.indexed import ImageTextIndexedDataset
    from megatron_m2.serving.store import EmbeddingStore
    from tests.helpers.distributed import run_distributed
    from tests.model.test_official import random_official
    from tests.test_inference import TOKENIZER, _cfg

    d = tmp_path_factory.mktemp("serve")
    cfg = _cfg()
    model = d / "model.safetensors"
    save_single_file(str(model), from_official(random_official(cfg, seed=11), cfg), cfg,
                     tokenizer_bytes=TOKENIZER.read_bytes())
    folder = d / "images"
    ds = ImageTextIndexedDataset(str(TEST_SPLIT))
    for i in range(N_IMAGES):
        path = folder / _image_name(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(ds[i].image)).convert("RGB").save(path)
    (d / "secret.png").write_bytes((folder / _image_name(0)).read_bytes())  # outside the folder
    store_dir = d / "store"
    ref = run_distributed(_build_store, 1, model=str(model), folder=str(folder),
                          store_dir=str(store_dir), texts=TEXTS)[0]
    argv = ["--load", str(model), "--store", str(store_dir), "--port", "0", "--no-access-log",
            "--max-batch", str(MAX_BATCH), "--max-wait-ms", "20", "--threads", "1"]
    for name, value in LIMITS.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    service = Service(argv)
    try:
        yield SimpleNamespace(url=service.url, service=service, model=model, folder=folder,
                              store=EmbeddingStore.open(store_dir), dir=d, **ref)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def client(served):
    import httpx

    with httpx.Client(base_url=served.url, timeout=60) as c:
        yield c


def _png(size=(64, 64), color=(200, 30, 30), mode="RGB") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(out, format="PNG")
    return out.getvalue()


def _noise_png(side: int) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def _exact(served, query: torch.Tensor, k: int):
    """Exact search: ids and scores of the top k store rows for ``query`` (stable ties)."""
    s = served.store.embeddings @ query
    order = torch.sort(s, descending=True, stable=True).indices[:k]
    return [served.store.items[i]["id"] for i in order], s[order]


# -- the service, end to end -------------------------------------------------------------------
@pytest.mark.slow
def test_health(served, client):
    r = client.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["uptime_s"] >= 0 and h["queue_depth"] == 0
    m = h["model"]
    assert m["source"] == "model.safetensors" and m["head"] == "vl" and m["embed_dim"] == 32
    assert m["weights_sha256"] == served.identity["weights_sha256"][:12]
    assert h["store"] == {"kind": "image", "count": N_IMAGES, "dim": 32, "index": "exact",
                          "source": "folder", "name": "store", "same_model": True}
    b = h["batching"]
    assert b["max_batch"] == MAX_BATCH and b["max_wait_ms"] == 20
    for key in ("batches", "items", "mean_batch_size", "text", "image"):
        assert key in b
    assert h["limits"] == LIMITS


@pytest.mark.slow
def test_embed_text_equals_the_encoder(served, client):
    r = client.post("/embed/text", json={"texts": TEXTS[:6]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == 32 and body["count"] == 6
    assert body["model"]["weights_sha256"] == served.identity["weights_sha256"][:12]
    rows = torch.tensor(body["embeddings"])
    torch.testing.assert_close(rows, served.text_all[:6], atol=ROW_ATOL, rtol=0)
    torch.testing.assert_close(rows, served.text_each[:6], atol=ROW_ATOL, rtol=0)


@pytest.mark.slow
def test_embed_image_equals_the_stores_rows(served, client):
    picks = [3, 0, N_IMAGES - 1]  # out of order, and the file with a CJK name
    files = [("files", (Path(_image_name(i)).name, (served.folder / _image_name(i)).read_bytes(),
                        "image/png")) for i in picks]
    r = client.post("/embed/image", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 3 and [i["filename"] for i in body["images"]] == \
        [Path(_image_name(i)).name for i in picks]
    assert body["images"][0] == {"filename": "emoji_03.png", "format": "PNG", "width": 64,
                                 "height": 64}
    torch.testing.assert_close(torch.tensor(body["embeddings"]),
                               served.store.embeddings[picks], atol=ROW_ATOL, rtol=0)


@pytest.mark.slow
def test_concurrent_requests_are_batched(served):
    """N concurrent one-text requests take fewer than N forward passes, and each gets exactly
    the row that encoding its text directly gives."""
    import httpx

    n = len(TEXTS)

    async def burst():
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=served.url, timeout=60, limits=limits) as c:
            before = (await c.get("/health")).json()["batching"]["text"]
            replies = await asyncio.gather(*[c.post("/embed/text", json={"texts": [t]})
                                             for t in TEXTS])
            after = (await c.get("/health")).json()["batching"]["text"]
        return before, replies, after

    before, replies, after = asyncio.run(burst())
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    rows = torch.tensor([r.json()["embeddings"][0] for r in replies])
    torch.testing.assert_close(rows, served.text_each, atol=ROW_ATOL, rtol=0)
    torch.testing.assert_close(rows, served.text_all, atol=ROW_ATOL, rtol=0)
    batches = after["batches"] - before["batches"]
    assert after["items"] - before["items"] == n
    assert after["requests"] - before["requests"] == n
    assert 1 <= batches < n, f"{n} concurrent requests took {batches} forward passes"
    assert after["largest_batch"] <= MAX_BATCH and after["mean_batch_size"] > 1


@pytest.mark.slow
@pytest.mark.parametrize("text", ["an emoji of red heart", "红心的表情符号"])
def test_search_text_is_exact_search(served, client, text):
    k = 7
    r = client.post("/search", json={"text": text, "k": k})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"type": "text", "text": text} and body["k"] == k
    res = body["results"]
    assert [x["rank"] for x in res] == list(range(1, k + 1))
    q = torch.tensor(client.post("/embed/text", json={"texts": [text]}).json()["embeddings"][0])
    torch.testing.assert_close(q, served.text_each[TEXTS.index(text)], atol=ROW_ATOL, rtol=0)
    ids, scores = _exact(served, q, k)
    assert [x["id"] for x in res] == ids
    torch.testing.assert_close(torch.tensor([x["score"] for x in res]), scores, atol=1e-5,
                               rtol=0)
    from urllib.parse import quote

    for x in res:
        assert x["path"] == x["id"]
        assert x["thumbnail"] == f"/items/{quote(x['id'], safe='')}/thumbnail"


@pytest.mark.slow
def test_search_by_image_finds_itself(served, client):
    name = _image_name(5)
    r = client.post("/search", data={"k": "3"},
                    files={"file": ("query.png", (served.folder / name).read_bytes(),
                                    "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["type"] == "image" and body["query"]["filename"] == "query.png"
    res = body["results"]
    assert len(res) == 3 and res[0]["id"] == name
    assert res[0]["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_search_k_larger_than_the_store(served, client):
    r = client.post("/search", json={"text": "a yellow star", "k": LIMITS["max_k"]})
    assert r.status_code == 200
    assert len(r.json()["results"]) == min(N_IMAGES, LIMITS["max_k"])


@pytest.mark.slow
def test_thumbnails(served, client):
    from PIL import Image

    res = client.post("/search", json={"text": "a smiling cat", "k": LIMITS["max_k"]}).json()
    by_id = {x["id"]: x["thumbnail"] for x in res["results"]}
    cjk = _image_name(N_IMAGES - 1)
    for item_id in (_image_name(0), cjk):
        r = client.get(by_id[item_id])
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        im = Image.open(io.BytesIO(r.content))
        assert im.format == "JPEG" and max(im.size) <= 128
    assert "%20" in by_id[cjk] and "%2F" in by_id[cjk]


@pytest.mark.slow
def test_bad_requests_are_refused_and_the_service_keeps_serving(served, client):
    """Every refusal is JSON {"error": ...} with its 4xx; /health is still 200 afterwards."""
    png = (served.folder / _image_name(1)).read_bytes()
    big = _noise_png(300)  # 300x300 noise: > 150 kB, few pixels
    assert len(big) > LIMITS["max_image_bytes"]
    wide = _png((2000, 1000))  # small file, 2 Mpx
    assert len(wide) < LIMITS["max_image_bytes"]
    bomb = _png((12000, 12000), mode="1")  # 144 Mpx, above Pillow's own warning threshold
    assert len(bomb) < LIMITS["max_image_bytes"]

    def image(data, name="x.png"):
        return {"files": [("files", (name, data, "image/png"))]}

    cases = [
        # (method, url, request kwargs, status, words in the error)
        ("post", "/embed/image", image(big), 413, ["bytes", "150000"]),
        ("post", "/embed/image", image(wide), 413, ["2000x1000", "pixels"]),
        ("post", "/embed/image", image(bomb), 413, ["pixels"]),
        ("post", "/search", {"files": {"file": ("w.png", wide, "image/png")}}, 413, ["pixels"]),
        ("post", "/embed/image", image(b"this is not an image at all"), 415, ["not an image"]),
        ("post", "/embed/image", image(png[:200]), 422, ["cannot decode"]),
        ("post", "/embed/image", image(b""), 422, ["empty"]),
        ("post", "/embed/image", {"files": [("files", ("x.png", png, "image/png"))] * 5}, 422,
         ["5 images", "limit is 4"]),
        ("post", "/embed/image", {"files": [("files", ("x.png", png, "image/png"))] * 6}, 422,
         ["too many files", "limit is 4"]),
        ("post", "/embed/image", {"data": {"x": "1"}, "files": {"other": ("x.png", png)}}, 422,
         ["'files'"]),
        ("post", "/embed/image", {"json": {"texts": ["a"]}}, 415, ["multipart"]),
        ("post", "/embed/text", {"json": {"texts": [""]}}, 422, ["texts[0] is empty"]),
        ("post", "/embed/text", {"json": {"texts": ["ok", "   "]}}, 422, ["texts[1] is empty"]),
        ("post", "/embed/text", {"json": {"texts": []}}, 422, ["at least one"]),
        ("post", "/embed/text", {"json": {"texts": ["x" * 201]}}, 422, ["201 characters"]),
        ("post", "/embed/text", {"json": {"texts": ["a"] * 9}}, 422, ["9 texts", "limit is 8"]),
        ("post", "/embed/text", {"json": {"texts": "a"}}, 422, ["texts", "list"]),
        ("post", "/embed/text", {"json": {"text": ["a"]}}, 422, ["texts"]),
        ("post", "/embed/text", {"content": b"{not json", "headers": {
            "content-type": "application/json"}}, 400, ["not valid JSON"]),
        ("post", "/search", {"json": {"text": "a", "k": 0}}, 422, ["between 1 and 20", "got 0"]),
        ("post", "/search", {"json": {"text": "a", "k": 21}}, 422, ["between 1 and 20"]),
        ("post", "/search", {"json": {"text": "a", "k": "many"}}, 422, ["integer"]),
        ("post", "/search", {"json": {"text": "a", "k": 2.5}}, 422, ["integer"]),
        ("post", "/search", {"json": {"text": ""}}, 422, ["text is empty"]),
        ("post", "/search", {"json": {"text": "x" * 201}}, 422, ["201 characters"]),
        ("post", "/search", {"json": {"k": 3}}, 422, ["text"]),
        ("post", "/search", {"json": ["a"]}, 422, ["body"]),
        ("post", "/search", {"data": {"k": "0"}, "files": {"file": ("x.png", png)}}, 422,
         ["between 1 and 20"]),
        ("post", "/search", {"data": {"k": "3"}, "files": {"other": ("x.png", png)}}, 422,
         ["'file'"]),
        ("post", "/search", {"data": {"k": "3", "text": "a", "z": "1"}}, 200, []),
        ("post", "/search", {"data": {"k": "3"}}, 422, ["no query"]),
        ("post", "/search", {"content": b"a", "headers": {"content-type": "text/plain"}}, 415,
         ["JSON"]),
        ("get", "/items/no-such-id/thumbnail", {}, 404, ["no item"]),
        ("get", "/items/..%2F..%2F..%2Fetc%2Fpasswd/thumbnail", {}, 404, ["no item"]),
        ("get", "/items/%2E%2E%2Fsecret.png/thumbnail", {}, 404, ["no item"]),
        ("get", "/items/a%2F..%2F..%2Fsecret.png/thumbnail", {}, 404, ["no item"]),
        ("get", "/no/such/endpoint", {}, 404, ["no such endpoint"]),
        ("get", "/search", {}, 405, ["GET", "not allowed"]),
        ("delete", "/embed/text", {}, 405, ["DELETE"]),
    ]
    for method, url, kwargs, status, words in cases:
        r = client.request(method.upper(), url, **kwargs)
        what = f"{method.upper()} {url} {str(kwargs)[:80]}"
        assert r.status_code == status, f"{what}: {r.status_code} {r.text[:300]}"
        assert r.headers["content-type"].startswith("application/json"), what
        if status != 200:
            msg = r.json()["error"]
            for w in words:
                assert w in msg, f"{what}: {msg!r} lacks {w!r}"
    # A body announced larger than any request may be: refused before it is read.
    r = client.post("/embed/text", content=b"x" * 2_000_000,
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert client.post("/embed/text", json={"texts": ["still here"]}).status_code == 200
    assert "Traceback" not in served.service.log(200)


@pytest.mark.slow
def test_page_and_openapi(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "中文" in r.text
    external = re.findall(r"""(?:src|href|action)\s*=\s*["'](?:https?:)?//"""
                          r"""|url\(\s*["']?(?:https?:)?//""", r.text)
    assert not external, "the page must load nothing from outside the service"
    api = client.get("/openapi.json").json()
    assert {"/health", "/embed/text", "/embed/image", "/search",
            "/items/{item_id}/thumbnail"} <= set(api["paths"])
    assert client.get("/assets/cjk-font.otf").status_code == 200


@pytest.mark.slow
def test_search_page_in_chromium(served, client, tmp_path):
    """Type an English then a Chinese query into the page: k thumbnails appear, the first is
    the API's top-1; then an image query and an error shown on the page."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found (Debian's chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright Python package is not installed")
    k = 6
    shot = tmp_path / "serve_search_page.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            console_errors = []
            page.on("console", lambda m: console_errors.append(m.text)
                    if m.type == "error" else None)
            page.goto(f"{served.url}/")
            sync_api.expect(page.locator("#status")).to_contain_text(f"{N_IMAGES} images")
            page.fill("#k", str(k))
            for text in ("an emoji of red heart", "红心的表情符号"):
                top1 = client.post("/search", json={"text": text, "k": k}).json()["results"][0]
                page.fill("#query", text)
                page.press("#query", "Enter")
                sync_api.expect(page.locator("#summary")).to_contain_text(text)
                results = page.locator("#results .result")
                sync_api.expect(results).to_have_count(k)
                assert results.first.get_attribute("data-id") == top1["id"]
                thumbs = page.locator("#results .result img.thumb")
                sync_api.expect(thumbs).to_have_count(k)
                for i in range(k):  # every thumbnail loads and decodes (64 px emoji)
                    sync_api.expect(thumbs.nth(i)).to_have_js_property("naturalWidth", 64)
            page.screenshot(path=str(shot), full_page=True)
            # an image query through the file picker finds the image itself first
            page.set_input_files("#file", str(served.folder / _image_name(4)))
            sync_api.expect(page.locator("#summary")).to_contain_text("emoji_04.png")
            sync_api.expect(page.locator("#results .result").first).to_have_attribute(
                "data-id", _image_name(4))
            assert not console_errors, console_errors  # (the 422 below is logged as one)
            # errors appear on the page: k out of range (checked by the page), then the API's
            page.fill("#k", "999")
            page.press("#query", "Enter")
            sync_api.expect(page.locator("#error")).to_contain_text("between 1 and 20")
            page.fill("#k", "5")
            page.evaluate("() => { document.getElementById('query').maxLength = 1000; }")
            page.fill("#query", "z" * 250)
            page.press("#query", "Enter")
            sync_api.expect(page.locator("#error")).to_contain_text("250 characters")
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / shot.name)
    print(f"search page screenshot: {shot} (copied to {ARTIFACTS / shot.name})")


@pytest.mark.slow
def test_bench_serve_tool(served):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_serve.py"), "--url",
                          served.url, "--requests", "24", "--concurrency", "4", "--warmup", "2",
                          "--timeout-s", "60", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr + out.stdout
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["requests"] == 24 and rep["concurrency"] == 4 and rep["errors"] == 0
    assert rep["endpoints"] == ["embed_text", "search"] and rep["requests_per_s"] > 0
    lat = rep["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert {m["requests"] for m in rep["by_endpoint"].values()} == {12}
    s = rep["server"]
    assert s["items"] == 24 and 1 <= s["batches"] <= 24 and s["mean_batch_size"] >= 1


@pytest.mark.slow
def test_store_of_another_model_is_refused_at_startup(served, tmp_path):
    from megatron_m2.serving.store import write_store

    other = dict(served.store.model, weights_sha256="0" * 64)
    bad = tmp_path / "other_store"
    write_store(bad, served.store.embeddings, served.store.items, kind="image", model=other,
                source=served.store.manifest["source"])
    proc = subprocess.run([sys.executable, "-m", "megatron_m2.cli.serve", "--load",
                           str(served.model), "--store", str(bad), "--port", "0"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("m2-serve: error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "another model" in lines[0] and "--allow-model-mismatch" in lines[0]


# -- the command line, before any model is loaded ----------------------------------------------
def _serve_cli(*argv):
    return subprocess.run([sys.executable, "-m", "megatron_m2.cli.serve", *argv],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("m2-serve: error: "), proc.stderr
    return lines[0]


@pytest.mark.slow
def test_cli_refuses_a_missing_store_a_busy_port_and_bad_values(tmp_path):
    existing = str(DEMO / "tokenizer.model")  # --load is only checked to exist before the store
    line = _one_error_line(_serve_cli("--load", existing, "--store", str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in line
    (tmp_path / "empty").mkdir()
    line = _one_error_line(_serve_cli("--load", existing, "--store", str(tmp_path / "empty")))
    assert "not an embedding store" in line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = _one_error_line(_serve_cli("--load", existing, "--port", str(port)))
        assert f"127.0.0.1:{port}" in line
    assert "--max-k" in _one_error_line(_serve_cli("--load", existing, "--max-k", "0"))
    assert "--max-wait-ms" in _one_error_line(_serve_cli("--load", existing,
                                                         "--max-wait-ms", "-1"))


# -- the app in-process, on a stand-in encoder -------------------------------------------------
class StandInEncoder:
    """Deterministic embeddings without a model: a text's row is seeded by its bytes, an
    image's row is its mean colour mixed into a fixed projection. Counts forward calls."""

    embed_dim = 8
    head = "vl"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self):
        from megatron_m2.data.transforms import eval_transform

        self.cfg = SimpleNamespace(image_size=16, max_text_len=12)
        self.transform = eval_transform(16)
        self.calls = []

    def encode_text(self, texts, batch_size=None):
        self.calls.append(("text", len(texts)))
        rows = [torch.randn(self.embed_dim, generator=torch.Generator().manual_seed(
            int.from_bytes(t.encode()[:6].ljust(6, b"\0"), "little") + len(t))) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def encode_image(self, images, batch_size=None):
        self.calls.append(("image", len(images)))
        x = torch.stack(list(images)).mean(dim=(2, 3))  # [n, 3]
        proj = torch.randn(3, self.embed_dim, generator=torch.Generator().manual_seed(0))
        return torch.nn.functional.normalize(x @ proj + 0.1, dim=-1)


IDENTITY = {"source": "/models/stand-in.safetensors", "head": "vl", "weights_sha256": "ab" * 32,
            "tokenizer_sha256": "cd" * 32, "embed_dim": 8}


def _unit_rows(n, dim=8, seed=0):
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=-1)


def _app(store=None, **kwargs):
    from fastapi.testclient import TestClient

    from megatron_m2.serving.app import Limits, create_app

    kwargs.setdefault("limits", Limits(max_k=10, max_image_bytes=100_000))
    kwargs.setdefault("identity", IDENTITY)
    enc = kwargs.pop("encoder", None) or StandInEncoder()
    return TestClient(create_app(enc, store, **kwargs)), enc


def test_dataset_store_thumbnails_and_captions(tmp_path):
    from PIL import Image

    from megatron_m2.data.indexed import ImageTextIndexedDataset
    from megatron_m2.serving.store import write_store

    ds = ImageTextIndexedDataset(str(TEST_SPLIT))
    items = [{"id": f"test/{i}", "index": i, "caption": f"caption {i}"} for i in range(6)]
    items.append({"id": "test/999", "index": 999, "caption": "not in the dataset"})
    store = write_store(tmp_path / "s", _unit_rows(7), items, kind="image", model=IDENTITY,
                        source={"type": "dataset", "path": str(TEST_SPLIT)})
    client, _ = _app(store)
    with client:
        res = client.post("/search", json={"text": "caption", "k": 7}).json()["results"]
        assert len(res) == 7 and {r["id"] for r in res} == {it["id"] for it in items}
        for r in res:
            assert r["caption"].startswith("caption") or r["caption"] == "not in the dataset"
            assert r["thumbnail"] == f"/items/test%2F{r['index']}/thumbnail"
        r = client.get("/items/test%2F2/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(r.content))
        assert thumb.size == Image.open(io.BytesIO(ds[2].image)).size  # 64 px: not enlarged
        r = client.get("/items/test%2F999/thumbnail")
        assert r.status_code == 404 and "sample 999" in r.json()["error"]
        assert client.get("/health").json()["store"]["source"] == "dataset"


def test_folder_store_never_reads_outside_its_folder(tmp_path):
    from PIL import Image

    from megatron_m2.serving.store import write_store

    folder = tmp_path / "photos"
    folder.mkdir()
    big = Image.new("RGB", (300, 200), (10, 200, 10))
    big.save(folder / "ok.png")
    big.save(tmp_path / "secret.png")
    Image.new("RGB", (3000, 2000), (200, 10, 10)).save(folder / "photo.jpg")
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    items = [{"id": "ok", "path": "ok.png"}, {"id": "photo", "path": "photo.jpg"},
             {"id": "up", "path": "../secret.png"},
             {"id": "abs", "path": str(tmp_path / "secret.png")},
             {"id": "link", "path": "link.png"}, {"id": "dot", "path": "."},
             {"id": "gone", "path": "missing.png"}]
    store = write_store(tmp_path / "s", _unit_rows(len(items)), items, kind="image",
                        model=IDENTITY, source={"type": "folder", "path": str(folder)})
    client, _ = _app(store, thumbnail_size=64)
    with client:
        r = client.get("/items/ok/thumbnail")
        assert r.status_code == 200
        assert Image.open(io.BytesIO(r.content)).size == (64, 43)  # longest side 64
        r = client.get("/items/photo/thumbnail")  # a JPEG: decoded at a reduced scale
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 43)
        for item_id in ("up", "abs", "link", "dot"):
            r = client.get(f"/items/{item_id}/thumbnail")
            assert r.status_code == 404 and "outside" in r.json()["error"], (item_id, r.text)
        assert client.get("/items/gone/thumbnail").status_code == 404
    # a store that moved: --source-root points at the folder's new place
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved, symlinks=True)
    shutil.rmtree(folder)
    client, _ = _app(store)
    with client:
        assert client.get("/items/ok/thumbnail").status_code == 404
    client, _ = _app(store, source_root=moved)
    with client:
        assert client.get("/items/ok/thumbnail").status_code == 200


def test_text_store_and_no_store():
    import tempfile

    from megatron_m2.serving.store import write_store

    lines = ["a red heart", "一颗红心", "a grinning face"]
    items = [{"id": f"l{i + 1}", "line": i + 1, "text": t} for i, t in enumerate(lines)]
    enc = StandInEncoder()
    with tempfile.TemporaryDirectory() as d:
        store = write_store(d, enc.encode_text(lines), items, kind="text", model=IDENTITY,
                            source={"type": "text", "path": "captions.txt"})
        client, _ = _app(store, encoder=enc)
        with client:
            res = client.post("/search", json={"text": "一颗红心", "k": 2}).json()
            assert res["store"] == "text"
            top = res["results"][0]
            assert top == {"rank": 1, "id": "l2", "score": pytest.approx(1.0, abs=1e-6),
                           "line": 2, "text": "一颗红心"}
            assert client.get("/items/l2/thumbnail").status_code == 404
    no_tokenizer = StandInEncoder()
    no_tokenizer.tokenizer = None
    client, _ = _app(None, encoder=no_tokenizer)
    with client:
        r = client.post("/embed/text", json={"texts": ["a"]})
        assert r.status_code == 409 and "--tokenizer-model" in r.json()["error"]
        r = client.post("/embed/image", files={"files": ("a.png", _png(), "image/png")})
        assert r.status_code == 200
    client, _ = _app(None)
    with client:
        r = client.post("/search", json={"text": "a", "k": 2})
        assert r.status_code == 409 and "--store" in r.json()["error"]
        assert client.get("/items/x/thumbnail").status_code == 404
        assert client.get("/health").json()["store"] is None
        assert client.post("/embed/text", json={"texts": ["a"]}).status_code == 200


def test_a_store_of_another_model_is_refused_unless_allowed(tmp_path):
    from megatron_m2.serving.store import StoreError, write_store

    other = dict(IDENTITY, weights_sha256="ef" * 32)
    store = write_store(tmp_path / "s", _unit_rows(3), [{"id": str(i), "line": i, "text": "t"}
                                                         for i in range(3)],
                        kind="text", model=other, source={"type": "text", "path": "t.txt"})
    with pytest.raises(StoreError, match="another model.*--allow-model-mismatch"):
        _app(store)
    client, _ = _app(store, allow_model_mismatch=True)
    with client:
        assert client.get("/health").json()["store"]["same_model"] is False
    wide = write_store(tmp_path / "w", _unit_rows(3, dim=16), [{"id": str(i)} for i in range(3)],
                       kind="text", model=IDENTITY, source={"type": "text", "path": "t.txt"})
    with pytest.raises(StoreError, match="width 16"):
        _app(wide, allow_model_mismatch=True)


def test_body_limit_and_image_batches_in_process():
    from megatron_m2.serving.app import Limits

    client, enc = _app(None, limits=Limits(max_texts_per_request=2, max_text_chars=10,
                                           max_images_per_request=2, max_image_bytes=5_000))
    with client:
        # a body larger than any valid request, sent without Content-Length (chunked)
        r = client.post("/embed/text", content=iter([b'{"texts": ["', b"x" * 200_000, b'"]}']),
                        headers={"content-type": "application/json"})
        assert r.status_code == 413 and "too large" in r.json()["error"]
        r = client.post("/embed/image", files=[("files", ("a.png", _png(), "image/png")),
                                               ("files", ("b.png", _png(color=(0, 0, 200)),
                                                          "image/png"))])
        assert r.status_code == 200 and r.json()["count"] == 2
        assert enc.calls[-1] == ("image", 2)
        assert client.get("/health").status_code == 200


def test_micro_batcher_gathers_orders_and_recovers():
    from megatron_m2.serving.batcher import EncoderWorker, MicroBatcher, QueueFull

    seen = []

    def encode(items):
        seen.append(list(items))
        if "boom" in items:
            raise RuntimeError("boom")
        return torch.tensor([[float(x)] for x in items])

    async def scenario():
        worker = EncoderWorker()
        b = MicroBatcher(encode, worker, max_batch=4, max_wait_ms=200, max_queue=12)
        # 10 concurrent one-item requests and one of two items: batches of at most 4 items,
        # whole requests only, each request gets its own rows in order
        reqs = [b.submit([i]) for i in range(10)] + [b.submit([100, 101])]
        out = await asyncio.gather(*reqs)
        assert [r.flatten().tolist() for r in out] == [[i] for i in range(10)] + [[100, 101]]
        assert [len(s) for s in seen] == [4, 4, 4] and b.batches == 3 and b.items == 12
        assert b.stats()["mean_batch_size"] == 4.0 and worker.calls == 3
        # a lone request waits max_wait_ms at most
        t0 = time.monotonic()
        assert (await b.submit([7])).item() == 7
        assert time.monotonic() - t0 < 2.0
        # a failing batch fails its requests only; the next batch works
        results = await asyncio.gather(b.submit(["boom"]), b.submit([5]),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert (await b.submit([6])).item() == 6 and b.stats()["failed_batches"] == 1
        # a full queue is refused at once
        with pytest.raises(QueueFull):
            await b.submit(list(range(13)))
        await b.close()
        worker.close()

    asyncio.run(scenario())
