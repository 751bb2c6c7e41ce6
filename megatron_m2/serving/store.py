"""Embedding stores: what ``m2-embed`` writes and ``m2-serve`` searches.

A store is one directory::

    store.json              manifest (below)
    embeddings.safetensors  tensor "embeddings": float32 [N, D], L2-normalised, row i = item i
    items.jsonl             one JSON object per row, in row order: {"id": ..., <source fields>}
    index.faiss             optional FAISS index over the rows (``store.json`` names its type)

``store.json``::

    {"format": "megatron_m2.embeddings", "format_version": 1,
     "kind": "image" | "text", "count": N, "dim": D,
     "model": {...model identity, see model_identity()...},
     "source": {"type": "folder" | "dataset" | "text", "path": ..., ...},
     "index": null | {"type": "flat" | "hnsw" | "ivf", "file": "index.faiss", "metric": "ip"},
     "created_by": "megatron_m2 X.Y.Z"}

Item fields by source: an image folder gives ``{"id", "path"}`` (``path`` relative to the
folder, which ``source.path`` names), an indexed dataset ``{"id", "index", "caption"}``
(sample number and its first caption, decoded), a text file ``{"id", "line", "text"}``.
``id`` is unique within a store.

Every file is written to a temporary name and renamed into place, ``store.json`` last: a
directory whose ``store.json`` exists is complete. Scores are cosine similarities (inner products
of unit vectors): exact with no index or a ``flat`` index, approximate with ``hnsw``/``ivf``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = ["FORMAT", "FORMAT_VERSION", "INDEX_TYPES", "StoreError", "EmbeddingStore",
           "model_identity", "write_store", "build_index", "same_model"]

FORMAT = "megatron_m2.embeddings"
FORMAT_VERSION = 1
MANIFEST = "store.json"
EMBEDDINGS = "embeddings.safetensors"
ITEMS = "items.jsonl"
INDEX = "index.faiss"
KINDS = ("image", "text")
INDEX_TYPES = ("flat", "hnsw", "ivf")


class StoreError(ValueError):
    """A store that is missing, incomplete, malformed or inconsistent (the message names the
    file and what is wrong)."""


def model_identity(encoder, source: Union[str, os.PathLike]) -> Dict[str, Any]:
    """What identifies the embeddings' model: the checkpoint it was loaded from, the head,
    a SHA-256 over its canonical weights (names, dtypes, shapes, bytes, in name order) and
    tokenizer, and its configuration. Two stores are comparable exactly when their
    ``weights_sha256``, ``tokenizer_sha256`` and ``head`` agree (:func:`same_model`)."""
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    tok = getattr(encoder, "tokenizer", None)
    tok_sha = hashlib.sha256(tok.model_bytes()).hexdigest() if tok is not None else None
    return {"source": str(source), "head": encoder.head, "weights_sha256": h.hexdigest(),
            "tokenizer_sha256": tok_sha,
            "text_style": getattr(tok, "text_style", None) if tok is not None else None,
            "embed_dim": int(encoder.embed_dim), "logit_scale": float(encoder.logit_scale),
            "config": encoder.cfg.to_dict()}


def same_model(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two :func:`model_identity` records describe the same weights, tokenizer and head."""
    keys = ("weights_sha256", "tokenizer_sha256", "head")
    return all(a.get(k) == b.get(k) for k in keys)


