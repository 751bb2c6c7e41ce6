"""Batch embedding of a corpus into an embedding store (what ``m2-embed`` runs).

A *source* (:mod:`megatron_m2.serving.sources`, whose names are re-exported here) lists the
items to embed, in a fixed order: the images of a folder, an indexed dataset's images or
captions, or the lines of a text file.

:func:`embed_corpus` embeds a source chunk by chunk (``chunk_size`` items each, chunk ``c``
holding items ``[c * chunk_size, (c + 1) * chunk_size)``) into ``OUTPUT/parts/``::

    parts/job.json                what is being embedded: model identity, source (with its
                                  fingerprint), kind, dtype, chunk size
    parts/part-000000.safetensors the chunk's embeddings (tensor "embeddings", [rows, D])
    parts/part-000000.json        its items (in row order) and rejects; written last, so a
                                  chunk is done exactly when this file exists and matches

Each file is written under a temporary name and renamed into place. Running the same job
again finds ``parts/job.json``, checks that it describes the same model
(:func:`~megatron_m2.serving.store.same_model`), the same source fingerprint, kind, dtype and
chunk size (anything else is refused with one line naming the difference), and embeds only the
chunks that are missing. When every chunk is there, the parts are merged in row order into the
store (:func:`~megatron_m2.serving.store.write_store`, ``store.json`` last), the rejects into
``OUTPUT/rejects.jsonl`` (``{"id", "reason"}`` per line, source order), and ``parts/`` is
removed.

An item that cannot be embedded (an unreadable or corrupt image, a blank or undecodable text
line, a sample without a caption in the language) does not stop the job: it is recorded as a
reject with its reason.

Inside an initialised ``torch.distributed`` world (``torchrun``) the missing chunks are dealt
round-robin over the ranks (on a fresh job, chunk ``c`` goes to rank ``c % world``), each rank
writes its own parts, and rank 0 merges after every rank is done. Chunks and the batches within
them do not depend on the world size, so the store is byte-identical to a one-process run.

Embeddings are computed batch by batch within a chunk: the first ``batch_size`` readable items
of the chunk, then the next, and so on. On CPUs, matrix products of very small batches take
another kernel path than larger ones, so an item's embedding can differ in the last bits
(measured: at most 3.3e-7) from one computed in a batch of another size; within one job the
batches are fixed, so reruns, resumed runs and multi-rank runs agree exactly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .sources import (
    IMAGE_EXTENSIONS,
    DatasetSource,
    EmbedError,
    ImageFolderSource,
    Rejected,
    Source,
    TextFileSource,
)
from .store import (
    EMBEDDINGS,
    INDEX,
    ITEMS,
    MANIFEST,
    StoreError,
    model_identity,
    same_model,
    write_store,
)

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "TEST_SLEEP_ENV", "EmbedError", "Rejected", "Source",
           "ImageFolderSource", "DatasetSource", "TextFileSource", "job_record",
           "embed_chunk", "embed_corpus"]

TEST_SLEEP_ENV = "M2_EMBED_TEST_SLEEP_PER_CHUNK"
"""For tests only: seconds to sleep after each chunk is written, so that a test can interrupt
a job deterministically between two chunks. Unset (no sleep) in normal use."""

JOB_FORMAT = "megatron_m2.embed_job"
JOB_FORMAT_VERSION = 1
PARTS = "parts"
JOB = "job.json"
REJECTS = "rejects.jsonl"
LOCK = ".m2-embed.lock"
_PART_RE = re.compile(r"^part-(\d+)\.(safetensors|json)$")
_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")
_OURS = {PARTS, MANIFEST, EMBEDDINGS, ITEMS, INDEX, REJECTS, LOCK}


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path`` (a reader never sees a partial file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, obj: Any, indent: Optional[int] = None) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(obj, ensure_ascii=False, indent=indent)
                                         + "\n", encoding="utf-8"))


# -- the job ------------------------------------------------------------------------------------
def job_record(identity: Mapping[str, Any], source: Source, chunk_size: int,
               dtype: str) -> Dict[str, Any]:
    """What ``parts/job.json`` records: a resumed run must agree on all of it (the model by
    :func:`~megatron_m2.serving.store.same_model`)."""
    from ..version import __version__

    return {"format": JOB_FORMAT, "format_version": JOB_FORMAT_VERSION, "kind": source.kind,
            "source": source.record(), "count": len(source), "chunk_size": int(chunk_size),
            "dtype": dtype, "model": dict(identity), "created_by": f"megatron_m2 {__version__}"}


def _describe_model(m: Mapping[str, Any]) -> str:
    return (f"{m.get('source')} (head {m.get('head')}, weights sha256 "
            f"{str(m.get('weights_sha256'))[:12]})")


def _describe_source(s: Mapping[str, Any]) -> str:
    extra = f" {s['field']}" if s.get("field") else ""
    extra += f" {s['lang']}" if s.get("lang") else ""
    return f"{s.get('type')} {s.get('path')}{extra}"


def _job_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> Optional[str]:
    """How the job ``old`` (from ``job.json``) differs from ``new``, or None."""
    if old.get("format") != JOB_FORMAT or old.get("format_version") != JOB_FORMAT_VERSION:
        return (f"an unknown job format {old.get('format')!r} version "
                f"{old.get('format_version')!r}")
    if not same_model(old.get("model", {}), new["model"]):
        return (f"another model: {_describe_model(old.get('model', {}))}, this run "
                f"{_describe_model(new['model'])}")
    if old.get("source") != new["source"]:
        if _describe_source(old.get("source") or {}) == _describe_source(new["source"]):
            return (f"the same source before it changed ({_describe_source(new['source'])}: "
                    "its content fingerprint differs)")
        return (f"another source: {_describe_source(old.get('source') or {})}, this run "
                f"{_describe_source(new['source'])}")
    for key, what in (("chunk_size", "--chunk-size"), ("dtype", "--dtype")):
        if old.get(key) != new[key]:
            return f"{what} {old.get(key)} (this run: {new[key]})"
    return None


def _store_difference(manifest: Mapping[str, Any], job: Mapping[str, Any]) -> Optional[str]:
    """How the complete store ``manifest`` differs from what ``job`` would write, or None."""
    if not same_model(manifest.get("model") or {}, job["model"]):
        return (f"another model: {_describe_model(manifest.get('model') or {})}, this run "
                f"{_describe_model(job['model'])}")
    if manifest.get("source") != job["source"] or manifest.get("kind") != job["kind"]:
        return (f"another source: {_describe_source(manifest.get('source') or {})}, this run "
                f"{_describe_source(job['source'])}")
    return None


def _part_paths(parts: Path, c: int) -> Tuple[Path, Path]:
    return parts / f"part-{c:06d}.safetensors", parts / f"part-{c:06d}.json"


def _chunk_bounds(c: int, chunk_size: int, count: int) -> Tuple[int, int]:
    return c * chunk_size, min((c + 1) * chunk_size, count)


def _read_part(parts: Path, c: int, chunk_size: int, count: int, dim: int,
               load: bool) -> Optional[Dict[str, Any]]:
    """Chunk ``c``'s sidecar (plus ``"embeddings"`` with ``load``) if the chunk is complete and
    consistent, else None."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    emb_path, side_path = _part_paths(parts, c)
    lo, hi = _chunk_bounds(c, chunk_size, count)
    try:
        side = json.loads(side_path.read_text(encoding="utf-8"))
        rows = len(side["items"])
        if (side.get("chunk"), side.get("start"), side.get("stop")) != (c, lo, hi) or \
                rows + len(side["rejects"]) != hi - lo:
            return None
        if load:
            emb = load_file(str(emb_path))["embeddings"]
            shape = list(emb.shape)
            side["embeddings"] = emb
        else:
            with safe_open(str(emb_path), "pt") as f:
                shape = list(f.get_slice("embeddings").get_shape())
        return side if shape == [rows, dim] else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError):
        return None


