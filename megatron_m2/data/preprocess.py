"""Turn image–caption collections into indexed datasets, accounting for every input record.

Inputs are read by :mod:`megatron_m2.data.records` (JSONL manifests, webdataset / img2dataset
tar shards, Chinese-CLIP TSV + JSONL, OpenCLIP CSV/TSV), the reader tokenizer training uses too.

Each record is processed in a worker process: the image is decoded with a pixel limit
(decompression bombs), fully loaded (truncated files), converted to RGB, shrunk to a maximum
side and re-encoded as JPEG; captions are checked (not empty, not over-long, valid text) and
tokenized in the tokenizer's text style (:data:`~megatron_m2.data.tokenizer.TEXT_STYLES`), and a
caption whose token ids repeat an earlier caption of the same record and language is dropped (an
img2dataset sample states its caption in both ``key.txt`` and ``key.json``). A record is
**written** or **rejected** with a reason — never both, never neither — so ``records = written +
rejected``; rejects go to a JSONL log with the record's location (``file:line`` or
``shard.tar:key``).

Work is cut into chunks of consecutive records, each written to its own small indexed dataset
under ``<prefix>.parts/`` and marked done atomically. A killed run resumes from the chunks already
done (``resume=True``, the default) or starts over; the final ``<prefix>.bin``/``.idx`` and the
dataset card ``<prefix>.meta.json`` (:mod:`megatron_m2.data.identity`) are assembled in input
order at the end and renamed into place, so an interruption can never leave duplicated or partial
records under the final names. Output order is the input order whatever the number of workers.

A run **fails** (:class:`PreprocessError`, nothing under the final names) when it writes no
record, or rejects more than ``max_reject_fraction`` of them. The reject log is still written;
the finished chunks stay in ``<prefix>.parts/`` when some records were written, so a rerun with
a higher ``max_reject_fraction`` assembles them without processing anything again.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from ..errors import UserError
from .records import LANGS, RawRecord, ReaderOptions, iter_records

__all__ = ["PreprocessConfig", "RawRecord", "Result", "process_record", "preprocess", "Summary",
           "PreprocessError", "DEFAULT_MAX_REJECT_FRACTION"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_REJECT_FRACTION = 0.1
"""A run that rejects more than this share of its records fails (m2-preprocess's default)."""


@dataclass
class PreprocessConfig:
    """Options of a preprocessing run."""

    tokenizer_model: str
    """SentencePiece model used to tokenize captions."""
    text_style: Optional[str] = None
    """``official`` / ``normalized`` (see :data:`~megatron_m2.data.tokenizer.TEXT_STYLES`);
    None: the tokenizer model's default."""
    text_length: Optional[int] = None
    """Cut captions to this many tokens (framed) when storing them, at the end the text style
    keeps, and record it in the dataset card; None stores them whole (any model text length
    works: the cut happens when loading)."""
    max_image_size: int = 512
    """Images are shrunk (aspect kept) so that their longer side is at most this."""
    jpeg_quality: int = 95
    """Quality of the re-encoded JPEG."""
    max_image_pixels: int = 64_000_000
    """Decoded images above this many pixels are rejected as decompression bombs."""
    max_caption_chars: int = 1000
    """Captions longer than this (after normalisation) are rejected."""
    workers: int = 1
    """Worker processes."""
    chunk_size: int = 1024
    """Records per resumable chunk."""
    max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION
    """The run fails when more than this share of the records is rejected (1.0: never)."""


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


class PreprocessError(UserError, ValueError):
    """A run wrote nothing or rejected too much; nothing was written under the final names.

    Attributes:
        summary: the run's :class:`Summary`.
        parts_kept: whether ``<prefix>.parts/`` holds finished chunks a rerun can reuse.
    """

    def __init__(self, message: str, summary: Summary, parts_kept: bool):
        super().__init__(message)
        self.summary, self.parts_kept = summary, parts_kept


# -- per-record work (worker processes) ------------------------------------------------------------
_WORKER: Dict[str, object] = {}


def _init_worker(cfg: PreprocessConfig) -> None:
    from PIL import Image

    from .tokenizer import M2Tokenizer

    _WORKER["cfg"] = cfg
    _WORKER["tok"] = M2Tokenizer(cfg.tokenizer_model, text_style=cfg.text_style)
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

    cfg: PreprocessConfig = _WORKER["cfg"]  # type: ignore[assignment]
    tok = _WORKER["tok"]
    if rec.error:
        return Result(rec.location, error=rec.error)
    captions: List[Tuple[str, List[int]]] = []
    for i, (lang, text) in enumerate(rec.captions):
        norm = tok.normalize(text)
        if not norm.strip():
            return Result(rec.location, error=f"caption {i} ({lang}) is empty")
        if len(norm) > cfg.max_caption_chars:
            return Result(rec.location, error=f"caption {i} ({lang}) has {len(norm)} characters "
                                              f"(limit {cfg.max_caption_chars})")
        if any(0xD800 <= ord(ch) <= 0xDFFF or ch == "\0" for ch in norm):
            return Result(rec.location, error=f"caption {i} ({lang}) holds invalid characters")
        # Stored whole unless asked (the text length is then chosen when loading); a cut keeps
        # the end the text style keeps, as loading would.
        caption = (lang if lang in LANGS else "other",
                   tok.frame(tok.encode(norm), max_length=cfg.text_length or 1 << 30))
        if caption not in captions:  # one caption per distinct text and language
            captions.append(caption)
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
               progress: Optional[Callable[[int, int], None]] = None,
               reader: Optional[ReaderOptions] = None) -> Summary:
    """Preprocess ``inputs`` into ``output_prefix.{bin,idx}`` and its dataset card; returns the
    accounting.

    ``inputs`` are files, URLs or ``pipe:`` commands, brace patterns already expanded
    (:func:`~megatron_m2.data.records.expand_inputs`); ``reader`` says how to read them
    (``texts`` is a shorthand for ``reader.texts``). ``progress(records_done, rejected)`` is
    called after every chunk (for progress bars).

    Raises:
        PreprocessError: no record was written, or more than ``cfg.max_reject_fraction`` were
            rejected (the reject log is written all the same).
    """
    from .identity import make_card, tokenizer_identity, write_card
    from .indexed import ImageTextWriter
    from .tokenizer import M2Tokenizer

    reader = reader or ReaderOptions()
    if texts is not None:
        reader.texts = texts
    tokenizer = M2Tokenizer(cfg.tokenizer_model, text_style=cfg.text_style)
    cfg = dataclasses.replace(cfg, text_style=tokenizer.text_style)  # the workers' style
    parts = Path(output_prefix + ".parts")
    if parts.exists() and not resume:
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    summary = Summary()

    def records() -> Iterator[RawRecord]:
        for path in inputs:
            yield from iter_records(path, reader)

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

    if reject_log:
        _write_reject_log(reject_log, parts, chunk_ids)
    failure = _outcome(summary, cfg, parts, chunk_ids, reject_log)
    if failure:
        kept = summary.written > 0
        if kept:
            failure += (f". The {len(chunk_ids)} finished chunk(s) are kept in {parts}: rerun "
                        "with a higher --max-reject-fraction to assemble them without "
                        "processing again, or fix the input and rerun with --no-resume")
        else:
            shutil.rmtree(parts)
        raise PreprocessError(failure, summary, kept)

    # Assemble in input order, then swap into place: the card first, the index last (a reader
    # that sees the index sees the card that describes it).
    part_prefixes = [str(parts / f"{ci:06d}") for ci in chunk_ids]
    card = make_card(part_prefixes, tokenizer_identity(tokenizer), cfg.text_length,
                     source={"inputs": list(inputs), **summary.to_dict()})
    with ImageTextWriter(output_prefix) as writer:
        for prefix in part_prefixes:
            writer.add_dataset(prefix)
        write_card(output_prefix, card)
    shutil.rmtree(parts)
    return summary


