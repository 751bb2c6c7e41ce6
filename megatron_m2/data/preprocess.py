"""Turn image–caption collections into indexed datasets, accounting for every input record.

Inputs (:func:`iter_records` picks the reader from the path):

* **JSONL manifest** (``*.jsonl``): one record per line, ``"image"`` (a path relative to the
  manifest, or absolute) and captions as ``"captions": [{"text": ..., "lang": "en"|"zh"}]`` or
  the shorthand ``"caption_en"`` / ``"caption_zh"``;
* **webdataset shards** (``*.tar``): members grouped by key (the name up to the first dot of its
  base name); an image member (jpg/jpeg/png/webp/bmp/gif) plus ``txt`` (one caption, language
  ``--default-lang``) and/or ``json`` (``caption``/``captions``/``caption_en``/``caption_zh``).
  Members are read in memory, never extracted; one with an absolute or ``..`` path is rejected;
* **Chinese-CLIP layout** (``*.tsv``): ``image_id<TAB>base64 image`` rows, captions from the
  JSONL next to it (``--texts``, default: the ``.tsv`` name with ``.jsonl``; lines of
  ``{"text_id", "text", "image_ids"}``), Chinese.

Each record is processed in a worker process: the image is decoded with a pixel limit
(decompression bombs), fully loaded (truncated files), converted to RGB, shrunk to a maximum
side and re-encoded as JPEG; captions are Unicode-normalised, checked (not empty, not over-long,
valid text) and tokenized. A record is **written** or **rejected** with a reason — never both,
never neither — so ``records = written + rejected``; rejects go to a JSONL log with the record's
location (``file:line`` or ``shard.tar:key``).

Work is cut into chunks of consecutive records, each written to its own small indexed dataset
under ``<prefix>.parts/`` and marked done atomically. A killed run resumes from the chunks already
done (``--resume``, the default) or starts over; the final ``<prefix>.bin``/``.idx`` are
assembled in input order at the end and renamed into place, so an interruption can never leave
duplicated or partial records under the final names. Output order is the input order whatever
the number of workers.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import shutil
import tarfile
import warnings
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

__all__ = ["PreprocessConfig", "RawRecord", "Result", "iter_records", "process_record",
           "preprocess", "Summary"]

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
LANGS = ("en", "zh")


@dataclass
class PreprocessConfig:
    """Options of a preprocessing run."""

    tokenizer_model: str
    """SentencePiece model used to tokenize captions."""
    max_image_size: int = 512
    """Images are shrunk (aspect kept) so that their longer side is at most this."""
    jpeg_quality: int = 95
    """Quality of the re-encoded JPEG."""
    max_image_pixels: int = 64_000_000
    """Decoded images above this many pixels are rejected as decompression bombs."""
    max_caption_chars: int = 1000
    """Captions longer than this (after normalisation) are rejected."""
    default_lang: str = "en"
    """Language of captions that do not say (webdataset ``txt`` members)."""
    workers: int = 1
    """Worker processes."""
    chunk_size: int = 1024
    """Records per resumable chunk."""


@dataclass
class RawRecord:
    """One input record before processing: where it came from and what it holds."""

    location: str
    image_path: Optional[str] = None
    image_bytes: Optional[bytes] = None
    captions: List[Tuple[str, str]] = field(default_factory=list)
    error: Optional[str] = None
    """Set when the record was already unusable while reading the input."""


@dataclass
class Result:
    location: str
    image: Optional[bytes] = None
    captions: Optional[List[Tuple[str, List[int]]]] = None
    error: Optional[str] = None


@dataclass
class Summary:
    records: int = 0
    written: int = 0
    rejected: int = 0

    def to_dict(self) -> Dict[str, int]:
        return {"records": self.records, "written": self.written, "rejected": self.rejected}


# -- readers ---------------------------------------------------------------------------------------
def _captions_from_obj(obj: dict, default_lang: str) -> Tuple[List[Tuple[str, str]], Optional[str]]:
    caps: List[Tuple[str, str]] = []
    if "captions" in obj:
        if not isinstance(obj["captions"], list):
            return [], "field 'captions' is not a list"
        for i, c in enumerate(obj["captions"]):
            if isinstance(c, str):
                caps.append((default_lang, c))
            elif isinstance(c, dict) and isinstance(c.get("text"), str):
                caps.append((str(c.get("lang", default_lang)), c["text"]))
            else:
                return [], f"captions[{i}] has no string 'text'"
    for lang in LANGS:
        v = obj.get(f"caption_{lang}")
        if v is not None:
            if not isinstance(v, str):
                return [], f"field 'caption_{lang}' is not a string"
            caps.append((lang, v))
    if "caption" in obj and isinstance(obj["caption"], str):
        caps.append((default_lang, obj["caption"]))
    if not caps:
        return [], "no caption field ('captions', 'caption_en', 'caption_zh')"
    return caps, None


def iter_jsonl_manifest(path: str, default_lang: str) -> Iterator[RawRecord]:
    base = Path(path).resolve().parent
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            loc = f"{path}:{lineno}"
            if not raw.strip():
                continue  # blank lines are not records
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRecord(loc, error=f"invalid UTF-8 at byte {e.start}")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield RawRecord(loc, error=f"malformed JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield RawRecord(loc, error="record is not a JSON object")
                continue
            image = obj.get("image")
            if not isinstance(image, str) or not image:
                yield RawRecord(loc, error="missing or non-string 'image' field")
                continue
            caps, err = _captions_from_obj(obj, default_lang)
            if err:
                yield RawRecord(loc, error=err)
                continue
            img_path = image if os.path.isabs(image) else str(base / image)
            yield RawRecord(loc, image_path=img_path, captions=caps)


def _unsafe_member(name: str) -> bool:
    p = Path(name)
    return name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts


def iter_webdataset(path: str, default_lang: str) -> Iterator[RawRecord]:
    """Group consecutive members by key, as webdataset does; nothing is extracted."""
    current_key, group, bad = None, {}, None

    def flush():
        loc = f"{path}:{current_key}"
        if bad:
            return RawRecord(loc, error=bad)
        img_ext = next((e for e in IMAGE_EXTS if e in group), None)
        if img_ext is None:
            return RawRecord(loc, error=f"no image member (have: {', '.join(sorted(group))})")
        caps: List[Tuple[str, str]] = []
        if "json" in group:
            try:
                obj = json.loads(group["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return RawRecord(loc, error=f"unreadable json member: {e}")
            if isinstance(obj, dict):
                caps, err = _captions_from_obj(obj, default_lang)
                if err and "txt" not in group:
                    return RawRecord(loc, error=err)
        if "txt" in group:
            try:
                caps.append((default_lang, group["txt"].decode("utf-8")))
            except UnicodeDecodeError as e:
                return RawRecord(loc, error=f"txt member is not valid UTF-8 (byte {e.start})")
        if not caps:
            return RawRecord(loc, error="no caption member (txt or json)")
        return RawRecord(loc, image_bytes=group[img_ext], captions=caps)

    try:
        tf = tarfile.open(path, mode="r|*")
    except (tarfile.TarError, OSError) as e:
        yield RawRecord(f"{path}", error=f"unreadable tar: {e}")
        return
    with tf:
        try:
            for m in tf:
                if not m.isfile():
                    continue
                name = m.name
                base = os.path.basename(name)
                key = os.path.join(os.path.dirname(name), base.split(".", 1)[0])
                ext = base.split(".", 1)[1].lower() if "." in base else ""
                if key != current_key:
                    if current_key is not None:
                        yield flush()
                    current_key, group, bad = key, {}, None
                if _unsafe_member(name):
                    bad = f"unsafe member path {name!r} (absolute or '..')"
                    continue
                data = tf.extractfile(m).read()
                group[ext] = data
        except (tarfile.TarError, OSError, EOFError) as e:
            if current_key is not None:
                bad = bad or f"truncated or corrupt tar: {e}"
        if current_key is not None:
            yield flush()


def iter_chinese_clip(tsv_path: str, texts_path: Optional[str] = None) -> Iterator[RawRecord]:
    """Chinese-CLIP layout: one record per image row; texts not matching an image are rejects."""
    texts_path = texts_path or str(Path(tsv_path).with_suffix(".jsonl"))
    by_image: Dict[str, List[Tuple[str, str]]] = {}
    text_errors: List[RawRecord] = []
    text_refs: Dict[str, List[str]] = {}
    with open(texts_path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            loc = f"{texts_path}:{lineno}"
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
                text, ids = obj["text"], obj["image_ids"]
                if not isinstance(text, str) or not isinstance(ids, list):
                    raise TypeError("'text' must be a string and 'image_ids' a list")
            except UnicodeDecodeError as e:
                text_errors.append(RawRecord(loc, error=f"invalid UTF-8 at byte {e.start}"))
                continue
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                text_errors.append(RawRecord(loc, error=f"malformed text record: {e}"))
                continue
            for image_id in ids:
                by_image.setdefault(str(image_id), []).append(("zh", text))
                text_refs.setdefault(str(image_id), []).append(loc)
    seen = set()
    with open(tsv_path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            loc = f"{tsv_path}:{lineno}"
            if not raw.strip():
                continue
            parts = raw.rstrip(b"\r\n").split(b"\t")
            if len(parts) != 2:
                yield RawRecord(loc, error=f"expected 2 tab-separated fields, got {len(parts)}")
                continue
            image_id = parts[0].decode("utf-8", "replace")
            seen.add(image_id)
            try:
                data = base64.b64decode(parts[1], validate=True)
            except (binascii.Error, ValueError) as e:
                yield RawRecord(loc, error=f"invalid base64 image: {e}")
                continue
            caps = by_image.get(image_id)
            if not caps:
                yield RawRecord(loc, error=f"image {image_id!r} has no caption in {texts_path}")
                continue
            yield RawRecord(loc, image_bytes=data, captions=caps)
    yield from text_errors
    for image_id, locs in text_refs.items():
        if image_id not in seen:
            for loc in locs:
                yield RawRecord(loc, error=f"caption references unknown image {image_id!r}")


def iter_records(path: str, default_lang: str = "en",
                 texts: Optional[str] = None) -> Iterator[RawRecord]:
    """Records of one input file, by extension (``.jsonl``, ``.tar``, ``.tsv``)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return iter_jsonl_manifest(path, default_lang)
    if suffix == ".tar":
        return iter_webdataset(path, default_lang)
    if suffix == ".tsv":
        return iter_chinese_clip(path, texts)
    raise ValueError(f"{path}: unknown input type {suffix!r} (expected .jsonl, .tar or .tsv)")


