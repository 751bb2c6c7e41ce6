"""The HTTP embedding and search service behind ``m2-serve`` (FastAPI).

:func:`create_app` wraps an :class:`~megatron_m2.inference.M2Encoder` and, optionally, an
:class:`~megatron_m2.serving.store.EmbeddingStore`:

======================================  ==========================================================
``GET /``                               the search page (``static/index.html``)
``GET /health``                         status, model and store summary, queues, batching counters
``POST /embed/text``                    ``{"texts": [...]}`` -> ``{"embeddings", "dim", ...}``
``POST /embed/image``                   multipart ``files`` (one or more images) -> embeddings
``POST /search``                        ``{"text", "k"}`` or multipart ``file`` (+ ``k``) -> top k
``GET /items/{id}/thumbnail``           a small JPEG of an image store's item
``GET /openapi.json``                   the API description
``GET /assets/cjk-font.otf``            the page's fallback CJK font (bundled subset)
======================================  ==========================================================

Every error is JSON ``{"error": "..."}`` with a 4xx status for the client's mistakes (413 image
or body too large, 413 too many pixels, 415 not an image, 422 invalid texts / ``k`` / batch
size, 404 unknown item or endpoint, 405 wrong method, 409 search without a store), 503 when the
queue is full and 500 (details in the server log only) for anything else.

Concurrent requests are gathered into batches per modality (:mod:`.batcher`); the model runs
on one worker thread, one forward at a time. Images are decoded and preprocessed on the request
threads, after their byte size and their pixel count (read from the header, before decoding)
are checked (:mod:`.limits`: the limits, image decoding and the ASGI middlewares;
:mod:`.thumbnails`: the thumbnails of a store's images; their public names are re-exported
here).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import BatcherClosed, EncoderWorker, MicroBatcher, QueueFull
from .limits import IMAGE_FORMATS, ApiError, Limits, _BodyLimit, _SecurityHeaders, decode_image
from .store import EmbeddingStore, StoreError, model_identity, same_model
from .thumbnails import Thumbnails

__all__ = ["Limits", "ApiError", "create_app", "check_store_model", "decode_image",
           "Thumbnails", "IMAGE_FORMATS"]

logger = logging.getLogger("m2-serve")


# -- model and store ---------------------------------------------------------------------------
def check_store_model(store: EmbeddingStore, identity: Mapping[str, Any], embed_dim: int,
                      allow_mismatch: bool = False) -> bool:
    """Refuse a store the encoder cannot search: always when the widths differ, and when it was
    embedded by another model (:func:`~megatron_m2.serving.store.same_model`) unless
    ``allow_mismatch``. Returns whether the models are the same; raises :class:`StoreError`."""
    if int(store.manifest.get("dim", -1)) != int(embed_dim):
        raise StoreError(f"{store.directory}: embeddings of width {store.manifest.get('dim')}, "
                         f"the model's are {embed_dim}: it was embedded by another model")
    same = same_model(store.model, identity)
    if not same:
        theirs, ours = store.model, identity
        diff = ", ".join(f"{k} {str(theirs.get(k))[:12]} vs {str(ours.get(k))[:12]}"
                         for k in ("weights_sha256", "tokenizer_sha256", "head")
                         if theirs.get(k) != ours.get(k))
        msg = (f"{store.directory} was embedded by another model than the one loaded "
               f"({diff}; store model {theirs.get('source')!r})")
        if not allow_mismatch:
            raise StoreError(msg + "; re-embed it with this model, or pass "
                                   "--allow-model-mismatch to serve it anyway")
        logger.warning("%s; serving it anyway (scores compare different models)", msg)
    return same


def _model_summary(identity: Mapping[str, Any], encoder) -> Dict[str, Any]:
    cfg = getattr(encoder, "cfg", None)
    source = str(identity.get("source") or "")
    return {"source": os.path.basename(os.path.normpath(source)) if source else None,
            "head": identity.get("head"),
            "weights_sha256": str(identity.get("weights_sha256") or "")[:12] or None,
            "tokenizer_sha256": str(identity.get("tokenizer_sha256") or "")[:12] or None,
            "text_style": identity.get("text_style"),
            "embed_dim": int(identity.get("embed_dim") or encoder.embed_dim),
            "image_size": getattr(cfg, "image_size", None),
            "max_text_len": getattr(cfg, "max_text_len", None),
            "device": str(getattr(encoder, "device", "")) or None,
            "dtype": str(getattr(encoder, "dtype", "")).replace("torch.", "") or None}


def _store_summary(store: Optional[EmbeddingStore], same: Optional[bool]) -> Optional[dict]:
    if store is None:
        return None
    index = store.manifest.get("index") or {}
    source = store.manifest.get("source") or {}
    return {"kind": store.kind, "count": len(store), "dim": int(store.manifest["dim"]),
            "index": index.get("type") or "exact", "source": source.get("type"),
            "name": store.directory.name, "same_model": same}


class TextsIn(BaseModel):
    """Body of ``POST /embed/text``."""

    texts: List[str]


class SearchIn(BaseModel):
    """JSON body of ``POST /search`` (``k`` is checked against the limits by the handler)."""

    text: str
    k: Any = 10


# -- the app -----------------------------------------------------------------------------------
CJK_FONT = "NotoSansCJKsc-Regular-demo-subset.otf"
"""The bundled CJK subset font (``megatron_m2/assets/fonts``), served to the page as a fallback
for machines without a CJK font (``unicode-range``: fetched only when CJK text is shown)."""


def _page() -> str:
    from importlib import resources

    return (resources.files("megatron_m2.serving") / "static" / "index.html").read_text("utf-8")


def _cjk_font() -> Optional[bytes]:
    from importlib import resources

    try:
        return (resources.files("megatron_m2") / "assets" / "fonts" / CJK_FONT).read_bytes()
    except OSError:
        return None


def _validation_message(errors: Sequence[Mapping[str, Any]]) -> Tuple[int, str]:
    parts = []
    for e in errors:
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return 400, f"the request body is not valid JSON ({ctx.get('error', 'decode error')})"
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    return 422, "; ".join(parts) or "invalid request"


def create_app(encoder, store: Optional[EmbeddingStore] = None, *,
               limits: Optional[Limits] = None, max_batch: int = 32, max_wait_ms: float = 5.0,
               max_queue: int = 256, identity: Optional[Mapping[str, Any]] = None,
               allow_model_mismatch: bool = False, source_root: Optional[os.PathLike] = None,
               thumbnail_size: int = 128):
    """The FastAPI app serving ``encoder`` (and searching ``store`` when given).

    Args:
        encoder: an :class:`~megatron_m2.inference.M2Encoder` (or anything with its
            ``encode_text``, ``encode_image``, ``transform``, ``embed_dim`` and ``head``).
        store: the embedding store ``/search`` searches (None: ``/search`` answers 409).
        limits: per-request limits (:class:`Limits`).
        max_batch: most items per forward pass; concurrent requests are gathered up to it.
        max_wait_ms: longest wait of a request for its batch to fill.
        max_queue: most items waiting per modality; beyond it requests get 503.
        identity: the encoder's :func:`~megatron_m2.serving.store.model_identity` (computed
            when None; the CLI passes the one it computed with the checkpoint's path).
        allow_model_mismatch: serve a store embedded by another model (else
            :class:`~megatron_m2.serving.store.StoreError`).
        source_root: the folder or dataset prefix of the store's images, when it moved since
            the store was written (default: the path recorded in the store).
        thumbnail_size: longest side of ``/items/{id}/thumbnail`` images.
    """
    limits = limits or Limits()
    if thumbnail_size < 1:
        raise ValueError(f"thumbnail_size must be >= 1, got {thumbnail_size}")
    if identity is None:
        identity = model_identity(encoder, "<in-memory>")
    same = None
    if store is not None:
        same = check_store_model(store, identity, encoder.embed_dim, allow_model_mismatch)
    model_info = _model_summary(identity, encoder)
    model_short = {k: model_info[k] for k in ("source", "head", "weights_sha256")}
    store_info = _store_summary(store, same)
    thumbs = Thumbnails(store, max_side=thumbnail_size, source_root=source_root) \
        if store is not None else None
    has_tokenizer = getattr(encoder, "tokenizer", True) is not None
    page = _page()
    started = time.time()
    t0 = time.monotonic()

    worker = EncoderWorker()

    def encode_texts(texts: List[str]) -> torch.Tensor:
        return encoder.encode_text(texts, batch_size=max_batch)

    def encode_images(tensors: List[torch.Tensor]) -> torch.Tensor:
        return encoder.encode_image(tensors, batch_size=max_batch)

    text_batcher = MicroBatcher(encode_texts, worker, max_batch=max_batch,
                                max_wait_ms=max_wait_ms, max_queue=max_queue, name="texts")
    image_batcher = MicroBatcher(encode_images, worker, max_batch=max_batch,
                                 max_wait_ms=max_wait_ms, max_queue=max_queue, name="images")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await text_batcher.close()
        await image_batcher.close()
        worker.close()

    app = FastAPI(title="M2-Encoder embedding and search service", lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Bilingual (English/Chinese) image and text embeddings and "
                              "nearest-neighbour search. Errors are JSON {\"error\": \"...\"}.")
    app.state.encoder, app.state.store, app.state.limits = encoder, store, limits
    app.state.batchers = {"text": text_batcher, "image": image_batcher}
    app.state.worker = worker

    # -- errors --------------------------------------------------------------------------------
    def error(status: int, message: str, headers: Optional[Mapping[str, str]] = None):
        return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error(*_validation_message(exc.errors()))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.error("%s %s failed: %r", request.method, request.url.path, exc)
        return error(500, "internal error (details are in the server log)")

    async def run_batch(batcher: MicroBatcher, items: Sequence[Any]) -> torch.Tensor:
        try:
            return await batcher.submit(items)
        except QueueFull as e:
            raise ApiError(503, f"the service is busy: {e}", {"Retry-After": "1"}) from None
        except BatcherClosed as e:
            raise ApiError(503, str(e)) from None

    # -- inputs --------------------------------------------------------------------------------
    def check_texts(texts: Sequence[str], field: str = "texts") -> List[str]:
        if not texts:
            raise ApiError(422, f"{field}: give at least one text")
        if len(texts) > limits.max_texts_per_request:
            raise ApiError(422, f"{field}: {len(texts)} texts; the limit is "
                                f"{limits.max_texts_per_request} per request")
        for i, t in enumerate(texts):
            where = f"{field}[{i}]" if len(texts) > 1 or field == "texts" else field
            if not t.strip():
                raise ApiError(422, f"{where} is empty")
            if len(t) > limits.max_text_chars:
                raise ApiError(422, f"{where} has {len(t)} characters; the limit is "
                                    f"{limits.max_text_chars}")
        return list(texts)

    def check_k(k: Any) -> int:
        if isinstance(k, str):
            try:
                k = int(k.strip())
            except ValueError:
                raise ApiError(422, f"k must be an integer, got {k!r}") from None
        if isinstance(k, bool) or not isinstance(k, int):
            raise ApiError(422, f"k must be an integer, got {k!r}")
        if not 1 <= k <= limits.max_k:
            raise ApiError(422, f"k must be between 1 and {limits.max_k}, got {k}")
        return k

    def prepare_image(data: bytes, name: str) -> Tuple[torch.Tensor, Dict[str, Any]]:
        im = decode_image(data, limits, name)
        info = {"filename": name, "format": im.format, "width": im.width, "height": im.height}
        return encoder.transform(im), info

    async def read_upload(upload: UploadFile, name: str) -> Tuple[torch.Tensor, Dict[str, Any]]:
        size = getattr(upload, "size", None)
        if size is not None and size > limits.max_image_bytes:
            raise ApiError(413, f"{name}: {size} bytes; the limit is {limits.max_image_bytes} "
                                "bytes per image")
        data = await upload.read(limits.max_image_bytes + 1)
        return await run_in_threadpool(prepare_image, data, name)

    def upload_name(upload: UploadFile, i: int) -> str:
        return upload.filename or f"file {i}"

    @contextlib.asynccontextmanager
    async def read_form(request: Request, max_files: int, too_many: str):
        try:
            form = await request.form(max_files=max_files, max_fields=max_files + 8)
        except StarletteHTTPException as e:
            if e.status_code != 400:
                raise
            if "Too many files" in str(e.detail):
                raise ApiError(422, too_many) from None
            raise ApiError(400, f"malformed form data: {e.detail}") from None
        try:
            yield form
        finally:
            await form.close()

    def need_tokenizer() -> None:
        if not has_tokenizer:
            raise ApiError(409, "the loaded checkpoint carries no tokenizer, so texts cannot be "
                                "embedded: start m2-serve with --tokenizer-model")

    # -- endpoints -----------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/assets/cjk-font.otf", include_in_schema=False)
    async def cjk_font():
        data = await run_in_threadpool(_cjk_font)
        if data is None:
            raise ApiError(404, "the bundled CJK font is not installed")
        return Response(data, media_type="font/otf",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/health", summary="Service status, model, store, queues and batching counters")
    async def health():
        stats = {name: b.stats() for name, b in app.state.batchers.items()}
        batches = sum(s["batches"] for s in stats.values())
        items = sum(s["items"] for s in stats.values())
        return JSONResponse({
            "status": "ok", "uptime_s": round(time.monotonic() - t0, 3),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "model": model_info, "store": store_info,
            "queue_depth": sum(s["queued"] + s["in_flight"] for s in stats.values()),
            "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms,
                         "max_queue": max_queue, "batches": batches, "items": items,
                         "mean_batch_size": round(items / batches, 3) if batches else 0.0,
                         "forward_calls": worker.calls,
                         "encoder_busy_s": round(worker.busy_s, 3), **stats},
            "limits": asdict(limits)})

    @app.post("/embed/text", summary="Embed texts (English, Chinese or mixed)")
    async def embed_text(body: TextsIn):
        need_tokenizer()
        texts = check_texts(body.texts)
        rows = await run_batch(text_batcher, texts)
        return JSONResponse({"embeddings": rows.tolist(), "dim": int(rows.shape[1]),
                             "count": len(texts), "model": model_short})

    image_form = {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}

    @app.post("/embed/image", summary="Embed uploaded images (multipart field 'files')",
              openapi_extra=image_form)
    async def embed_image(request: Request):
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise ApiError(415, "send the images as multipart/form-data, field 'files'")
        async with read_form(request, limits.max_images_per_request + 1,
                             f"too many files: the limit is {limits.max_images_per_request} "
                             "images per request") as form:
            uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
            if not uploads:
                other = [f for _, f in form.multi_items() if isinstance(f, UploadFile)]
                raise ApiError(422, "no images: send them in the multipart field 'files'"
                               + (" (got files under another field name)" if other else ""))
            if len(uploads) > limits.max_images_per_request:
                raise ApiError(422, f"{len(uploads)} images; the limit is "
                                    f"{limits.max_images_per_request} per request")
            prepared = [await read_upload(u, upload_name(u, i)) for i, u in enumerate(uploads)]
        rows = await run_batch(image_batcher, [t for t, _ in prepared])
        return JSONResponse({"embeddings": rows.tolist(), "dim": int(rows.shape[1]),
                             "count": len(prepared), "images": [i for _, i in prepared],
                             "model": model_short})

    search_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["text"], "properties": {
            "text": {"type": "string"}, "k": {"type": "integer", "default": 10}}}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}, "text": {"type": "string"},
            "k": {"type": "integer", "default": 10}}}}}}}

    def results(scores: torch.Tensor, rows: torch.Tensor, root_path: str) -> List[dict]:
        out = []
        for score, row in zip(scores.tolist(), rows.tolist()):
            if row < 0:  # an approximate index found fewer than k
                continue
            item = store.items[row]
            rec = {"rank": len(out) + 1, "id": str(item["id"]), "score": float(score)}
            rec.update({k: v for k, v in item.items() if k not in rec})
            if thumbs is not None and thumbs.available:
                rec["thumbnail"] = f"{root_path}/items/{quote(rec['id'], safe='')}/thumbnail"
            out.append(rec)
        return out

    @app.post("/search", summary="Nearest store items of a text or an image",
              openapi_extra=search_body)
    async def search(request: Request):
        if store is None:
            raise ApiError(409, "no embedding store is loaded: start m2-serve with --store DIR "
                                "to search")
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            async with read_form(request, 2, "search takes one image 'file'") as form:
                uploads = [(key, f) for key, f in form.multi_items() if isinstance(f, UploadFile)]
                if any(key != "file" for key, _ in uploads):
                    raise ApiError(422, "send the query image in the multipart field 'file'")
                if len(uploads) > 1:
                    raise ApiError(422, "search takes one image 'file'")
                text = form.get("text")
                k = check_k(form.get("k", "10"))
                if uploads and text is not None:
                    raise ApiError(422, "give a text or an image 'file', not both")
                if uploads:
                    upload = uploads[0][1]
                    tensor, info = await read_upload(upload, upload_name(upload, 0))
                    query = {"type": "image", **info}
                    q = await run_batch(image_batcher, [tensor])
                elif isinstance(text, str):
                    need_tokenizer()
                    query = {"type": "text", "text": check_texts([text], "text")[0]}
                    q = await run_batch(text_batcher, [query["text"]])
                else:
                    raise ApiError(422, "no query: send a 'text' field or an image 'file'")
        elif ctype.startswith("application/json") or not ctype:
            try:
                raw = json.loads(await request.body())
            except ValueError as e:
                raise ApiError(400, f"the request body is not valid JSON ({e})") from None
            try:
                body = SearchIn.model_validate(raw)
            except ValidationError as e:
                raise ApiError(*_validation_message(e.errors())) from None
            k = check_k(body.k)
            need_tokenizer()
            query = {"type": "text", "text": check_texts([body.text], "text")[0]}
            q = await run_batch(text_batcher, [query["text"]])
        else:
            raise ApiError(415, "send JSON {\"text\": ..., \"k\": ...} or multipart/form-data "
                                "with an image 'file' (and 'k')")
        scores, rows = await run_in_threadpool(store.search, q, k)
        return JSONResponse({"query": query, "k": k, "store": store_info["kind"],
                             "results": results(scores[0], rows[0],
                                                request.scope.get("root_path", ""))})

    @app.get("/items/{item_id:path}/thumbnail", summary="Thumbnail of an image store's item",
             response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "unknown"}})
    async def thumbnail(item_id: str):
        if thumbs is None:
            raise ApiError(404, "no embedding store is loaded")
        data = await run_in_threadpool(thumbs.get, item_id)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=3600"})

    app.add_middleware(_BodyLimit, limits=limits)
    app.add_middleware(_SecurityHeaders)
    return app
