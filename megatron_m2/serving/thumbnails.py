"""Thumbnails of an embedding store's images for ``GET /items/{id}/thumbnail``.

:class:`Thumbnails` reads an image store's item from its source (a folder or an indexed
dataset), decodes it within :data:`SOURCE_LIMITS` and keeps the small JPEGs it made in a cache.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional

from .limits import ApiError, Limits, decode_image
from .store import EmbeddingStore

__all__ = ["Thumbnails", "SOURCE_LIMITS"]

logger = logging.getLogger("m2-serve")


def _thumbnail_bytes(im, max_side: int) -> bytes:
    from PIL import ImageOps

    from ..data.transforms import to_rgb

    im = ImageOps.exif_transpose(im) or im
    im = to_rgb(im).copy()
    im.thumbnail((max_side, max_side))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=85)
    return out.getvalue()


SOURCE_LIMITS = Limits(max_image_bytes=256 * 1024 * 1024, max_image_pixels=178_956_970)
"""Bounds on a store's own images when thumbnails are made (the store's files are not
uploads, but a decompression bomb among them must not take the service down)."""


class Thumbnails:
    """Small JPEGs of an image store's items, read from its source: a folder (files strictly
    inside the folder; a path that leads outside, through ``..``, an absolute path or a
    symbolic link, is refused) or an indexed dataset. Recently made thumbnails are cached."""

    def __init__(self, store: EmbeddingStore, limits: Limits = SOURCE_LIMITS, *,
                 max_side: int = 128, source_root: Optional[os.PathLike] = None,
                 cache_size: int = 2048):
        self.store, self.limits, self.max_side = store, limits, max_side
        self.source = dict(store.manifest.get("source") or {})
        self.type = self.source.get("type")
        self.root = self._resolve_root(source_root)
        self._dataset = None
        self._cache: "OrderedDict[str, bytes]" = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        """Whether the store's items have images to show."""
        return self.store.kind == "image" and self.type in ("folder", "dataset")

    def _resolve_root(self, source_root) -> Optional[Path]:
        if source_root is not None:
            return Path(source_root).resolve()
        path = self.source.get("path")
        if not path:
            return None
        p = Path(path)
        if p.is_absolute():
            return p.resolve()
        # relative: to the directory m2-embed ran in (assumed the current one), else the store's
        for base in (Path.cwd(), self.store.directory):
            cand = base / p
            if cand.exists() or (self.type == "dataset" and Path(f"{cand}.idx").exists()):
                return cand.resolve()
        return (Path.cwd() / p).resolve()

    def _read_folder(self, item: Mapping[str, Any]) -> bytes:
        rel = item.get("path")
        if not isinstance(rel, str) or not rel or self.root is None:
            raise ApiError(404, f"item {item.get('id')!r} names no file")
        target = (self.root / rel).resolve()
        if target == self.root or not target.is_relative_to(self.root):
            logger.warning("refused item %r: its path %r leads outside %s", item.get("id"),
                           rel, self.root)
            raise ApiError(404, f"item {item.get('id')!r}: its file is outside the store's "
                                "source folder")
        if not target.is_file():
            raise ApiError(404, f"item {item.get('id')!r}: its file is missing")
        size = target.stat().st_size
        if size > self.limits.max_image_bytes:
            raise ApiError(404, f"item {item.get('id')!r}: its file has {size} bytes, above "
                                f"the {self.limits.max_image_bytes}-byte limit on thumbnails")
        return target.read_bytes()

    def _read_dataset(self, item: Mapping[str, Any]) -> bytes:
        from ..data.indexed import ImageTextIndexedDataset

        if self.root is None:
            raise ApiError(404, "the store names no dataset")
        with self._lock:
            if self._dataset is None:
                try:
                    self._dataset = ImageTextIndexedDataset(str(self.root))
                except Exception as e:  # noqa: BLE001 - reported as a missing source
                    logger.warning("cannot open the store's dataset %s: %s", self.root, e)
                    raise ApiError(404, "the store's source dataset cannot be read") from None
        index = item.get("index")
        if not isinstance(index, int) or not 0 <= index < len(self._dataset):
            raise ApiError(404, f"item {item.get('id')!r}: sample {index!r} is not in the "
                                "store's dataset")
        return self._dataset[index].image

    def get(self, item_id: str) -> bytes:
        """JPEG bytes of the item's thumbnail (``ApiError`` 404 for an unknown id, a text
        store, or an image that cannot be found or read)."""
        if not self.available:
            raise ApiError(404, f"the store holds {self.store.kind} items from a "
                                f"{self.type!r} source: no thumbnails")
        try:
            row = self.store.row(item_id)
        except KeyError:
            raise ApiError(404, f"no item with id {item_id!r}") from None
        with self._lock:
            if item_id in self._cache:
                self._cache.move_to_end(item_id)
                return self._cache[item_id]
        item = self.store.items[row]
        data = self._read_folder(item) if self.type == "folder" else self._read_dataset(item)
        try:
            im = decode_image(data, self.limits, name=f"item {item_id!r}",
                              draft=(self.max_side, self.max_side))
        except ApiError as e:
            logger.warning("no thumbnail: %s", e.message)
            raise ApiError(404, f"{e.message} (the store's source image)") from None
        thumb = _thumbnail_bytes(im, self.max_side)
        with self._lock:
            self._cache[item_id] = thumb
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return thumb