# -- per-record work (worker processes) ------------------------------------------------------------
_WORKER: Dict[str, object] = {}


def _init_worker(cfg: PreprocessConfig) -> None:
    from PIL import Image

    from .tokenizer import M2Tokenizer

    _WORKER["cfg"] = cfg
    _WORKER["tok"] = M2Tokenizer(cfg.tokenizer_model)
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
    # Over the limit PIL only warns (up to 2x) before it raises: make both an error.
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _encode_image(data: bytes, cfg: PreprocessConfig) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode everything now: truncated/corrupt data fails here
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(bg, rgba).convert("RGB")
        else:
            rgb = img.convert("RGB")
    w, h = rgb.size
    if max(w, h) > cfg.max_image_size:
        s = cfg.max_image_size / max(w, h)
        rgb = rgb.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=cfg.jpeg_quality)
    return out.getvalue()


def process_record(rec: RawRecord) -> Result:
    """Validate, decode, re-encode and tokenize one record (in a worker process)."""
    from PIL import Image, UnidentifiedImageError

    from .tokenizer import normalize_caption

    cfg: PreprocessConfig = _WORKER["cfg"]  # type: ignore[assignment]
    tok = _WORKER["tok"]
    if rec.error:
        return Result(rec.location, error=rec.error)
    captions: List[Tuple[str, List[int]]] = []
    for i, (lang, text) in enumerate(rec.captions):
        norm = normalize_caption(text)
        if not norm:
            return Result(rec.location, error=f"caption {i} ({lang}) is empty")
        if len(norm) > cfg.max_caption_chars:
            return Result(rec.location, error=f"caption {i} ({lang}) has {len(norm)} characters "
                                              f"(limit {cfg.max_caption_chars})")
        if any(0xD800 <= ord(ch) <= 0xDFFF or ch == "\0" for ch in norm):
            return Result(rec.location, error=f"caption {i} ({lang}) holds invalid characters")
        captions.append((lang if lang in LANGS else "other", tok.frame(tok.encode(norm),
                                                                        max_length=1 << 30)))
    data = rec.image_bytes
    if data is None:
        try:
            with open(rec.image_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return Result(rec.location, error=f"missing image file {rec.image_path}")
        except OSError as e:
            return Result(rec.location, error=f"unreadable image file {rec.image_path}: {e}")
    try:
        image = _encode_image(data, cfg)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Result(rec.location, error=f"decompression bomb: {e}")
    except UnidentifiedImageError:
        return Result(rec.location, error="not an image (unidentified format)")
    except (OSError, SyntaxError, ValueError) as e:
        return Result(rec.location, error=f"corrupt or truncated image: {e}")
    return Result(rec.location, image=image, captions=captions)


# -- the run ---------------------------------------------------------------------------------------
def _chunked(it: Iterable[RawRecord], n: int) -> Iterator[List[RawRecord]]:
    chunk: List[RawRecord] = []
    for r in it:
        chunk.append(r)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def preprocess(inputs: List[str], output_prefix: str, cfg: PreprocessConfig,
               reject_log: Optional[str] = None, resume: bool = True,
               texts: Optional[str] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> Summary:
    """Preprocess ``inputs`` into ``output_prefix.{bin,idx}``; returns the accounting.

    ``progress(records_done, rejected)`` is called after every chunk (for progress bars).
    """
    from .indexed import ImageTextWriter

    parts = Path(output_prefix + ".parts")
    if parts.exists() and not resume:
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    summary = Summary()

    def records() -> Iterator[RawRecord]:
        for path in inputs:
            yield from iter_records(path, cfg.default_lang, texts)

    ctx = get_context("spawn")
    pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg,)) if (
        cfg.workers > 1) else None
    if pool is None:
        _init_worker(cfg)
    chunk_ids: List[int] = []
    try:
        for ci, chunk in enumerate(_chunked(records(), cfg.chunk_size)):
            chunk_ids.append(ci)
            done = parts / f"{ci:06d}.done.json"
            if done.exists():  # resumed: this chunk was finished by an earlier run
                counts = json.loads(done.read_text())
                if counts["records"] != len(chunk):
                    raise RuntimeError(f"{done}: the input changed since the interrupted run "
                                       f"({counts['records']} vs {len(chunk)} records); rerun "
                                       f"with --no-resume")
            else:
                results = (pool.imap(process_record, chunk, chunksize=8) if pool
                           else map(process_record, chunk))
                counts = _write_chunk(parts, ci, results)
            summary.records += counts["records"]
            summary.written += counts["written"]
            summary.rejected += counts["rejected"]
            if progress:
                progress(summary.records, summary.rejected)
    finally:
        if pool:
            pool.close()
            pool.join()

    # Assemble in input order, then swap into place.
    with ImageTextWriter(output_prefix) as writer:
        for ci in chunk_ids:
            writer.add_dataset(str(parts / f"{ci:06d}"))
    if reject_log:
        tmp = reject_log + ".tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            for ci in chunk_ids:
                out.write((parts / f"{ci:06d}.rejects.jsonl").read_text(encoding="utf-8"))
        os.replace(tmp, reject_log)
    shutil.rmtree(parts)
    return summary


def _write_chunk(parts: Path, ci: int, results: Iterable[Result]) -> Dict[str, int]:
    from .indexed import ImageTextWriter

    counts = {"records": 0, "written": 0, "rejected": 0}
    rejects = parts / f"{ci:06d}.rejects.jsonl"
    with ImageTextWriter(str(parts / f"{ci:06d}")) as writer, \
            open(str(rejects) + ".tmp", "w", encoding="utf-8") as rej:
        for r in results:
            counts["records"] += 1
            if r.error:
                counts["rejected"] += 1
                rej.write(json.dumps({"location": r.location, "reason": r.error},
                                     ensure_ascii=False) + "\n")
            else:
                writer.add_sample(r.image, r.captions)
                counts["written"] += 1
    os.replace(str(rejects) + ".tmp", rejects)
    done = parts / f"{ci:06d}.done.json"
    tmp = str(done) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(counts, f)
    os.replace(tmp, done)  # the chunk counts as finished only once this marker exists
    return counts