def _clear_output(out: Path) -> None:
    """Remove what a previous job wrote to ``out`` (store files, rejects, parts), manifest
    first so that the directory is never a complete-looking store in between."""
    for name in (MANIFEST, EMBEDDINGS, ITEMS, INDEX, REJECTS):
        if (out / name).is_file():
            (out / name).unlink()
    if (out / PARTS).exists():
        shutil.rmtree(out / PARTS)


def _remove_temporaries(directory: Path) -> None:
    if directory.is_dir():
        for p in directory.iterdir():
            if _TMP_RE.match(p.name) and p.is_file():
                p.unlink()


class _OutputLock:
    """An exclusive ``flock`` on ``OUTPUT/.m2-embed.lock`` while a job writes there (rank 0
    holds it), so that two jobs never write one directory at once. The kernel releases it when
    the process ends, however it ends; the file is removed when the job finishes."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self._f = None

    def acquire(self) -> "_OutputLock":
        """Take the lock (:class:`EmbedError` when another process holds it)."""
        try:
            import fcntl
        except ImportError:  # no flock on this platform: no protection
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise EmbedError(f"--output {self.path.parent}: another m2-embed is writing there "
                             f"(it holds {self.path}); wait for it to finish or use another "
                             "--output") from None
        self._f = f
        return self

    def release(self, remove: bool = False) -> None:
        """Unlock (and with ``remove``, delete the lock file first)."""
        if self._f is not None:
            if remove and self.path.exists():
                self.path.unlink()
            self._f.close()
            self._f = None


def _prepare(out: Path, job: Dict[str, Any], force: bool, chunks: int, dim: int
             ) -> Tuple[str, Any]:
    """Rank 0: decide what to do with ``out``: ``("complete", manifest)`` when it already holds
    this store, else ``("run", done chunk numbers)`` after writing or checking ``job.json``."""
    if out.exists() and not out.is_dir():
        raise EmbedError(f"--output {out}: exists and is not a directory")
    parts = out / PARTS
    job_path = parts / JOB
    if force and out.exists():
        _clear_output(out)
    if job_path.exists():
        try:
            old = json.loads(job_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EmbedError(f"{job_path}: unreadable ({e}); rerun with --force to start "
                             "over") from None
        diff = _job_difference(old, job)
        if diff:
            raise EmbedError(f"--output {out}: its unfinished job ({job_path}) embeds with "
                             f"{diff}; rerun with --force to start over, or use another "
                             "--output")
        _remove_temporaries(parts)
        _remove_temporaries(out)
        done = [c for c in range(chunks) if _read_part(parts, c, job["chunk_size"],
                                                       job["count"], dim, load=False)]
        return "run", done
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EmbedError(f"{manifest_path}: unreadable ({e}); rerun with --force to "
                             "rebuild the store") from None
        diff = _store_difference(manifest, job)
        if diff:
            raise EmbedError(f"--output {out}: holds a complete store of {diff}; rerun with "
                             "--force to replace it, or use another --output")
        if parts.exists():  # left over from a merge interrupted after store.json was written
            shutil.rmtree(parts)
        return "complete", manifest
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name not in _OURS and not _TMP_RE.match(p.name))
        if foreign:
            raise EmbedError(f"--output {out}: not empty and not an embedding store (it holds "
                             f"{foreign[0]!r}{' and more' if len(foreign) > 1 else ''}); use "
                             "a new or empty directory")
        if parts.exists():
            stray = [p.name for p in parts.iterdir() if _PART_RE.match(p.name)]
            if stray:
                raise EmbedError(f"{parts}: part files ({stray[0]}, ...) but no {JOB}; rerun "
                                 "with --force to start over")
            _remove_temporaries(parts)
        _remove_temporaries(out)
    parts.mkdir(parents=True, exist_ok=True)
    _write_json(job_path, job, indent=1)
    return "run", []


def embed_chunk(source: Source, encoder, lo: int, hi: int, batch_size: int,
                on_item: Optional[Callable[[], None]] = None
                ) -> Tuple[torch.Tensor, List[Dict[str, Any]], List[Dict[str, str]]]:
    """Embed items ``[lo, hi)`` of ``source``: ``(embeddings [rows, D], items, rejects)``.

    Readable items are embedded ``batch_size`` at a time in source order (the batches depend
    only on the chunk and ``batch_size``); each reject is ``{"id", "reason"}``. ``on_item`` is
    called once per item (progress)."""
    embs: List[torch.Tensor] = []
    items: List[Dict[str, Any]] = []
    rejects: List[Dict[str, str]] = []
    batch_items: List[Dict[str, Any]] = []
    batch_inputs: List[Any] = []

    def flush():
        if batch_inputs:
            embs.append(source.encode(encoder, batch_inputs))
            items.extend(batch_items)
            batch_items.clear()
            batch_inputs.clear()

    for i in range(lo, hi):
        try:
            item, x = source.get(i, encoder)
        except Rejected as r:
            rejects.append({"id": source.item_id(i), "reason": r.reason})
        else:
            batch_items.append(item)
            batch_inputs.append(x)
            if len(batch_inputs) == batch_size:
                flush()
        if on_item is not None:
            on_item()
    flush()
    emb = torch.cat(embs) if embs else torch.empty(0, encoder.embed_dim)
    return emb, items, rejects


def _write_part(parts: Path, c: int, lo: int, hi: int, emb: torch.Tensor,
                items: List[Dict[str, Any]], rejects: List[Dict[str, str]]) -> None:
    """The chunk's embeddings, then its sidecar (which marks the chunk done)."""
    from safetensors.torch import save_file

    emb_path, side_path = _part_paths(parts, c)
    emb = emb.detach().float().cpu().contiguous()
    _atomic(emb_path, lambda p: save_file({"embeddings": emb}, str(p),
                                          metadata={"chunk": str(c)}))
    _write_json(side_path, {"chunk": c, "start": lo, "stop": hi, "rows": len(items),
                            "items": items, "rejects": rejects})