def _atomic(path: Path, write) -> None:
    """Write through a temporary name and rename into place, with the permissions ``open()``
    would give (safetensors and FAISS create owner-only files; a server running as another
    user must read them)."""
    from ..utils.files import apply_umask

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        apply_umask(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def build_index(embeddings: torch.Tensor, index_type: str = "flat", *, hnsw_m: int = 32,
                ivf_lists: Optional[int] = None, seed: int = 0):
    """A FAISS inner-product index over ``embeddings`` ([N, D] float32, unit rows).

    ``flat`` is exact (``IndexFlatIP``); ``hnsw`` is a graph index (``IndexHNSWFlat``, inner
    product, ``hnsw_m`` links per node); ``ivf`` clusters into ``ivf_lists`` lists (default
    ``4·sqrt(N)``, at most N) searched ``nprobe = max(1, lists // 8)`` at a time. Needs the
    ``faiss`` module (``pip install faiss-cpu``)."""
    if index_type not in INDEX_TYPES:
        raise StoreError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    try:
        import faiss
    except ImportError:
        raise StoreError("building an index needs FAISS: pip install faiss-cpu "
                         "(or megatron_m2[serve])") from None
    x = embeddings.detach().float().contiguous().numpy()
    n, d = x.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        if n < 1:
            raise StoreError("an ivf index needs at least one embedding")
        lists = ivf_lists or max(1, min(n, int(4 * n ** 0.5)))
        if not 1 <= lists <= n:
            raise StoreError(f"--ivf-lists must be in [1, {n}] for {n} embeddings, got {lists}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = max(1, lists // 8)
    if n:
        index.add(x)
    return index


def write_store(directory: Union[str, os.PathLike], embeddings: torch.Tensor,
                items: Sequence[Mapping[str, Any]], *, kind: str, model: Mapping[str, Any],
                source: Mapping[str, Any], index_type: Optional[str] = None,
                index_options: Optional[Mapping[str, Any]] = None) -> "EmbeddingStore":
    """Write a complete store (``store.json`` last) and return it opened."""
    from safetensors.torch import save_file

    from ..version import __version__

    directory = Path(directory)
    if kind not in KINDS:
        raise StoreError(f"kind must be one of {KINDS}, got {kind!r}")
    emb = embeddings.detach().float().cpu().contiguous()
    if emb.dim() != 2 or emb.shape[0] != len(items):
        raise StoreError(f"{len(items)} items but embeddings of shape {tuple(emb.shape)}")
    ids = [str(it.get("id")) for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise StoreError(f"item ids must be unique; {dup!r} occurs more than once")
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / MANIFEST
    if manifest_path.exists():  # rewriting: the old manifest goes first (incomplete until done)
        manifest_path.unlink()
    _atomic(directory / EMBEDDINGS, lambda p: save_file(
        {"embeddings": emb}, str(p), metadata={"format": FORMAT}))  # one key: a stable header

    def _items(p):
        with open(p, "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps(dict(it), ensure_ascii=False) + "\n")
    _atomic(directory / ITEMS, _items)
    index_record = None
    if index_type is not None:
        import faiss

        index = build_index(emb, index_type, **dict(index_options or {}))
        _atomic(directory / INDEX, lambda p: faiss.write_index(index, str(p)))
        index_record = {"type": index_type, "file": INDEX, "metric": "ip",
                        **{k: v for k, v in dict(index_options or {}).items() if v is not None}}
    elif (directory / INDEX).exists():
        (directory / INDEX).unlink()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                "count": int(emb.shape[0]), "dim": int(emb.shape[1]), "model": dict(model),
                "source": dict(source), "index": index_record,
                "created_by": f"megatron_m2 {__version__}"}
    _atomic(manifest_path, lambda p: p.write_text(
        json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"))
    return EmbeddingStore.open(directory)


@dataclass
class EmbeddingStore:
    """An opened store: ``embeddings`` [N, D], ``items`` (dicts, row order), ``manifest``,
    and the FAISS index when the store has one."""

    directory: Path
    manifest: Dict[str, Any]
    embeddings: torch.Tensor
    items: List[Dict[str, Any]]
    index: Any = None
    _row_of: Dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def model(self) -> Dict[str, Any]:
        return self.manifest["model"]

    @property
    def ids(self) -> List[str]:
        return [str(it["id"]) for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def row(self, item_id: str) -> int:
        """Row number of an item id (``KeyError`` naming it when absent)."""
        if not self._row_of:
            self._row_of = {str(it["id"]): i for i, it in enumerate(self.items)}
        try:
            return self._row_of[str(item_id)]
        except KeyError:
            raise KeyError(f"{self.directory}: no item with id {item_id!r}") from None

    @classmethod
    def open(cls, directory: Union[str, os.PathLike], load_index: bool = True
             ) -> "EmbeddingStore":
        """Open and check a store written by :func:`write_store` (``StoreError`` when it is
        incomplete or inconsistent)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        mpath = directory / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{directory}: not an embedding store (no {MANIFEST}; an "
                             f"interrupted m2-embed resumes when run again)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"{mpath}: unreadable manifest: {e}") from None
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{mpath}: format_version {manifest.get('format_version')!r}; "
                             f"this version reads {FORMAT_VERSION}")
        try:
            emb = load_file(str(directory / EMBEDDINGS))["embeddings"]
        except (OSError, SafetensorError, KeyError) as e:
            raise StoreError(f"{directory / EMBEDDINGS}: {e}") from None
        items = []
        ipath = directory / ITEMS
        try:
            with open(ipath, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        items.append(json.loads(line))
                    except ValueError as e:
                        raise StoreError(f"{ipath}:{n}: not JSON: {e}") from None
        except OSError as e:
            raise StoreError(f"{ipath}: {e}") from None
        count, dim = manifest.get("count"), manifest.get("dim")
        if tuple(emb.shape) != (count, dim) or len(items) != count:
            raise StoreError(f"{directory}: manifest says {count} x {dim}, embeddings are "
                             f"{tuple(emb.shape)} and items.jsonl has {len(items)} rows")
        index = None
        rec = manifest.get("index")
        if rec and load_index:
            try:
                import faiss
            except ImportError:
                raise StoreError(f"{directory} has a FAISS index: pip install faiss-cpu "
                                 "(or open it with load_index=False for exact search)") from None
            index = faiss.read_index(str(directory / rec["file"]))
            if index.ntotal != count:
                raise StoreError(f"{directory / rec['file']}: {index.ntotal} vectors, "
                                 f"expected {count}")
        return cls(directory, manifest, emb, items, index)

    def search(self, queries: torch.Tensor, k: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` rows for each query: ``(scores [Q, k'], rows [Q, k'])`` best first,
        ``k' = min(k, N)``. Uses the FAISS index when there is one, else exact search (ties
        rank the lower row first)."""
        q = queries.detach().float().cpu()
        if q.dim() == 1:
            q = q[None]
        if q.shape[-1] != self.embeddings.shape[1]:
            raise StoreError(f"queries have dimension {q.shape[-1]}, the store "
                             f"{self.directory} {self.embeddings.shape[1]}")
        k = min(int(k), len(self))
        if k <= 0:
            return torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.int64)
        if self.index is not None:
            scores, rows = self.index.search(q.contiguous().numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(rows).long()
        s = q @ self.embeddings.T
        # stable: equal scores keep row order
        order = torch.sort(s, dim=1, descending=True, stable=True)
        return order.values[:, :k], order.indices[:, :k]