def _write_reject_log(path: str, parts: Path, chunk_ids: List[int]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for ci in chunk_ids:
            out.write((parts / f"{ci:06d}.rejects.jsonl").read_text(encoding="utf-8"))
    os.replace(tmp, path)


def _outcome(summary: Summary, cfg: PreprocessConfig, parts: Path, chunk_ids: List[int],
             reject_log: Optional[str]) -> Optional[str]:
    """Why the run failed (None when it did not): nothing written, or too many rejects."""
    share = summary.rejected / summary.records if summary.records else 0.0
    if summary.written and share <= cfg.max_reject_fraction:
        return None
    reasons: Counter = Counter()
    for ci in chunk_ids:
        for line in (parts / f"{ci:06d}.rejects.jsonl").read_text(encoding="utf-8").splitlines():
            reasons[_reason_kind(json.loads(line)["reason"])] += 1
    top = "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3))
    where = f" (listed in {reject_log})" if reject_log else " (--reject-log lists them)"
    if not summary.records:
        return "the input holds no record"
    if not summary.written:
        return (f"no record was written: all {summary.records} were rejected{where}; most "
                f"common: {top}")
    return (f"{summary.rejected} of {summary.records} records ({share:.1%}) were rejected, more "
            f"than --max-reject-fraction {cfg.max_reject_fraction:g}{where}; most common: {top}")


def _reason_kind(reason: str) -> str:
    """A reject reason without its record-specific details (paths, numbers, quoted values),
    so that reasons can be counted."""
    kind = re.split(r":\s", reason, maxsplit=1)[0]
    kind = re.sub(r"(^|\s)\S*[\\/]\S*", r"\1<path>", kind)
    kind = re.sub(r"'[^']*'", "'...'", re.sub(r"\d+", "N", kind))
    return kind if len(kind) <= 60 else kind[:57] + "..."


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