def _merge(out: Path, source: Source, job: Mapping[str, Any], chunks: int, dim: int,
           index_type: Optional[str], index_options: Optional[Mapping[str, Any]]
           ) -> Tuple[int, int]:
    """Rank 0: every part, in row order, into the store and ``rejects.jsonl``; then remove
    ``parts/``. Returns ``(rows, rejects)``."""
    parts = out / PARTS
    embs, items, rejects = [], [], []
    for c in range(chunks):
        side = _read_part(parts, c, job["chunk_size"], job["count"], dim, load=True)
        if side is None:
            raise EmbedError(f"{_part_paths(parts, c)[1]}: missing or inconsistent after every "
                             "rank finished; run the same command again to embed that chunk")
        embs.append(side["embeddings"])
        items.extend(side["items"])
        rejects.extend(side["rejects"])
    emb = torch.cat(embs) if embs else torch.empty(0, dim)

    def _rejects(p: Path):
        with open(p, "w", encoding="utf-8") as f:
            for r in rejects:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    _atomic(out / REJECTS, _rejects)
    options = {k: v for k, v in dict(index_options or {}).items() if v is not None}
    try:
        write_store(out, emb, items, kind=source.kind, model=job["model"],
                    source=source.record(), index_type=index_type,
                    index_options=options or None)
    except StoreError as e:
        raise EmbedError(f"--output {out}: {e}") from None
    (parts / JOB).unlink()  # first: parts/ without job.json beside store.json is a leftover
    shutil.rmtree(parts)
    return len(items), len(rejects)


