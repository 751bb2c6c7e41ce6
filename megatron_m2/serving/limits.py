"""What one request to ``m2-serve`` may hold, and how its inputs are checked.

:class:`Limits` (per-request bounds), :class:`ApiError` (a refused request, answered as JSON
``{"error": ...}`` with its status), :func:`decode_image` (uploaded bytes to a loaded PIL image,
its size and pixel count checked before the pixels are decoded) and the pure ASGI middlewares
:class:`_BodyLimit` (413 on bodies above the limits) and :class:`_SecurityHeaders` that
:func:`~megatron_m2.serving.app.create_app` installs.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from typing import List, Mapping, Optional, Tuple

from fastapi import HTTPException

__all__ = ["Limits", "ApiError", "decode_image", "IMAGE_FORMATS"]

IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow formats accepted for uploads (others are refused as 415 before any decoding)."""

_MULTIPART_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may hold. Each limit violated is a 4xx with a message naming it."""

    max_image_bytes: int = 10 * 1024 * 1024
    """Bytes of one uploaded image file (413 above)."""
    max_image_pixels: int = 40_000_000
    """Width x height of one image, read from its header before decoding (413 above)."""
    max_images_per_request: int = 16
    """Files of one ``/embed/image`` request (422 above)."""
    max_text_chars: int = 1000
    """Characters of one text (422 above)."""
    max_texts_per_request: int = 64
    """Texts of one ``/embed/text`` request (422 above)."""
    max_k: int = 100
    """Largest ``k`` of ``/search`` (422 above, or below 1)."""

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")

    @property
    def max_json_bytes(self) -> int:
        """Largest non-multipart request body (UTF-8 texts at up to 4 bytes per character,
        plus JSON overhead)."""
        return max(64 * 1024, self.max_texts_per_request * (4 * self.max_text_chars + 16)
                   + 64 * 1024)

    @property
    def max_multipart_bytes(self) -> int:
        """Largest multipart request body (every file at its limit, plus headers)."""
        return (self.max_images_per_request * (self.max_image_bytes + _MULTIPART_OVERHEAD)
                + _MULTIPART_OVERHEAD)


class ApiError(Exception):
    """A request the service refuses: answered ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Optional[Mapping[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


# -- images ------------------------------------------------------------------------------------
def _formats() -> List[str]:
    """:data:`IMAGE_FORMATS` whose Pillow plugins are present (all of them registered)."""
    from PIL import Image

    Image.init()
    return [f for f in IMAGE_FORMATS if f in Image.OPEN]


def decode_image(data: bytes, limits: Limits, name: str = "image",
                 draft: Optional[Tuple[int, int]] = None):
    """Decode uploaded bytes into a loaded PIL image, or raise :class:`ApiError`.

    413 when the bytes exceed ``max_image_bytes`` or the header announces more than
    ``max_image_pixels`` pixels (checked before the pixels are decoded; Pillow's own
    decompression-bomb guard also answers 413), 415 when the bytes are not an image in one of
    :data:`IMAGE_FORMATS`, 422 when the image is corrupt or truncated. Only the first frame of
    an animation is decoded. ``draft``: a size the caller reduces the image to anyway (a JPEG
    is then decoded at the smallest scale at least that large).
    """
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise ApiError(413, f"{name}: {len(data)} bytes; the limit is "
                            f"{limits.max_image_bytes} bytes per image")
    if not data:
        raise ApiError(422, f"{name}: empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=_formats())
    except UnidentifiedImageError:
        raise ApiError(415, f"{name}: not an image (accepted formats: "
                            f"{', '.join(f for f in IMAGE_FORMATS if f != 'MPO')})") from None
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"{name}: too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ApiError(422, f"{name}: cannot read the image header: {e}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise ApiError(422, f"{name}: image of size {w}x{h}")
    if w * h > limits.max_image_pixels:
        raise ApiError(413, f"{name}: {w}x{h} = {w * h} pixels; the limit is "
                            f"{limits.max_image_pixels} pixels per image")
    try:
        if draft is not None:
            im.draft("RGB", draft)
        im.load()
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"{name}: too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ApiError(422, f"{name}: cannot decode the {im.format} image: {e}") from None
    return im


# -- middleware --------------------------------------------------------------------------------
def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}, ensure_ascii=False).encode()


class _BodyLimit:
    """Pure ASGI middleware refusing request bodies above a limit with 413: at once from
    ``Content-Length``, or while reading a body sent without one."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"").decode("latin-1").lower()
        multipart = ctype.startswith("multipart/")
        limit = self.limits.max_multipart_bytes if multipart else self.limits.max_json_bytes
        what = (f"{self.limits.max_images_per_request} images of up to "
                f"{self.limits.max_image_bytes} bytes" if multipart else "texts")
        message = f"request body too large: the limit is {limit} bytes ({what})"
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = False
            if too_big:
                body = _error_body(message)
                await send({"type": "http.response.start", "status": 413, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message_ = await receive()
            if message_["type"] == "http.request":
                seen += len(message_.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, message)  # FastAPI re-raises it as is
            return message_

        await self.app(scope, limited_receive, send)


class _SecurityHeaders:
    """Pure ASGI middleware adding ``nosniff``, no-referrer and frame-denial headers to every
    response, and a same-origin content security policy to HTML pages."""

    CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
           "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; "
           "base-uri 'none'; form-action 'self'")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {k.lower() for k, _ in headers}
                extra = [(b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
                ctype = dict(headers).get(b"content-type", b"")
                if ctype.startswith(b"text/html"):
                    extra.append((b"content-security-policy", self.CSP.encode()))
                headers += [(k, v) for k, v in extra if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
