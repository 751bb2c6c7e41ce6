"""Readers of image–caption collections: one record reader for preprocessing and tokenizer training.

Every input is read into :class:`RawRecord` objects (an image, its captions with a language, and
where the record came from), or, for tokenizer training, into captions alone
(:func:`iter_captions`), by the same code. Supported layouts (``--input-format auto`` picks one
from the path, :func:`detect_format`):

``jsonl``
    One JSON object per line (``*.jsonl``, ``*.json``): ``"image"`` (a path relative to the
    manifest, or absolute) and captions as ``"captions": [{"text": ..., "lang": "en"|"zh"}]``
    (or plain strings), ``"caption_en"`` / ``"caption_zh"``, ``"caption"`` or ``"text"``.
``webdataset``
    Tar shards as the ``webdataset`` library reads them (its ``gopen`` and tar iteration):
    brace expansion (``shards/{000..099}.tar``), ``.tar``, ``.tar.gz``/``.tgz``, ``pipe:``
    commands and URLs. Members are grouped by key (the name up to the first dot of its base
    name) into samples: an image member (jpg/jpeg/png/webp/bmp/gif) plus ``txt`` (one caption)
    and/or ``json`` (``caption``/``captions``/``caption_en``/``caption_zh``, img2dataset's and
    our own metadata). Members are read in memory, never extracted; a member with an absolute or
    ``..`` path makes its sample a reject.
``chinese-clip``
    Chinese-CLIP's layout: ``{split}_imgs.tsv`` rows ``image_id<TAB>base64 image`` (the URL-safe
    alphabet its own tools write, or the standard one), captions from ``{split}_texts.jsonl``
    (``{"text_id", "text", "image_ids"}`` per line; ``--texts`` names another file).
``csv``
    OpenCLIP's CSV/TSV convention: a header row, one image path column (``--csv-img-key``,
    default ``filepath``) and caption columns (``--csv-caption-key``, default ``title``; ``LANG=
    COLUMN`` gives a column its language), separated by ``--csv-separator`` (default: a comma
    for ``*.csv``, a tab for ``*.tsv``). Image paths are relative to the CSV file.

A ``*.tsv`` with a header naming ``--csv-img-key`` is read as CSV, any other ``*.tsv`` as
Chinese-CLIP. Records that are already unusable while reading carry an ``error`` (and are
rejected with that reason by preprocessing), so every line, row or sample of the input is
accounted for.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ..errors import UserError

__all__ = ["RawRecord", "ReaderOptions", "InputError", "INPUT_FORMATS", "IMAGE_EXTS", "LANGS",
           "expand_inputs", "detect_format", "check_inputs", "iter_records", "iter_captions",
           "decode_base64_image", "default_texts_path"]

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
LANGS = ("en", "zh")
INPUT_FORMATS = ("auto", "jsonl", "webdataset", "chinese-clip", "csv")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # pipe:, http:, s3:, file:, ...


class InputError(UserError, ValueError):
    """An input as a whole cannot be read (missing file, no caption column, ...); the message
    names the file. Problems of single records are rejects, not errors."""


@dataclass
class RawRecord:
    """One input record before processing: where it came from and what it holds."""

    location: str
    image_path: Optional[str] = None
    image_bytes: Optional[bytes] = None
    captions: List[Tuple[str, str]] = field(default_factory=list)
    """``(language, text)`` pairs, the text as read (normalisation is the tokenizer's)."""
    error: Optional[str] = None
    """Set when the record was already unusable while reading the input."""


@dataclass
class ReaderOptions:
    """How inputs are read (the ``m2-preprocess`` / ``tools/train_tokenizer.py`` flags)."""

    input_format: str = "auto"
    """One of :data:`INPUT_FORMATS`."""
    default_lang: Optional[str] = None
    """Language of captions that do not name one; None: ``zh`` for Chinese-CLIP, else ``en``."""
    texts: Optional[str] = None
    """Chinese-CLIP captions file (default: :func:`default_texts_path`)."""
    csv_img_key: str = "filepath"
    """CSV column of the image path."""
    csv_caption_keys: Sequence[str] = ("title",)
    """CSV caption columns, each ``COLUMN`` (language :attr:`default_lang`) or ``LANG=COLUMN``."""
    csv_separator: Optional[str] = None
    """CSV field separator; None: ``,`` for ``*.csv``, a tab otherwise."""

    def lang(self, fmt: str) -> str:
        if self.default_lang:
            return self.default_lang
        return "zh" if fmt == "chinese-clip" else "en"

    def caption_columns(self, fmt: str) -> List[Tuple[str, str]]:
        cols = []
        for item in self.csv_caption_keys:
            lang, sep, col = item.partition("=")
            cols.append((lang, col) if sep else (self.lang(fmt), item))
        return cols


# -- which inputs ------------------------------------------------------------------------------
def _is_url(path: str) -> bool:
    # A Windows drive letter ("C:\...") is not a scheme; neither is a bare relative path.
    return bool(_URL_RE.match(path)) and not re.match(r"^[a-zA-Z]:[\\/]", path)


def expand_inputs(inputs: Iterable[str]) -> List[str]:
    """Inputs with webdataset's brace expansion applied (``shard-{000..009}.tar`` → ten
    names), in order."""
    import braceexpand

    out: List[str] = []
    for item in inputs:
        out.extend(braceexpand.braceexpand(item))
    return out


def _suffix(path: str) -> str:
    lower = path.lower()
    for s in _TAR_SUFFIXES:
        if lower.endswith(s):
            return s
    return Path(lower).suffix


def _tsv_is_csv(path: str, opts: ReaderOptions) -> bool:
    """A ``.tsv`` whose first line names the CSV image column is OpenCLIP's CSV layout."""
    sep = opts.csv_separator or "\t"
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = next(csv.reader(f, delimiter=sep), [])
    return opts.csv_img_key in header


def detect_format(path: str, opts: ReaderOptions) -> str:
    """The layout of ``path`` (an explicit ``opts.input_format`` wins)."""
    if opts.input_format != "auto":
        return opts.input_format
    if _is_url(path) and not path.startswith("file:"):
        return "webdataset"  # pipe: commands and remote shards are tar streams
    suffix = _suffix(path)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in _TAR_SUFFIXES:
        return "webdataset"
    if suffix == ".csv":
        return "csv"
    if suffix == ".tsv":
        return "csv" if _tsv_is_csv(path, opts) else "chinese-clip"
    raise InputError(f"{path}: unknown input type {suffix or '(no extension)'!r} (expected "
                     ".jsonl, .tar/.tar.gz shards, a Chinese-CLIP .tsv or a .csv; "
                     "--input-format names the layout)")


def default_texts_path(tsv_path: str) -> str:
    """Chinese-CLIP's naming: ``train_imgs.tsv`` ↔ ``train_texts.jsonl``; a ``.tsv`` not named
    ``*_imgs.tsv`` pairs with the same name ending in ``.jsonl``."""
    p = Path(tsv_path)
    if p.name.endswith("_imgs.tsv"):
        return str(p.with_name(p.name[:-len("_imgs.tsv")] + "_texts.jsonl"))
    return str(p.with_suffix(".jsonl"))


def check_inputs(paths: Sequence[str], opts: ReaderOptions,
                 plain_text: bool = False) -> Dict[str, str]:
    """Check that every local input exists and has a known layout, before any work; returns
    ``{path: format}``. URLs and ``pipe:`` commands are only checked when read. With
    ``plain_text`` (tokenizer training), a file of no known layout is accepted as ``"text"``
    (one caption per line).

    Raises:
        InputError: naming the first input that cannot be read.
    """
    if opts.input_format not in INPUT_FORMATS:
        raise InputError(f"unknown input format {opts.input_format!r} (choose from "
                         f"{', '.join(INPUT_FORMATS)})")
    formats = {}
    for path in paths:
        local = not _is_url(path) or path.startswith("file:")
        if local:
            fs_path = re.sub(r"^file:(//)?", "", path)  # file:///a/b -> /a/b, file:a -> a
            if not os.path.exists(fs_path):
                raise InputError(f"input {path} does not exist")
            if os.path.isdir(fs_path):
                raise InputError(f"input {path} is a directory (give the manifest, shard or "
                                 "table files inside it)")
        try:
            fmt = detect_format(path, opts)
        except InputError:
            if not (plain_text and local and opts.input_format == "auto"):
                raise
            formats[path] = "text"
            continue
        if fmt == "chinese-clip":
            texts = opts.texts or default_texts_path(path)
            if not os.path.isfile(texts):
                raise InputError(f"input {path}: Chinese-CLIP captions file {texts} does not "
                                 "exist (name it with --texts)")
        if fmt == "csv" and local:
            _csv_columns(path, opts, fmt)
        formats[path] = fmt
    return formats


# -- JSONL manifests ---------------------------------------------------------------------------
def _captions_from_obj(obj: dict, default_lang: str
                       ) -> Tuple[List[Tuple[str, str]], Optional[str]]:
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
    for key in ("caption", "text"):  # img2dataset / webdataset metadata; Chinese-CLIP texts
        if isinstance(obj.get(key), str):
            caps.append((default_lang, obj[key]))
    if not caps:
        return [], "no caption field ('captions', 'caption_en', 'caption_zh', 'caption', 'text')"
    return caps, None


def _iter_jsonl(path: str, default_lang: str, images: bool) -> Iterator[RawRecord]:
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
            if images and (not isinstance(image, str) or not image):
                yield RawRecord(loc, error="missing or non-string 'image' field")
                continue
            caps, err = _captions_from_obj(obj, default_lang)
            if err:
                yield RawRecord(loc, error=err)
                continue
            img_path = None
            if images:
                img_path = image if os.path.isabs(image) else str(base / image)
            yield RawRecord(loc, image_path=img_path, captions=caps)


# -- webdataset shards -------------------------------------------------------------------------
def _unsafe_member(name: str) -> bool:
    p = Path(name)
    return name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts


def _tar_sample(loc: str, group: Dict[str, bytes], bad: Optional[str], default_lang: str,
                images: bool) -> RawRecord:
    """One webdataset sample (its members by extension) as a record."""
    if bad:
        return RawRecord(loc, error=bad)
    img_ext = next((e for e in IMAGE_EXTS if e in group), None)
    if images and img_ext is None:
        return RawRecord(loc, error=f"no image member (have: {', '.join(sorted(group))})")
    caps: List[Tuple[str, str]] = []
    if "txt" in group:
        try:
            caps.append((default_lang, group["txt"].decode("utf-8")))
        except UnicodeDecodeError as e:
            return RawRecord(loc, error=f"txt member is not valid UTF-8 (byte {e.start})")
    if "json" in group:
        try:
            obj = json.loads(group["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return RawRecord(loc, error=f"unreadable json member: {e}")
        if isinstance(obj, dict):
            more, err = _captions_from_obj(obj, default_lang)
            if err and "txt" not in group:
                return RawRecord(loc, error=err)
            # img2dataset writes the caption into both key.txt and key.json: keep it once.
            caps += [c for c in more if c not in caps]
    if not caps:
        return RawRecord(loc, error="no caption member (txt or json)")
    return RawRecord(loc, image_bytes=group[img_ext] if images else None, captions=caps)


def _iter_webdataset(url: str, default_lang: str, images: bool) -> Iterator[RawRecord]:
    """Samples of one shard, grouped by key with the ``webdataset`` library's conventions
    (``gopen`` opens files, ``pipe:`` commands and URLs; its tar iterator skips ``__*__``
    metadata members; keys and extensions as its ``base_plus_ext``). Nothing is extracted."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    def keep(fname: str) -> bool:  # captions only: do not read image members at all
        _, ext = base_plus_ext(fname)
        return images or (ext or "").lower() not in IMAGE_EXTS

    def reraise(exn: Exception) -> bool:
        raise exn

    try:
        stream = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - any opener failure is this shard's failure
        yield RawRecord(url, error=f"cannot open shard: {e}")
        return
    key, group, bad = None, {}, None
    try:
        for member in tar_file_iterator(stream, handler=reraise, select_files=keep):
            name = member["fname"]
            prefix, ext = base_plus_ext(name)
            if prefix is None:  # no extension: not part of any sample (webdataset skips it)
                continue
            if prefix != key:
                if key is not None:
                    yield _tar_sample(f"{url}:{key}", group, bad, default_lang, images)
                key, group, bad = prefix, {}, None
            if _unsafe_member(name):
                bad = f"unsafe member path {name!r} (absolute or '..')"
                continue
            ext = ext.lower()
            if ext in group:
                bad = f"duplicate member {name!r}"
            group[ext] = member["data"]
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        if key is None:
            yield RawRecord(url, error=f"unreadable tar: {e}")
            key = None
        else:
            bad = bad or f"truncated or corrupt shard: {e}"
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - a pipe's exit status is reported below instead
            pass
    if key is not None:
        yield _tar_sample(f"{url}:{key}", group, bad, default_lang, images)
    status = getattr(stream, "status", None)  # webdataset's Pipe: the command's exit status
    if status not in (None, 0, 141):
        yield RawRecord(url, error=f"shard command exited with status {status}; samples after "
                                   "the last one read are missing")


# -- Chinese-CLIP --------------------------------------------------------------------------------
def decode_base64_image(field: bytes) -> bytes:
    """Image bytes of a base64 field in either alphabet: the URL-safe one (``-_``) that
    Chinese-CLIP's tools write with ``base64.urlsafe_b64encode``, or the standard one (``+/``);
    missing ``=`` padding is tolerated.

    Raises:
        binascii.Error: not base64 in either alphabet.
    """
    data = field.strip().translate(bytes.maketrans(b"-_", b"+/"))
    data += b"=" * (-len(data) % 4)
    return base64.b64decode(data, validate=True)


def _read_clip_texts(texts_path: str, lang: str
                     ) -> Tuple[Dict[str, List[Tuple[str, str]]], Dict[str, List[str]],
                                List[RawRecord]]:
    by_image: Dict[str, List[Tuple[str, str]]] = {}
    refs: Dict[str, List[str]] = {}
    errors: List[RawRecord] = []
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
                errors.append(RawRecord(loc, error=f"invalid UTF-8 at byte {e.start}"))
                continue
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                errors.append(RawRecord(loc, error=f"malformed text record: {e}"))
                continue
            for image_id in ids:
                by_image.setdefault(str(image_id), []).append((lang, text))
                refs.setdefault(str(image_id), []).append(loc)
    return by_image, refs, errors


def _iter_chinese_clip(tsv_path: str, texts_path: Optional[str], lang: str
                       ) -> Iterator[RawRecord]:
    """One record per image row; texts that name no image row are rejects."""
    texts_path = texts_path or default_texts_path(tsv_path)
    by_image, refs, text_errors = _read_clip_texts(texts_path, lang)
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
            image_id = parts[0].decode("utf-8", "replace").strip()
            seen.add(image_id)
            try:
                data = decode_base64_image(parts[1])
            except (binascii.Error, ValueError) as e:
                yield RawRecord(loc, error=f"invalid base64 image: {e}")
                continue
            caps = by_image.get(image_id)
            if not caps:
                yield RawRecord(loc, error=f"image {image_id!r} has no caption in {texts_path}")
                continue
            yield RawRecord(loc, image_bytes=data, captions=caps)
    yield from text_errors
    for image_id, locs in refs.items():
        if image_id not in seen:
            for loc in locs:
                yield RawRecord(loc, error=f"caption references unknown image {image_id!r}")


def _iter_clip_texts(tsv_path: str, texts_path: Optional[str], lang: str
                     ) -> Iterator[RawRecord]:
    """Captions only: the texts file, without decoding the images."""
    by_image, refs, errors = _read_clip_texts(texts_path or default_texts_path(tsv_path), lang)
    yield from errors
    done = set()
    for image_id, caps in by_image.items():
        for loc, cap in zip(refs[image_id], caps):
            if loc not in done:  # a text naming several images is one caption
                done.add(loc)
                yield RawRecord(loc, captions=[cap])


# -- OpenCLIP CSV --------------------------------------------------------------------------------
def _csv_separator(path: str, opts: ReaderOptions) -> str:
    if opts.csv_separator is not None:
        return opts.csv_separator
    return "," if _suffix(path) == ".csv" else "\t"


def _csv_columns(path: str, opts: ReaderOptions, fmt: str) -> List[str]:
    sep = _csv_separator(path, opts)
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = next(csv.reader(f, delimiter=sep), None)
    if not header:
        raise InputError(f"{path}: empty file (a CSV input needs a header row)")
    wanted = [opts.csv_img_key] + [col for _, col in opts.caption_columns(fmt)]
    missing = [c for c in wanted if c not in header]
    if missing:
        shown = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "")
        raise InputError(f"{path}: no column {missing[0]!r} in the header (columns: {shown}; "
                         f"separator {sep!r}); name the columns with --csv-img-key / "
                         "--csv-caption-key, the separator with --csv-separator")
    return header


def _iter_csv(path: str, opts: ReaderOptions, images: bool) -> Iterator[RawRecord]:
    header = _csv_columns(path, opts, "csv")
    columns = opts.caption_columns("csv")
    base = Path(path).resolve().parent
    csv.field_size_limit(1 << 24)
    # surrogateescape: an undecodable byte reaches the caption check (which rejects that row)
    # instead of ending the whole file.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=_csv_separator(path, opts))
        next(reader)
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                yield RawRecord(f"{path}:{line}", error=f"unreadable CSV from here on ({e}); "
                                                        "the rows after it were not read")
                break
            loc = f"{path}:{line}"
            if not row or not any(x.strip() for x in row):
                continue
            if len(row) != len(header):
                yield RawRecord(loc, error=f"{len(row)} fields, the header has {len(header)}")
                continue
            values = dict(zip(header, row))
            caps = [(lang, values[col]) for lang, col in columns if values[col].strip()]
            if not caps:
                yield RawRecord(loc, error="no caption (empty "
                                           f"{', '.join(repr(c) for _, c in columns)})")
                continue
            img_path = None
            if images:
                image = values[opts.csv_img_key].strip()
                if not image:
                    yield RawRecord(loc, error=f"empty {opts.csv_img_key!r} column")
                    continue
                img_path = image if os.path.isabs(image) else str(base / image)
            yield RawRecord(loc, image_path=img_path, captions=caps)


# -- dispatch ----------------------------------------------------------------------------------
def iter_records(path: str, opts: Optional[ReaderOptions] = None, images: bool = True
                 ) -> Iterator[RawRecord]:
    """Records of one input (see the module docstring for the layouts).

    With ``images=False`` (tokenizer training) image data is neither required nor read: JSONL
    lines need no ``"image"``, tar image members are skipped, Chinese-CLIP images are not
    decoded, CSV image columns are ignored.
    """
    opts = opts or ReaderOptions()
    fmt = detect_format(path, opts)
    lang = opts.lang(fmt)
    if fmt == "jsonl":
        return _iter_jsonl(path, lang, images)
    if fmt == "webdataset":
        return _iter_webdataset(path, lang, images)
    if fmt == "chinese-clip":
        return (_iter_chinese_clip(path, opts.texts, lang) if images
                else _iter_clip_texts(path, opts.texts, lang))
    if fmt == "csv":
        return _iter_csv(path, opts, images)
    raise InputError(f"unknown input format {fmt!r}")


def iter_captions(path: str, opts: Optional[ReaderOptions] = None
                  ) -> Iterator[Tuple[str, str]]:
    """``(language, text)`` of every caption of the usable records of ``path``: the captions
    preprocessing would read, for tokenizer training. Records preprocessing would reject for
    their structure (malformed JSON, no caption field, ...) are skipped and counted in one
    warning that names the first of them."""
    skipped, first = 0, None
    for rec in iter_records(path, opts, images=False):
        if rec.error is None:
            yield from rec.captions
        else:
            skipped += 1
            first = first or f"{rec.location}: {rec.error}"
    if skipped:
        logger.warning("%s: skipped %d unusable record(s), e.g. %s", path, skipped, first)