def _count_lines(path: Path) -> Optional[int]:
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def _collective(obj: Any, group, rank: int, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (identity in a world of one)."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _gather(obj: Any, group, world: int) -> List[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: List[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def embed_corpus(encoder, source: Source, output: Union[str, os.PathLike], *,
                 load: Union[str, os.PathLike], chunk_size: int = 1024,
                 batch_size: Optional[int] = None, dtype: str = "fp32",
                 index_type: Optional[str] = None,
                 index_options: Optional[Mapping[str, Any]] = None, force: bool = False,
                 progress: bool = False, group=None) -> Dict[str, Any]:
    """Embed ``source`` with ``encoder`` (an :class:`~megatron_m2.inference.M2Encoder`) into
    the store ``output``, resuming an interrupted job there (see the module docstring).

    Args:
        load: the checkpoint the encoder was loaded from (recorded in the model identity).
        chunk_size: items per part file (the unit of resumption and of work between ranks).
        batch_size: items per forward pass (default: the encoder's).
        dtype: the compute dtype's name, recorded in ``job.json`` (a job resumes only in the
            same dtype).
        index_type: ``None``, ``"flat"``, ``"hnsw"`` or ``"ivf"`` (a FAISS index in the store).
        index_options: ``hnsw_m`` / ``ivf_lists`` for :func:`~megatron_m2.serving.store.
            build_index`.
        force: discard what ``output`` holds (an unfinished job or a complete store) first.
        progress: a tqdm bar on rank 0.
        group: the process group whose ranks share the work (default: the world when
            ``torch.distributed`` is initialised with more than one rank).

    Returns:
        On rank 0, the summary: ``status`` (``"written"`` or ``"complete"`` when ``output``
        already held this store), ``total``, ``embedded``, ``rejected``, ``chunks``,
        ``resumed_chunks``, ``processed`` (items embedded or rejected by this run),
        ``embed_seconds``, ``items_per_s`` (``processed / embed_seconds``; None when nothing
        was processed), ``world_size``, ``kind``, ``dim``, ``index`` and the paths ``output``,
        ``store`` and ``rejects``. Other ranks get ``{"rank": r}``.

    Raises:
        EmbedError: the output holds another job or store, the source changed or differs
            between ranks, the encoder cannot embed the source, or the index cannot be built.
    """
    import torch.distributed as dist

    if chunk_size < 1:
        raise EmbedError(f"--chunk-size must be >= 1, got {chunk_size}")
    batch_size = int(batch_size or encoder.batch_size)
    if batch_size < 1:
        raise EmbedError(f"--batch-size must be >= 1, got {batch_size}")
    if group is None and dist.is_initialized() and dist.get_world_size() > 1:
        group = dist.group.WORLD
    rank = dist.get_rank(group) if group is not None else 0
    world = dist.get_world_size(group) if group is not None else 1
    out = Path(output).resolve()
    source.check(encoder)
    records = _gather(source.record(), group, world)
    if any(r != records[0] for r in records):
        bad = next(i for i, r in enumerate(records) if r != records[0])
        raise EmbedError(f"the source differs between rank 0 and rank {bad} "
                         f"({_describe_source(records[0])}): every rank must see the same "
                         "files")
    count, dim = len(source), int(encoder.embed_dim)
    chunks = -(-count // chunk_size)

    lock = _OutputLock(out) if rank == 0 else None
    try:
        outcome: Tuple[str, Any]
        job = None
        error: Optional[BaseException] = None
        if rank == 0:
            try:
                if out.exists() and not out.is_dir():
                    raise EmbedError(f"--output {out}: exists and is not a directory")
                lock.acquire()
                job = job_record(model_identity(encoder, os.path.abspath(load)), source,
                                 chunk_size, dtype)
                outcome = _prepare(out, job, force, chunks, dim)
            except BaseException as e:  # noqa: BLE001 - told to every rank, then raised here
                error, outcome = e, ("error", str(e))
        else:
            outcome = ("", None)
        outcome = _collective(outcome, group, rank, world)
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise EmbedError(outcome[1])
        summary_base = {"output": str(out), "store": str(out / MANIFEST),
                        "rejects": str(out / REJECTS), "kind": source.kind, "source": source.type,
                        "total": count, "chunks": chunks, "world_size": world, "dim": dim}
        if outcome[0] == "complete":
            if rank != 0:
                return {"rank": rank}
            manifest = outcome[1]
            return {"status": "complete", **summary_base, "embedded": manifest.get("count"),
                    "rejected": _count_lines(out / REJECTS), "resumed_chunks": chunks,
                    "processed": 0, "embed_seconds": 0.0, "items_per_s": None,
                    "index": (manifest.get("index") or {}).get("type")}

        done = set(outcome[1])
        missing = [c for c in range(chunks) if c not in done]
        mine = missing[rank::world]
        parts = out / PARTS
        if rank == 0:
            logger.info("%d %s items in %d chunk(s) of %d: %d done before, %d to embed on %d "
                        "rank(s)", count, source.kind, chunks, chunk_size, len(done), len(missing),
                        world)
        todo = sum(_chunk_bounds(c, chunk_size, count)[1] - _chunk_bounds(c, chunk_size, count)[0]
                   for c in mine)
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=todo, desc="m2-embed" + (f" (rank 0 of {world})" if world > 1 else ""),
                       unit=source.kind, dynamic_ncols=True, smoothing=0.1)
        sleep = float(os.environ.get(TEST_SLEEP_ENV) or 0)
        t0 = time.perf_counter()
        processed = 0
        try:
            for c in mine:
                lo, hi = _chunk_bounds(c, chunk_size, count)
                emb, items, rejects = embed_chunk(source, encoder, lo, hi, batch_size,
                                                  on_item=bar.update if bar is not None else None)
                _write_part(parts, c, lo, hi, emb, items, rejects)
                processed += hi - lo
                if sleep:
                    time.sleep(sleep)
        finally:
            if bar is not None:
                bar.close()
        if world > 1:  # also the barrier: every rank's parts are written
            totals = torch.tensor([processed], dtype=torch.int64)
            dist.all_reduce(totals, group=group)
            processed = int(totals[0])
        embed_seconds = time.perf_counter() - t0
        if rank != 0:
            return {"rank": rank}
        rows, rejected = _merge(out, source, job, chunks, dim, index_type, index_options)
        return {"status": "written", **summary_base, "embedded": rows, "rejected": rejected,
                "resumed_chunks": len(done), "processed": processed,
                "embed_seconds": round(embed_seconds, 3),
                "items_per_s": round(processed / embed_seconds, 2) if processed else None,
                "index": index_type}
    finally:
        if lock is not None:
            lock.release(remove=True)
